//! # mathia — one binary, every role
//!
//! `mathia serve` runs the gateway, handlers, relay and projections in one
//! process (the embedded default); `mathia gateway|handlers|relay|projections`
//! runs one role, so each scales out on its own; `mathia migrate` applies the
//! migrations. [`Config`] is read from flags, `MATHIA_*` environment variables
//! and an optional TOML file, and checked before anything starts ([`config`]).

pub mod bench;
pub mod config;
pub mod ops;
pub mod sampler;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use events::Subjects;
use handlers::handler::{HandlerConfig, Handlers};
use handlers::infra;
use handlers::relay::Relay;
use projections::assistant::{
    Assistant, AssistantConfig, AssistantQueue, FixedRates, Llm, OpenAiLlm,
};
use projections::chat::ChatProjector;
use projections::classifier::{Classifier, HttpClassifier, RuleClassifier};
use projections::feed::FeedProjector;
use projections::itinerary::{FeedQueue, ItineraryProjector, Poster};
use projections::reminder::RemindersProjector;
use projections::runner::Runner;
use projections::scheduler::Scheduler;
use projections::screen::{ScreenConfig, ScreenQueue, Screener};
use projections::wallet::WalletProjector;
use projections::webhook::{Deliverer, DeliveryConfig, WebhookQueue};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Configuration of every role. Each flag also reads its `MATHIA_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Postgres connection string (event store and read models).
    #[arg(
        long,
        env = "MATHIA_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/mathia"
    )]
    pub database_url: String,
    /// NATS server with JetStream, version 2.10 or later.
    #[arg(long, env = "MATHIA_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Redis (rate limits, pending markers).
    #[arg(
        long,
        env = "MATHIA_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Where the gateway listens.
    #[arg(long, env = "MATHIA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// HS256 secret for access tokens, base64, at least 32 bytes. Required
    /// for `gateway`; `serve` makes a random one (tokens die with the process) when unset.
    #[arg(long, env = "MATHIA_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// AES-256 master key, base64 of 32 bytes: wraps every room's data key.
    /// Required for `gateway` and `projections`; `serve` without it keeps one in
    /// `.data/master.key` (created on first start). Losing it loses every message.
    #[arg(long, env = "MATHIA_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Chat messages per user per minute (0: no limit).
    #[arg(long, env = "MATHIA_CHAT_MESSAGES_PER_MIN", default_value_t = 30)]
    pub chat_messages_per_min: u32,
    /// Chat messages per user per day (0: no limit).
    #[arg(long, env = "MATHIA_CHAT_MESSAGES_PER_DAY", default_value_t = 1000)]
    pub chat_messages_per_day: u32,
    /// Searches per user per day (0: no limit).
    #[arg(long, env = "MATHIA_SEARCHES_PER_DAY", default_value_t = 100)]
    pub searches_per_day: u32,
    /// Uploads per user per day (0: no limit).
    #[arg(long, env = "MATHIA_UPLOADS_PER_DAY", default_value_t = 20)]
    pub uploads_per_day: u32,
    /// Largest upload, in bytes (50 MiB by default).
    #[arg(long, env = "MATHIA_UPLOAD_MAX_BYTES", default_value_t = 50 * 1024 * 1024)]
    pub upload_max_bytes: u64,
    /// Directory of the local-disk object store: uploaded files, sealed.
    #[arg(long, env = "MATHIA_UPLOAD_DIR", default_value = ".data/uploads")]
    pub upload_dir: std::path::PathBuf,
    /// Origins allowed to open the WebSocket, comma-separated (empty: any; tokens
    /// never ride in cookies, so this is defence in depth).
    #[arg(
        long,
        env = "MATHIA_WS_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub ws_origins: Vec<String>,
    /// Largest WebSocket frame a client may send, in bytes.
    #[arg(long, env = "MATHIA_WS_MAX_FRAME", default_value_t = 64 * 1024)]
    pub ws_max_frame: usize,
    /// Client frames per second per WebSocket (bursts of twice that).
    #[arg(long, env = "MATHIA_WS_FRAMES_PER_SEC", default_value_t = 20)]
    pub ws_frames_per_sec: u32,
    /// Seconds between the server's pings.
    #[arg(long, env = "MATHIA_WS_HEARTBEAT_SECS", default_value_t = 25)]
    pub ws_heartbeat_secs: u64,
    /// Seconds of silence after which a WebSocket is closed (4000).
    #[arg(long, env = "MATHIA_WS_IDLE_SECS", default_value_t = 60)]
    pub ws_idle_secs: u64,
    /// Answer messages that mention @mathia (the assistant runs in the projections role).
    #[arg(long, env = "MATHIA_ASSISTANT", default_value_t = true, action = clap::ArgAction::Set)]
    pub assistant: bool,
    /// Assistant requests per user per hour (0: no limit).
    #[arg(long, env = "MATHIA_ASSISTANT_PER_HOUR", default_value_t = 100)]
    pub assistant_per_hour: u32,
    /// Base URL of an OpenAI-compatible API for summaries and open questions
    /// (without `/v1/chat/completions`); unset: the offline rules only.
    #[arg(long, env = "MATHIA_LLM_URL")]
    pub llm_url: Option<String>,
    /// The model to ask.
    #[arg(long, env = "MATHIA_LLM_MODEL", default_value = "gpt-4o-mini")]
    pub llm_model: String,
    /// Bearer key of that API.
    #[arg(long, env = "MATHIA_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,
    /// Exchange rates conversions (`POST /v1/conversions`) are made at and the
    /// assistant quotes, `USD/KES=129.25,EUR/KES=140.10` (the inverse of each
    /// pair is implied; a pair not given is never guessed).
    #[arg(long, env = "MATHIA_FX_RATES", default_value = "")]
    pub fx_rates: String,
    /// How often the scheduler runs the ledger reconciliation report, in
    /// seconds (0: never; admins still run it on demand).
    #[arg(long, env = "MATHIA_RECONCILE_SECS", default_value_t = 3600)]
    pub reconcile_secs: u64,
    /// How often the scheduler looks for due work, in ms.
    #[arg(long, env = "MATHIA_SCHEDULER_TICK_MS", default_value_t = 100)]
    pub scheduler_tick_ms: u64,
    /// Waits between webhook delivery attempts, then the dead letter
    /// (units ms, s, m, h). SPEC §6: 0.2 s, 1 s, 2 s, 5 s, … up to 24 h.
    #[arg(
        long,
        env = "MATHIA_WEBHOOK_SCHEDULE",
        default_value = "200ms,1s,2s,5s,10s,30s,1m,5m,15m,30m,1h,2h,4h,8h,16h,24h"
    )]
    pub webhook_schedule: String,
    /// Each wait is scaled by a random factor in [1 - jitter, 1 + jitter).
    #[arg(long, env = "MATHIA_WEBHOOK_JITTER", default_value_t = 0.2)]
    pub webhook_jitter: f64,
    /// Longest a webhook delivery attempt may take before it counts as failed.
    #[arg(long, env = "MATHIA_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// How often an idle webhook deliverer looks for due deliveries, in ms.
    #[arg(long, env = "MATHIA_WEBHOOK_POLL_MS", default_value_t = 100)]
    pub webhook_poll_ms: u64,
    /// Reminders a user may set per 12 hours (0: no limit).
    #[arg(long, env = "MATHIA_REMINDERS_PER_12H", default_value_t = 10)]
    pub reminders_per_12h: u32,
    /// Positions of the log whose feed rows are kept for resuming (older cursors get `recovered: false`).
    #[arg(long, env = "MATHIA_FEED_RETENTION", default_value_t = 5_000_000)]
    pub feed_retention: i64,
    /// Prefix of every subject and stream name (empty in a deployment).
    #[arg(long, env = "MATHIA_NATS_PREFIX", default_value = "")]
    pub nats_prefix: String,
    /// Prefix of every Redis key.
    #[arg(long, env = "MATHIA_REDIS_PREFIX", default_value = "")]
    pub redis_prefix: String,
    /// Requests per minute per principal (0: no limit).
    #[arg(long, env = "MATHIA_RATE_LIMIT_API_PER_MIN", default_value_t = 60)]
    pub rate_limit_api_per_min: u32,
    /// Requests per minute per IP without a token (0: no limit).
    #[arg(long, env = "MATHIA_RATE_LIMIT_ANON_PER_MIN", default_value_t = 10)]
    pub rate_limit_anon_per_min: u32,
    /// How long a write waits for its decision before answering 202.
    #[arg(long, env = "MATHIA_COMMAND_TIMEOUT_MS", default_value_t = 5000)]
    pub command_timeout_ms: u64,
    /// How long a read waits for `after_position`.
    #[arg(long, env = "MATHIA_READ_WAIT_MS", default_value_t = 2000)]
    pub read_wait_ms: u64,
    /// Postgres connections per process.
    #[arg(long, env = "MATHIA_DATABASE_POOL", default_value_t = 32)]
    pub database_pool: u32,
    /// Most commands decided in one transaction.
    #[arg(long, env = "MATHIA_HANDLER_BATCH", default_value_t = 512)]
    pub handler_batch: usize,
    /// In `serve`, run the handlers, the relay and each projector on a thread and
    /// scheduler of their own, with their own connections, as if they were
    /// separate processes. Off by default: measured with `loadgen --role-threads`
    /// it shortens projection visibility at saturation but lengthens answers at
    /// moderate load on 2 cores.
    #[arg(long, env = "MATHIA_ROLE_THREADS", default_value_t = false, action = clap::ArgAction::Set)]
    pub role_threads: bool,
    /// Moderation classifier: `rules` (a local word list, the default), `http`
    /// (an OpenAI-compatible `/v1/moderations` API) or `off` (no screening).
    #[arg(long, env = "MATHIA_MODERATION_CLASSIFIER", default_value = "rules",
          value_parser = ["rules", "http", "off"])]
    pub moderation_classifier: String,
    /// The rules classifier's list, `category:word,word;category:word` (`-` joins
    /// the words of a phrase); unset: the built-in list.
    #[arg(long, env = "MATHIA_MODERATION_WORDS")]
    pub moderation_words: Option<String>,
    /// Base URL of the HTTP classifier (without `/v1/moderations`).
    #[arg(long, env = "MATHIA_MODERATION_URL")]
    pub moderation_url: Option<String>,
    /// Model the HTTP classifier asks for.
    #[arg(
        long,
        env = "MATHIA_MODERATION_MODEL",
        default_value = "omni-moderation-latest"
    )]
    pub moderation_model: String,
    /// Bearer key of the HTTP classifier.
    #[arg(long, env = "MATHIA_MODERATION_API_KEY", hide_env_values = true)]
    pub moderation_api_key: Option<String>,
    /// The HTTP classifier also flags a text whose best category score reaches this (0 to 1).
    #[arg(long, env = "MATHIA_MODERATION_THRESHOLD", default_value_t = 0.8)]
    pub moderation_threshold: f64,
    /// Timeout of one HTTP classifier call.
    #[arg(long, env = "MATHIA_MODERATION_TIMEOUT_MS", default_value_t = 5000)]
    pub moderation_timeout_ms: u64,
    /// Messages per classifier batch.
    #[arg(long, env = "MATHIA_MODERATION_BATCH", default_value_t = 10)]
    pub moderation_batch: u32,
    /// Longest a message waits for its batch to fill before it is screened anyway.
    #[arg(long, env = "MATHIA_MODERATION_FLUSH_MS", default_value_t = 5000)]
    pub moderation_flush_ms: u64,
    /// Classifier flags that mute a sender in a room (0: never mute).
    #[arg(long, env = "MATHIA_MUTE_AFTER_FLAGS", default_value_t = 3)]
    pub mute_after_flags: u32,
    /// How long that mute lasts, in minutes.
    #[arg(long, env = "MATHIA_MUTE_MINUTES", default_value_t = 60)]
    pub mute_minutes: u64,
    /// Base URL of the travel search provider, an Amadeus-style API
    /// (`/v2/shopping/flight-offers`, `/v3/shopping/hotel-offers`); unset: no provider.
    #[arg(long, env = "MATHIA_TRAVEL_URL")]
    pub travel_url: Option<String>,
    /// Bearer key of the travel provider.
    #[arg(long, env = "MATHIA_TRAVEL_API_KEY", hide_env_values = true)]
    pub travel_api_key: Option<String>,
    /// Timeout of one travel provider call.
    #[arg(long, env = "MATHIA_TRAVEL_TIMEOUT_MS", default_value_t = 5000)]
    pub travel_timeout_ms: u64,
    /// Retries of a travel provider call that timed out or answered 429/5xx.
    #[arg(long, env = "MATHIA_TRAVEL_RETRIES", default_value_t = 2)]
    pub travel_retries: u32,
    /// When no provider answers, answer a sample labelled `source: "fallback"`
    /// instead of 503. Off by default: nothing invented unless asked for.
    #[arg(long, env = "MATHIA_TRAVEL_FALLBACK", default_value_t = false, action = clap::ArgAction::Set)]
    pub travel_fallback: bool,
    /// Transfer fee in basis points of the amount (rounded down), paid by the
    /// sender to a sharded fee account; 0 with a 0 fixed fee: no fee leg.
    #[arg(long, env = "MATHIA_WALLET_FEE_BPS", default_value_t = 0)]
    pub wallet_fee_bps: u32,
    /// Fixed part of the transfer fee in minor units.
    #[arg(long, env = "MATHIA_WALLET_FEE_FIXED", default_value_t = 0)]
    pub wallet_fee_fixed: i64,
    /// HMAC-SHA256 secret payment providers sign webhooks with
    /// (`/v1/webhooks/payments/{provider}`); unset: those webhooks answer 503.
    #[arg(long, env = "MATHIA_PAYMENTS_WEBHOOK_SECRET", hide_env_values = true)]
    pub payments_webhook_secret: Option<String>,
    /// Base URL of the M-Pesa STK-push provider (`POST /v1/wallets/{id}/topups`).
    #[arg(long, env = "MATHIA_PAYMENTS_URL")]
    pub payments_url: Option<String>,
    /// API key of that provider.
    #[arg(long, env = "MATHIA_PAYMENTS_API_KEY", hide_env_values = true)]
    pub payments_api_key: Option<String>,
    /// Base URL of the card provider (Stripe-style payment intents) behind
    /// card top-ups (`POST /v1/wallets/{id}/topups` with `method: card`).
    #[arg(long, env = "MATHIA_CARD_URL")]
    pub card_url: Option<String>,
    /// Secret key of the card provider.
    #[arg(long, env = "MATHIA_CARD_API_KEY", hide_env_values = true)]
    pub card_api_key: Option<String>,
    /// Argon2 memory cost in KiB.
    #[arg(long, env = "MATHIA_ARGON2_MEMORY_KIB", default_value_t = 19 * 1024)]
    pub argon2_memory_kib: u32,
    /// How often the gateway process samples lags and consumer pending counts
    /// into its `/metrics` gauges, in ms.
    #[arg(long, env = "MATHIA_METRICS_SAMPLE_MS", default_value_t = 5000)]
    pub metrics_sample_ms: u64,
    /// In a process without the gateway, serve `/metrics` and `/healthz` here
    /// (e.g. 0.0.0.0:9090); unset: such a process exports no metrics.
    #[arg(long, env = "MATHIA_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Replicas of the `COMMANDS` and `EVENTS` streams (1 on a single node, 3 in a
    /// JetStream cluster; consumers follow their stream). 0: keep the definitions' value.
    #[arg(long, env = "MATHIA_NATS_REPLICAS", default_value_t = 0)]
    pub nats_replicas: usize,
    /// A TOML file of settings whose keys are these flags' names (`database_url = "…"`);
    /// flags and `MATHIA_*` variables override it. See `deploy/mathia.example.toml`.
    #[arg(long, env = "MATHIA_CONFIG_FILE")]
    pub config_file: Option<std::path::PathBuf>,
}

impl Config {
    /// The defaults of every flag (and the `MATHIA_*` variables that are set),
    /// for programs that build a configuration in code (tests, the load generator).
    pub fn defaults() -> Config {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        <Defaults as clap::Parser>::parse_from(["mathia"]).config
    }
}

/// Which roles a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// HTTP gateway.
    pub gateway: bool,
    /// Command handlers.
    pub handlers: bool,
    /// Outbox relay.
    pub relay: bool,
    /// Projectors.
    pub projections: bool,
    /// The scheduler (due reminders).
    pub scheduler: bool,
}

impl Roles {
    /// Everything (`serve`).
    pub const ALL: Roles = Roles {
        gateway: true,
        handlers: true,
        relay: true,
        projections: true,
        scheduler: true,
    };
}

/// The shared connections.
#[derive(Clone)]
pub struct Infra {
    /// Postgres.
    pub pool: sqlx::PgPool,
    /// NATS.
    pub nats: async_nats::Client,
    /// Names.
    pub subjects: Subjects,
}

/// Connect to Postgres and NATS and make sure the streams exist.
pub async fn connect(config: &Config, name: &str) -> anyhow::Result<Infra> {
    let pool = infra::connect_pg(&config.database_url, config.database_pool).await?;
    let nats = infra::connect_nats(&config.nats_url, name).await?;
    let subjects = Subjects::with_prefix(&config.nats_prefix);
    let js = async_nats::jetstream::new(nats.clone());
    handlers::bus::ensure_streams_replicated(&js, &subjects, config.nats_replicas).await?;
    Ok(Infra {
        pool,
        nats,
        subjects,
    })
}

/// A role's loop, boxed.
type RoleFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Run a role: on a thread and current-thread scheduler of its own with its own
/// connections (`config.role_threads`), or as a task sharing `shared`'s connections.
fn role<F, Fut>(
    config: &Config,
    shared: &Infra,
    name: &'static str,
    pool_size: u32,
    body: F,
) -> RoleFuture
where
    F: FnOnce(Infra) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    if !config.role_threads {
        return Box::pin(body(shared.clone()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let config = config.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("mathia-{name}"))
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async move {
                        let pool = infra::connect_pg(&config.database_url, pool_size).await?;
                        let nats = infra::connect_nats(&config.nats_url, &format!("mathia-{name}"))
                            .await?;
                        let subjects = Subjects::with_prefix(&config.nats_prefix);
                        body(Infra {
                            pool,
                            nats,
                            subjects,
                        })
                        .await
                    })
                });
            let _ = tx.send(result);
        });
    Box::pin(async move {
        spawned.with_context(|| format!("starting the {name} thread"))?;
        rx.await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the {name} thread panicked")))
    })
}

fn jwt_secret(config: &Config, roles: Roles) -> anyhow::Result<Vec<u8>> {
    match &config.jwt_secret {
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .context("MATHIA_JWT_SECRET is not valid base64"),
        None if roles == Roles::ALL => {
            tracing::warn!(
                "MATHIA_JWT_SECRET is unset: using a random secret; tokens will not survive a restart"
            );
            Ok(rand::random::<[u8; 32]>().to_vec())
        }
        None => anyhow::bail!(
            "MATHIA_JWT_SECRET is required when the gateway runs alone (all instances must share it)"
        ),
    }
}

/// The master key: from the configuration, or (for `serve` only) from
/// `.data/master.key`, created on first use.
pub fn master_key(config: &Config, roles: Roles) -> anyhow::Result<commands::crypto::Key> {
    let encoded = match &config.master_key {
        Some(k) => k.trim().to_owned(),
        None if roles == Roles::ALL => {
            let path = std::path::Path::new(".data/master.key");
            if !path.exists() {
                std::fs::create_dir_all(".data")?;
                let key = base64::engine::general_purpose::STANDARD
                    .encode(commands::crypto::Key::random().as_bytes());
                write_private(path, &key).context("creating .data/master.key")?;
                tracing::warn!(
                    "MATHIA_MASTER_KEY is unset: created .data/master.key; back it up, every message depends on it"
                );
            }
            std::fs::read_to_string(path)
                .context("reading .data/master.key")?
                .trim()
                .to_owned()
        }
        None => anyhow::bail!(
            "MATHIA_MASTER_KEY is required when a role runs alone (all instances must share it)"
        ),
    };
    decode_master_key(&encoded, "MATHIA_MASTER_KEY")
}

/// A master key from its base64 form (`what` names where it came from in errors).
pub fn decode_master_key(encoded: &str, what: &str) -> anyhow::Result<commands::crypto::Key> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .with_context(|| format!("{what} is not valid base64"))?;
    commands::crypto::Key::from_slice(&bytes).with_context(|| {
        format!("{what} must be 32 bytes (base64 of 32 random bytes: openssl rand -base64 32)")
    })
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(contents.as_bytes())
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, contents)
    }
}

/// The configured moderation classifier; none when screening is off.
pub fn classifier(config: &Config) -> anyhow::Result<Option<Arc<dyn Classifier>>> {
    Ok(match config.moderation_classifier.as_str() {
        "off" => None,
        "http" => {
            let url = config
                .moderation_url
                .as_deref()
                .context("MATHIA_MODERATION_CLASSIFIER=http needs MATHIA_MODERATION_URL")?;
            anyhow::ensure!(
                (0.0..=1.0).contains(&config.moderation_threshold),
                "MATHIA_MODERATION_THRESHOLD must be between 0 and 1"
            );
            Some(Arc::new(HttpClassifier::new(
                url,
                &config.moderation_model,
                config.moderation_api_key.clone(),
                Duration::from_millis(config.moderation_timeout_ms),
                config.moderation_threshold,
            )?))
        }
        _ => Some(Arc::new(match &config.moderation_words {
            Some(spec) => RuleClassifier::parse(spec).context("MATHIA_MODERATION_WORDS")?,
            None => RuleClassifier::default(),
        })),
    })
}

/// Run `roles` until `shutdown` is cancelled. `listener` is required when the gateway runs.
pub async fn run(
    config: Config,
    roles: Roles,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let problems = config::problems(&config);
    if !problems.is_empty() {
        anyhow::bail!(
            "the configuration has {} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    // Install the metrics recorder before any role records a figure.
    let metrics_listener = match (&config.metrics_listen, roles.gateway) {
        (_, true) => {
            gateway::routes::health::prometheus();
            None
        }
        (Some(addr), false) => {
            gateway::routes::health::prometheus();
            Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("MATHIA_METRICS_LISTEN: cannot listen on {addr}"))?,
            )
        }
        (None, false) => None,
    };
    let keystore = if roles.gateway || roles.projections || roles.scheduler {
        Some(handlers::keystore::Keystore::new(master_key(
            &config, roles,
        )?))
    } else {
        None
    };
    let infra = connect(&config, "mathia").await?;
    if roles == Roles::ALL {
        infra::migrate(&infra.pool).await?;
    }
    // A JoinSet, not a detached tracker: if this future is dropped (the process
    // "crashes" in a test that aborts it), every role task dies with it.
    let mut set: JoinSet<bool> = JoinSet::new();
    let mut spawn = |name: &'static str, fut: RoleFuture| {
        set.spawn(async move {
            match fut.await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(
                        role = name,
                        error = format!("{e:#}"),
                        "role stopped with an error"
                    );
                    false
                }
            }
        });
    };
    if let Some(listener) = metrics_listener {
        let stop = shutdown.clone();
        spawn(
            "metrics",
            Box::pin(gateway::routes::health::serve_metrics(
                listener,
                async move { stop.cancelled().await },
            )),
        );
    }
    if roles.handlers {
        let (config, shutdown) = (config.clone(), shutdown.clone());
        spawn(
            "handlers",
            role(
                &config.clone(),
                &infra,
                "handlers",
                8,
                move |infra| async move {
                    let h = Handlers {
                        pool: infra.pool.clone(),
                        client: infra.nats.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                        config: HandlerConfig {
                            batch_max: config.handler_batch,
                            ..Default::default()
                        },
                    };
                    h.run(shutdown).await
                },
            ),
        );
    }
    if roles.relay {
        let (config, shutdown) = (config.clone(), shutdown.clone());
        spawn(
            "relay",
            role(
                &config.clone(),
                &infra,
                "relay",
                4,
                move |infra| async move {
                    let r = Relay {
                        pool: infra.pool.clone(),
                        database_url: config.database_url.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                        name: infra.subjects.events_stream(),
                    };
                    r.run(shutdown).await
                },
            ),
        );
    }
    if roles.projections {
        let keystore = keystore
            .clone()
            .context("projections need the master key")?;
        let (stop, chat_keys) = (shutdown.clone(), keystore.clone());
        spawn(
            "proj-chat",
            role(&config, &infra, "proj-chat", 4, move |infra| async move {
                let runner = Runner {
                    pool: infra.pool.clone(),
                    js: async_nats::jetstream::new(infra.nats.clone()),
                    subjects: infra.subjects.clone(),
                };
                runner
                    .run(
                        Arc::new(ChatProjector {
                            keystore: chat_keys,
                        }),
                        stop,
                    )
                    .await
            }),
        );
        // Itineraries: the read models, and the trip-room reactor (queue + poster).
        let stop = shutdown.clone();
        spawn(
            "proj-itinerary",
            role(
                &config,
                &infra,
                "proj-itinerary",
                2,
                move |infra| async move {
                    let runner = Runner {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                    };
                    runner.run(Arc::new(ItineraryProjector), stop).await
                },
            ),
        );
        let stop = shutdown.clone();
        spawn(
            "proj-itinerary-feed",
            role(
                &config,
                &infra,
                "proj-itinerary-feed",
                2,
                move |infra| async move {
                    let runner = Runner {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                    };
                    runner.run(Arc::new(FeedQueue), stop).await
                },
            ),
        );
        let (stop, poster_keys) = (shutdown.clone(), keystore.clone());
        spawn(
            "itinerary-poster",
            role(
                &config,
                &infra,
                "itinerary-poster",
                2,
                move |infra| async move {
                    let poster = Poster {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                        keystore: poster_keys,
                        poll: Duration::from_millis(200),
                    };
                    poster.run(stop).await
                },
            ),
        );
        if let Some(classifier) = classifier(&config)? {
            let stop = shutdown.clone();
            spawn(
                "proj-screen",
                role(&config, &infra, "proj-screen", 2, move |infra| async move {
                    let runner = Runner {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                    };
                    runner.run(Arc::new(ScreenQueue), stop).await
                }),
            );
            let (stop, keystore) = (shutdown.clone(), keystore.clone());
            let screen = ScreenConfig {
                batch: config.moderation_batch.max(1).into(),
                flush: Duration::from_millis(config.moderation_flush_ms),
                mute_after: config.mute_after_flags,
                mute_for: Duration::from_secs(config.mute_minutes * 60),
                ..ScreenConfig::default()
            };
            spawn(
                "screener",
                role(&config, &infra, "screener", 2, move |infra| async move {
                    let screener = Screener {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                        keystore,
                        classifier,
                        config: screen,
                    };
                    screener.run(stop).await
                }),
            );
        }
        let (stop, retention) = (shutdown.clone(), config.feed_retention.max(1));
        spawn(
            "proj-feed",
            role(&config, &infra, "proj-feed", 2, move |infra| async move {
                let runner = Runner {
                    pool: infra.pool.clone(),
                    js: async_nats::jetstream::new(infra.nats.clone()),
                    subjects: infra.subjects.clone(),
                };
                let pool = infra.pool.clone();
                let prune_stop = stop.clone();
                // Keep the feed to its retention: older cursors are refused whole.
                let pruner = async move {
                    while !prune_stop.is_cancelled() {
                        if let Err(e) = projections::feed::prune(&pool, retention).await {
                            tracing::warn!(error = format!("{e:#}"), "feed pruning failed");
                        }
                        tokio::select! {
                            _ = prune_stop.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                };
                let (ran, ()) = tokio::join!(runner.run(Arc::new(FeedProjector), stop), pruner);
                ran
            }),
        );
        let stop = shutdown.clone();
        spawn(
            "proj-webhooks",
            role(
                &config,
                &infra,
                "proj-webhooks",
                2,
                move |infra| async move {
                    let runner = Runner {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                    };
                    runner.run(Arc::new(WebhookQueue), stop).await
                },
            ),
        );
        if config.assistant {
            let stop = shutdown.clone();
            spawn(
                "proj-assistant",
                role(
                    &config,
                    &infra,
                    "proj-assistant",
                    2,
                    move |infra| async move {
                        let runner = Runner {
                            pool: infra.pool.clone(),
                            js: async_nats::jetstream::new(infra.nats.clone()),
                            subjects: infra.subjects.clone(),
                        };
                        runner.run(Arc::new(AssistantQueue), stop).await
                    },
                ),
            );
            let (stop, keystore) = (shutdown.clone(), keystore.clone());
            let llm: Option<Arc<dyn Llm>> = match &config.llm_url {
                Some(url) => Some(Arc::new(OpenAiLlm::new(
                    url,
                    &config.llm_model,
                    config.llm_api_key.clone(),
                    Duration::from_secs(60),
                )?)),
                None => None,
            };
            let rates = Arc::new(FixedRates::parse(&config.fx_rates).context("MATHIA_FX_RATES")?);
            let redis = redis::aio::ConnectionManager::new(
                redis::Client::open(config.redis_url.as_str())
                    .context("MATHIA_REDIS_URL is not a Redis URL")?,
            )
            .await
            .context("connecting to Redis")?;
            let assistant_config = AssistantConfig {
                per_hour: config.assistant_per_hour,
                redis_prefix: config.redis_prefix.clone(),
                dialog_ttl: Duration::from_secs(6 * 3600),
            };
            spawn(
                "assistant",
                role(&config, &infra, "assistant", 2, move |infra| async move {
                    let a = Assistant {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        nats: infra.nats.clone(),
                        subjects: infra.subjects.clone(),
                        keystore,
                        redis,
                        llm,
                        rates,
                        config: assistant_config,
                    };
                    a.run(stop).await
                }),
            );
        }
        let stop = shutdown.clone();
        spawn(
            "proj-reminders",
            role(
                &config,
                &infra,
                "proj-reminders",
                2,
                move |infra| async move {
                    let runner = Runner {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                    };
                    runner.run(Arc::new(RemindersProjector), stop).await
                },
            ),
        );
        let shutdown = shutdown.clone();
        spawn(
            "proj-wallet",
            role(&config, &infra, "proj-wallet", 4, move |infra| async move {
                let runner = Runner {
                    pool: infra.pool.clone(),
                    js: async_nats::jetstream::new(infra.nats.clone()),
                    subjects: infra.subjects.clone(),
                };
                runner.run(Arc::new(WalletProjector), shutdown).await
            }),
        );
    }
    if roles.scheduler {
        // Holds past their timeout: due work from proj_wallet_holds, expired by command.
        let stop = shutdown.clone();
        spawn(
            "hold-expirer",
            role(
                &config,
                &infra,
                "hold-expirer",
                2,
                move |infra| async move {
                    let expirer = projections::wallet::HoldExpirer {
                        pool: infra.pool.clone(),
                        js: async_nats::jetstream::new(infra.nats.clone()),
                        subjects: infra.subjects.clone(),
                        every: Duration::from_millis(100),
                    };
                    expirer.run(stop).await
                },
            ),
        );
        let (stop, keystore) = (
            shutdown.clone(),
            keystore
                .clone()
                .context("the scheduler needs the master key")?,
        );
        let tick = Duration::from_millis(config.scheduler_tick_ms.max(10));
        // Webhook deliveries are due work too: the deliverer runs with the scheduler.
        let delivery = DeliveryConfig {
            schedule: commands::webhook::Schedule::parse(
                &config.webhook_schedule,
                config.webhook_jitter,
            )
            .map_err(|e| anyhow::anyhow!("MATHIA_WEBHOOK_SCHEDULE / MATHIA_WEBHOOK_JITTER: {e}"))?,
            timeout: Duration::from_millis(config.webhook_timeout_ms.max(1)),
            poll: Duration::from_millis(config.webhook_poll_ms.max(5)),
            ..DeliveryConfig::default()
        };
        let (stop_deliveries, delivery_keys) = (shutdown.clone(), keystore.clone());
        spawn(
            "webhook-deliverer",
            role(
                &config,
                &infra,
                "webhook-deliverer",
                2,
                move |infra| async move {
                    Deliverer::new(infra.pool.clone(), delivery_keys, delivery)?
                        .run(stop_deliveries)
                        .await
                },
            ),
        );
        if config.reconcile_secs > 0 {
            let (stop, every) = (shutdown.clone(), Duration::from_secs(config.reconcile_secs));
            spawn(
                "reconciler",
                role(&config, &infra, "reconciler", 1, move |infra| async move {
                    projections::reconcile::Reconciler {
                        pool: infra.pool.clone(),
                        every,
                    }
                    .run(stop)
                    .await
                }),
            );
        }
        spawn(
            "scheduler",
            role(&config, &infra, "scheduler", 2, move |infra| async move {
                let s = Scheduler {
                    pool: infra.pool.clone(),
                    js: async_nats::jetstream::new(infra.nats.clone()),
                    subjects: infra.subjects.clone(),
                    keystore,
                    tick,
                };
                s.run(stop).await
            }),
        );
    }
    if roles.gateway {
        // The process that serves /metrics samples everyone's lag into it.
        let (stop, every) = (
            shutdown.clone(),
            Duration::from_millis(config.metrics_sample_ms.max(100)),
        );
        let (pool, js, subjects) = (
            infra.pool.clone(),
            async_nats::jetstream::new(infra.nats.clone()),
            infra.subjects.clone(),
        );
        spawn(
            "metrics-sampler",
            Box::pin(sampler::run(pool, js, subjects, every, stop)),
        );
        let listener = listener.context("the gateway needs a listener")?;
        let redis_client = redis::Client::open(config.redis_url.as_str())
            .context("MATHIA_REDIS_URL is not a Redis URL")?;
        let redis = redis::aio::ConnectionManager::new(redis_client)
            .await
            .context("connecting to Redis")?;
        let keys = gateway::auth::Keys::new(&jwt_secret(&config, roles)?)?;
        let settings = gateway::Settings {
            rate_limit_api_per_min: config.rate_limit_api_per_min,
            rate_limit_anon_per_min: config.rate_limit_anon_per_min,
            command_timeout: Duration::from_millis(config.command_timeout_ms),
            read_wait: Duration::from_millis(config.read_wait_ms),
            argon2_memory_kib: config.argon2_memory_kib,
            redis_prefix: config.redis_prefix.clone(),
            chat_messages_per_min: config.chat_messages_per_min,
            chat_messages_per_day: config.chat_messages_per_day,
            searches_per_day: config.searches_per_day,
            uploads_per_day: config.uploads_per_day,
            upload_max_bytes: config.upload_max_bytes,
            upload_dir: config.upload_dir.clone(),
            travel_url: config.travel_url.clone(),
            travel_api_key: config.travel_api_key.clone(),
            travel_timeout: Duration::from_millis(config.travel_timeout_ms),
            travel_retries: config.travel_retries,
            travel_fallback: config.travel_fallback,
            wallet_fee_bps: config.wallet_fee_bps,
            wallet_fee_fixed: config.wallet_fee_fixed,
            payments_webhook_secret: config
                .payments_webhook_secret
                .clone()
                .map(gateway::routes::payments::WebhookSecret),
            payments_url: config.payments_url.clone(),
            payments_api_key: config
                .payments_api_key
                .clone()
                .map(gateway::routes::payments::WebhookSecret),
            card_url: config.card_url.clone(),
            card_api_key: config
                .card_api_key
                .clone()
                .map(gateway::routes::payments::WebhookSecret),
            fx_rates: Arc::new(FixedRates::parse(&config.fx_rates).context("MATHIA_FX_RATES")?),
            ws_origins: config
                .ws_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            ws_max_frame: config.ws_max_frame,
            ws_frames_per_sec: config.ws_frames_per_sec,
            ws_heartbeat: Duration::from_secs(config.ws_heartbeat_secs.max(1)),
            ws_idle_timeout: Duration::from_secs(config.ws_idle_secs.max(2)),
            reminders_per_12h: config.reminders_per_12h,
            ..Default::default()
        };
        let state = gateway::AppState::new(
            infra.pool.clone(),
            infra.nats.clone(),
            redis,
            infra.subjects.clone(),
            settings,
            keys,
            keystore
                .clone()
                .context("the gateway needs the master key")?,
        );
        let stop = shutdown.clone();
        spawn(
            "gateway",
            Box::pin(gateway::run(state, listener, async move {
                stop.cancelled().await
            })),
        );
    }
    let mut failed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            done = set.join_next() => match done {
                None => break,
                // A role that ends on its own before shutdown is a failure of the process.
                Some(ok) => {
                    failed |= !ok.unwrap_or(false) || !shutdown.is_cancelled();
                    if failed {
                        shutdown.cancel();
                        break;
                    }
                }
            },
        }
    }
    while let Some(ok) = set.join_next().await {
        failed |= !ok.unwrap_or(false);
    }
    if failed {
        anyhow::bail!("a role failed");
    }
    Ok(())
}

/// `mathia status` as a table for a person.
pub fn render_status(s: &projections::status::Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let at = s
        .log
        .last_event_at
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| "never".into());
    let _ = writeln!(out, "{:<10} head {:<10} last event {at}", "log", s.log.head);
    for (kind, list) in [("relay", &s.relays), ("projector", &s.projectors)] {
        for p in list {
            let _ = writeln!(
                out,
                "{kind:<10} {:<16} position {:<10} lag {:>8} events {:>8.1} s{}",
                p.name,
                p.position,
                p.lag_events,
                p.lag_seconds,
                if p.stuck { "  STUCK" } else { "" }
            );
        }
    }
    for st in &s.streams {
        let _ = writeln!(
            out,
            "{:<10} {:<16} messages {:<10} bytes {:<12} seq {}..{}",
            "stream", st.name, st.messages, st.bytes, st.first_seq, st.last_seq
        );
        for c in &st.consumers {
            let _ = writeln!(
                out,
                "  consumer {:<16} pending {:<8} ack pending {:<6} redelivered {:<6} ack floor {}",
                c.name, c.num_pending, c.num_ack_pending, c.num_redelivered, c.ack_floor
            );
        }
    }
    for d in &s.dead_letters {
        let _ = writeln!(
            out,
            "{:<10} {:<16} parked {:<6} waiting {:<6} streams held {}",
            "deadletter", d.model, d.parked, d.waiting, d.streams
        );
    }
    for r in &s.rebuilds {
        let _ = writeln!(
            out,
            "{:<10} {:<16} position {:<10} started {} last moved {}",
            "rebuild",
            r.model,
            r.position,
            r.started_at.to_rfc3339(),
            r.updated_at.to_rfc3339()
        );
    }
    // The handler backlog: commands stored in COMMANDS and not yet decided.
    if let Some(h) = s
        .streams
        .iter()
        .flat_map(|st| st.consumers.iter())
        .find(|c| c.name == handlers::bus::HANDLERS)
    {
        let _ = writeln!(
            out,
            "{:<10} backlog {} commands ({} waiting, {} being decided)",
            "handlers",
            h.num_pending + h.num_ack_pending as u64,
            h.num_pending,
            h.num_ack_pending
        );
    }
    for reason in &s.stuck {
        let _ = writeln!(out, "STUCK: {reason}");
    }
    out
}

/// Logging setup.
pub mod telemetry {
    use tracing_subscriber::EnvFilter;

    /// Whether `MATHIA_LOG_FORMAT` (or the older `LOG_FORMAT`) asks for JSON lines.
    pub fn json_requested() -> bool {
        std::env::var("MATHIA_LOG_FORMAT")
            .or_else(|_| std::env::var("LOG_FORMAT"))
            .is_ok_and(|f| f.trim().eq_ignore_ascii_case("json"))
    }

    /// Structured logs to stderr: `RUST_LOG` filters, `MATHIA_LOG_FORMAT=json`
    /// (or `LOG_FORMAT=json`) for JSON lines, one object per event with the
    /// fields of the spans it happened in (`trace_id`, `span_id`, `request_id`…).
    pub fn init() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(
                "info,mathia=debug,gateway=debug,handlers=info,projections=info,tower_http=info",
            )
        });
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        if json_requested() {
            let _ = builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .try_init();
        } else {
            let _ = builder.try_init();
        }
    }
}
