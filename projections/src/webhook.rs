//! Outbound webhooks: the endpoints read model, the delivery queue and the
//! deliverer.
//!
//! - [`WebhookQueue`], projector `webhooks`: keeps `proj_webhooks` (the
//!   endpoints) and, for every event of a deliverable domain that an enabled
//!   endpoint's filter selects and whose owner is the endpoint's owner, queues
//!   one row of `webhook_deliveries`, keyed by (endpoint, event) so it exists
//!   once forever. The body (`{id, type, occurred_at, data}`) is built here,
//!   with every sealed field and token left out of `data`.
//! - [`Deliverer`] (in the scheduler role): claims due rows (`FOR UPDATE SKIP
//!   LOCKED`, so several deliverers share the queue), opens the endpoint's
//!   secret from the keystore, signs and POSTs each one; 2xx is delivered,
//!   anything else (or a timeout) waits `schedule.delay(attempts)` (exponential
//!   with jitter) and then, once the schedule is spent, is dead-lettered.
//!   Redriving (an event, `DeadLettersRedriven`) puts dead letters back with a
//!   fresh schedule.
//!
//! **Never during a rebuild.** The projector has its own checkpoint, so
//! rebuilding any other read model queues nothing. `webhook_high_water` holds
//! the highest position it ever queued from: when its own checkpoint is moved
//! back (a rebuild of `webhooks`), events at or below that mark rebuild the
//! endpoints but queue and redrive nothing, and the deliverer sends nothing
//! until the projector is past the mark again.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use commands::webhook::{Schedule, matches, sign};
use events::{Event, EventEnvelope};
use handlers::keystore::Keystore;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Projector;

/// The projector's name (its checkpoint row).
pub const MODEL: &str = "webhooks";

const DELIVERY_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f77_6562_686f_6f6b_0001);

/// The delivery of `event` to `endpoint`: the same id every time.
pub fn delivery_id(endpoint: Uuid, event: Uuid) -> Uuid {
    Uuid::new_v5(&DELIVERY_NS, format!("{endpoint}|{event}").as_bytes())
}

/// Projector `webhooks`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookQueue;

struct Target {
    id: Uuid,
    owner: Uuid,
    filter: Vec<String>,
}

async fn targets(tx: &mut PgConnection) -> anyhow::Result<Vec<Target>> {
    let rows = sqlx::query(
        "SELECT webhook_id, owner, filter FROM proj_webhooks WHERE enabled AND NOT deleted",
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .iter()
        .map(|r| Target {
            id: r.get("webhook_id"),
            owner: r.get("owner"),
            filter: r.get("filter"),
        })
        .collect())
}

/// The owner an event's creation names (the first event of a wallet account,
/// a reminder, an itinerary).
fn created_owner(e: &Event) -> Option<Uuid> {
    match e {
        Event::Wallet(events::wallet::WalletEvent::AccountOpened { owner_id, .. }) => *owner_id,
        Event::Reminder(events::reminder::ReminderEvent::ReminderSet { owner, .. }) => Some(*owner),
        Event::Itinerary(events::itinerary::ItineraryEvent::ItineraryCreated { owner, .. }) => {
            Some(*owner)
        }
        _ => None,
    }
}

/// Event types whose payload names their stream's owner ([`created_owner`]).
const CREATIONS: &[&str] = &["AccountOpened", "ReminderSet", "ItineraryCreated"];

async fn owner_of(
    tx: &mut PgConnection,
    env: &EventEnvelope,
    e: &Event,
    learnt: &HashMap<String, Uuid>,
) -> anyhow::Result<Option<Uuid>> {
    Ok(match env.domain.as_str() {
        events::notify::DOMAIN => env.stream_id.id().parse().ok(),
        // A chat event is its author's own: what they posted, created, joined.
        events::chat::DOMAIN => env.actor,
        _ => match created_owner(e).or_else(|| learnt.get(env.stream_id.as_str()).copied()) {
            Some(o) => Some(o),
            None => {
                sqlx::query_scalar("SELECT owner FROM webhook_stream_owners WHERE stream_id = $1")
                    .bind(env.stream_id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?
            }
        },
    })
}

/// `data` of a delivery: the payload without its tag, every sealed value
/// (`{nonce, ct}`: message bodies, attachments), key and link token left out.
pub fn scrub(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|k, val| {
                    let sealed = val
                        .as_object()
                        .is_some_and(|o| o.contains_key("nonce") && o.contains_key("ct"));
                    !sealed
                        && !matches!(
                            k.as_str(),
                            "message_key" | "wrapped" | "link_token" | "sealed" | "key"
                        )
                });
                m.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("type");
    }
    walk(&mut v);
    v
}

/// The body POSTed for `env`.
pub fn body(env: &EventEnvelope) -> Value {
    json!({
        "id": env.event_id,
        "type": format!("{}.{}", env.domain, env.event_type),
        "occurred_at": env.occurred_at,
        "data": scrub(env.payload.clone()),
    })
}

impl Projector for WebhookQueue {
    fn name(&self) -> &'static str {
        MODEL
    }

    fn domains(&self) -> &'static [&'static str] {
        &[
            events::webhook::DOMAIN,
            events::wallet::DOMAIN,
            events::notify::DOMAIN,
            events::reminder::DOMAIN,
            events::itinerary::DOMAIN,
            events::chat::DOMAIN,
        ]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        let high_water: i64 =
            sqlx::query_scalar("SELECT position FROM webhook_high_water FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        let mut endpoints = targets(tx).await?;
        let mut learnt: HashMap<String, Uuid> = HashMap::new();
        for env in batch {
            let live = env.position > high_water;
            let wanted: Vec<(Uuid, Uuid)> = if live {
                endpoints
                    .iter()
                    .filter(|t| matches(&t.filter, &env.domain, &env.event_type))
                    .map(|t| (t.id, t.owner))
                    .collect()
            } else {
                vec![]
            };
            let webhook = env.domain == events::webhook::DOMAIN;
            // Most events concern nobody here: do not even decode them.
            if wanted.is_empty() && !webhook && !CREATIONS.contains(&env.event_type.as_str()) {
                continue;
            }
            let event = env.event()?;
            if let Event::Webhook(e) = &event {
                endpoint(tx, env, e, live).await?;
                endpoints = targets(tx).await?;
                continue;
            }
            if let Some(owner) = created_owner(&event) {
                learnt.insert(env.stream_id.as_str().to_owned(), owner);
            }
            if wanted.is_empty() {
                continue;
            }
            let Some(owner) = owner_of(tx, env, &event, &learnt).await? else {
                continue;
            };
            let body = body(env);
            for (id, _) in wanted.into_iter().filter(|(_, o)| *o == owner) {
                sqlx::query(
                    "INSERT INTO webhook_deliveries (delivery_id, webhook_id, owner, event_id, position,
                        event_type, body, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, now()) ON CONFLICT DO NOTHING",
                )
                .bind(delivery_id(id, env.event_id))
                .bind(id)
                .bind(owner)
                .bind(env.event_id)
                .bind(env.position)
                .bind(format!("{}.{}", env.domain, env.event_type))
                .bind(&body)
                .execute(&mut *tx)
                .await?;
            }
        }
        if !learnt.is_empty() {
            let (streams, owners): (Vec<String>, Vec<Uuid>) = learnt.into_iter().unzip();
            sqlx::query(
                "INSERT INTO webhook_stream_owners (stream_id, owner)
                 SELECT * FROM UNNEST($1::text[], $2::uuid[]) ON CONFLICT DO NOTHING",
            )
            .bind(&streams)
            .bind(&owners)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(last) = batch.last() {
            sqlx::query("UPDATE webhook_high_water SET position = GREATEST(position, $1)")
                .bind(last.position)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

async fn endpoint(
    tx: &mut PgConnection,
    env: &EventEnvelope,
    e: &events::webhook::WebhookEvent,
    live: bool,
) -> anyhow::Result<()> {
    use events::webhook::WebhookEvent as W;
    let id: Uuid = env.stream_id.id().parse()?;
    match e {
        W::WebhookRegistered {
            owner,
            url,
            filter,
            description,
            ..
        } => {
            sqlx::query(
                "INSERT INTO proj_webhooks (webhook_id, owner, url, filter, description, created_at, version, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(owner)
            .bind(url)
            .bind(filter)
            .bind(description)
            .bind(env.occurred_at)
            .bind(env.version)
            .bind(env.position)
            .execute(&mut *tx)
            .await?;
        }
        W::WebhookUpdated {
            url,
            filter,
            description,
            enabled,
        } => {
            sqlx::query(
                "UPDATE proj_webhooks SET url = COALESCE($2, url), filter = COALESCE($3, filter),
                    description = COALESCE($4, description), enabled = COALESCE($5, enabled),
                    version = $6, position = $7
                 WHERE webhook_id = $1",
            )
            .bind(id)
            .bind(url)
            .bind(filter)
            .bind(description)
            .bind(enabled)
            .bind(env.version)
            .bind(env.position)
            .execute(&mut *tx)
            .await?;
        }
        W::WebhookDeleted => {
            sqlx::query(
                "UPDATE proj_webhooks SET deleted = true, enabled = false, version = $2, position = $3
                 WHERE webhook_id = $1",
            )
            .bind(id)
            .bind(env.version)
            .bind(env.position)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL
                 WHERE webhook_id = $1 AND status = 'pending'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        W::DeadLettersRedriven { delivery_id } => {
            sqlx::query(
                "UPDATE proj_webhooks SET version = $2, position = $3 WHERE webhook_id = $1",
            )
            .bind(id)
            .bind(env.version)
            .bind(env.position)
            .execute(&mut *tx)
            .await?;
            if live {
                sqlx::query(
                    "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),
                        dead_at = NULL
                     WHERE webhook_id = $1 AND status = 'dead' AND ($2::uuid IS NULL OR delivery_id = $2)",
                )
                .bind(id)
                .bind(delivery_id)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(())
}

/// Tuning of the deliverer.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Waits between attempts, then the dead letter.
    pub schedule: Schedule,
    /// Longest an attempt may take (then it counts as failed).
    pub timeout: Duration,
    /// How often an idle deliverer looks at the queue.
    pub poll: Duration,
    /// Most deliveries claimed (and sent concurrently) at once.
    pub batch: i64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            schedule: Schedule::default(),
            timeout: Duration::from_secs(10),
            poll: Duration::from_millis(100),
            batch: 32,
        }
    }
}

/// The delivery worker.
pub struct Deliverer {
    /// Queue, endpoints and keystore.
    pub pool: PgPool,
    /// Opens the signing secrets.
    pub keystore: Keystore,
    /// Tuning.
    pub config: DeliveryConfig,
    /// HTTP client (no redirects followed).
    pub http: reqwest::Client,
}

enum Attempt {
    Delivered(u16),
    Failed(Option<u16>, String),
}

impl Deliverer {
    /// A deliverer with its own HTTP client.
    pub fn new(pool: PgPool, keystore: Keystore, config: DeliveryConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("Mathia-Webhooks/1")
            .build()?;
        Ok(Deliverer {
            pool,
            keystore,
            config,
            http,
        })
    }

    /// Deliver until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            attempts = self.config.schedule.max_attempts(),
            timeout_ms = self.config.timeout.as_millis() as u64,
            "webhook deliverer started"
        );
        let mut backoff = Duration::from_millis(500);
        while !shutdown.is_cancelled() {
            let wait = match self.deliver_once().await {
                Ok(n) if n > 0 => {
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(_) => self.config.poll,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "webhook delivery failed; retrying"
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

    /// Whether projector `webhooks` is re-applying events it applied before.
    pub async fn rebuilding(&self) -> anyhow::Result<bool> {
        let (checkpoint, high_water): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT position FROM proj_checkpoints WHERE model = $1), 0),
                    (SELECT position FROM webhook_high_water)",
        )
        .bind(MODEL)
        .fetch_one(&self.pool)
        .await?;
        Ok(checkpoint < high_water)
    }

    /// Send one batch of due deliveries; returns how many were attempted.
    pub async fn deliver_once(&self) -> anyhow::Result<usize> {
        // One cheap look first: an idle deliverer opens no transaction.
        let due: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now())",
        )
        .fetch_one(&self.pool)
        .await?;
        if !due || self.rebuilding().await? {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT d.delivery_id, d.webhook_id, d.body, d.attempts, w.url
             FROM webhook_deliveries d JOIN proj_webhooks w ON w.webhook_id = d.webhook_id
             WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND w.enabled AND NOT w.deleted
             ORDER BY d.next_attempt_at LIMIT $1
             FOR UPDATE OF d SKIP LOCKED",
        )
        .bind(self.config.batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut sends = Vec::with_capacity(rows.len());
        let mut gone = vec![];
        for r in &rows {
            let (id, endpoint): (Uuid, Uuid) = (r.get("delivery_id"), r.get("webhook_id"));
            let Some(secret) = self.keystore.webhook_secret(&mut tx, endpoint).await? else {
                // The endpoint was deleted meanwhile: nothing can sign for it.
                gone.push(id);
                continue;
            };
            let body: Value = r.get("body");
            let url: String = r.get("url");
            let attempts: i32 = r.get("attempts");
            sends.push(async move {
                let outcome = self.send(id, &url, &secret, &body).await;
                (id, attempts, outcome)
            });
        }
        let results = futures::future::join_all(sends).await;
        let n = results.len();
        for (id, attempts, outcome) in results {
            let attempts = attempts + 1;
            match outcome {
                Attempt::Delivered(status) => {
                    sqlx::query(
                        "UPDATE webhook_deliveries SET status = 'delivered', attempts = $2, last_attempt_at = now(),
                            last_status = $3, last_error = NULL, delivered_at = now(), next_attempt_at = NULL
                         WHERE delivery_id = $1",
                    )
                    .bind(id)
                    .bind(attempts)
                    .bind(i32::from(status))
                    .execute(&mut *tx)
                    .await?;
                    metrics::counter!("mathia_webhook_deliveries_total", "result" => "delivered")
                        .increment(1);
                }
                Attempt::Failed(status, error) => {
                    let next = self
                        .config
                        .schedule
                        .delay(attempts as u32)
                        .and_then(|d| chrono::Duration::from_std(d).ok())
                        .map(|d| Utc::now() + d);
                    sqlx::query(
                        "UPDATE webhook_deliveries SET attempts = $2, last_attempt_at = now(), last_status = $3,
                            last_error = $4, next_attempt_at = $5,
                            status = CASE WHEN $5::timestamptz IS NULL THEN 'dead' ELSE 'pending' END,
                            dead_at = CASE WHEN $5::timestamptz IS NULL THEN now() END
                         WHERE delivery_id = $1",
                    )
                    .bind(id)
                    .bind(attempts)
                    .bind(status.map(i32::from))
                    .bind(&error)
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                    let result = if next.is_some() { "retry" } else { "dead" };
                    metrics::counter!("mathia_webhook_deliveries_total", "result" => result)
                        .increment(1);
                    tracing::debug!(delivery = %id, attempts, error, result, "webhook attempt failed");
                }
            }
        }
        if !gone.is_empty() {
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL
                 WHERE delivery_id = ANY($1)",
            )
            .bind(&gone)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(n + gone.len())
    }

    async fn send(&self, id: Uuid, url: &str, secret: &[u8], body: &Value) -> Attempt {
        let bytes = match serde_json::to_vec(body) {
            Ok(b) => b,
            Err(e) => return Attempt::Failed(None, format!("body: {e}")),
        };
        let ts = Utc::now().timestamp();
        let signature = sign(secret, ts, &bytes);
        let sent = self
            .http
            .post(url)
            .timeout(self.config.timeout)
            .header("content-type", "application/json")
            .header("Mathia-Webhook-Id", id.to_string())
            .header("Mathia-Webhook-Timestamp", ts.to_string())
            .header("Mathia-Signature", signature)
            .body(bytes)
            .send()
            .await;
        match sent {
            Ok(res) if res.status().is_success() => Attempt::Delivered(res.status().as_u16()),
            Ok(res) => Attempt::Failed(
                Some(res.status().as_u16()),
                format!("HTTP {}", res.status().as_u16()),
            ),
            // Without the URL: it may carry the receiver's own token.
            Err(e) if e.is_timeout() => Attempt::Failed(None, "timeout".into()),
            Err(e) => Attempt::Failed(None, e.without_url().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_data_leaves_sealed_fields_and_tokens_out() {
        let v = json!({"type": "MessagePosted", "room_id": "r", "body": {"nonce": "a", "ct": "b"},
            "attachment": {"name": {"nonce": "c", "ct": "d"}, "size": 3}, "message_key": "k",
            "link_token": "t", "items": [{"body": {"nonce": "x", "ct": "y"}, "n": 1}]});
        assert_eq!(
            scrub(v),
            json!({"room_id": "r", "attachment": {"size": 3}, "items": [{"n": 1}]})
        );
    }
}
