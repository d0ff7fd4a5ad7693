-- Outbound webhooks (SPEC §6).
--
-- webhook_secrets is a keystore table, not a read model: each endpoint's
-- signing secret sealed (AES-256-GCM) by the master key. A rebuild never
-- touches it; deleting an endpoint deletes its row in the handler's
-- transaction, so nothing can sign for it again.
CREATE TABLE webhook_secrets (
    endpoint_id UUID PRIMARY KEY,
    sealed      BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Read model of projector `webhooks`: the endpoints.
CREATE TABLE proj_webhooks (
    webhook_id  UUID PRIMARY KEY,
    owner       UUID NOT NULL,
    url         TEXT NOT NULL,
    filter      TEXT[] NOT NULL,
    description TEXT,
    enabled     BOOLEAN NOT NULL DEFAULT true,
    deleted     BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL,
    version     BIGINT NOT NULL,
    position    BIGINT NOT NULL
);
CREATE INDEX proj_webhooks_owner ON proj_webhooks (owner, created_at, webhook_id) WHERE NOT deleted;

-- Who owns a stream whose events do not all say so (wallet accounts,
-- reminders, itineraries): learnt from the event that creates it.
CREATE TABLE webhook_stream_owners (
    stream_id TEXT PRIMARY KEY,
    owner     UUID NOT NULL
);

-- The delivery ledger: one row per (endpoint, event), forever. Not a read
-- model: a rebuild of projector `webhooks` re-derives endpoints but never
-- queues a delivery again (see webhook_high_water).
CREATE TABLE webhook_deliveries (
    delivery_id     UUID PRIMARY KEY,
    webhook_id      UUID NOT NULL,
    owner           UUID NOT NULL,
    event_id        UUID NOT NULL,
    position        BIGINT NOT NULL,
    event_type      TEXT NOT NULL,
    body            JSONB NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempts        INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ,
    last_attempt_at TIMESTAMPTZ,
    last_status     INT,
    last_error      TEXT,
    delivered_at    TIMESTAMPTZ,
    dead_at         TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (webhook_id, position);

-- The highest position projector `webhooks` has ever queued from. Events at
-- or below it are being re-applied (a rebuild): they update endpoints but fire
-- nothing, and the deliverer waits until the projector is past it again.
CREATE TABLE webhook_high_water (
    id       BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    position BIGINT NOT NULL
);
INSERT INTO webhook_high_water (id, position) VALUES (true, 0);
