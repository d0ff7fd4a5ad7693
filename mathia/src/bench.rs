//! What the benchmark binaries share: a `mathia serve` child process against
//! its own database, NATS prefix and Redis prefix (so its memory is measured
//! apart from the load generator's), and clients for its HTTP API and WebSocket.

use anyhow::Context as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;
use yawc::{Frame, OpCode, Options, WebSocket};

/// A WebSocket client.
pub type Socket = WebSocket<yawc::MaybeTlsStream<tokio::net::TcpStream>>;

/// A running `mathia serve` and what it needs to be cleaned up.
pub struct Server {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A pooled client.
    pub http: reqwest::Client,
    admin: PgConnection,
    db: String,
    prefix: String,
    nats_url: String,
    data: std::path::PathBuf,
}

/// Where the services are.
pub struct Services<'a> {
    /// An admin database URL to create the benchmark's database from.
    pub admin_database_url: &'a str,
    /// NATS.
    pub nats_url: &'a str,
    /// Redis.
    pub redis_url: &'a str,
}

impl Server {
    /// Start the `mathia` binary next to the running one with `env` on top of
    /// benchmark defaults (limits off), and wait until it answers.
    pub async fn start(services: &Services<'_>, env: &[(&str, &str)]) -> anyhow::Result<Server> {
        let db = format!("mathia_bench_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(services.admin_database_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut admin)
            .await?;
        let database_url = match services.admin_database_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db}"),
            None => anyhow::bail!("the admin URL names no database"),
        };
        let prefix = format!("b{}", &Uuid::new_v4().simple().to_string()[..8]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let exe = std::env::current_exe()?.with_file_name("mathia");
        let data = std::env::temp_dir().join(format!("mathia-bench-{prefix}"));
        std::fs::create_dir_all(&data)?;
        let key = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
        };
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("serve")
            .current_dir(&data)
            .env("MATHIA_DATABASE_URL", &database_url)
            .env("MATHIA_NATS_URL", services.nats_url)
            .env("MATHIA_REDIS_URL", services.redis_url)
            .env("MATHIA_LISTEN", format!("127.0.0.1:{port}"))
            .env("MATHIA_NATS_PREFIX", &prefix)
            .env("MATHIA_REDIS_PREFIX", format!("{prefix}:"))
            .env("MATHIA_MASTER_KEY", &key)
            .env("MATHIA_JWT_SECRET", &key)
            .env("MATHIA_RATE_LIMIT_API_PER_MIN", "0")
            .env("MATHIA_RATE_LIMIT_ANON_PER_MIN", "0")
            .env("MATHIA_CHAT_MESSAGES_PER_MIN", "0")
            .env("MATHIA_CHAT_MESSAGES_PER_DAY", "0")
            .env("MATHIA_REMINDERS_PER_12H", "0")
            .env("MATHIA_ARGON2_MEMORY_KIB", "1024")
            .env("MATHIA_WS_FRAMES_PER_SEC", "1000")
            .env("MATHIA_WS_IDLE_SECS", "600")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} (build it: cargo build --release -p mathia --bins)",
                exe.display()
            )
        })?;
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            admin,
            db,
            prefix,
            nats_url: services.nats_url.to_owned(),
            data,
        };
        for _ in 0..600 {
            if server
                .http
                .get(format!("{}/healthz", server.base))
                .send()
                .await
                .is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!("the server did not start")
    }

    /// The server's resident memory.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
            })
            .unwrap_or(0)
    }

    /// POST JSON; an error unless 2xx.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "{path}: {status} {body}");
        Ok(body)
    }

    /// Register and log in user number `i`: (id, access token).
    pub async fn user(&self, i: usize) -> anyhow::Result<(Uuid, String)> {
        let email = format!("w{i}@bench.local");
        let pw = "Bench&Mark-2026";
        let reg = self
            .post(
                "/v1/auth/register",
                None,
                &json!({"email": email, "password": pw, "display_name": "w"}),
            )
            .await?;
        let login = self
            .post(
                "/v1/auth/login",
                None,
                &json!({"email": email, "password": pw}),
            )
            .await?;
        Ok((
            reg["user_id"].as_str().context("user id")?.parse()?,
            login["access_token"].as_str().context("token")?.to_owned(),
        ))
    }

    /// A WebSocket authenticated with `token` and subscribed to `channel`.
    pub async fn open(&self, token: &str, channel: &str) -> anyhow::Result<Socket> {
        let url = format!("{}/v1/ws", self.base.replacen("http", "ws", 1));
        let mut ws = WebSocket::connect(url.parse()?)
            .with_options(Options::default())
            .await?;
        ws.send(Frame::text(
            json!({"type": "auth", "token": token}).to_string(),
        ))
        .await?;
        ws.send(Frame::text(
            json!({"type": "subscribe", "id": "s", "channel": channel}).to_string(),
        ))
        .await?;
        while let Some(f) = ws.next().await {
            if f.opcode() == OpCode::Text {
                let v: Value = serde_json::from_str(f.as_str())?;
                if v["type"] == "subscribed" {
                    return Ok(ws);
                }
                anyhow::ensure!(v["type"] != "error", "subscribe: {v}");
            }
        }
        anyhow::bail!("the socket closed before subscribing")
    }

    /// Stop the server; drop its database and streams.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db
        )))
        .execute(&mut self.admin)
        .await?;
        let js = async_nats::jetstream::new(async_nats::connect(&self.nats_url).await?);
        let subjects = events::Subjects::with_prefix(&self.prefix);
        let _ = js.delete_stream(subjects.commands_stream()).await;
        let _ = js.delete_stream(subjects.events_stream()).await;
        Ok(())
    }
}

/// The connection string of database `db` on the server of `admin`.
///
/// ```
/// use mathia::bench::db_url;
/// assert_eq!(db_url("postgres://u@h:5432/postgres", "b1"), "postgres://u@h:5432/b1");
/// assert_eq!(
///     db_url("postgres://u@h/postgres?sslmode=disable", "b1"),
///     "postgres://u@h/b1?sslmode=disable"
/// );
/// ```
pub fn db_url(admin: &str, db: &str) -> String {
    // The query (`?options=…`, `?sslmode=…`) stays.
    let (admin, query) = match admin.split_once('?') {
        Some((url, query)) => (url, format!("?{query}")),
        None => (admin, String::new()),
    };
    match admin.rsplit_once('/') {
        Some((base, _)) if base.contains("://") && !base.ends_with('/') => {
            format!("{base}/{db}{query}")
        }
        _ => format!("{}/{db}{query}", admin.trim_end_matches('/')),
    }
}
