//! Connections and migrations.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations of the whole backend, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connect a pool of at most `max` connections.
///
/// Its sessions plan each prepared statement once (`plan_cache_mode =
/// force_generic_plan`). Left to choose, Postgres kept re-planning our
/// statements on every execution: with `LIMIT $n` and range bounds as
/// parameters the generic plan's estimate looks worse than a custom one, so it
/// is never picked, although it is the same plan. A timeline page spent as long
/// in planning (0.36 ms) as in execution (0.38 ms); with the generic plan,
/// 0.02 ms of planning and the same index scans. Every statement here is a
/// keyed lookup or a short range, which is what generic plans are good at.
/// A URL that sets it itself (`?options=-c%20plan_cache_mode%3Dauto`) keeps its own.
pub async fn connect_pg(url: &str, max: u32) -> anyhow::Result<PgPool> {
    let redacted = || format!("connecting to Postgres at {}", redact_url(url));
    let mut options: PgConnectOptions = url.parse().with_context(redacted)?;
    if !options
        .get_options()
        .is_some_and(|o| o.contains("plan_cache_mode"))
    {
        options = options.options([("plan_cache_mode", "force_generic_plan")]);
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(redacted)
}

/// Apply every pending migration.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")
}

/// Connect to NATS, retrying forever in the background once connected.
pub async fn connect_nats(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {}", redact_url(url)))
}

/// A URL with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            super::redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            super::redact_url("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
    }
}
