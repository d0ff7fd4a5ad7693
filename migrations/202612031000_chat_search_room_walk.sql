-- Search reads a room's newest messages first (thread replies too) before it asks
-- the GIN index: a common term fills its page from a few rows there, where the
-- GIN index yields thousands of hits to fetch and sort. That walk needs every
-- message of a room in position order; the timeline index holds the main
-- timeline only. The index on (room_id, sent_at) goes: no statement reads it
-- (jump to date uses `proj_chat_messages_at`, search filters dates on the rows).
CREATE INDEX proj_chat_messages_room ON proj_chat_messages (room_id, position);
DROP INDEX proj_chat_messages_time;
-- An interrupted chat rebuild was shaped with the old indexes: it starts again.
DROP SCHEMA IF EXISTS mathia_rebuild_chat CASCADE;
DELETE FROM proj_rebuilds WHERE model = 'chat';
