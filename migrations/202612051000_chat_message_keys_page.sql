-- A timeline page opens the keys of 50 consecutive messages of one room. By
-- `message_id` alone they were 50 probes into a table written in send order
-- across every room: 50 index pages and 50 heap pages, half of a page's time in
-- Postgres. Keyed by (room, message), a page's keys lie in the room's own small
-- part of the index (in one or two leaf pages when the ids are UUIDv7, sent
-- without a client message id; anywhere in the room's part when they derive
-- from one), and with the wrapped key in the index they are read without the
-- table (an index-only scan once vacuum has marked the pages all-visible). The
-- index on `room_id` alone goes: this one's prefix serves a room's erasure.
--
-- Erasure is unchanged by the copy in the index: a DELETE leaves the dead
-- index entry until vacuum removes it, exactly as it leaves the dead heap row.
CREATE INDEX chat_message_keys_page ON chat_message_keys (room_id, message_id) INCLUDE (key_version, wrapped);
DROP INDEX chat_message_keys_room;
