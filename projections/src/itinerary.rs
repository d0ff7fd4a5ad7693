//! Itinerary read models (projector `itinerary`) and the trip-room reactor.
//!
//! Read models: `proj_itineraries` (details, version), `proj_itinerary_members`
//! (owner, collaborators, invitations: "my itineraries"), `proj_itinerary_items`
//! (every item with its UTC instants, ordered by them) and
//! `proj_itinerary_listings` (the events catalogue). Every value comes from the
//! events (positions, `occurred_at`), so a rebuild from zero is identical.
//!
//! The reactor has the two parts of [`crate::screen`]:
//! - [`FeedQueue`], projector `itinerary-feed`: each change of a trip that has
//!   a room becomes a row of `itinerary_feed_queue` with its text rendered.
//! - [`Poster`]: drains the queue, seals each text under a fresh message key of
//!   the room (the keystore is here: the projections role holds the master
//!   key) and publishes `itinerary.PostUpdate` as the system. The message and
//!   command ids derive from the event id, so a poster that dies after
//!   publishing posts nothing twice.

use std::time::Duration;

use chrono::Utc;
use commands::itinerary::{ItineraryCommand, trip_room_id};
use commands::{Actor, Command, Role, crypto};
use events::chat::Bytes64;
use events::itinerary::{Item, ItineraryEvent};
use events::{Event, EventEnvelope, Subjects};
use handlers::bus::{self, CommandEnvelope, Published};
use handlers::keystore::{Keystore, new_message_key};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Projector;

/// The projector's name: checkpoint row and consumer `proj-itinerary`.
pub const MODEL: &str = "itinerary";

/// Projector `itinerary`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ItineraryProjector;

fn stream_uuid(env: &EventEnvelope) -> anyhow::Result<Uuid> {
    Ok(env.stream_id.id().parse()?)
}

/// What a batch changes in bulk: item upserts (the last state of each item
/// wins, so one statement never touches a row twice), each trip's last version,
/// and which trips' item lists changed (their `items_body` is rebuilt once).
/// Item writes are most of the domain's events; applied one by one they cost
/// two round trips each, in bulk three statements per batch.
#[derive(Default)]
struct Pending {
    items: std::collections::BTreeMap<(Uuid, Uuid), (Item, i64)>,
    versions: std::collections::BTreeMap<Uuid, (i64, chrono::DateTime<Utc>, i64)>,
    touched: std::collections::BTreeSet<Uuid>,
}

impl Pending {
    /// Write the buffered item upserts (before any other event of the batch
    /// is applied, so that events keep their order).
    async fn flush_items(&mut self, tx: &mut PgConnection) -> anyhow::Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.items);
        let n = items.len();
        let (mut trip, mut id, mut kind, mut status) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut start, mut end, mut amount, mut currency) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut provider, mut reference, mut body, mut position) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for ((itinerary, item_id), (item, pos)) in items {
            trip.push(itinerary);
            id.push(item_id);
            kind.push(item.kind.as_str());
            status.push(item.status.as_str());
            start.push(item.start.utc);
            end.push(item.end.utc);
            amount.push(item.price.as_ref().map(|p| p.amount));
            currency.push(item.price.as_ref().map(|p| p.currency.clone()));
            provider.push(item.provider.clone());
            reference.push(item.booking_reference.clone());
            body.push(serde_json::to_value(&item)?);
            position.push(pos);
        }
        sqlx::query(
            "INSERT INTO proj_itinerary_items (itinerary_id, item_id, kind, status, start_at, end_at,
                price_amount, price_currency, provider, booking_reference, item, position)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[],
                $6::timestamptz[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::bigint[])
             ON CONFLICT (itinerary_id, item_id) DO UPDATE SET kind = EXCLUDED.kind, status = EXCLUDED.status,
                start_at = EXCLUDED.start_at, end_at = EXCLUDED.end_at, price_amount = EXCLUDED.price_amount,
                price_currency = EXCLUDED.price_currency, provider = EXCLUDED.provider,
                booking_reference = EXCLUDED.booking_reference, item = EXCLUDED.item, position = EXCLUDED.position",
        )
        .bind(&trip)
        .bind(&id)
        .bind(&kind)
        .bind(&status)
        .bind(&start)
        .bind(&end)
        .bind(&amount)
        .bind(&currency)
        .bind(&provider)
        .bind(&reference)
        .bind(&body)
        .bind(&position)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// The end of the batch: items, then each touched trip's `items_body` (the
    /// detail read's item list, in chronological order, as one text), then
    /// each trip's version.
    async fn finish(mut self, tx: &mut PgConnection) -> anyhow::Result<()> {
        self.flush_items(tx).await?;
        if !self.touched.is_empty() {
            let trips: Vec<Uuid> = self.touched.into_iter().collect();
            sqlx::query(
                "UPDATE proj_itineraries i SET items_body = COALESCE((
                     SELECT string_agg(x.body, ', ' ORDER BY x.start_at, x.end_at, x.item_id)
                     FROM proj_itinerary_items x WHERE x.itinerary_id = i.itinerary_id), '')
                 WHERE i.itinerary_id = ANY($1)",
            )
            .bind(&trips)
            .execute(&mut *tx)
            .await?;
        }
        if !self.versions.is_empty() {
            let mut ids = Vec::with_capacity(self.versions.len());
            let (mut versions, mut at, mut pos) = (vec![], vec![], vec![]);
            for (id, (v, t, p)) in self.versions {
                ids.push(id);
                versions.push(v);
                at.push(t);
                pos.push(p);
            }
            sqlx::query(
                "UPDATE proj_itineraries i SET version = u.v, updated_at = u.t, updated_position = u.p
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[], $4::bigint[]) AS u(id, v, t, p)
                 WHERE i.itinerary_id = u.id",
            )
            .bind(&ids)
            .bind(&versions)
            .bind(&at)
            .bind(&pos)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

impl Projector for ItineraryProjector {
    fn name(&self) -> &'static str {
        MODEL
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::itinerary::DOMAIN]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "proj_itineraries",
            "proj_itinerary_members",
            "proj_itinerary_items",
            "proj_itinerary_listings",
        ]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut pending = Pending::default();
        for env in batch {
            let Event::Itinerary(event) = env.event()? else {
                continue;
            };
            let pos = env.position;
            let at = env.occurred_at;
            use ItineraryEvent as E;
            if let E::ItemAdded { item } | E::ItemUpdated { item } = &event {
                let id = stream_uuid(env)?;
                pending
                    .items
                    .insert((id, item.item_id), (item.clone(), pos));
                pending.touched.insert(id);
                pending.versions.insert(id, (env.version, at, pos));
                continue;
            }
            // Anything else sees the items written so far.
            pending.flush_items(tx).await?;
            if let E::ListingAdded {
                listing_id,
                category,
                title,
                place,
                start,
                end,
                ..
            } = &event
            {
                let mut listing = serde_json::to_value(&event)?;
                if let Some(o) = listing.as_object_mut() {
                    o.remove("type");
                }
                sqlx::query(
                    "INSERT INTO proj_itinerary_listings (listing_id, category, title, place, start_at, end_at, listing, position)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                )
                .bind(listing_id)
                .bind(category)
                .bind(title)
                .bind(place)
                .bind(start.utc)
                .bind(end.utc)
                .bind(listing)
                .bind(pos)
                .execute(&mut *tx)
                .await?;
                continue;
            }
            let id = stream_uuid(env)?;
            match &event {
                E::ItineraryCreated {
                    owner,
                    details: d,
                    link_token,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO proj_itineraries (itinerary_id, owner_id, title, region, start_date, end_date, zone,
                            budget, visibility, link_token, metadata, version, created_at, updated_at, updated_position)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14)",
                    )
                    .bind(id)
                    .bind(owner)
                    .bind(&d.title)
                    .bind(&d.region)
                    .bind(d.start_date)
                    .bind(d.end_date)
                    .bind(&d.zone)
                    .bind(serde_json::to_value(&d.budget)?)
                    .bind(d.visibility.as_str())
                    .bind(link_token)
                    .bind(&d.metadata)
                    .bind(env.version)
                    .bind(at)
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO proj_itinerary_members (itinerary_id, user_id, role, state, since_position)
                         VALUES ($1, $2, 'owner', 'active', $3)",
                    )
                    .bind(id)
                    .bind(owner)
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                    continue;
                }
                E::ItineraryUpdated {
                    details: d,
                    link_token,
                } => {
                    sqlx::query(
                        "UPDATE proj_itineraries SET title = $2, region = $3, start_date = $4, end_date = $5,
                            zone = $6, budget = $7, visibility = $8, link_token = $9, metadata = $10
                         WHERE itinerary_id = $1",
                    )
                    .bind(id)
                    .bind(&d.title)
                    .bind(&d.region)
                    .bind(d.start_date)
                    .bind(d.end_date)
                    .bind(&d.zone)
                    .bind(serde_json::to_value(&d.budget)?)
                    .bind(d.visibility.as_str())
                    .bind(link_token)
                    .bind(&d.metadata)
                    .execute(&mut *tx)
                    .await?;
                }
                E::ItineraryArchived => {
                    sqlx::query(
                        "UPDATE proj_itineraries SET archived = true WHERE itinerary_id = $1",
                    )
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                E::ItineraryDeleted => {
                    for forget in [
                        "DELETE FROM proj_itinerary_items WHERE itinerary_id = $1",
                        "DELETE FROM proj_itinerary_members WHERE itinerary_id = $1",
                        "DELETE FROM proj_itineraries WHERE itinerary_id = $1",
                    ] {
                        sqlx::query(forget).bind(id).execute(&mut *tx).await?;
                    }
                    continue;
                }
                // Buffered above, with their version.
                E::ItemAdded { .. } | E::ItemUpdated { .. } => continue,
                E::ItemCancelled { item_id } => {
                    pending.touched.insert(id);
                    sqlx::query(
                        "UPDATE proj_itinerary_items SET status = 'cancelled', position = $3,
                            item = jsonb_set(item, '{status}', '\"cancelled\"')
                         WHERE itinerary_id = $1 AND item_id = $2",
                    )
                    .bind(id)
                    .bind(item_id)
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                }
                E::ItemRemoved { item_id } => {
                    pending.touched.insert(id);
                    sqlx::query(
                        "DELETE FROM proj_itinerary_items WHERE itinerary_id = $1 AND item_id = $2",
                    )
                    .bind(id)
                    .bind(item_id)
                    .execute(&mut *tx)
                    .await?;
                }
                E::ShareInvited { user_id, role, .. } => {
                    sqlx::query(
                        "INSERT INTO proj_itinerary_members (itinerary_id, user_id, role, state, since_position)
                         VALUES ($1, $2, $3, 'invited', $4)
                         ON CONFLICT (itinerary_id, user_id) DO UPDATE SET role = EXCLUDED.role,
                            since_position = EXCLUDED.since_position
                         WHERE proj_itinerary_members.state = 'invited'",
                    )
                    .bind(id)
                    .bind(user_id)
                    .bind(role.as_str())
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                }
                E::ShareAccepted { user_id, role } => {
                    sqlx::query(
                        "UPDATE proj_itinerary_members SET state = 'active', role = $3, since_position = $4
                         WHERE itinerary_id = $1 AND user_id = $2",
                    )
                    .bind(id)
                    .bind(user_id)
                    .bind(role.as_str())
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                }
                E::ShareRevoked { user_id, .. } => {
                    sqlx::query(
                        "DELETE FROM proj_itinerary_members WHERE itinerary_id = $1 AND user_id = $2",
                    )
                    .bind(id)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                }
                E::OwnershipTransferred { from, to } => {
                    for (user, role) in [(from, "editor"), (to, "owner")] {
                        sqlx::query(
                            "UPDATE proj_itinerary_members SET role = $3, since_position = $4
                             WHERE itinerary_id = $1 AND user_id = $2",
                        )
                        .bind(id)
                        .bind(user)
                        .bind(role)
                        .bind(pos)
                        .execute(&mut *tx)
                        .await?;
                    }
                    sqlx::query(
                        "UPDATE proj_itineraries SET owner_id = $2 WHERE itinerary_id = $1",
                    )
                    .bind(id)
                    .bind(to)
                    .execute(&mut *tx)
                    .await?;
                }
                E::RoomOpened { room_id } => {
                    sqlx::query("UPDATE proj_itineraries SET room_id = $2 WHERE itinerary_id = $1")
                        .bind(id)
                        .bind(room_id)
                        .execute(&mut *tx)
                        .await?;
                }
                E::ListingAdded { .. } => {}
            }
            pending.versions.insert(id, (env.version, at, pos));
        }
        pending.finish(tx).await
    }
}

async fn title_of(tx: &mut PgConnection, item: Uuid) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT title FROM itinerary_feed_items WHERE item_id = $1")
            .bind(item)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or_else(|| "an item".to_owned()),
    )
}

/// Projector `itinerary-feed`: the queue of changes to post into trip rooms.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeedQueue;

fn when(item: &Item) -> String {
    let fmt = "%a %d %b %H:%M";
    if item.start.zone == item.end.zone {
        format!(
            "{} → {} ({})",
            item.start.local.format(fmt),
            item.end.local.format(fmt),
            item.start.zone
        )
    } else {
        format!(
            "{} ({}) → {} ({})",
            item.start.local.format(fmt),
            item.start.zone,
            item.end.local.format(fmt),
            item.end.zone
        )
    }
}

impl Projector for FeedQueue {
    fn name(&self) -> &'static str {
        "itinerary-feed"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::itinerary::DOMAIN]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        use ItineraryEvent as E;
        for env in batch {
            let Event::Itinerary(event) = env.event()? else {
                continue;
            };
            if matches!(event, E::ListingAdded { .. }) {
                continue;
            }
            let id = stream_uuid(env)?;
            // Titles are kept for every trip: a room may open after its items were added.
            let text = match &event {
                E::ItemAdded { item } | E::ItemUpdated { item } => {
                    sqlx::query(
                        "INSERT INTO itinerary_feed_items (item_id, title) VALUES ($1, $2)
                         ON CONFLICT (item_id) DO UPDATE SET title = EXCLUDED.title",
                    )
                    .bind(item.item_id)
                    .bind(&item.title)
                    .execute(&mut *tx)
                    .await?;
                    let verb = if matches!(event, E::ItemAdded { .. }) {
                        "added"
                    } else {
                        "updated"
                    };
                    Some(format!(
                        "{verb} {} “{}”: {} [{}]",
                        item.kind.as_str(),
                        item.title,
                        when(item),
                        item.status.as_str()
                    ))
                }
                E::ItemCancelled { item_id } => Some(format!(
                    "cancelled “{}”",
                    title_of(&mut *tx, *item_id).await?
                )),
                E::ItemRemoved { item_id } => {
                    let t = title_of(&mut *tx, *item_id).await?;
                    sqlx::query("DELETE FROM itinerary_feed_items WHERE item_id = $1")
                        .bind(item_id)
                        .execute(&mut *tx)
                        .await?;
                    Some(format!("removed “{t}”"))
                }
                E::ItineraryUpdated { details, .. } => Some(format!(
                    "updated the trip: “{}”, {} to {} ({})",
                    details.title, details.start_date, details.end_date, details.zone
                )),
                E::ItineraryArchived => Some("archived the trip".to_owned()),
                E::ShareAccepted { role, .. } => {
                    Some(format!("joined the trip as {}", role.as_str()))
                }
                E::ShareRevoked { .. } => Some("removed someone from the trip".to_owned()),
                E::OwnershipTransferred { .. } => Some("handed the trip over".to_owned()),
                E::RoomOpened { .. } => {
                    sqlx::query(
                        "INSERT INTO itinerary_feed_rooms (itinerary_id) VALUES ($1) ON CONFLICT DO NOTHING",
                    )
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    Some("opened the trip room".to_owned())
                }
                E::ItineraryDeleted => {
                    sqlx::query("DELETE FROM itinerary_feed_rooms WHERE itinerary_id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    None
                }
                E::ItineraryCreated { .. } | E::ShareInvited { .. } | E::ListingAdded { .. } => {
                    None
                }
            };
            let Some(text) = text else { continue };
            sqlx::query(
                "INSERT INTO itinerary_feed_queue (position, event_id, itinerary_id, actor, text, queued_at)
                 SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (
                    SELECT 1 FROM itinerary_feed_rooms WHERE itinerary_id = $3)
                 ON CONFLICT DO NOTHING",
            )
            .bind(env.position)
            .bind(env.event_id)
            .bind(id)
            .bind(env.actor)
            .bind(&text)
            .bind(env.occurred_at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

const FEED_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f69_7469_6e5f_6665_6564);

/// The message (and command) id of the post about event `event_id`.
pub fn post_id(event_id: Uuid) -> Uuid {
    Uuid::new_v5(&FEED_NS, event_id.as_bytes())
}

/// The trip-room poster.
pub struct Poster {
    /// Queue, users, keystore.
    pub pool: PgPool,
    /// Where posts are published.
    pub js: async_nats::jetstream::Context,
    /// Subject and stream names.
    pub subjects: Subjects,
    /// Seals the texts.
    pub keystore: Keystore,
    /// How often an idle poster looks at the queue.
    pub poll: Duration,
}

impl Poster {
    /// Post until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(500);
        while !shutdown.is_cancelled() {
            let wait = match self.post_once().await {
                Ok(n) if n > 0 => {
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(_) => self.poll,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "posting trip updates failed; retrying"
                    );
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(())
    }

    /// Post one batch; returns how many rows it handled.
    pub async fn post_once(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT q.position, q.event_id, q.itinerary_id, q.text, u.display_name
             FROM itinerary_feed_queue q LEFT JOIN users u ON u.user_id = q.actor
             ORDER BY q.position LIMIT 50 FOR UPDATE OF q SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut done = Vec::with_capacity(rows.len());
        for r in &rows {
            let itinerary: Uuid = r.get("itinerary_id");
            let event_id: Uuid = r.get("event_id");
            let who: Option<String> = r.get("display_name");
            let text = format!(
                "{} {}",
                who.unwrap_or_else(|| "Someone".into()),
                r.get::<String, _>("text")
            );
            done.push(r.get::<i64, _>("position"));
            // A room deleted meanwhile (or never keyed) has nothing to post into.
            let Some(keys) = self
                .keystore
                .room_keys(&self.pool, trip_room_id(itinerary))
                .await?
            else {
                continue;
            };
            let message_id = post_id(event_id);
            let (key, wrapped) = new_message_key(&keys.current, message_id);
            let body = crypto::seal(
                &key,
                &crypto::field_aad(message_id, "body"),
                text.as_bytes(),
            );
            let hash = Sha256::digest(format!("itinerary-feed|{event_id}").as_bytes());
            let envelope = CommandEnvelope {
                command_id: message_id,
                correlation_id: event_id,
                actor: Actor {
                    user_id: None,
                    role: Role::System,
                },
                issued_at: Utc::now(),
                request_hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
                command: Command::Itinerary(ItineraryCommand::PostUpdate {
                    itinerary_id: itinerary,
                    message_id,
                    body,
                    key_version: keys.version,
                    message_key: Bytes64(wrapped),
                    sent_at: Utc::now(),
                }),
                expected_version: None,
            };
            let reply = format!(
                "{}.{message_id}",
                self.subjects.outcome_inbox("itinerary-feed")
            );
            match bus::publish_command(&self.js, &self.subjects, &envelope, &reply).await? {
                Published::Stored { .. } => {}
                // Not known to be stored: keep the rows; the same id makes a retry safe.
                Published::Unknown => anyhow::bail!("COMMANDS did not acknowledge a trip update"),
            }
        }
        sqlx::query("DELETE FROM itinerary_feed_queue WHERE position = ANY($1)")
            .bind(&done)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.len())
    }
}
