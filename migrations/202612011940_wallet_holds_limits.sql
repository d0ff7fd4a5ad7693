-- Holds (pending transfers) and limits of the wallet read model (projector `wallet`).
-- Disposable like the rest of it: rebuilt from the events.
ALTER TABLE proj_wallet_accounts ADD COLUMN pending BIGINT NOT NULL DEFAULT 0;
ALTER TABLE proj_wallet_accounts ADD COLUMN limits JSONB;

-- One row per hold. `status` is pending until a HoldReleased ends it
-- (posted, voided, expired); the expiry scheduler reads the due pending ones.
CREATE TABLE proj_wallet_holds (
    hold_id      UUID        PRIMARY KEY,
    from_account UUID        NOT NULL,
    to_account   UUID        NOT NULL,
    amount       BIGINT      NOT NULL,
    posted       BIGINT      NOT NULL DEFAULT 0,
    status       TEXT        NOT NULL,
    reference    TEXT,
    expires_at   TIMESTAMPTZ NOT NULL,
    placed_at    TIMESTAMPTZ NOT NULL,
    ended_at     TIMESTAMPTZ,
    position     BIGINT      NOT NULL
);
CREATE INDEX proj_wallet_holds_due ON proj_wallet_holds (expires_at) WHERE status = 'pending';
CREATE INDEX proj_wallet_holds_from ON proj_wallet_holds (from_account);
CREATE INDEX proj_wallet_holds_to ON proj_wallet_holds (to_account);

-- Disputes: one row per dispute; a wallet is frozen while one of its rows is open.
ALTER TABLE proj_wallet_accounts ADD COLUMN frozen BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE proj_wallet_disputes (
    dispute_id  UUID        PRIMARY KEY,
    transfer_id UUID        NOT NULL,
    payee       UUID        NOT NULL,
    payer       UUID        NOT NULL,
    amount      BIGINT      NOT NULL,
    held        BIGINT      NOT NULL,
    status      TEXT        NOT NULL,
    reason      TEXT        NOT NULL,
    evidence    JSONB       NOT NULL DEFAULT '[]',
    opened_at   TIMESTAMPTZ NOT NULL,
    resolved_at TIMESTAMPTZ,
    position    BIGINT      NOT NULL
);
CREATE INDEX proj_wallet_disputes_payee ON proj_wallet_disputes (payee) WHERE status = 'open';
