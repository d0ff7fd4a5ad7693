-- Payment provider webhooks (gateway-owned tables, like the audit log: the
-- provider's deliveries are facts about the outside world, not our events).
-- The inbox keeps every verified delivery once, keyed by the provider's event id.
CREATE TABLE payment_webhook_inbox (
    provider    TEXT        NOT NULL,
    event_id    TEXT        NOT NULL,
    event_type  TEXT        NOT NULL,
    payment_id  TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

-- One row per provider payment; `rank` only grows (pending 1 < completed/failed 2),
-- so a late "pending" never undoes "completed".
CREATE TABLE payment_intents (
    provider      TEXT        NOT NULL,
    payment_id    TEXT        NOT NULL,
    wallet_id     UUID        NOT NULL,
    amount        BIGINT      NOT NULL,
    currency      TEXT        NOT NULL,
    status        TEXT        NOT NULL,
    rank          SMALLINT    NOT NULL,
    deposit_id    UUID,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, payment_id)
);
