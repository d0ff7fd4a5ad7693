//! `mathia config check` and the start-up validation, run as the real binary
//! with its own environment (the process environment is the input here).

use std::collections::BTreeMap;
use std::process::{Command, Output};

const SECRET_JWT: &str = "ZmlsZS1vbmx5LWp3dC1zZWNyZXQtZmlsZS1vbmx5LWp3dC1zZWNyZXQtMDE=";

fn mathia(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mathia"));
    // Nothing from the caller's environment: only what the test says.
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("mathia runs")
}

/// `VARIABLE source value` lines of the check's output.
fn settings(out: &Output) -> BTreeMap<String, (String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("MATHIA_"))
        .map(|l| {
            let mut w = l.split_whitespace();
            let var = w.next().unwrap().to_owned();
            let source = w.next().unwrap().to_owned();
            (var, (source, w.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

fn file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mathia-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_file_fills_in_under_variables_and_flags_and_secrets_are_redacted() {
    let path = file(
        "ok",
        &format!(
            r#"
database_pool = 7
listen = "0.0.0.0:9000"
jwt-secret = "{SECRET_JWT}"
MATHIA_WS_ORIGINS = ["https://a.mathia.test", "https://b.mathia.test"]
handler_batch = 100
database_url = "postgres://mathia:pg-pass-9f2@db.internal:5432/mathia"
"#
        ),
    );
    let out = mathia(
        &["--handler-batch", "64", "config", "check"],
        &[
            ("MATHIA_CONFIG_FILE", path.to_str().unwrap()),
            ("MATHIA_LISTEN", "127.0.0.1:9100"),
            ("MATHIA_HANDLER_BATCH", "32"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("# the configuration is valid"));
    let s = settings(&out);
    assert_eq!(s["MATHIA_DATABASE_POOL"], ("file".into(), "7".into()));
    assert_eq!(
        s["MATHIA_LISTEN"],
        ("env".into(), "127.0.0.1:9100".into()),
        "a variable beats the file"
    );
    assert_eq!(
        s["MATHIA_HANDLER_BATCH"],
        ("flag".into(), "64".into()),
        "a flag beats both"
    );
    assert_eq!(
        s["MATHIA_WS_ORIGINS"],
        (
            "file".into(),
            "https://a.mathia.test,https://b.mathia.test".into()
        )
    );
    assert_eq!(s["MATHIA_JWT_SECRET"], ("file".into(), "<redacted>".into()));
    assert_eq!(s["MATHIA_MASTER_KEY"].1, "(unset)");
    assert_eq!(s["MATHIA_READ_WAIT_MS"], ("default".into(), "2000".into()));
    assert_eq!(
        s["MATHIA_DATABASE_URL"].1,
        "postgres://mathia:REDACTED@db.internal:5432/mathia"
    );
    for secret in [SECRET_JWT, "pg-pass-9f2"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret));
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn every_problem_is_listed_at_once_and_the_check_fails() {
    let path = file(
        "bad",
        r#"
database_pool = "many"
colour = "blue"
moderation_threshold = 2.5
"#,
    );
    let env = [
        ("MATHIA_CONFIG_FILE", path.to_str().unwrap()),
        ("MATHIA_DATABASE_URL", "mysql://root:hunter2@db/mathia"),
        ("MATHIA_MASTER_KEY", "c2hvcnQ="),
        (
            "MATHIA_WS_ORIGINS",
            "https://ok.mathia.test,https://x.test/path",
        ),
        ("MATHIA_NATS_URL", "nats//broken"),
        ("MATHIA_WEBHOOK_SCHEDULE", "1s,soon"),
    ];
    let out = mathia(&["config", "check"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let problems: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("problem: "))
        .collect();
    for needle in [
        "`database_pool`",
        "`colour` is not a setting",
        "MATHIA_MODERATION_THRESHOLD",
        "MATHIA_DATABASE_URL",
        "MATHIA_MASTER_KEY: decodes to 5 bytes",
        "MATHIA_WS_ORIGINS: `https://x.test/path`",
        "MATHIA_NATS_URL",
        "MATHIA_WEBHOOK_SCHEDULE",
    ] {
        assert_eq!(
            problems.iter().filter(|p| p.contains(needle)).count(),
            1,
            "{needle} once in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 8, "{problems:#?}");
    assert!(stderr.contains("8 problem(s)"));
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "a password leaked"
    );
    // The effective configuration is printed anyway, so the operator sees what was read.
    assert_eq!(
        settings(&out)["MATHIA_DATABASE_URL"].1,
        "mysql://root:REDACTED@db/mathia"
    );

    // Any other command refuses to start with the same list, before connecting anywhere.
    let out = mathia(&["serve"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the configuration has 8 problem(s)"),
        "{stderr}"
    );
    assert!(stderr.contains("MATHIA_WEBHOOK_SCHEDULE"));
    assert!(!stderr.contains("hunter2"));
    let _ = std::fs::remove_file(path);
}

#[test]
fn an_unreadable_or_malformed_file_is_a_problem_not_a_crash() {
    let out = mathia(
        &["config", "check"],
        &[("MATHIA_CONFIG_FILE", "/nonexistent/mathia.toml")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/mathia.toml"));
    let path = file("garbled", "listen = \n[[[");
    let out = mathia(
        &["config", "check"],
        &[("MATHIA_CONFIG_FILE", path.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not TOML"));
    let _ = std::fs::remove_file(path);
}

/// The configuration files shipped in deploy/ pass the check: the example, and
/// the TOML inside the Kubernetes ConfigMap.
#[test]
fn the_shipped_configuration_files_are_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let example = format!("{root}/deploy/mathia.example.toml");
    let manifest = std::fs::read_to_string(format!("{root}/deploy/k8s/mathia.yaml")).unwrap();
    let configmap: String = manifest
        .split("mathia.toml: |\n")
        .nth(1)
        .expect("the ConfigMap's mathia.toml")
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    assert!(configmap.contains("nats_replicas = 3"), "{configmap}");
    let k8s = file("k8s", &configmap);
    for path in [std::path::PathBuf::from(example), k8s.clone()] {
        let out = mathia(
            &["config", "check"],
            &[("MATHIA_CONFIG_FILE", path.to_str().unwrap())],
        );
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(settings(&out).values().any(|(source, _)| source == "file"));
    }
    let _ = std::fs::remove_file(k8s);
}
