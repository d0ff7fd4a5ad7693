-- Requests to the @mathia assistant waiting for an answer (projector `assistant`).
-- Rows are claimed with FOR UPDATE SKIP LOCKED, so several workers share them.
CREATE TABLE assistant_queue (
    message_id UUID PRIMARY KEY,
    room_id    UUID        NOT NULL,
    sender     UUID        NOT NULL,
    body       JSONB       NOT NULL,             -- sealed, as in the event
    position   BIGINT      NOT NULL,
    queued_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX assistant_queue_position ON assistant_queue (position);
