-- Identity is not event-sourced: password hashes and refresh tokens must be
-- erasable and must never travel on the bus. See README "Accounts".
CREATE TABLE users (
    user_id        UUID        PRIMARY KEY,
    email          TEXT        NOT NULL UNIQUE,
    display_name   TEXT        NOT NULL,
    password_hash  TEXT        NOT NULL,
    role           TEXT        NOT NULL CHECK (role IN ('user', 'admin')),
    time_zone      TEXT        NOT NULL DEFAULT 'UTC',
    failed_logins  INT         NOT NULL DEFAULT 0,
    locked_until   TIMESTAMPTZ,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Rotating refresh tokens, stored as SHA-256 of the token. A token used twice
-- revokes its whole family (reuse detection).
CREATE TABLE refresh_tokens (
    token_hash  BYTEA       PRIMARY KEY,
    family_id   UUID        NOT NULL,
    user_id     UUID        NOT NULL REFERENCES users (user_id),
    issued_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

-- Security-relevant actions. Never holds a secret, a token or a password.
CREATE TABLE audit_log (
    id        BIGSERIAL   PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor     UUID,
    action    TEXT        NOT NULL,
    subject   TEXT,
    ip        TEXT,
    detail    JSONB       NOT NULL DEFAULT '{}'
);
