-- Reminders (projector `reminders`) and notification inboxes (projector `notifications`).
-- proj_reminders is also the scheduler's due work: active rows by next_due_at.

CREATE TABLE proj_reminders (
    reminder_id  UUID PRIMARY KEY,
    owner        UUID        NOT NULL,
    content      TEXT        NOT NULL,
    next_due_at  TIMESTAMPTZ,                 -- null: done or cancelled
    local        TIMESTAMP   NOT NULL,        -- wall-clock time of the next occurrence, in `zone`
    zone         TEXT        NOT NULL,
    recurrence   TEXT        NOT NULL,
    priority     TEXT        NOT NULL,
    room_id      UUID,
    status       TEXT        NOT NULL CHECK (status IN ('active', 'done', 'cancelled')),
    fired        INT         NOT NULL DEFAULT 0,
    last_fired_at TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    version      BIGINT      NOT NULL,
    position     BIGINT      NOT NULL
);
CREATE INDEX proj_reminders_owner ON proj_reminders (owner, created_at, reminder_id);
CREATE INDEX proj_reminders_due ON proj_reminders (next_due_at) WHERE status = 'active';

CREATE TABLE proj_notifications (
    notification_id UUID PRIMARY KEY,
    user_id         UUID        NOT NULL,
    category        TEXT        NOT NULL,
    title           TEXT        NOT NULL,
    body            TEXT,
    link            TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    read_at         TIMESTAMPTZ,
    position        BIGINT      NOT NULL
);
CREATE INDEX proj_notifications_user ON proj_notifications (user_id, position DESC);
CREATE INDEX proj_notifications_unread ON proj_notifications (user_id) WHERE read_at IS NULL;
