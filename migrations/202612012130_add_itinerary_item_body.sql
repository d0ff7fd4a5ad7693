-- Each item's answer text, as the detail read (`GET /v1/itineraries/{id}`)
-- serves it: the item's JSON with its `itinerary_id` first. The detail read
-- concatenates these texts instead of rebuilding every item as jsonb and printing
-- the aggregate on each request (on 100 items: 10.5 ms → 3.1 ms median in
-- Postgres, `loadgen --itinerary`, 2026-12-01). Generated, so every write
-- path (the projector's upsert, cancel, a rebuild into shadow tables
-- `INCLUDING GENERATED`) keeps it equal to `item` with nothing to remember.
ALTER TABLE proj_itinerary_items
    ADD COLUMN body TEXT GENERATED ALWAYS AS
        ('{"itinerary_id": "' || itinerary_id::text || '", ' || substr(item::text, 2)) STORED;
