-- Chat moderation (flags, mutes) and room notes: read models of projector `chat`,
-- plus the screener's queue (its own state, fed by projector `screen`).

-- One row per message with an open flag: the classifier's verdict and/or reports.
CREATE TABLE proj_chat_flags (
    message_id        UUID PRIMARY KEY,
    room_id           UUID NOT NULL,
    sender            UUID NOT NULL,
    classifier_label  TEXT,                       -- null: only reported
    classifier_score  SMALLINT,                   -- thousandths
    reports           INT NOT NULL DEFAULT 0,
    report_reasons    TEXT[] NOT NULL DEFAULT '{}',
    first_flagged_at  TIMESTAMPTZ NOT NULL,
    last_flagged_at   TIMESTAMPTZ NOT NULL,
    position          BIGINT NOT NULL             -- of the latest flag: the list's order and cursor
);
CREATE INDEX proj_chat_flags_room ON proj_chat_flags (room_id, position DESC);
CREATE INDEX proj_chat_flags_all ON proj_chat_flags (position DESC);

-- Mutes that were set (a row whose `until` has passed is no longer in force).
CREATE TABLE proj_chat_mutes (
    room_id  UUID NOT NULL,
    user_id  UUID NOT NULL,
    until    TIMESTAMPTZ NOT NULL,
    reason   TEXT NOT NULL,
    muted_by UUID,                                -- null: automatic, after flags
    PRIMARY KEY (room_id, user_id)
);

-- Pinned notes; the body is sealed under the note's own key (chat_message_keys).
CREATE TABLE proj_chat_notes (
    note_id     UUID PRIMARY KEY,
    room_id     UUID NOT NULL,
    author      UUID NOT NULL,
    priority    TEXT NOT NULL CHECK (priority IN ('low', 'normal', 'high')),
    body        JSONB NOT NULL,
    key_version INT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    position    BIGINT NOT NULL
);
CREATE INDEX proj_chat_notes_room ON proj_chat_notes (room_id, position);
CREATE INDEX proj_chat_notes_high ON proj_chat_notes (author, position) WHERE priority = 'high';

-- Messages waiting to be screened, oldest first. Rows are claimed with
-- FOR UPDATE SKIP LOCKED, so several screeners share the queue.
CREATE TABLE chat_screen_queue (
    message_id UUID PRIMARY KEY,
    room_id    UUID NOT NULL,
    position   BIGINT NOT NULL,
    body       JSONB NOT NULL,                    -- sealed, as in the event
    queued_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX chat_screen_queue_position ON chat_screen_queue (position);

-- Which room each screened message is in: an edit (which does not name its room)
-- is queued for screening again.
CREATE TABLE chat_screen_rooms (
    message_id UUID PRIMARY KEY,
    room_id    UUID NOT NULL
);
CREATE INDEX chat_screen_rooms_room ON chat_screen_rooms (room_id);
