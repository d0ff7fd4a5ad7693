-- Uploaded files (not a read model: never rebuilt, never truncated by a replay).
-- The bytes are in the object store, sealed in chunks under a per-upload file key.
-- Until a message carries the upload, the file key is here, wrapped by the room's
-- data key (so deleting the room erases it). The handler that appends the
-- message erases this copy in the same transaction: from then on the file key
-- lives only inside the message's sealed attachment, under the message key, and
-- redacting the message makes the bytes unrecoverable.
CREATE TABLE chat_uploads (
    upload_id    UUID        PRIMARY KEY,
    room_id      UUID        NOT NULL,
    uploader     UUID        NOT NULL,
    storage_key  TEXT        NOT NULL UNIQUE,
    content_type TEXT        NOT NULL,
    size         BIGINT      NOT NULL,
    sha256       TEXT        NOT NULL,
    key_version  INT,                   -- the room key version wrapping `wrapped_key`
    wrapped_key  BYTEA,                 -- the file key; null once a message carries it
    message_id   UUID,                  -- the message that carries it
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX chat_uploads_room ON chat_uploads (room_id);
CREATE INDEX chat_uploads_uploader ON chat_uploads (uploader, created_at) WHERE message_id IS NULL;
