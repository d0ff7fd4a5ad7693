-- Wallet read models (projector `wallet`). Disposable: rebuilt from events.
CREATE TABLE proj_wallet_accounts (
    account_id    UUID        PRIMARY KEY,
    owner_id      UUID,
    currency      TEXT        NOT NULL,
    kind          TEXT        NOT NULL,
    posted        BIGINT      NOT NULL,
    version       BIGINT      NOT NULL,
    opened_at     TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX proj_wallet_accounts_owner ON proj_wallet_accounts (owner_id);

-- One row per ledger leg. `amount` is signed: credits positive, debits negative.
CREATE TABLE proj_wallet_entries (
    account_id    UUID        NOT NULL,
    version       BIGINT      NOT NULL,
    position      BIGINT      NOT NULL,
    transfer_id   UUID        NOT NULL,
    kind          TEXT        NOT NULL,
    amount        BIGINT      NOT NULL,
    counterparty  UUID        NOT NULL,
    reference     TEXT,
    balance_after BIGINT      NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account_id, version)
);
