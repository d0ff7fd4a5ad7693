//! The `mathia` command. See the crate docs of `mathia` and the README.

use clap::{Parser, Subcommand};
use mathia::{Config, Roles};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
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
    /// Apply database migrations and exit.
    Migrate,
    /// Grant or revoke the admin role of an existing account (audited).
    Admin {
        #[command(subcommand)]
        action: AdminAction,
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
    let cli = Cli::parse();
    let none = Roles {
        gateway: false,
        handlers: false,
        relay: false,
        projections: false,
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
