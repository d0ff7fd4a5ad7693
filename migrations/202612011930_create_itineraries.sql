-- Itinerary read models (projector `itinerary`). Disposable: rebuilt from events.
CREATE TABLE proj_itineraries (
    itinerary_id     UUID        PRIMARY KEY,
    owner_id         UUID        NOT NULL,
    title            TEXT        NOT NULL,
    region           TEXT,
    start_date       DATE        NOT NULL,
    end_date         DATE        NOT NULL,
    zone             TEXT        NOT NULL,
    budget           JSONB       NOT NULL,
    visibility       TEXT        NOT NULL,
    link_token       TEXT        UNIQUE,
    metadata         JSONB       NOT NULL,
    archived         BOOLEAN     NOT NULL DEFAULT false,
    room_id          UUID,
    version          BIGINT      NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    updated_position BIGINT      NOT NULL
);

-- The owner, collaborators and invitations. "My itineraries" walks
-- (user_id, itinerary_id) backwards: UUIDv7 ids make it newest first, and the
-- cursor never moves under concurrent edits.
CREATE TABLE proj_itinerary_members (
    itinerary_id   UUID   NOT NULL,
    user_id        UUID   NOT NULL,
    role           TEXT   NOT NULL CHECK (role IN ('owner', 'editor', 'viewer')),
    state          TEXT   NOT NULL CHECK (state IN ('invited', 'active')),
    since_position BIGINT NOT NULL,
    PRIMARY KEY (itinerary_id, user_id)
);
CREATE INDEX proj_itinerary_members_user ON proj_itinerary_members (user_id, state, itinerary_id DESC);

CREATE TABLE proj_itinerary_items (
    itinerary_id      UUID        NOT NULL,
    item_id           UUID        NOT NULL,
    kind              TEXT        NOT NULL,
    status            TEXT        NOT NULL,
    start_at          TIMESTAMPTZ NOT NULL,
    end_at            TIMESTAMPTZ NOT NULL,
    price_amount      BIGINT,
    price_currency    TEXT,
    provider          TEXT,
    booking_reference TEXT,
    item              JSONB       NOT NULL,
    position          BIGINT      NOT NULL,
    PRIMARY KEY (itinerary_id, item_id)
);
CREATE INDEX proj_itinerary_items_time ON proj_itinerary_items (itinerary_id, start_at, end_at, item_id);

-- The events catalogue.
CREATE TABLE proj_itinerary_listings (
    listing_id UUID        PRIMARY KEY,
    category   TEXT        NOT NULL,
    title      TEXT        NOT NULL,
    place      TEXT        NOT NULL,
    start_at   TIMESTAMPTZ NOT NULL,
    end_at     TIMESTAMPTZ NOT NULL,
    listing    JSONB       NOT NULL,
    position   BIGINT      NOT NULL
);
CREATE INDEX proj_itinerary_listings_place ON proj_itinerary_listings (lower(place), start_at);

-- The trip-room reactor's queue (projector `itinerary-feed`): itinerary changes
-- waiting to be posted into their trip room. Not a read model: its checkpoint
-- is its own, so rebuilding `itinerary` never posts anything again. It holds
-- what the event log holds in clear already (itinerary events are not sealed).
CREATE TABLE itinerary_feed_queue (
    position     BIGINT      PRIMARY KEY,
    event_id     UUID        NOT NULL,
    itinerary_id UUID        NOT NULL,
    actor        UUID,
    text         TEXT        NOT NULL,
    queued_at    TIMESTAMPTZ NOT NULL
);

-- What the reactor's queue projector remembers to render its texts: trips with
-- an open room, and the titles of their items.
CREATE TABLE itinerary_feed_rooms (
    itinerary_id UUID PRIMARY KEY
);
CREATE TABLE itinerary_feed_items (
    item_id UUID PRIMARY KEY,
    title   TEXT NOT NULL
);
