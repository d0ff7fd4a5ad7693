//! Outbound webhook endpoints, as pure decide/evolve, and the pure parts of
//! delivering to them: the event filter, the signature and the retry schedule.
//!
//! **Secrets.** The signing secret is made by the gateway, shown once in the
//! 201 answer and sealed (AES-256-GCM under the master key, bound to
//! `webhook:<id>:secret`) before it travels: the command carries only the
//! sealed form, and the decision turns it into [`KeyOp::PutWebhookSecret`], a
//! row of the keystore table `webhook_secrets` written in the handler's
//! transaction. No event holds it, sealed or not, so the log has nothing to
//! shred; deleting the endpoint is [`KeyOp::DestroyWebhookSecret`] in the same
//! transaction as `WebhookDeleted`, and nothing can sign for it again. (The
//! alternative, sealing it into the event under a key derived from the master
//! key, would leave it openable for as long as the master key lives.)
//!
//! **Scope.** An endpoint receives only its owner's own events: their inbox,
//! their reminders, their wallet accounts, their itineraries, and chat events
//! they caused, with every sealed field (message bodies, keys) left out.

use std::time::Duration;

use events::webhook::{DOMAIN, ENDPOINT, WebhookEvent};
use events::{Event, StreamId};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Sha256;
use uuid::Uuid;

use crate::{Actor, Decision, KeyOp, Rejection, StateSet};

/// The stream of endpoint `id`.
pub fn endpoint_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, ENDPOINT, &id.to_string()).expect("a uuid is a valid subject token")
}

/// Domains whose events can be delivered (each event to its owner only).
pub const DELIVERABLE: &[&str] = &[
    events::wallet::DOMAIN,
    events::notify::DOMAIN,
    events::reminder::DOMAIN,
    events::itinerary::DOMAIN,
    events::chat::DOMAIN,
];

/// Most entries in one filter.
pub const MAX_FILTER: usize = 50;
/// Longest URL, in bytes.
pub const MAX_URL: usize = 2048;
/// Longest description, in characters.
pub const MAX_DESCRIPTION: usize = 200;

/// Associated data of an endpoint's sealed secret.
pub fn secret_aad(endpoint: Uuid) -> Vec<u8> {
    format!("webhook:{endpoint}:secret").into_bytes()
}

/// Check a filter entry: `*`, `<domain>.*` or `<domain>.<EventType>`.
pub fn check_filter(filter: &[String]) -> Result<(), String> {
    if filter.is_empty() || filter.len() > MAX_FILTER {
        return Err(format!("1 to {MAX_FILTER} entries"));
    }
    for f in filter {
        if f == "*" {
            continue;
        }
        let Some((domain, ty)) = f.split_once('.') else {
            return Err(format!("`{f}`: want <domain>.* or <domain>.<EventType>"));
        };
        if !DELIVERABLE.contains(&domain) {
            return Err(format!(
                "`{f}`: domain must be one of {}",
                DELIVERABLE.join(", ")
            ));
        }
        let ok_type = ty == "*"
            || (!ty.is_empty()
                && ty.len() <= 64
                && ty.starts_with(|c: char| c.is_ascii_uppercase())
                && ty.chars().all(|c| c.is_ascii_alphanumeric()));
        if !ok_type {
            return Err(format!("`{f}`: the event type is like `Credited`, or `*`"));
        }
    }
    Ok(())
}

/// Whether `filter` selects an event of `domain` and `event_type`.
///
/// ```
/// use commands::webhook::matches;
/// let f = vec!["wallet.*".to_string(), "chat.MessagePosted".to_string()];
/// assert!(matches(&f, "wallet", "Credited"));
/// assert!(matches(&f, "chat", "MessagePosted"));
/// assert!(!matches(&f, "chat", "RoomCreated"));
/// assert!(matches(&["*".to_string()], "notify", "NotificationCreated"));
/// ```
pub fn matches(filter: &[String], domain: &str, event_type: &str) -> bool {
    filter.iter().any(|f| {
        f == "*"
            || f.split_once('.')
                .is_some_and(|(d, t)| d == domain && (t == "*" || t == event_type))
    })
}

/// Check a URL: http or https, a host, no white space or control characters.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if url.len() > MAX_URL
        || host.is_empty()
        || host.starts_with(':')
        || host.contains('@')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "an http(s) URL with a host, at most {MAX_URL} bytes"
        ));
    }
    Ok(())
}

fn check_description(d: &Option<String>) -> Result<(), String> {
    match d {
        Some(d) if d.chars().count() > MAX_DESCRIPTION || d.contains('\0') => {
            Err(format!("at most {MAX_DESCRIPTION} characters, without NUL"))
        }
        _ => Ok(()),
    }
}

/// `v1=<hex hmac-sha256(secret, "<timestamp>.<body>")>`: the `Mathia-Signature` header.
///
/// ```
/// use commands::webhook::sign;
/// let s = sign(b"whsec_test", 1700000000, br#"{"id":"1"}"#);
/// assert!(s.starts_with("v1=") && s.len() == 3 + 64);
/// assert_ne!(s, sign(b"whsec_other", 1700000000, br#"{"id":"1"}"#));
/// ```
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1={hex}")
}

/// The retry schedule: the wait after each failed attempt, then a dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Wait after the 1st, 2nd, … failed attempt; one attempt more than waits.
    pub delays: Vec<Duration>,
    /// Each wait is scaled by a factor drawn from `[1 - jitter, 1 + jitter)`.
    pub jitter: f64,
}

impl Default for Schedule {
    /// SPEC §6: 0.2 s, 1 s, 2 s, 5 s, … doubling-ish up to 24 h, ±20 % jitter.
    fn default() -> Self {
        let secs = [
            0.2, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14_400.0,
            28_800.0, 57_600.0, 86_400.0,
        ];
        Schedule {
            delays: secs.iter().map(|s| Duration::from_secs_f64(*s)).collect(),
            jitter: 0.2,
        }
    }
}

impl Schedule {
    /// Parse `200ms,1s,2s,5m,24h` (units ms, s, m, h; a bare number is seconds).
    pub fn parse(spec: &str, jitter: f64) -> Result<Schedule, String> {
        if !(0.0..1.0).contains(&jitter) {
            return Err("jitter is a fraction from 0 to below 1".into());
        }
        let delays = spec
            .split(',')
            .map(|p| {
                let p = p.trim();
                let (num, unit) = p
                    .find(|c: char| c.is_ascii_alphabetic())
                    .map(|i| p.split_at(i))
                    .unwrap_or((p, "s"));
                let n: f64 = num
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{p}` is not a duration"))?;
                let secs = match unit {
                    "ms" => n / 1000.0,
                    "s" => n,
                    "m" => n * 60.0,
                    "h" => n * 3600.0,
                    _ => return Err(format!("`{p}`: units are ms, s, m, h")),
                };
                if !(0.0..=7.0 * 86_400.0).contains(&secs) {
                    return Err(format!("`{p}`: 0 to 7 days"));
                }
                Ok(Duration::from_secs_f64(secs))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if delays.is_empty() {
            return Err("at least one wait".into());
        }
        Ok(Schedule { delays, jitter })
    }

    /// Attempts before a dead letter.
    pub fn max_attempts(&self) -> u32 {
        self.delays.len() as u32 + 1
    }

    /// The wait after failed attempt number `attempt` (1-based), with `unit` in
    /// `[0, 1)` choosing the jitter; none once the schedule is spent (dead letter).
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Option<Duration> {
        let base = self.delays.get(attempt.checked_sub(1)? as usize)?;
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Some(base.mul_f64(factor.max(0.0)))
    }

    /// [`Schedule::delay_with`] with a random jitter.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        self.delay_with(attempt, rand::random::<f64>())
    }
}

/// The state of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Registered.
    pub exists: bool,
    /// Whose.
    pub owner: Uuid,
    /// Deleted (its secret is gone).
    pub deleted: bool,
    /// Enabled.
    pub enabled: bool,
}

impl Endpoint {
    /// Fold one event in.
    pub fn evolve(&mut self, e: &WebhookEvent) {
        match e {
            WebhookEvent::WebhookRegistered { owner, .. } => {
                self.exists = true;
                self.owner = *owner;
                self.enabled = true;
            }
            WebhookEvent::WebhookUpdated { enabled, .. } => {
                if let Some(en) = enabled {
                    self.enabled = *en;
                }
            }
            WebhookEvent::WebhookDeleted => {
                self.deleted = true;
                self.enabled = false;
            }
            WebhookEvent::DeadLettersRedriven { .. } => {}
        }
    }
}

/// Commands of webhook endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WebhookCommand {
    /// Register an endpoint for the actor.
    RegisterWebhook {
        /// New id.
        endpoint_id: Uuid,
        /// Where to POST.
        url: String,
        /// Which events.
        filter: Vec<String>,
        /// A note.
        description: Option<String>,
        /// The signing secret, sealed by the master key (see the module docs).
        sealed_secret: events::chat::Bytes64,
    },
    /// Change URL, filter, description or enabled (the owner).
    UpdateWebhook {
        /// Endpoint.
        endpoint_id: Uuid,
        /// New URL.
        url: Option<String>,
        /// New filter.
        filter: Option<Vec<String>>,
        /// New description.
        description: Option<String>,
        /// Enable or disable.
        enabled: Option<bool>,
    },
    /// Delete the endpoint and destroy its secret (the owner).
    DeleteWebhook {
        /// Endpoint.
        endpoint_id: Uuid,
    },
    /// Put dead letters back in the queue (the owner).
    RedriveDeadLetters {
        /// Endpoint.
        endpoint_id: Uuid,
        /// One delivery, or all when none.
        delivery_id: Option<Uuid>,
    },
}

fn not_found() -> Rejection {
    Rejection::new(404, "webhook_not_found", "no such webhook")
}

fn invalid(message: String) -> Rejection {
    Rejection::new(422, "invalid", message)
}

impl WebhookCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            WebhookCommand::RegisterWebhook { .. } => "webhook.RegisterWebhook",
            WebhookCommand::UpdateWebhook { .. } => "webhook.UpdateWebhook",
            WebhookCommand::DeleteWebhook { .. } => "webhook.DeleteWebhook",
            WebhookCommand::RedriveDeadLetters { .. } => "webhook.RedriveDeadLetters",
        }
    }

    fn endpoint_id(&self) -> Uuid {
        match self {
            WebhookCommand::RegisterWebhook { endpoint_id, .. }
            | WebhookCommand::UpdateWebhook { endpoint_id, .. }
            | WebhookCommand::DeleteWebhook { endpoint_id }
            | WebhookCommand::RedriveDeadLetters { endpoint_id, .. } => *endpoint_id,
        }
    }

    /// The stream the command is addressed to.
    pub fn target(&self) -> StreamId {
        endpoint_stream(self.endpoint_id())
    }

    /// Every stream the decision reads or appends to.
    pub fn streams(&self) -> Vec<StreamId> {
        vec![self.target()]
    }

    /// Decide against the loaded states.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        let stream = self.target();
        let ep = states.webhook(&stream);
        let mine = ep.exists && !ep.deleted && Some(ep.owner) == actor.user_id;
        let endpoint_id = self.endpoint_id();
        let one =
            |e: WebhookEvent, status: u16, answer: serde_json::Value, keys: Vec<KeyOp>| Decision {
                events: vec![(stream.clone(), Event::Webhook(e))],
                status,
                answer,
                keys,
            };
        match self {
            WebhookCommand::RegisterWebhook {
                url,
                filter,
                description,
                sealed_secret,
                ..
            } => {
                let Some(owner) = actor.user_id else {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "webhooks belong to people",
                    ));
                };
                if ep.exists {
                    return Err(Rejection::new(
                        409,
                        "webhook_exists",
                        "this webhook id is taken",
                    ));
                }
                check_url(url).map_err(invalid)?;
                check_filter(filter).map_err(invalid)?;
                check_description(description).map_err(invalid)?;
                Ok(one(
                    WebhookEvent::WebhookRegistered {
                        endpoint_id,
                        owner,
                        url: url.clone(),
                        filter: filter.clone(),
                        description: description.clone(),
                    },
                    201,
                    json!({
                        "webhook_id": endpoint_id, "url": url, "filter": filter,
                        "description": description, "enabled": true,
                    }),
                    vec![KeyOp::PutWebhookSecret {
                        endpoint_id,
                        sealed: sealed_secret.clone(),
                    }],
                ))
            }
            WebhookCommand::UpdateWebhook {
                url,
                filter,
                description,
                enabled,
                ..
            } => {
                if !mine {
                    return Err(not_found());
                }
                if url.is_none() && filter.is_none() && description.is_none() && enabled.is_none() {
                    return Err(invalid(
                        "change the url, the filter, the description or enabled".into(),
                    ));
                }
                if let Some(u) = url {
                    check_url(u).map_err(invalid)?;
                }
                if let Some(f) = filter {
                    check_filter(f).map_err(invalid)?;
                }
                check_description(description).map_err(invalid)?;
                Ok(one(
                    WebhookEvent::WebhookUpdated {
                        url: url.clone(),
                        filter: filter.clone(),
                        description: description.clone(),
                        enabled: *enabled,
                    },
                    200,
                    json!({ "webhook_id": endpoint_id, "enabled": enabled.unwrap_or(ep.enabled) }),
                    vec![],
                ))
            }
            WebhookCommand::DeleteWebhook { .. } => {
                if !mine {
                    return Err(not_found());
                }
                Ok(one(
                    WebhookEvent::WebhookDeleted,
                    200,
                    json!({ "webhook_id": endpoint_id, "deleted": true }),
                    vec![KeyOp::DestroyWebhookSecret { endpoint_id }],
                ))
            }
            WebhookCommand::RedriveDeadLetters { delivery_id, .. } => {
                if !mine {
                    return Err(not_found());
                }
                Ok(one(
                    WebhookEvent::DeadLettersRedriven {
                        delivery_id: *delivery_id,
                    },
                    200,
                    json!({
                        "webhook_id": endpoint_id,
                        "redriven": delivery_id.map(|d| json!(d)).unwrap_or(json!("all")),
                    }),
                    vec![],
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Loaded, State};

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn the_default_schedule_runs_from_200_ms_to_24_h_then_dead_letters() {
        let s = Schedule::default();
        assert_eq!(ms(s.delay_with(1, 0.5).unwrap()), 200);
        assert_eq!(ms(s.delay_with(2, 0.5).unwrap()), 1000);
        assert_eq!(ms(s.delay_with(3, 0.5).unwrap()), 2000);
        assert_eq!(ms(s.delay_with(4, 0.5).unwrap()), 5000);
        let last = s.delays.len() as u32;
        assert_eq!(
            s.delay_with(last, 0.5).unwrap(),
            Duration::from_secs(86_400)
        );
        assert!(s.delay_with(last + 1, 0.5).is_none(), "spent: dead letter");
        assert!(s.delay_with(0, 0.5).is_none());
        assert_eq!(s.max_attempts(), last + 1);
        // Non-decreasing: each wait at least the one before.
        assert!(s.delays.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let s = Schedule::default();
        assert_eq!(ms(s.delay_with(2, 0.0).unwrap()), 800);
        assert!(ms(s.delay_with(2, 0.999_999).unwrap()) <= 1200);
        for _ in 0..1000 {
            let d = s.delay(4).unwrap().as_secs_f64();
            assert!((4.0..6.0).contains(&d), "{d}");
        }
        let none = Schedule::parse("1s", 0.0).unwrap();
        assert_eq!(none.delay(1), Some(Duration::from_secs(1)));
    }

    #[test]
    fn schedules_parse_with_units() {
        let s = Schedule::parse("200ms, 1s,2,5m,24h", 0.1).unwrap();
        assert_eq!(
            s.delays,
            vec![
                Duration::from_millis(200),
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(300),
                Duration::from_secs(86_400)
            ]
        );
        for bad in ["", "1x", "abc", "-1s", "8000h"] {
            assert!(Schedule::parse(bad, 0.1).is_err(), "{bad}");
        }
        assert!(Schedule::parse("1s", 1.0).is_err());
    }

    #[test]
    fn filters_and_urls_are_checked() {
        let ok = |v: &[&str]| check_filter(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["wallet.*", "notify.*", "chat.MessagePosted"]).is_ok());
        assert!(ok(&["*"]).is_ok());
        for bad in [
            &[][..],
            &["wallet"],
            &["accounts.*"],
            &["chat.message posted"],
            &["wallet.credited"],
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("http://127.0.0.1:9000/x?y=1").is_ok());
        for bad in [
            "ftp://x",
            "https://",
            "https:// x",
            "example.com",
            "http://u:p@host/",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_owner_changes_an_endpoint_and_deleting_destroys_the_secret() {
        let id = Uuid::now_v7();
        let alice = Actor {
            user_id: Some(Uuid::now_v7()),
            role: crate::Role::User,
        };
        let eve = Actor {
            user_id: Some(Uuid::now_v7()),
            role: crate::Role::User,
        };
        let mut states = StateSet::default();
        let reg = WebhookCommand::RegisterWebhook {
            endpoint_id: id,
            url: "https://example.com/h".into(),
            filter: vec!["notify.*".into()],
            description: None,
            sealed_secret: events::chat::Bytes64(vec![1, 2, 3]),
        };
        let d = reg.decide(&alice, &states).unwrap();
        assert_eq!(d.status, 201);
        assert!(matches!(d.keys[0], KeyOp::PutWebhookSecret { .. }));
        // The secret is in no event, not even sealed.
        assert!(!serde_json::to_string(&d.events).unwrap().contains("AQID"));
        states.insert(
            endpoint_stream(id),
            Loaded {
                version: 0,
                state: State::Webhook(Endpoint::default()),
            },
        );
        states.apply(&d.events);
        let del = WebhookCommand::DeleteWebhook { endpoint_id: id };
        assert_eq!(del.decide(&eve, &states).unwrap_err().status, 404);
        let d = del.decide(&alice, &states).unwrap();
        assert_eq!(
            d.keys,
            vec![KeyOp::DestroyWebhookSecret { endpoint_id: id }]
        );
        states.apply(&d.events);
        assert_eq!(del.decide(&alice, &states).unwrap_err().status, 404);
    }
}
