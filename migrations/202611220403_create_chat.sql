-- Keystore (not read models: never rebuilt, never truncated by a replay).
-- A row here is the only way to open what the log holds sealed; deleting it is erasure.
CREATE TABLE chat_room_keys (
    room_id     UUID        NOT NULL,
    version     INT         NOT NULL,
    wrapped     BYTEA       NOT NULL,   -- the room data key, wrapped by the master key
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, version)
);
CREATE TABLE chat_message_keys (
    message_id  UUID        PRIMARY KEY,
    room_id     UUID        NOT NULL,
    key_version INT         NOT NULL,
    wrapped     BYTEA       NOT NULL    -- the message key, wrapped by the room data key
);
CREATE INDEX chat_message_keys_room ON chat_message_keys (room_id);

-- Chat read models (projector `chat`). Disposable: rebuilt from events.
CREATE TABLE proj_chat_rooms (
    room_id       UUID        PRIMARY KEY,
    name          TEXT        NOT NULL,
    topic         TEXT,
    visibility    TEXT        NOT NULL,
    archived      BOOLEAN     NOT NULL DEFAULT false,
    created_by    UUID        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    key_version   INT         NOT NULL,
    version       BIGINT      NOT NULL,
    last_position BIGINT      NOT NULL DEFAULT 0
);
CREATE INDEX proj_chat_rooms_public ON proj_chat_rooms (created_at) WHERE visibility = 'public' AND NOT archived;

-- One row per (room, user) who was ever invited or joined; `state` is where they stand now.
CREATE TABLE proj_chat_members (
    room_id        UUID        NOT NULL,
    user_id        UUID        NOT NULL,
    state          TEXT        NOT NULL,  -- invited, joined, left, kicked, banned
    role           TEXT,
    since          TIMESTAMPTZ NOT NULL,
    since_position BIGINT      NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX proj_chat_members_user ON proj_chat_members (user_id, state);

CREATE TABLE proj_chat_email_invites (
    room_id    UUID        NOT NULL,
    email      TEXT        NOT NULL,
    invited_by UUID        NOT NULL,
    at         TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (room_id, email)
);
CREATE INDEX proj_chat_email_invites_email ON proj_chat_email_invites (email);

-- Messages: bodies stay sealed here too; the gateway opens them for members.
CREATE TABLE proj_chat_messages (
    message_id            UUID        PRIMARY KEY,
    room_id               UUID        NOT NULL,
    position              BIGINT      NOT NULL,
    thread_root           UUID,
    sender                UUID        NOT NULL,
    kind                  TEXT        NOT NULL,
    body                  JSONB,               -- sealed; null once redacted
    attachment            JSONB,               -- names sealed; null once redacted
    quote                 UUID,
    mentions              UUID[]      NOT NULL,
    mentions_assistant    BOOLEAN     NOT NULL,
    client_message_id     TEXT,
    sent_at               TIMESTAMPTZ NOT NULL,
    edited_at             TIMESTAMPTZ,
    edits                 INT         NOT NULL DEFAULT 0,
    redacted_at           TIMESTAMPTZ,
    reactions             JSONB       NOT NULL DEFAULT '{}',  -- emoji → [user ids]
    reply_count           INT         NOT NULL DEFAULT 0,
    latest_reply          UUID,
    latest_reply_position BIGINT
);
CREATE INDEX proj_chat_messages_timeline ON proj_chat_messages (room_id, position) WHERE thread_root IS NULL;
CREATE INDEX proj_chat_messages_thread ON proj_chat_messages (thread_root, position) WHERE thread_root IS NOT NULL;
CREATE INDEX proj_chat_messages_threads ON proj_chat_messages (room_id, latest_reply_position) WHERE reply_count > 0;
CREATE INDEX proj_chat_messages_time ON proj_chat_messages (room_id, sent_at);

-- Earlier bodies of edited messages (sealed under the same message key).
CREATE TABLE proj_chat_edits (
    message_id UUID        NOT NULL,
    edit_no    INT         NOT NULL,
    body       JSONB       NOT NULL,
    replaced_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (message_id, edit_no)
);

-- Unread and mention counts per member, room and timeline (the nil uuid is the main timeline).
CREATE TABLE proj_chat_unread (
    user_id       UUID   NOT NULL,
    room_id       UUID   NOT NULL,
    thread_root   UUID   NOT NULL,
    read_position BIGINT NOT NULL,
    unread        INT    NOT NULL,
    mentions      INT    NOT NULL,
    PRIMARY KEY (user_id, room_id, thread_root)
);
CREATE INDEX proj_chat_unread_room ON proj_chat_unread (room_id, thread_root);

-- Blind search index: keyed tokens of word prefixes; the key is the room's.
CREATE TABLE proj_chat_search (
    room_id    UUID   NOT NULL,
    token      BYTEA  NOT NULL,
    position   BIGINT NOT NULL,
    message_id UUID   NOT NULL,
    PRIMARY KEY (room_id, token, position)
);
CREATE INDEX proj_chat_search_message ON proj_chat_search (message_id);
