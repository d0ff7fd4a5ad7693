//! What every handler gets: connections, settings, keys and the table of
//! requests waiting for an outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use events::Subjects;
use futures::StreamExt;
use handlers::Outcome;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::auth::Keys;
use crate::objects::{LocalDisk, ObjectStore};

/// The gateway's settings (the `mathia` binary fills them from its config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requests per minute per authenticated principal.
    pub rate_limit_api_per_min: u32,
    /// Requests per minute per IP without authentication.
    pub rate_limit_anon_per_min: u32,
    /// How long a write waits for its outcome before answering 202.
    pub command_timeout: Duration,
    /// How long a read waits for `after_position`.
    pub read_wait: Duration,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime.
    pub refresh_ttl: Duration,
    /// Failed logins before lockout.
    pub lockout_after: i32,
    /// Lockout duration.
    pub lockout_for: Duration,
    /// Argon2 memory cost in KiB (19 MiB by default, per OWASP).
    pub argon2_memory_kib: u32,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// Chat messages per user per minute (0: no limit).
    pub chat_messages_per_min: u32,
    /// Chat messages per user per day.
    pub chat_messages_per_day: u32,
    /// Searches per user per day.
    pub searches_per_day: u32,
    /// Uploads per user per day (0: no limit).
    pub uploads_per_day: u32,
    /// Largest upload, in bytes (SPEC §2: 50 MB).
    pub upload_max_bytes: u64,
    /// The directory of the default (local-disk) object store.
    pub upload_dir: std::path::PathBuf,
    /// Base URL of the travel search provider (Amadeus-style API); none: no provider.
    pub travel_url: Option<String>,
    /// Its bearer key.
    pub travel_api_key: Option<String>,
    /// Timeout of one provider call.
    pub travel_timeout: Duration,
    /// Retries of a provider call that timed out or answered 429/5xx.
    pub travel_retries: u32,
    /// Answer a sample labelled `source: "fallback"` when no provider answers.
    pub travel_fallback: bool,
    /// Transfer fee in basis points of the amount (rounded down), paid by the sender.
    pub wallet_fee_bps: u32,
    /// Fixed transfer fee in minor units, added to the proportional part.
    pub wallet_fee_fixed: i64,
    /// HMAC secret payment providers sign their webhooks with; none: webhooks answer 503.
    pub payments_webhook_secret: Option<crate::routes::payments::WebhookSecret>,
    /// Base URL of the M-Pesa STK-push provider; none: top-ups answer 503.
    pub payments_url: Option<String>,
    /// Its API key.
    pub payments_api_key: Option<crate::routes::payments::WebhookSecret>,
    /// Base URL of the card provider (Stripe-style payment intents); none: card top-ups answer 503.
    pub card_url: Option<String>,
    /// Its secret key.
    pub card_api_key: Option<crate::routes::payments::WebhookSecret>,
    /// The rates conversions are made at (`MATHIA_FX_RATES`); a pair not in
    /// them cannot be converted (no invented rates).
    pub fx_rates: Arc<projections::assistant::FixedRates>,
    /// Origins allowed to open the WebSocket (empty: any).
    pub ws_origins: Vec<String>,
    /// Largest WebSocket frame a client may send, in bytes.
    pub ws_max_frame: usize,
    /// Client frames per second per connection (burst: twice that).
    pub ws_frames_per_sec: u32,
    /// How often the server pings.
    pub ws_heartbeat: Duration,
    /// A connection silent for this long is closed.
    pub ws_idle_timeout: Duration,
    /// How long a connection may stay unauthenticated.
    pub ws_auth_timeout: Duration,
    /// Subscriptions per connection.
    pub ws_max_subscriptions: usize,
    /// Reminders a user may set per 12 hours (0: no limit).
    pub reminders_per_12h: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rate_limit_api_per_min: 60,
            rate_limit_anon_per_min: 10,
            command_timeout: Duration::from_secs(5),
            read_wait: Duration::from_secs(2),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            lockout_after: 5,
            lockout_for: Duration::from_secs(15 * 60),
            argon2_memory_kib: 19 * 1024,
            redis_prefix: String::new(),
            chat_messages_per_min: 30,
            chat_messages_per_day: 1000,
            searches_per_day: 100,
            uploads_per_day: 20,
            upload_max_bytes: 50 * 1024 * 1024,
            upload_dir: ".data/uploads".into(),
            travel_url: None,
            travel_api_key: None,
            travel_timeout: Duration::from_secs(5),
            travel_retries: 2,
            travel_fallback: false,
            wallet_fee_bps: 0,
            wallet_fee_fixed: 0,
            payments_webhook_secret: None,
            payments_url: None,
            payments_api_key: None,
            card_url: None,
            card_api_key: None,
            fx_rates: Arc::default(),
            ws_origins: vec![],
            ws_max_frame: 64 * 1024,
            ws_frames_per_sec: 20,
            ws_heartbeat: Duration::from_secs(25),
            ws_idle_timeout: Duration::from_secs(60),
            ws_auth_timeout: Duration::from_secs(10),
            ws_max_subscriptions: 200,
            reminders_per_12h: 10,
        }
    }
}

/// One in-flight command: the hash it was sent with and where its outcome lands.
struct Waiter {
    request_hash: String,
    outcome: watch::Sender<Option<Outcome>>,
}

/// Shared by every request: one `Arc`, so the clone each handler's `State`
/// extractor makes is one reference count, not a copy of every field (some
/// hold strings and maps: that copy showed in the allocator's profile).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    /// Event store (ledger reads) and read models.
    pub pool: PgPool,
    /// Core NATS.
    pub nats: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Redis (rate limits, pending-command markers).
    pub redis: redis::aio::ConnectionManager,
    /// Subject and stream names.
    pub subjects: Subjects,
    /// Settings.
    pub settings: Arc<Settings>,
    /// JWT keys.
    pub keys: Arc<Keys>,
    /// Opens room and message keys.
    pub keystore: handlers::keystore::Keystore,
    /// Where uploaded files rest, sealed (a [`LocalDisk`] under `upload_dir` unless replaced).
    pub objects: Arc<dyn ObjectStore>,
    /// Flight and hotel search.
    pub travel: crate::travel::Travel,
    /// This instance's id: handlers answer on `_outcome.<id>.<command_id>`.
    pub instance: Uuid,
    /// Realtime subscriptions on this instance and the feed tailer's position.
    pub hub: Arc<crate::realtime::Hub>,
    /// Typing, presence and assistant chunks for this instance's connections.
    pub signals: tokio::sync::broadcast::Sender<Arc<crate::signals::Signal>>,
    /// Compressors shared by WebSocket connections (permessage-deflate without context takeover).
    pub deflate: yawc::DeflatePool,
    /// Read models' checkpoints as last read (see [`crate::consistency::Checkpoints`]).
    pub checkpoints: Arc<crate::consistency::Checkpoints>,
    /// Room keys as the send path last read them (see [`crate::roomkeys`]).
    pub room_keys: crate::roomkeys::RoomKeyCache,
    waiters: Arc<Mutex<HashMap<Uuid, Waiter>>>,
}

/// A request registering interest in a command's outcome.
pub enum Registration {
    /// This request is the first: it must publish the command.
    First(watch::Receiver<Option<Outcome>>),
    /// Another request of this instance already sent it; wait on its outcome.
    Joined(watch::Receiver<Option<Outcome>>),
    /// Another request with the same key but a different body is in flight.
    Mismatch,
}

impl AppState {
    /// Assemble the state.
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        redis: redis::aio::ConnectionManager,
        subjects: Subjects,
        settings: Settings,
        keys: Keys,
        keystore: handlers::keystore::Keystore,
    ) -> Self {
        let objects = Arc::new(LocalDisk::new(settings.upload_dir.clone()));
        // Only a client that cannot be built fails here: then act as "no provider", never panic.
        let travel = crate::travel::Travel::from_settings(&settings).unwrap_or_else(|e| {
            tracing::error!(error = format!("{e:#}"), "travel search provider unusable");
            crate::travel::Travel {
                flights: Arc::new(crate::travel::Unconfigured),
                hotels: Arc::new(crate::travel::Unconfigured),
                fallback: settings.travel_fallback,
            }
        });
        AppState(Arc::new(Shared {
            pool,
            js: jetstream::new(nats.clone()),
            nats,
            redis,
            subjects,
            settings: Arc::new(settings),
            keys: Arc::new(keys),
            keystore,
            objects,
            travel,
            instance: Uuid::new_v4(),
            hub: Arc::new(crate::realtime::Hub::default()),
            signals: tokio::sync::broadcast::channel(4096).0,
            deflate: yawc::DeflatePool::new(64),
            checkpoints: Arc::default(),
            room_keys: Default::default(),
            waiters: Arc::new(Mutex::new(HashMap::new())),
        }))
    }

    /// The same state with another object store (a bucket, say).
    ///
    /// # Panics
    /// When the state was already cloned: this belongs to assembly, before the
    /// state is shared with any request.
    pub fn with_object_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        Arc::get_mut(&mut self.0)
            .expect("with_object_store is called while assembling the state, before it is shared")
            .objects = store;
        self
    }

    /// The subject the handlers answer `command_id` on.
    pub fn reply_subject(&self, command_id: Uuid) -> String {
        format!(
            "{}.{command_id}",
            self.subjects
                .outcome_inbox(&self.instance.simple().to_string())
        )
    }

    /// A Redis key under the configured prefix.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.settings.redis_prefix)
    }

    /// Register interest in `command_id`'s outcome.
    pub fn register(&self, command_id: Uuid, request_hash: &str) -> Registration {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = waiters.get(&command_id) {
            if w.request_hash != request_hash {
                return Registration::Mismatch;
            }
            return Registration::Joined(w.outcome.subscribe());
        }
        let (tx, rx) = watch::channel(None);
        waiters.insert(
            command_id,
            Waiter {
                request_hash: request_hash.to_owned(),
                outcome: tx,
            },
        );
        Registration::First(rx)
    }

    /// Forget `command_id` (its outcome arrived, or every waiter gave up).
    pub fn deliver(&self, outcome: Outcome) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&outcome.command_id);
        if let Some(w) = waiter {
            let _ = w.outcome.send(Some(outcome));
        }
    }

    /// Drop a registration whose request gave up waiting.
    pub fn forget(&self, command_id: Uuid) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&command_id);
    }

    /// Subscribe to this instance's outcome inbox and deliver outcomes to waiters.
    pub async fn listen_for_outcomes(self) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let subject = format!(
            "{}.*",
            self.subjects
                .outcome_inbox(&self.instance.simple().to_string())
        );
        let mut sub = self.nats.subscribe(subject).await?;
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                match serde_json::from_slice::<Outcome>(&msg.payload) {
                    Ok(outcome) => self.deliver(outcome),
                    Err(e) => tracing::warn!(error = %e, "undecodable outcome"),
                }
            }
        }))
    }
}
