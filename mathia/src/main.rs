//! The `mathia` command. See the crate docs of `mathia` and the README.

use anyhow::Context as _;
use clap::Subcommand;
use mathia::{Config, Roles};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser)]
#[command(
    name = "mathia",
    version,
    about = "Mathia backend: chat, wallet and itineraries, event-sourced"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every role in one process; migrates first.
    Serve,
    /// The HTTP gateway only.
    Gateway,
    /// The command handlers only.
    Handlers,
    /// The outbox relay only.
    Relay,
    /// The projectors only.
    Projections,
    /// The scheduler only: fires due reminders (run two for failover; each
    /// occurrence still fires once).
    Scheduler,
    /// Apply database migrations and exit.
    Migrate,
    /// Read the event log: list or follow it with filters, or show one event.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Grant or revoke the admin role of an existing account (audited).
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Rebuild a read model (or `all`) from the event log into shadow tables
    /// while the live ones keep serving, then swap them in atomically.
    /// Resumes an interrupted rebuild of the same model.
    Replay {
        /// wallet, chat, feed, itinerary, reminders, or all (reactors are never rebuilt).
        model: String,
        /// Rebuild into shadow, compare with the live model row for row, report
        /// the differences, swap nothing. Exits 1 when they differ.
        #[arg(long)]
        dry_run: bool,
        /// Start after this position instead of 0 (events up to it are left out).
        #[arg(long)]
        from: Option<i64>,
        /// Throw away an interrupted rebuild of this model and start again.
        #[arg(long)]
        restart: bool,
        /// Stop (resumably) after applying this many events.
        #[arg(long)]
        max_events: Option<u64>,
        /// Drop an interrupted rebuild and exit.
        #[arg(long, conflicts_with_all = ["dry_run", "from", "restart", "max_events"])]
        discard: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Events a projector could not apply, parked with their error while the
    /// later events of their stream wait.
    Deadletters {
        #[command(subcommand)]
        action: DeadlettersAction,
    },
    /// The configuration: `mathia config check` prints the effective settings
    /// (secrets redacted) and every problem; exits 1 when there is any.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Keys: `rotate-master` re-wraps every room key and webhook secret under a
    /// new master key (stop every process first; see deploy/RUNBOOK.md).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// The ledger reconciliation report: Σ debits = Σ credits per currency,
    /// balanced transfers, the read model, provider payments against their
    /// deposits. Kept as a run; exits 1 when anything disagrees.
    Reconcile {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Where every stream, consumer, the relay and every projector stands.
    /// Exits 2 when something is behind and not moving.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A reader behind the head that has not moved for this long is stuck.
        #[arg(long, default_value_t = 60)]
        stuck_after_secs: u64,
    },
}

#[derive(Subcommand)]
enum EventsAction {
    /// Events in position order, filtered; `--follow` keeps printing new ones.
    Tail {
        /// Only this stream, e.g. wallet.account.<uuid>.
        #[arg(long)]
        stream: Option<String>,
        /// Only this domain, e.g. wallet.
        #[arg(long)]
        domain: Option<String>,
        /// Only this event type, e.g. Credited.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only the events of this request (X-Request-Id). Scans: bound it with --after or --since.
        #[arg(long)]
        correlation: Option<uuid::Uuid>,
        /// Only events decided at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only events decided before this RFC 3339 time.
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Start after this position (0: from the beginning).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many (per poll with --follow).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Keep printing events as they are committed.
        #[arg(long)]
        follow: bool,
        /// One JSON envelope per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One event with all its metadata, by position or event id.
    Show {
        /// A position (e.g. 42) or an event id.
        key: String,
    },
}

#[derive(Subcommand)]
enum DeadlettersAction {
    /// Parked and waiting events, oldest first.
    List {
        /// Only this projector.
        #[arg(long)]
        projector: Option<String>,
        /// Include skipped ones.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Apply the parked event again (after a fix is deployed), then the waiting
    /// events of its stream in order. Exits 2 if one still fails.
    Retry {
        /// The dead letter's id.
        id: i64,
    },
    /// Skip the parked event (it stays listed as skipped) and apply the waiting
    /// events of its stream in order.
    Skip {
        /// The dead letter's id.
        id: i64,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// From MATHIA_MASTER_KEY to the key in --new-key-file, in one transaction;
    /// idempotent. Then restart everything with the new key.
    RotateMaster {
        /// A file holding the new key, base64 of 32 bytes (not a flag value:
        /// keys stay out of shell history and process lists).
        #[arg(long)]
        new_key_file: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the effective configuration and its source (flag, env, file,
    /// default), secrets redacted, then every problem found.
    Check,
}

#[derive(Subcommand)]
enum AdminAction {
    /// Make the account with this email an admin (from its next login or refresh).
    Grant {
        /// The account's email.
        email: String,
    },
    /// Make it an ordinary user again.
    Revoke {
        /// The account's email.
        email: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mathia::telemetry::init();
    let loaded = mathia::config::load::<Cli>(std::env::args_os().collect());
    let cli = loaded.parsed;
    let mut problems = loaded.file_problems;
    problems.extend(mathia::config::problems(&cli.config));
    if let Cmd::Config {
        action: ConfigAction::Check,
    } = cli.command
    {
        print!(
            "{}",
            mathia::config::render(&loaded.matches, &loaded.from_file)
        );
        if problems.is_empty() {
            println!("# the configuration is valid");
            return Ok(());
        }
        for p in &problems {
            eprintln!("problem: {p}");
        }
        eprintln!("{} problem(s)", problems.len());
        std::process::exit(1);
    }
    if !problems.is_empty() {
        // Every problem at once, not the first only.
        eprintln!(
            "mathia: the configuration has {} problem(s):",
            problems.len()
        );
        for p in &problems {
            eprintln!("  - {p}");
        }
        eprintln!("(`mathia config check` prints the effective configuration)");
        std::process::exit(2);
    }
    let none = Roles {
        gateway: false,
        handlers: false,
        relay: false,
        projections: false,
        scheduler: false,
    };
    let roles = match cli.command {
        Cmd::Migrate => {
            let pool = handlers::infra::connect_pg(&cli.config.database_url, 2).await?;
            handlers::infra::migrate(&pool).await?;
            println!("migrations applied");
            return Ok(());
        }
        Cmd::Status {
            json,
            stuck_after_secs,
        } => {
            let infra = mathia::connect(&cli.config, "mathia-status").await?;
            let js = async_nats::jetstream::new(infra.nats.clone());
            let status = projections::status::gather(
                &infra.pool,
                &js,
                &infra.subjects,
                std::time::Duration::from_secs(stuck_after_secs),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", mathia::render_status(&status));
            }
            std::process::exit(if status.stuck.is_empty() { 0 } else { 2 });
        }
        Cmd::Reconcile { json } => {
            let pool = handlers::infra::connect_pg(&cli.config.database_url, 2).await?;
            let report = projections::reconcile::reconcile(&pool).await?;
            projections::reconcile::record(&pool, &report, "cli").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", mathia::ops::render_reconciliation(&report));
            }
            std::process::exit(if report.balanced { 0 } else { 1 });
        }
        Cmd::Replay {
            model,
            dry_run,
            from,
            restart,
            max_events,
            discard,
            json,
        } => {
            // A connection per model: `replay all` rebuilds them side by side.
            let connections = mathia::ops::READ_MODELS.len() as u32;
            let pool = handlers::infra::connect_pg(&cli.config.database_url, connections).await?;
            if discard {
                return mathia::ops::discard(&pool, &model).await;
            }
            let options = projections::rebuild::Options {
                from,
                dry_run,
                restart,
                max_events,
                batch: None,
            };
            let code = mathia::ops::replay(&cli.config, &pool, &model, &options, json).await?;
            std::process::exit(code);
        }
        Cmd::Deadletters { action } => {
            let pool = handlers::infra::connect_pg(&cli.config.database_url, 2).await?;
            return match action {
                DeadlettersAction::List {
                    projector,
                    all,
                    json,
                } => mathia::ops::list_deadletters(&pool, projector.as_deref(), all, json).await,
                DeadlettersAction::Retry { id } => {
                    mathia::ops::settle_deadletter(&cli.config, &pool, id, false).await
                }
                DeadlettersAction::Skip { id } => {
                    mathia::ops::settle_deadletter(&cli.config, &pool, id, true).await
                }
            };
        }
        Cmd::Events { action } => {
            let pool = handlers::infra::connect_pg(&cli.config.database_url, 2).await?;
            return events_command(&pool, action).await;
        }
        Cmd::Admin { action } => {
            let pool = handlers::infra::connect_pg(&cli.config.database_url, 2).await?;
            let (email, admin) = match &action {
                AdminAction::Grant { email } => (email, true),
                AdminAction::Revoke { email } => (email, false),
            };
            if !gateway::auth::set_admin(&pool, email, admin).await? {
                anyhow::bail!("no account with email {email}");
            }
            println!(
                "{email} is now {}",
                if admin { "an admin" } else { "a user" }
            );
            return Ok(());
        }
        Cmd::Config { .. } => return Ok(()),
        Cmd::Keys {
            action: KeysAction::RotateMaster { new_key_file },
        } => {
            let old = mathia::master_key(&cli.config, none)?;
            let text = std::fs::read_to_string(&new_key_file)
                .with_context(|| format!("reading {}", new_key_file.display()))?;
            let new = mathia::decode_master_key(&text, "the new master key")?;
            let pool = handlers::infra::connect_pg(&cli.config.database_url, 2).await?;
            let done = handlers::master_key::rotate(&pool, &old, &new).await?;
            println!(
                "re-wrapped {} room keys and {} webhook secrets ({} already under the new key); \
                 now set MATHIA_MASTER_KEY to the new key everywhere and start again",
                done.room_keys, done.webhook_secrets, done.already_new
            );
            return Ok(());
        }
        Cmd::Serve => Roles::ALL,
        Cmd::Gateway => Roles {
            gateway: true,
            ..none
        },
        Cmd::Handlers => Roles {
            handlers: true,
            ..none
        },
        Cmd::Relay => Roles {
            relay: true,
            ..none
        },
        Cmd::Projections => Roles {
            projections: true,
            ..none
        },
        Cmd::Scheduler => Roles {
            scheduler: true,
            ..none
        },
    };
    let listener = match roles.gateway {
        true => Some(tokio::net::TcpListener::bind(&cli.config.listen).await?),
        false => None,
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    mathia::run(cli.config, roles, listener, shutdown).await
}

async fn events_command(pool: &sqlx::PgPool, action: EventsAction) -> anyhow::Result<()> {
    use handlers::store;
    match action {
        EventsAction::Show { key } => match store::find_event(pool, &key).await? {
            Some(e) => {
                println!("{}", serde_json::to_string_pretty(&e)?);
                Ok(())
            }
            None => anyhow::bail!("no event at position or with id {key}"),
        },
        EventsAction::Tail {
            stream,
            domain,
            event_type,
            correlation,
            since,
            until,
            after,
            limit,
            follow,
            json,
        } => {
            let mut filter = store::EventFilter {
                after,
                stream_id: stream,
                domain,
                event_type,
                correlation_id: correlation,
                since,
                until,
                limit,
            };
            if !json {
                println!(
                    "{:>10}  {:<27}  {:<56} {:>5}  {:<16} request",
                    "position", "occurred_at", "stream", "v", "type"
                );
            }
            loop {
                let batch = store::query_events(pool, &filter).await?;
                for e in &batch {
                    if json {
                        println!("{}", serde_json::to_string(e)?);
                    } else {
                        println!(
                            "{:>10}  {:<27}  {:<56} {:>5}  {:<16} {}",
                            e.position,
                            e.occurred_at
                                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                            e.stream_id,
                            e.version,
                            e.event_type,
                            e.correlation_id
                        );
                    }
                }
                if let Some(last) = batch.last() {
                    filter.after = last.position;
                }
                if !follow {
                    return Ok(());
                }
                if batch.is_empty() {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }
}
