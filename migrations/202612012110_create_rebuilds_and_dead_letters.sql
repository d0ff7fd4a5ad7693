-- Operations: projection rebuilds into shadow tables (`mathia replay`) and
-- events a projector could not apply (`mathia deadletters`).

-- A rebuild in progress: its shadow schema holds a copy of the model's tables,
-- filled from the log; `position` moves in the same transaction as the shadow
-- rows, so an interrupted rebuild resumes where it stopped.
CREATE TABLE proj_rebuilds (
    model         TEXT        PRIMARY KEY,
    shadow_schema TEXT        NOT NULL,
    from_position BIGINT      NOT NULL,
    position      BIGINT      NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- An event a projector could not apply ('parked', with the error), and the
-- later events of the same stream held back behind it ('waiting'), so only that
-- stream waits while every other stream flows. `mathia deadletters retry|skip`
-- settles them; skipped events stay here as the record of what was skipped.
CREATE TABLE proj_deadletters (
    id         BIGSERIAL   PRIMARY KEY,
    model      TEXT        NOT NULL,
    position   BIGINT      NOT NULL,
    stream_id  TEXT        NOT NULL,
    event_id   UUID        NOT NULL,
    event_type TEXT        NOT NULL,
    status     TEXT        NOT NULL CHECK (status IN ('parked', 'waiting', 'skipped')),
    error      TEXT,
    attempts   INT         NOT NULL DEFAULT 0,
    parked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (model, position)
);
CREATE INDEX proj_deadletters_open ON proj_deadletters (model, stream_id, position)
    WHERE status <> 'skipped';
