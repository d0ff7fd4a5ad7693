//! Where the configuration comes from, and whether it makes sense.
//!
//! Every setting of [`crate::Config`] is, by precedence: a command-line flag, a
//! `MATHIA_*` environment variable, a key of the optional TOML file named by
//! `--config-file` / `MATHIA_CONFIG_FILE`, the default. The file's keys are the
//! flag names (`database_url`, `database-url` or `MATHIA_DATABASE_URL` all name the
//! same setting); lists may be TOML arrays. See `deploy/mathia.example.toml`.
//!
//! [`problems`] checks the values a type cannot: URLs and their schemes, key
//! lengths, origins, ranges, the little languages (webhook schedule, FX rates,
//! moderation words). Every problem is one line naming the variable, and all of
//! them are reported at once: `mathia` refuses to start with any, and
//! `mathia config check` prints the effective configuration (secrets redacted)
//! and every problem.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;

use base64::Engine as _;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};
use reqwest::Url;

use crate::Config;

/// A parsed command line with the file merged in.
pub struct Loaded<P> {
    /// The parsed command.
    pub parsed: P,
    /// The matches it came from (for [`render`]).
    pub matches: ArgMatches,
    /// Ids of the settings whose value came from the file.
    pub from_file: BTreeSet<String>,
    /// Problems with the file itself (unreadable, not TOML, unknown keys, bad values).
    pub file_problems: Vec<String>,
}

/// The setting a file key names: `database_url`, `database-url` and
/// `MATHIA_DATABASE_URL` are the same one.
fn setting_id(key: &str) -> String {
    let id = key.trim().to_ascii_lowercase().replace('-', "_");
    id.strip_prefix("mathia_").map(str::to_owned).unwrap_or(id)
}

fn toml_text(value: &toml::Value) -> Option<String> {
    Some(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(toml_text)
            .collect::<Option<Vec<_>>>()?
            .join(","),
        _ => return None,
    })
}

/// Parse `args` as `P` (whose arguments include [`Config`]'s), with the values
/// of the configuration file filled in where neither a flag nor a variable set
/// them. Exits like clap on `--help` and on malformed flags or variables.
pub fn load<P: clap::Parser>(args: Vec<OsString>) -> Loaded<P> {
    let cmd = P::command();
    let first = cmd.clone().get_matches_from(args.clone());
    let mut file_problems = Vec::new();
    let mut extra: Vec<OsString> = Vec::new();
    let mut from_file = BTreeSet::new();
    if let Some(path) = first.get_one::<PathBuf>("config_file") {
        let shown = path.display();
        match std::fs::read_to_string(path) {
            Err(e) => file_problems.push(format!("MATHIA_CONFIG_FILE: cannot read {shown}: {e}")),
            Ok(text) => match text.parse::<toml::Table>() {
                Err(e) => file_problems.push(format!(
                    "MATHIA_CONFIG_FILE: {shown} is not TOML: {}",
                    e.to_string().trim()
                )),
                Ok(table) => {
                    for (key, value) in &table {
                        let id = setting_id(key);
                        let arg = cmd.get_arguments().find(|a| a.get_id() == id.as_str());
                        let (Some(arg), false) = (arg, id == "config_file") else {
                            file_problems
                                .push(format!("{shown}: `{key}` is not a setting of mathia"));
                            continue;
                        };
                        let Some(text) = toml_text(value) else {
                            file_problems.push(format!(
                                "{shown}: `{key}` must be a string, number, boolean or list"
                            ));
                            continue;
                        };
                        if matches!(
                            first.value_source(&id),
                            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                        ) {
                            continue; // Overridden.
                        }
                        let Some(long) = arg.get_long() else { continue };
                        // Check the value's type here, with this one argument alone, so
                        // that a bad one is one problem among the others, not clap's exit.
                        let alone = clap::Command::new("mathia").arg(arg.clone());
                        if let Err(e) = alone
                            .try_get_matches_from(["mathia".into(), format!("--{long}={text}")])
                        {
                            let why = e.kind().as_str().unwrap_or("invalid value");
                            let text = if arg.is_hide_env_values_set() {
                                "<redacted>"
                            } else {
                                &text
                            };
                            file_problems.push(format!("{shown}: `{key}`: {why} `{text}`"));
                            continue;
                        }
                        extra.push(format!("--{long}={text}").into());
                        from_file.insert(id);
                    }
                }
            },
        }
    }
    let matches = if extra.is_empty() {
        first
    } else {
        // The file's values go right after the program name: `Config`'s flags
        // belong to the top-level command, before the subcommand.
        let mut full = Vec::with_capacity(args.len() + extra.len());
        let mut rest = args.into_iter();
        full.extend(rest.next());
        full.extend(extra);
        full.extend(rest);
        cmd.get_matches_from(full)
    };
    let parsed = P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Loaded {
        parsed,
        matches,
        from_file,
        file_problems,
    }
}

/// The effective configuration, one `VARIABLE=value  # source` line a setting,
/// secrets (and passwords inside URLs) redacted.
pub fn render(matches: &ArgMatches, from_file: &BTreeSet<String>) -> String {
    let mut out = String::new();
    let cmd = <Check as CommandFactory>::command();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(env) = arg.get_env() else { continue };
        let raw: Option<Vec<String>> = matches
            .get_raw(id)
            .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect());
        let value = match raw {
            None => "(unset)".to_owned(),
            Some(_) if arg.is_hide_env_values_set() => "<redacted>".to_owned(),
            Some(vals) => vals
                .iter()
                .map(|v| redact_url(v))
                .collect::<Vec<_>>()
                .join(","),
        };
        let source = if from_file.contains(id) {
            "file"
        } else {
            match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "flag",
                Some(ValueSource::EnvVariable) => "env",
                Some(ValueSource::DefaultValue) => "default",
                _ => "unset",
            }
        };
        let _ = writeln!(out, "{:<40} {:<9} {value}", env.to_string_lossy(), source);
    }
    out
}

/// Only to enumerate [`Config`]'s arguments.
#[derive(clap::Parser)]
struct Check {
    #[command(flatten)]
    config: Config,
}

/// `scheme://user:password@host` → `scheme://user:REDACTED@host`; other text unchanged.
pub fn redact_url(value: &str) -> String {
    match Url::parse(value) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("REDACTED"));
            url.to_string()
        }
        _ => value.to_owned(),
    }
}

/// Every problem of `c`, one line each, naming the variable. Empty: all is well.
pub fn problems(c: &Config) -> Vec<String> {
    let mut p = Problems(Vec::new());
    p.url(
        "MATHIA_DATABASE_URL",
        &c.database_url,
        &["postgres", "postgresql"],
    );
    for server in c.nats_url.split(',') {
        let server = server.trim();
        if server.contains("://") {
            p.url("MATHIA_NATS_URL", server, &["nats", "tls", "ws", "wss"]);
        } else if !host_port(server) {
            p.push(format!(
                "MATHIA_NATS_URL: `{}` is neither nats://host:port nor host:port",
                redact_url(server)
            ));
        }
    }
    p.url(
        "MATHIA_REDIS_URL",
        &c.redis_url,
        &["redis", "rediss", "unix", "redis+unix"],
    );
    if let Some(addr) = &c.metrics_listen
        && !host_port(addr)
    {
        p.push(format!(
            "MATHIA_METRICS_LISTEN: `{addr}` is not host:port (e.g. 0.0.0.0:9090)"
        ));
    }
    if !host_port(&c.listen) {
        p.push(format!(
            "MATHIA_LISTEN: `{}` is not host:port (e.g. 127.0.0.1:8080)",
            c.listen
        ));
    }
    for (var, url) in [
        ("MATHIA_LLM_URL", &c.llm_url),
        ("MATHIA_MODERATION_URL", &c.moderation_url),
        ("MATHIA_TRAVEL_URL", &c.travel_url),
        ("MATHIA_PAYMENTS_URL", &c.payments_url),
        ("MATHIA_CARD_URL", &c.card_url),
    ] {
        if let Some(url) = url {
            p.url(var, url, &["http", "https"]);
        }
    }
    if let Some(secret) = &c.jwt_secret {
        p.key("MATHIA_JWT_SECRET", secret, 32, None);
    }
    if let Some(key) = &c.master_key {
        p.key("MATHIA_MASTER_KEY", key, 32, Some(32));
    }
    for (var, secret) in [
        ("MATHIA_PAYMENTS_WEBHOOK_SECRET", &c.payments_webhook_secret),
        ("MATHIA_PAYMENTS_API_KEY", &c.payments_api_key),
        ("MATHIA_LLM_API_KEY", &c.llm_api_key),
        ("MATHIA_MODERATION_API_KEY", &c.moderation_api_key),
        ("MATHIA_TRAVEL_API_KEY", &c.travel_api_key),
    ] {
        if secret.as_deref().is_some_and(|s| s.trim().is_empty()) {
            p.push(format!("{var}: is set but empty (unset it instead)"));
        }
    }
    for origin in c
        .ws_origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
    {
        if !is_origin(origin) {
            p.push(format!(
                "MATHIA_WS_ORIGINS: `{origin}` is not an origin (scheme://host[:port], no path)"
            ));
        }
    }
    if !c
        .nats_prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        p.push("MATHIA_NATS_PREFIX: only letters, digits, `_` and `-` (one subject token)".into());
    }
    let ranges: [(&str, f64, f64, f64); 22] = [
        ("MATHIA_DATABASE_POOL", c.database_pool.into(), 1.0, 1000.0),
        (
            "MATHIA_HANDLER_BATCH",
            c.handler_batch as f64,
            1.0,
            100_000.0,
        ),
        (
            "MATHIA_COMMAND_TIMEOUT_MS",
            c.command_timeout_ms as f64,
            1.0,
            600_000.0,
        ),
        ("MATHIA_READ_WAIT_MS", c.read_wait_ms as f64, 0.0, 600_000.0),
        (
            "MATHIA_ARGON2_MEMORY_KIB",
            c.argon2_memory_kib.into(),
            8.0,
            4_194_304.0,
        ),
        (
            "MATHIA_UPLOAD_MAX_BYTES",
            c.upload_max_bytes as f64,
            1.0,
            1e12,
        ),
        (
            "MATHIA_WS_MAX_FRAME",
            c.ws_max_frame as f64,
            128.0,
            16.0 * 1024.0 * 1024.0,
        ),
        (
            "MATHIA_WS_FRAMES_PER_SEC",
            c.ws_frames_per_sec.into(),
            1.0,
            100_000.0,
        ),
        (
            "MATHIA_WS_HEARTBEAT_SECS",
            c.ws_heartbeat_secs as f64,
            1.0,
            3600.0,
        ),
        ("MATHIA_WS_IDLE_SECS", c.ws_idle_secs as f64, 2.0, 86_400.0),
        (
            "MATHIA_MODERATION_THRESHOLD",
            c.moderation_threshold,
            0.0,
            1.0,
        ),
        (
            "MATHIA_MODERATION_BATCH",
            c.moderation_batch.into(),
            1.0,
            1000.0,
        ),
        (
            "MATHIA_MODERATION_TIMEOUT_MS",
            c.moderation_timeout_ms as f64,
            1.0,
            600_000.0,
        ),
        ("MATHIA_WEBHOOK_JITTER", c.webhook_jitter, 0.0, 0.99),
        (
            "MATHIA_WEBHOOK_TIMEOUT_MS",
            c.webhook_timeout_ms as f64,
            1.0,
            600_000.0,
        ),
        (
            "MATHIA_TRAVEL_TIMEOUT_MS",
            c.travel_timeout_ms as f64,
            1.0,
            600_000.0,
        ),
        ("MATHIA_TRAVEL_RETRIES", c.travel_retries.into(), 0.0, 10.0),
        (
            "MATHIA_WALLET_FEE_BPS",
            c.wallet_fee_bps.into(),
            0.0,
            10_000.0,
        ),
        (
            "MATHIA_WALLET_FEE_FIXED",
            c.wallet_fee_fixed as f64,
            0.0,
            1e15,
        ),
        ("MATHIA_FEED_RETENTION", c.feed_retention as f64, 1.0, 1e15),
        (
            "MATHIA_METRICS_SAMPLE_MS",
            c.metrics_sample_ms as f64,
            100.0,
            3_600_000.0,
        ),
        ("MATHIA_NATS_REPLICAS", c.nats_replicas as f64, 0.0, 5.0),
    ];
    for (var, value, low, high) in ranges {
        if !(low..=high).contains(&value) {
            p.push(format!("{var}: {value} is out of range {low} to {high}"));
        }
    }
    if c.ws_heartbeat_secs >= c.ws_idle_secs {
        p.push(format!(
            "MATHIA_WS_HEARTBEAT_SECS: {} must be shorter than MATHIA_WS_IDLE_SECS ({}), or idle clients are closed between pings",
            c.ws_heartbeat_secs, c.ws_idle_secs
        ));
    }
    if let Err(e) = commands::webhook::Schedule::parse(&c.webhook_schedule, 0.0) {
        p.push(format!("MATHIA_WEBHOOK_SCHEDULE: {e}"));
    }
    if let Err(e) = projections::assistant::FixedRates::parse(&c.fx_rates) {
        p.push(format!("MATHIA_FX_RATES: {e:#}"));
    }
    if let Some(words) = &c.moderation_words
        && let Err(e) = projections::classifier::RuleClassifier::parse(words)
    {
        p.push(format!("MATHIA_MODERATION_WORDS: {e:#}"));
    }
    if c.moderation_classifier == "http" && c.moderation_url.is_none() {
        p.push("MATHIA_MODERATION_CLASSIFIER=http needs MATHIA_MODERATION_URL".into());
    }
    p.0
}

struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    fn url(&mut self, var: &str, value: &str, schemes: &[&str]) {
        // Never echo a password: the URL is shown redacted.
        match Url::parse(value) {
            Err(e) => self.push(format!("{var}: `{}` is not a URL ({e})", redact_url(value))),
            Ok(url) if !schemes.contains(&url.scheme()) => self.push(format!(
                "{var}: scheme `{}` is not one of {}",
                url.scheme(),
                schemes.join(", ")
            )),
            Ok(url) if url.scheme() != "unix" && url.host_str().is_none_or(str::is_empty) => {
                self.push(format!("{var}: `{}` names no host", redact_url(value)))
            }
            Ok(_) => {}
        }
    }

    /// A base64 key of at least `min` (and at most `max`) bytes. The value itself is never shown.
    fn key(&mut self, var: &str, value: &str, min: usize, max: Option<usize>) {
        let want = match max {
            Some(m) if m == min => format!("{min} bytes"),
            _ => format!("at least {min} bytes"),
        };
        match base64::engine::general_purpose::STANDARD.decode(value.trim()) {
            Err(_) => self.push(format!(
                "{var}: is not base64 (want {want}: openssl rand -base64 {min})"
            )),
            Ok(bytes) if bytes.len() < min || max.is_some_and(|m| bytes.len() > m) => {
                self.push(format!(
                    "{var}: decodes to {} bytes, want {want} (openssl rand -base64 {min})",
                    bytes.len()
                ))
            }
            Ok(_) => {}
        }
    }
}

/// `host:port` with a port number (IPv6 in brackets).
fn host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
        None => false,
    }
}

/// `scheme://host[:port]` exactly, as a browser sends it in `Origin`.
fn is_origin(s: &str) -> bool {
    match Url::parse(s) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.path() == "/"
                && !s.ends_with('/')
                && u.query().is_none()
                && u.fragment().is_none()
                && u.username().is_empty()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            jwt_secret: Some(base64::engine::general_purpose::STANDARD.encode([7u8; 32])),
            master_key: Some(base64::engine::general_purpose::STANDARD.encode([9u8; 32])),
            ..Config::defaults()
        }
    }

    #[test]
    fn the_defaults_have_no_problem() {
        assert_eq!(problems(&Config::defaults()), Vec::<String>::new());
        assert_eq!(problems(&valid()), Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_reported_at_once_and_names_its_variable() {
        let c = Config {
            database_url: "mysql://root:hunter2@db/mathia".into(),
            nats_url: "nats://127.0.0.1:4222,not a server".into(),
            redis_url: "redis//nohost".into(),
            listen: "8080".into(),
            jwt_secret: Some(base64::engine::general_purpose::STANDARD.encode([1u8; 16])),
            master_key: Some("not base64!".into()),
            ws_origins: vec![
                "https://ok.example".into(),
                "https://bad.example/path".into(),
            ],
            database_pool: 0,
            moderation_threshold: 1.5,
            webhook_schedule: "soon".into(),
            moderation_classifier: "http".into(),
            ws_heartbeat_secs: 90,
            ws_idle_secs: 60,
            ..Config::defaults()
        };
        let found = problems(&c);
        for var in [
            "MATHIA_DATABASE_URL",
            "MATHIA_NATS_URL",
            "MATHIA_REDIS_URL",
            "MATHIA_LISTEN",
            "MATHIA_JWT_SECRET",
            "MATHIA_MASTER_KEY",
            "MATHIA_WS_ORIGINS",
            "MATHIA_DATABASE_POOL",
            "MATHIA_MODERATION_THRESHOLD",
            "MATHIA_WEBHOOK_SCHEDULE",
            "MATHIA_MODERATION_CLASSIFIER",
            "MATHIA_WS_HEARTBEAT_SECS",
        ] {
            assert_eq!(
                found.iter().filter(|p| p.starts_with(var)).count(),
                1,
                "{var} once in {found:#?}"
            );
        }
        assert_eq!(found.len(), 12, "{found:#?}");
        assert!(
            found.iter().all(|p| !p.contains("hunter2")),
            "a password leaked: {found:#?}"
        );
        assert!(found.iter().any(|p| p.contains("decodes to 16 bytes")));
    }

    #[test]
    fn urls_lose_their_passwords_when_shown() {
        assert_eq!(
            redact_url("postgres://mathia:s3cret@db:5432/mathia"),
            "postgres://mathia:REDACTED@db:5432/mathia"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[test]
    fn origins_are_scheme_host_port_only() {
        assert!(is_origin("https://app.mathia.test"));
        assert!(is_origin("http://127.0.0.1:3000"));
        for bad in [
            "app.mathia.test",
            "https://a.test/",
            "https://a.test/x",
            "ftp://a.test",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }
}
