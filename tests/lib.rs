//! Test harness: every test gets its own database (cloned from a migrated
//! template), its own NATS subject prefix and stream names, and its own Redis
//! key prefix, against the real services named by `MATHIA_TEST_DATABASE_URL`,
//! `MATHIA_NATS_URL` and `MATHIA_REDIS_URL` (see `scripts/services.sh`).
//! Logs appear only with `TEST_LOG=1`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use events::Subjects;
use mathia::{Config, Roles};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The admin connection string (a database the tests may create others from).
pub fn admin_url() -> String {
    std::env::var("MATHIA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// NATS for tests.
pub fn nats_url() -> String {
    std::env::var("MATHIA_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Redis for tests.
pub fn redis_url() -> String {
    std::env::var("MATHIA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn with_db(url: &str, db: &str) -> String {
    // The admin URL names a database (`…/postgres`): swap that last path segment.
    match url.rsplit_once('/') {
        Some((base, _)) if base.contains("://") && !base.ends_with('/') => format!("{base}/{db}"),
        _ => format!("{}/{db}", url.trim_end_matches('/')),
    }
}

/// Initialise test logging once, when `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,handlers=debug,projections=debug")
            .with_test_writer()
            .try_init();
    }
}

/// Create a fresh database from the migrated template; returns its URL and name.
pub async fn fresh_database() -> anyhow::Result<(String, String)> {
    let admin = admin_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .context("connecting to the admin database")?;
    let mut h = Sha256::new();
    let mut files: Vec<_> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))?
            .flatten()
            .map(|e| e.path())
            .collect();
    files.sort();
    for f in files {
        h.update(std::fs::read(&f)?);
    }
    let template = format!(
        "mathia_tmpl_{}",
        &h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()[..16]
    );
    sqlx::query("SELECT pg_advisory_lock(727274)")
        .execute(&mut conn)
        .await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&template)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {template}")))
            .execute(&mut conn)
            .await?;
        let pool = PgPool::connect(&with_db(&admin, &template)).await?;
        handlers::infra::migrate(&pool).await?;
        pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {template} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        )))
        .execute(&mut conn)
        .await?;
    }
    let name = format!("mathia_t_{}", Uuid::new_v4().simple());
    let created = sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE {template}"
    )))
    .execute(&mut conn)
    .await;
    sqlx::query("SELECT pg_advisory_unlock(727274)")
        .execute(&mut conn)
        .await?;
    created?;
    Ok((with_db(&admin, &name), name))
}

/// Drop a test database.
pub async fn drop_database(name: &str) {
    if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

/// A running backend, isolated from every other test.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// HTTP client.
    pub http: reqwest::Client,
    /// The test's database.
    pub pool: PgPool,
    /// Its name.
    pub db_name: String,
    /// Its configuration (reuse to start more roles against the same backend).
    pub config: Config,
    /// NATS names.
    pub subjects: Subjects,
    /// NATS client.
    pub nats: async_nats::Client,
    /// Running role groups, each stoppable.
    pub roles: std::sync::Mutex<Vec<RoleGroup>>,
}

/// A set of roles running as one `mathia::run`.
pub struct RoleGroup {
    /// Cancels it gracefully.
    pub shutdown: CancellationToken,
    /// Its task (abort it to simulate a crash).
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Roles made of one flag.
pub fn only(gateway: bool, handlers: bool, relay: bool, projections: bool) -> Roles {
    Roles {
        gateway,
        handlers,
        relay,
        projections,
        scheduler: false,
    }
}

impl TestApp {
    /// Every role in one process, with generous rate limits.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Roles::ALL, |_| {}).await
    }

    /// `roles`, with the configuration adjusted by `tweak`.
    pub async fn spawn_with(roles: Roles, tweak: impl FnOnce(&mut Config)) -> TestApp {
        init_logs();
        let (url, db_name) = fresh_database().await.expect("a fresh test database");
        let prefix = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut config = Config {
            database_url: url.clone(),
            nats_url: nats_url(),
            redis_url: redis_url(),
            listen: "127.0.0.1:0".into(),
            jwt_secret: Some("dGVzdC1vbmx5LXNlY3JldC10ZXN0LW9ubHktc2VjcmV0LTAxMjM0NTY3ODk=".into()),
            nats_prefix: prefix.clone(),
            redis_prefix: format!("{prefix}:"),
            rate_limit_api_per_min: 1_000_000,
            rate_limit_anon_per_min: 1_000_000,
            command_timeout_ms: 10_000,
            read_wait_ms: 5_000,
            database_pool: 16,
            handler_batch: 512,
            argon2_memory_kib: 1024,
            // Roles as tasks (the default), so `crash` can kill one by aborting it.
            role_threads: false,
            // A fresh master key per test app: nothing one test seals opens in another.
            master_key: Some(
                base64::engine::general_purpose::STANDARD
                    .encode(commands::crypto::Key::random().as_bytes()),
            ),
            chat_messages_per_min: 1_000_000,
            chat_messages_per_day: 1_000_000,
            searches_per_day: 1_000_000,
            uploads_per_day: 1_000_000,
            upload_max_bytes: 50 * 1024 * 1024,
            // A directory per test app, so a test can look at what rests on disk.
            upload_dir: std::env::temp_dir().join(format!("mathia-uploads-{prefix}")),
            ..Config::defaults()
        };
        tweak(&mut config);
        let pool = PgPool::connect(&url).await.expect("test pool");
        let nats = async_nats::connect(&config.nats_url)
            .await
            .expect("NATS for tests (run scripts/services.sh)");
        let mut app = TestApp {
            base: String::new(),
            http: reqwest::Client::new(),
            pool,
            db_name,
            subjects: Subjects::with_prefix(&prefix),
            config,
            nats,
            roles: Default::default(),
        };
        if roles.gateway {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr: SocketAddr = l.local_addr().expect("addr");
            app.base = format!("http://{addr}");
            app.launch(roles, Some(l));
            // Wait for the gateway to answer.
            for _ in 0..400 {
                if app
                    .http
                    .get(format!("{}/healthz", app.base))
                    .send()
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        } else {
            app.launch(roles, None);
        }
        app
    }

    fn launch(&self, roles: Roles, listener: Option<tokio::net::TcpListener>) -> usize {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mathia::run(
            self.config.clone(),
            roles,
            listener,
            shutdown.clone(),
        ));
        let mut groups = self.roles.lock().expect("roles");
        groups.push(RoleGroup { shutdown, task });
        groups.len() - 1
    }

    /// Start another group of roles (not the gateway) against the same backend; returns its index.
    pub fn start(&self, roles: Roles) -> usize {
        assert!(!roles.gateway, "one gateway per test app");
        self.launch(roles, None)
    }

    /// Kill role group `i` at once: its in-flight work is dropped mid-way, like a crash.
    pub async fn crash(&self, i: usize) {
        let handle = self.roles.lock().expect("roles")[i].task.abort_handle();
        handle.abort();
        while !handle.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// POST JSON with an optional bearer token and extra headers.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    /// Any method, with an optional JSON body and headers.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    /// GET with an optional bearer token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    /// Register and log in; returns (user id, access token).
    pub async fn user(&self, email: &str) -> (Uuid, String) {
        let r = self
            .post(
                "/v1/auth/register",
                None,
                &json!({"email": email, "password": "Str0ng&Secret!", "display_name": "T"}),
                &[],
            )
            .await;
        assert_eq!(r.status, 201, "register {email}: {}", r.body);
        let id: Uuid = r.body["user_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("user id");
        let r = self
            .post(
                "/v1/auth/login",
                None,
                &json!({"email": email, "password": "Str0ng&Secret!"}),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "login {email}: {}", r.body);
        (
            id,
            r.body["access_token"].as_str().expect("token").to_owned(),
        )
    }

    /// An admin account (registered, granted with `gateway::auth::set_admin`
    /// as `mathia admin grant` does, logged in); returns (user id, access token).
    pub async fn admin(&self) -> (Uuid, String) {
        let r = self
            .post("/v1/auth/register", None, &json!({"email": "admin@test.local", "password": "Str0ng&Secret!", "display_name": "A"}), &[])
            .await;
        assert_eq!(r.status, 201, "register admin: {}", r.body);
        assert_eq!(r.body["role"], "user", "registering never makes an admin");
        let user_id: Uuid = r.body["user_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("user id");
        assert!(
            gateway::auth::set_admin(&self.pool, "admin@test.local", true)
                .await
                .expect("grant")
        );
        let r = self
            .post(
                "/v1/auth/login",
                None,
                &json!({"email": "admin@test.local", "password": "Str0ng&Secret!"}),
                &[],
            )
            .await;
        assert_eq!(r.status, 200);
        (
            user_id,
            r.body["access_token"].as_str().expect("token").to_owned(),
        )
    }

    /// Open a KES wallet for `token`'s user and fund it with `amount` as admin `admin`.
    pub async fn funded_wallet(&self, token: &str, admin: &str, amount: i64) -> Uuid {
        let r = self
            .post("/v1/wallets", Some(token), &json!({"currency": "KES"}), &[])
            .await;
        assert_eq!(r.status, 201, "open wallet: {}", r.body);
        let id: Uuid = r.body["wallet_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("wallet id");
        if amount > 0 {
            let r = self
                .post(
                    &format!("/v1/wallets/{id}/deposits"),
                    Some(admin),
                    &json!({"amount": amount, "currency": "KES"}),
                    &[],
                )
                .await;
            assert_eq!(r.status, 201, "deposit: {}", r.body);
        }
        id
    }

    /// An admin, Alice with a KES wallet holding `funds`, and Bob with an empty one.
    pub async fn alice_and_bob(&self, funds: i64) -> Parties {
        let (_, admin) = self.admin().await;
        let (_, alice) = self.user("alice@test.local").await;
        let (bob_id, bob) = self.user("bob@test.local").await;
        let from = self.funded_wallet(&alice, &admin, funds).await;
        self.funded_wallet(&bob, &admin, 0).await;
        Parties {
            admin,
            alice,
            bob,
            bob_id,
            from,
        }
    }

    /// Wait (up to 5 s) until `wallet`'s posted balance, as `token` reads it,
    /// is `want` (a deposit credited by webhook lands asynchronously); the last seen.
    pub async fn posted_balance(&self, token: &str, wallet: Uuid, want: i64) -> serde_json::Value {
        let mut posted = serde_json::Value::Null;
        for _ in 0..100 {
            self.settle("wallet").await;
            posted = self
                .get(&format!("/v1/wallets/{wallet}"), Some(token))
                .await
                .body["balance"]["posted"]
                .clone();
            if posted == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        posted
    }

    /// Row count of a table.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Wait until projector `model` has applied the head of the log.
    pub async fn settle(&self, model: &str) {
        for _ in 0..1200 {
            let head = handlers::store::head_position(&self.pool)
                .await
                .expect("head");
            if projections::checkpoint(&self.pool, model)
                .await
                .expect("checkpoint")
                >= head
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("projector {model} did not catch up with the log");
    }

    /// Another gateway of the same backend, serving once it answers `/healthz`:
    /// its base URL, what stops it, and its task.
    pub async fn second_gateway(
        &self,
    ) -> (String, CancellationToken, JoinHandle<anyhow::Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(mathia::run(
            self.config.clone(),
            only(true, false, false, false),
            Some(listener),
            stop.clone(),
        ));
        for _ in 0..800 {
            if reqwest::get(format!("{base}/healthz")).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        (base, stop, task)
    }

    /// Stop everything, delete the streams and drop the database.
    pub async fn stop(self) {
        let groups = std::mem::take(&mut *self.roles.lock().expect("roles"));
        for g in &groups {
            g.shutdown.cancel();
        }
        for g in groups {
            let _ = tokio::time::timeout(Duration::from_secs(10), g.task).await;
        }
        let js = async_nats::jetstream::new(self.nats.clone());
        let _ = js.delete_stream(self.subjects.commands_stream()).await;
        let _ = js.delete_stream(self.subjects.events_stream()).await;
        self.pool.close().await;
        drop_database(&self.db_name).await;
        let _ = std::fs::remove_dir_all(&self.config.upload_dir);
    }
}

/// Serve `router` (a provider stub) on a free loopback port; its base URL.
pub async fn serve_stub(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a stub");
    let url = format!("http://{}", listener.local_addr().expect("stub address"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// The usual cast of a wallet test.
pub struct Parties {
    /// Admin token.
    pub admin: String,
    /// Alice's token.
    pub alice: String,
    /// Bob's token.
    pub bob: String,
    /// Bob's user id.
    pub bob_id: Uuid,
    /// Alice's wallet.
    pub from: Uuid,
}

/// An HTTP answer, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

impl Reply {
    /// Read a response whole.
    pub async fn from(res: reqwest::Response) -> Reply {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap_or_default();
        Reply {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert a problem+json answer with `status` and `code`.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "want {status} {code}, got {}",
            self.body
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.body
        );
        assert_eq!(self.body["code"], code, "{}", self.body);
        assert_eq!(self.body["status"], status);
        assert!(
            self.body["type"].is_string()
                && self.body["title"].is_string()
                && self.body["detail"].is_string()
        );
    }
}
