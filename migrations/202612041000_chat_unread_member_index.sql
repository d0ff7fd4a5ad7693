-- Every post of a run adds to the unread row of each other member of its room:
-- the statement finds a room's rows by (room_id, thread_root) and then updates
-- each by member. With the member in the index, each of those lookups is one
-- index entry; it was every row of the room, filtered. The rows are hot
-- counters (each post updates ten of them): half-empty pages keep their new
-- versions on the same page (HOT updates, no new index entries).
CREATE INDEX proj_chat_unread_member ON proj_chat_unread (room_id, thread_root, user_id);
DROP INDEX proj_chat_unread_room;
ALTER TABLE proj_chat_unread SET (fillfactor = 50);
-- An interrupted chat rebuild was shaped with the old indexes: it starts again.
DROP SCHEMA IF EXISTS mathia_rebuild_chat CASCADE;
DELETE FROM proj_rebuilds WHERE model = 'chat';
