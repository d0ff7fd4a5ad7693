-- Realtime: the feed that WebSocket subscriptions and GET /v1/sync replay and
-- stream from (projector `feed`), and read-model epochs for their cursors.

-- A read model's epoch changes whenever its checkpoint moves backwards (a
-- rebuild): cursors carry the epoch they were issued under, and a cursor of an
-- older epoch is refused (`recovered: false`), so a client reloads instead of
-- mixing two generations of a read model.
ALTER TABLE proj_checkpoints ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;

CREATE FUNCTION proj_checkpoints_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.position < OLD.position THEN
        NEW.epoch := OLD.epoch + 1;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER proj_checkpoints_epoch BEFORE UPDATE ON proj_checkpoints
    FOR EACH ROW EXECUTE FUNCTION proj_checkpoints_epoch();

-- Tell listening gateways that the feed moved (delivered at commit).
CREATE FUNCTION proj_feed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model = 'feed' THEN
        PERFORM pg_notify('mathia_feed', NEW.position::text);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER proj_feed_notify AFTER UPDATE ON proj_checkpoints
    FOR EACH ROW EXECUTE FUNCTION proj_feed_notify();

-- One row per (topic, event): `room:<uuid>` or `user:<uuid>`. Bodies stay sealed
-- as in the events; the gateway opens them for the subscriber.
CREATE TABLE proj_feed (
    topic       TEXT        NOT NULL,
    position    BIGINT      NOT NULL,
    kind        TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, position)
);
CREATE INDEX proj_feed_position ON proj_feed (position);

-- Rows at or below `position` were pruned: a cursor older than that cannot be replayed.
CREATE TABLE proj_feed_floor (
    one      BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    position BIGINT  NOT NULL
);
INSERT INTO proj_feed_floor (position) VALUES (0);

-- The feed projector's own lookups: the room of each message, the owner of each wallet account.
CREATE TABLE feed_message_rooms (
    message_id UUID PRIMARY KEY,
    room_id    UUID NOT NULL
);
CREATE TABLE feed_account_owners (
    account_id UUID PRIMARY KEY,
    owner_id   UUID NOT NULL
);
