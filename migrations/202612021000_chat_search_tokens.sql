-- The blind search index moves onto the message row: `search_tokens` holds the
-- message's keyed tokens (first 8 bytes of each HMAC, as BIGINT, ascending) under
-- a GIN index, instead of one `proj_chat_search` row per token (27 rows per
-- message, each with a B-tree entry at a random place: most of the cost of
-- projecting a post and nearly all of a chat rebuild's). A GIN posting list
-- stores each message once per token in a few bytes, and its pending list turns
-- the inserts into appends. Redaction clears the column with the body.
ALTER TABLE proj_chat_messages ADD COLUMN search_tokens BIGINT[];
UPDATE proj_chat_messages m SET search_tokens = t.tokens
FROM (SELECT message_id,
             array_agg(DISTINCT ('x' || encode(substr(token, 1, 8), 'hex'))::bit(64)::bigint
                       ORDER BY ('x' || encode(substr(token, 1, 8), 'hex'))::bit(64)::bigint) AS tokens
      FROM proj_chat_search GROUP BY message_id) t
WHERE t.message_id = m.message_id;
DROP TABLE proj_chat_search;
CREATE INDEX proj_chat_messages_search ON proj_chat_messages USING gin (search_tokens);
-- An interrupted chat rebuild has the old shape: it starts again.
DROP SCHEMA IF EXISTS mathia_rebuild_chat CASCADE;
DELETE FROM proj_rebuilds WHERE model = 'chat';
