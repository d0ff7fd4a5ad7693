-- The detail read's item list, kept by the projector: every item's answer text
-- (`proj_itinerary_items.body`) in chronological order, joined, rebuilt once
-- per batch for each trip whose items changed. The read then fetches one row
-- instead of aggregating (and sorting) a trip's items on every request.
ALTER TABLE proj_itineraries ADD COLUMN items_body TEXT NOT NULL DEFAULT '';
UPDATE proj_itineraries i SET items_body = COALESCE((
    SELECT string_agg(x.body, ', ' ORDER BY x.start_at, x.end_at, x.item_id)
    FROM proj_itinerary_items x WHERE x.itinerary_id = i.itinerary_id), '');
