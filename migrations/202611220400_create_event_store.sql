-- The event store: one append-only log, one row per event.
--
-- `position` is the global order. It is assigned from `event_log_head` while the
-- appending transaction holds that row's lock, and the lock is held until commit,
-- so positions become visible strictly in increasing order and without holes:
-- a reader that has seen position N can never later find a committed N-1.
-- (Sequences do not give this: their values are taken at insert but become
-- visible at commit, in any order. See README "Global position".)
CREATE TABLE events (
    position        BIGINT      PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    stream_id       TEXT        NOT NULL,
    version         BIGINT      NOT NULL CHECK (version > 0),
    domain          TEXT        NOT NULL,
    event_type      TEXT        NOT NULL,
    schema_version  INT         NOT NULL,
    payload         JSONB       NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    correlation_id  UUID        NOT NULL,
    causation_id    UUID        NOT NULL,
    actor           UUID,
    CONSTRAINT events_stream_version UNIQUE (stream_id, version)
);
-- No other index: every extra index is paid on each append. Projectors read
-- short position ranges through the primary key and filter by domain there.

-- The single row whose lock orders commits. `position` is the last position handed out.
CREATE TABLE event_log_head (
    id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    position BIGINT  NOT NULL
);
INSERT INTO event_log_head (id, position) VALUES (TRUE, 0);

-- Aggregate snapshots: state after `version`, so loading is snapshot + tail.
CREATE TABLE snapshots (
    stream_id  TEXT        PRIMARY KEY,
    version    BIGINT      NOT NULL,
    state      JSONB       NOT NULL,
    taken_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every command ever decided, with the answer it got. Dedup lives here forever,
-- not only inside JetStream's duplicate window.
CREATE TABLE command_ledger (
    command_id    UUID        PRIMARY KEY,
    principal     UUID,
    command_type  TEXT        NOT NULL,
    stream_id     TEXT        NOT NULL,
    request_hash  TEXT        NOT NULL,
    status        SMALLINT    NOT NULL,
    answer        JSONB       NOT NULL,
    position      BIGINT,
    decided_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- How far the relay has published the log to the EVENTS stream.
CREATE TABLE relay_checkpoint (
    name       TEXT        PRIMARY KEY,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per projector; written in the same transaction as its read-model rows.
CREATE TABLE proj_checkpoints (
    model      TEXT        PRIMARY KEY,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
