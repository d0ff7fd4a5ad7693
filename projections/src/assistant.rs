//! The @mathia assistant, a reactor like the screener: projector `assistant`
//! queues every message that mentions `@mathia` (body still sealed); the
//! worker claims requests, opens them, understands them
//! ([`commands::assistant::parse`], offline; an OpenAI-compatible model for
//! summaries and open questions when configured), acts **only through the
//! commands the user could send, as the user** (a reminder, a trip), reads only
//! what the user may read (their own wallets, this room), never moves money
//! (it proposes, the user confirms), streams the reply as `ai_stream_chunk`
//! signals on `live.<room>.ai`, and commits only the final text as a message.
//!
//! Per (user, room), what a request left open waits in Redis for 6 h, so a
//! follow-up can fill it. At most `per_hour` requests per user per hour.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use commands::assistant::{self, Intent, Pending, When};
use commands::chat::ChatCommand;
use commands::itinerary::ItineraryCommand;
use commands::reminder::ReminderCommand;
use commands::{Actor, Command, Role, crypto};
use events::chat::{Bytes64, ChatEvent, Sealed};
use events::{Event, EventEnvelope, Subjects};
use futures::StreamExt;
use futures::future::BoxFuture;
use handlers::bus::{self, CommandEnvelope, Outcome};
use handlers::keystore::Keystore;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Projector;

/// Projector `assistant`: the queue of requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct AssistantQueue;

impl Projector for AssistantQueue {
    fn name(&self) -> &'static str {
        "assistant"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::chat::DOMAIN]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        for env in batch {
            if let Event::Chat(ChatEvent::MessagePosted {
                message_id,
                room_id,
                sender,
                body,
                mentions_assistant: true,
                ..
            }) = env.event()?
                && sender != commands::chat::ASSISTANT
            {
                sqlx::query(
                    "INSERT INTO assistant_queue (message_id, room_id, sender, body, position, queued_at)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                )
                .bind(message_id)
                .bind(room_id)
                .bind(sender)
                .bind(serde_json::to_value(&body)?)
                .bind(env.position)
                .bind(env.occurred_at)
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(())
    }
}

/// A language model that streams its answer.
pub trait Llm: Send + Sync + 'static {
    /// Answer `prompt` about `context`, chunk by chunk.
    fn stream<'a>(
        &'a self,
        system: &'a str,
        prompt: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<futures::stream::BoxStream<'a, anyhow::Result<String>>>>;
}

/// An OpenAI-compatible `POST /v1/chat/completions` with `stream: true`
/// (server-sent events, `data: {"choices":[{"delta":{"content":…}}]}` … `data: [DONE]`).
pub struct OpenAiLlm {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
}

impl OpenAiLlm {
    /// `base_url` without `/v1/chat/completions`.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(OpenAiLlm {
            client: reqwest::Client::builder().timeout(timeout).build()?,
            url: format!("{}/v1/chat/completions", base_url.trim_end_matches('/')),
            model: model.to_owned(),
            api_key,
        })
    }
}

impl Llm for OpenAiLlm {
    fn stream<'a>(
        &'a self,
        system: &'a str,
        prompt: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<futures::stream::BoxStream<'a, anyhow::Result<String>>>> {
        Box::pin(async move {
            let mut req = self.client.post(&self.url).json(&serde_json::json!({
                "model": self.model,
                "stream": true,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            }));
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            let res = req
                .send()
                .await
                .context("calling the model")?
                .error_for_status()
                .context("the model refused")?;
            let mut res = res;
            let mut buf = String::new();
            let s = async_stream(move |tx| async move {
                loop {
                    let chunk = match res.chunk().await {
                        Ok(Some(c)) => c,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::Error::from(e))).await;
                            return;
                        }
                    };
                    buf.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buf.find('\n') {
                        let line = buf[..end].trim().to_owned();
                        buf.drain(..=end);
                        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                            continue;
                        };
                        if data == "[DONE]" {
                            return;
                        }
                        let delta = serde_json::from_str::<serde_json::Value>(data)
                            .ok()
                            .and_then(|v| {
                                v["choices"][0]["delta"]["content"]
                                    .as_str()
                                    .map(str::to_owned)
                            });
                        if let Some(d) = delta.filter(|d| !d.is_empty())
                            && tx.send(Ok(d)).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
            Ok(s)
        })
    }
}

/// A stream fed by a task (no extra crate for one generator).
fn async_stream<'a, F, Fut>(f: F) -> futures::stream::BoxStream<'a, anyhow::Result<String>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<anyhow::Result<String>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// Exchange rates, quoted as integers: `units` of `to` per 1,000,000 of `from`.
pub trait Rates: Send + Sync + 'static {
    /// The rate, if known.
    fn rate(&self, from: &str, to: &str) -> Option<i64>;
    /// Where the rates come from (said in the answer).
    fn source(&self) -> &str;
}

/// Rates from configuration: `USD/KES=129.25,EUR/KES=140.10` (no invented rates:
/// an unknown pair is said to be unknown).
#[derive(Debug, Default)]
pub struct FixedRates {
    rates: std::collections::HashMap<(String, String), i64>,
}

impl FixedRates {
    /// Parse the configuration; the inverse of each pair is implied.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut rates = std::collections::HashMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (pair, rate) = part
                .split_once('=')
                .with_context(|| format!("'{part}' is not FROM/TO=RATE"))?;
            let (from, to) = pair
                .split_once('/')
                .with_context(|| format!("'{pair}' is not FROM/TO"))?;
            let micro =
                decimal_micros(rate.trim()).with_context(|| format!("'{rate}' is not a rate"))?;
            anyhow::ensure!(micro > 0, "a rate must be positive");
            let (from, to) = (from.trim().to_uppercase(), to.trim().to_uppercase());
            // The inverse, rounded to the nearest millionth.
            rates.insert(
                (to.clone(), from.clone()),
                (1_000_000_000_000 + micro / 2) / micro,
            );
            rates.insert((from, to), micro);
        }
        Ok(FixedRates { rates })
    }
}

impl Rates for FixedRates {
    fn rate(&self, from: &str, to: &str) -> Option<i64> {
        if from == to {
            return Some(1_000_000);
        }
        self.rates.get(&(from.to_owned(), to.to_owned())).copied()
    }

    fn source(&self) -> &str {
        "configured rates (MATHIA_FX_RATES)"
    }
}

/// `12.5` → 12,500,000 (millionths), without floats.
fn decimal_micros(s: &str) -> Option<i64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 6
        || int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int: i64 = int.parse().ok()?;
    let frac: i64 = format!("{frac:0<6}").parse().ok()?;
    int.checked_mul(1_000_000)?.checked_add(frac)
}

/// Convert `amount` with `rate` (both in millionths) to a string with 2 decimals.
pub fn convert(amount: &str, rate_micros: i64) -> Option<String> {
    let a = i128::from(decimal_micros(amount)?);
    // micros × micros / 1e10 = hundredths, rounded half up.
    let cents = (a * i128::from(rate_micros) + 5_000_000_000) / 10_000_000_000;
    Some(format!("{}.{:02}", cents / 100, cents % 100))
}

/// Tuning.
#[derive(Debug, Clone)]
pub struct AssistantConfig {
    /// Requests per user per hour.
    pub per_hour: u32,
    /// Prefix of Redis keys.
    pub redis_prefix: String,
    /// How long a follow-up may come.
    pub dialog_ttl: Duration,
}

/// The worker.
pub struct Assistant {
    /// Queue, read models, keystore.
    pub pool: PgPool,
    /// Commands.
    pub js: async_nats::jetstream::Context,
    /// Core NATS: stream chunks, command answers.
    pub nats: async_nats::Client,
    /// Names.
    pub subjects: Subjects,
    /// Opens requests, seals replies.
    pub keystore: Keystore,
    /// Rate limit and dialog state.
    pub redis: redis::aio::ConnectionManager,
    /// Optional model.
    pub llm: Option<Arc<dyn Llm>>,
    /// Exchange rates.
    pub rates: Arc<dyn Rates>,
    /// Tuning.
    pub config: AssistantConfig,
}

const NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f61_7373_6973_7400_0001);

fn derived(request: Uuid, what: &str) -> Uuid {
    Uuid::new_v5(&NS, format!("{request}|{what}").as_bytes())
}

impl Assistant {
    /// Answer requests until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(llm = self.llm.is_some(), "assistant started");
        while !shutdown.is_cancelled() {
            let wait = match self.answer_some().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "assistant failed; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(())
    }

    /// Claim and answer the oldest requests; returns how many.
    pub async fn answer_some(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT message_id, room_id, sender, body, queued_at FROM assistant_queue
             ORDER BY position LIMIT 8 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let (message_id, room_id, sender): (Uuid, Uuid, Uuid) =
                (r.get("message_id"), r.get("room_id"), r.get("sender"));
            let sealed: Sealed = serde_json::from_value(r.get("body"))?;
            let keys = self.keystore.message_keys(&mut tx, &[message_id]).await?;
            // Redacted before we got to it: nothing to answer.
            let Some(text) = keys.get(&message_id).and_then(|k| {
                crypto::open(k, &crypto::field_aad(message_id, "body"), &sealed).ok()
            }) else {
                continue;
            };
            let text = String::from_utf8_lossy(&text).into_owned();
            let (reply, streamed) = match self.answer(message_id, room_id, sender, &text).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "assistant request failed");
                    let sorry =
                        "Sorry, something went wrong on my side; please try again in a moment.";
                    (sorry.to_owned(), false)
                }
            };
            // A model's answer was streamed as it came; any other answer is one chunk.
            if !streamed {
                self.chunk(room_id, message_id, 0, &reply, true).await;
            }
            self.reply(message_id, room_id, &reply).await?;
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get("message_id")).collect();
        sqlx::query("DELETE FROM assistant_queue WHERE message_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.config.redis_prefix)
    }

    async fn allowed(&self, user: Uuid) -> anyhow::Result<bool> {
        if self.config.per_hour == 0 {
            return Ok(true);
        }
        let hour = Utc::now().timestamp() / 3600;
        let key = self.key(&format!("q:assistant_per_hour:{user}:{hour}"));
        let mut redis = self.redis.clone();
        let (n,): (u32,) = redis::pipe()
            .incr(&key, 1)
            .expire(&key, 3600)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(n <= self.config.per_hour)
    }

    async fn pending(&self, user: Uuid, room: Uuid) -> Option<Pending> {
        let mut redis = self.redis.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(self.key(&format!("assistant:dialog:{user}:{room}")))
            .query_async(&mut redis)
            .await
            .ok()?;
        serde_json::from_str(&v?).ok()
    }

    async fn remember(&self, user: Uuid, room: Uuid, p: Option<&Pending>) {
        let key = self.key(&format!("assistant:dialog:{user}:{room}"));
        let mut redis = self.redis.clone();
        let _: redis::RedisResult<()> = match p {
            Some(p) => {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(serde_json::to_string(p).unwrap_or_default())
                    .arg("EX")
                    .arg(self.config.dialog_ttl.as_secs())
                    .query_async(&mut redis)
                    .await
            }
            None => redis::cmd("DEL").arg(&key).query_async(&mut redis).await,
        };
    }

    /// Understand and act; the text of the answer.
    async fn answer(
        &self,
        request: Uuid,
        room: Uuid,
        user: Uuid,
        text: &str,
    ) -> anyhow::Result<(String, bool)> {
        if !self.allowed(user).await? {
            let limit = format!(
                "You have asked me {} times this hour, which is the limit; ask again next hour.",
                self.config.per_hour
            );
            return Ok((limit, false));
        }
        let now = Utc::now();
        let pending = self.pending(user, room).await;
        let intent = assistant::parse(text, now.naive_utc(), pending.as_ref());
        let streamed = self.llm.is_some() && matches!(intent, Intent::Summarise | Intent::Unknown);
        let (answer, left_open) = match intent {
            Intent::Help => (assistant::HELP.to_owned(), None),
            Intent::AskReminderTime { content } => (
                format!(
                    "When should I remind you to {content}? (e.g. \"in 10 mins\" or \"at 5pm\")"
                ),
                Some(Pending::ReminderTime { content }),
            ),
            Intent::SetReminder { content, when } => {
                let local = match when {
                    When::In(secs) => (now + chrono::Duration::seconds(secs)).naive_utc(),
                    When::At(l) => l,
                };
                let cmd = Command::Reminder(ReminderCommand::SetReminder {
                    reminder_id: derived(request, "reminder"),
                    content: content.clone(),
                    local,
                    zone: "UTC".into(),
                    recurrence: events::reminder::Recurrence::None,
                    priority: events::reminder::Priority::Normal,
                    room_id: None,
                    now,
                });
                let out = self.act(request, "reminder", user, cmd).await?;
                if out.status < 300 {
                    let due = out.body["due_at"].as_str().unwrap_or_default().to_owned();
                    (
                        format!("⏰ Done: I'll remind you to {content} at {due} (UTC)."),
                        None,
                    )
                } else {
                    (
                        format!("I couldn't set that reminder: {}.", problem(&out)),
                        None,
                    )
                }
            }
            Intent::Balance => (self.balance(user).await?, None),
            Intent::Transactions => (self.transactions(user).await?, None),
            Intent::AskTripDates { destination, start } => (
                match start {
                    None => format!(
                        "When is the trip to {destination}? (e.g. \"from the 20th to the 24th\")"
                    ),
                    Some(s) => format!("Going to {destination} on {s}; when do you come back?"),
                },
                Some(Pending::TripDates { destination, start }),
            ),
            Intent::CreateTrip {
                destination,
                start,
                end,
            } => {
                let cmd = Command::Itinerary(ItineraryCommand::Create {
                    itinerary_id: derived(request, "trip"),
                    details: events::itinerary::Details {
                        title: format!("Trip to {destination}"),
                        region: Some(destination.clone()),
                        start_date: start,
                        end_date: end,
                        zone: "UTC".into(),
                        budget: Default::default(),
                        visibility: events::itinerary::Visibility::Private,
                        metadata: serde_json::Value::Null,
                    },
                    link_token: base64_token(),
                });
                let out = self.act(request, "trip", user, cmd).await?;
                if out.status < 300 {
                    (
                        format!(
                            "🧳 Created \"Trip to {destination}\", {start} to {end}: /v1/itineraries/{}",
                            derived(request, "trip")
                        ),
                        None,
                    )
                } else {
                    (
                        format!("I couldn't create that trip: {}.", problem(&out)),
                        None,
                    )
                }
            }
            Intent::AddTripItem {
                title,
                trip,
                date,
                time,
            } => (
                self.add_trip_item(request, user, &title, &trip, date, time)
                    .await?,
                None,
            ),
            Intent::Summarise => (self.summarise(room, request).await?, None),
            Intent::Convert { amount, from, to } => (
                match self
                    .rates
                    .rate(&from, &to)
                    .and_then(|r| convert(&amount, r))
                {
                    Some(v) => format!(
                        "{amount} {from} is about {v} {to} ({}).",
                        self.rates.source()
                    ),
                    None => format!("I have no rate for {from} to {to}; I won't guess."),
                },
                None,
            ),
            Intent::Search { query } => (self.search(room, &query).await?, None),
            Intent::ProposePayment {
                amount,
                currency,
                to,
            } => (
                format!(
                    "I can't move money. To send {amount}{} to {to}, confirm it yourself: POST /v1/transfers \
                     with the amount in minor units and an Idempotency-Key, or use Send in the app.",
                    currency.map(|c| format!(" {c}")).unwrap_or_default()
                ),
                None,
            ),
            Intent::Unknown => match &self.llm {
                Some(_) => (self.ask_llm(room, request, text).await?, None),
                None => (format!("I didn't get that. {}", assistant::HELP), None),
            },
        };
        self.remember(user, room, left_open.as_ref()).await;
        Ok((answer, streamed))
    }

    /// Send `command` as `user` and wait for its answer.
    async fn act(
        &self,
        request: Uuid,
        what: &str,
        user: Uuid,
        command: Command,
    ) -> anyhow::Result<Outcome> {
        let command_id = derived(request, what);
        let reply = format!("{}.{command_id}", self.subjects.outcome_inbox("assistant"));
        let mut sub = self.nats.subscribe(reply.clone()).await?;
        let envelope = CommandEnvelope {
            command_id,
            correlation_id: request,
            // The user's own authority: the assistant can do only what they could.
            actor: Actor {
                user_id: Some(user),
                role: Role::User,
            },
            issued_at: Utc::now(),
            request_hash: hex(&Sha256::digest(
                format!("assistant|{request}|{what}").as_bytes(),
            )),
            command,
            expected_version: None,
        };
        bus::publish_command(&self.js, &self.subjects, &envelope, &reply).await?;
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .context("no answer to the assistant's command")?
            .context("the answer subscription closed")?;
        Ok(serde_json::from_slice(&msg.payload)?)
    }

    /// An activity on the user's trip whose destination or title matches, as the user.
    async fn add_trip_item(
        &self,
        request: Uuid,
        user: Uuid,
        title: &str,
        trip: &str,
        date: Option<chrono::NaiveDate>,
        time: Option<chrono::NaiveTime>,
    ) -> anyhow::Result<String> {
        let found = sqlx::query(
            "SELECT i.itinerary_id, i.title, i.start_date, i.zone FROM proj_itineraries i
             JOIN proj_itinerary_members m ON m.itinerary_id = i.itinerary_id
             WHERE m.user_id = $1 AND m.state = 'active' AND m.role IN ('owner', 'editor') AND NOT i.archived
               AND (i.region ILIKE $2 OR i.title ILIKE '%' || $2 || '%')
             ORDER BY i.start_date LIMIT 1",
        )
        .bind(user)
        .bind(trip)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = found else {
            return Ok(format!("I found no trip to {trip} that you can edit."));
        };
        let (itinerary_id, trip_title, zone): (Uuid, String, String) =
            (row.get("itinerary_id"), row.get("title"), row.get("zone"));
        let day = date.unwrap_or_else(|| row.get("start_date"));
        let at = day.and_time(
            time.unwrap_or_else(|| chrono::NaiveTime::from_hms_opt(9, 0, 0).unwrap_or_default()),
        );
        let slot = commands::itinerary::Slot {
            local: at,
            zone: zone.clone(),
        };
        let cmd = Command::Itinerary(ItineraryCommand::AddItem {
            itinerary_id,
            item_id: derived(request, "item"),
            item: commands::itinerary::ItemInput {
                kind: events::itinerary::ItemKind::Activity,
                title: title.to_owned(),
                start: slot.clone(),
                end: commands::itinerary::Slot {
                    local: at + chrono::Duration::hours(1),
                    zone,
                },
                locations: vec![],
                booking_reference: None,
                provider: None,
                status: events::itinerary::ItemStatus::Pending,
                price: None,
                notes: None,
                travellers: vec![],
            },
        });
        let out = self.act(request, "item", user, cmd).await?;
        Ok(if out.status < 300 {
            format!(
                "📌 Added \"{title}\" to {trip_title} on {day} at {}.",
                at.format("%H:%M")
            )
        } else {
            format!("I couldn't add that: {}.", problem(&out))
        })
    }

    async fn balance(&self, user: Uuid) -> anyhow::Result<String> {
        let rows = sqlx::query(
            "SELECT currency, posted FROM proj_wallet_accounts WHERE owner_id = $1 AND kind = 'user' ORDER BY currency",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok("You have no wallet yet: open one with POST /v1/wallets.".into());
        }
        let parts: Vec<String> = rows
            .iter()
            .map(|r| {
                let c: String = r.get("currency");
                money(r.get("posted"), &c)
            })
            .collect();
        Ok(format!("💰 Your balance: {}.", parts.join(", ")))
    }

    async fn transactions(&self, user: Uuid) -> anyhow::Result<String> {
        let rows = sqlx::query(
            "SELECT e.amount, e.kind, e.occurred_at, a.currency FROM proj_wallet_entries e
             JOIN proj_wallet_accounts a ON a.account_id = e.account_id
             WHERE a.owner_id = $1 ORDER BY e.position DESC LIMIT 5",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok("No transactions yet.".into());
        }
        let lines: Vec<String> = rows
            .iter()
            .map(|r| {
                let at: DateTime<Utc> = r.get("occurred_at");
                let c: String = r.get("currency");
                let kind: String = r.get("kind");
                format!(
                    "{} {} {}",
                    at.format("%Y-%m-%d %H:%M"),
                    kind,
                    money(r.get("amount"), &c)
                )
            })
            .collect();
        Ok(format!("Your last transactions:\n{}", lines.join("\n")))
    }

    /// The room's latest messages, opened (members only see this room: the asker is one).
    async fn recent(
        &self,
        room: Uuid,
        before: Uuid,
        n: i64,
    ) -> anyhow::Result<Vec<(Uuid, String)>> {
        let rows = sqlx::query(
            "SELECT message_id, sender, body FROM proj_chat_messages
             WHERE room_id = $1 AND message_id <> $2 AND redacted_at IS NULL AND sender <> $3
             ORDER BY position DESC LIMIT $4",
        )
        .bind(room)
        .bind(before)
        .bind(commands::chat::ASSISTANT)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get("message_id")).collect();
        let mut conn = self.pool.acquire().await?;
        let keys = self.keystore.message_keys(&mut conn, &ids).await?;
        let mut out: Vec<(Uuid, String)> = rows
            .iter()
            .filter_map(|r| {
                let id: Uuid = r.get("message_id");
                let sealed: Sealed =
                    serde_json::from_value(r.get::<Option<serde_json::Value>, _>("body")?).ok()?;
                let text =
                    crypto::open(keys.get(&id)?, &crypto::field_aad(id, "body"), &sealed).ok()?;
                Some((r.get("sender"), String::from_utf8_lossy(&text).into_owned()))
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn summarise(&self, room: Uuid, request: Uuid) -> anyhow::Result<String> {
        let recent = self.recent(room, request, 30).await?;
        if recent.is_empty() {
            let nothing = "Nothing to summarise yet.";
            if self.llm.is_some() {
                // The answer counts as streamed when a model is configured: send it as its one chunk.
                self.chunk(room, request, 0, nothing, true).await;
            }
            return Ok(nothing.into());
        }
        if self.llm.is_some() {
            let transcript: Vec<String> = recent.iter().map(|(_, t)| format!("- {t}")).collect();
            return self
                .stream_llm(
                    room,
                    request,
                    "Summarise this chat in three short sentences.",
                    &transcript.join("\n"),
                )
                .await;
        }
        let people: std::collections::BTreeSet<Uuid> = recent.iter().map(|(s, _)| *s).collect();
        let mut highlights: Vec<&String> = recent.iter().map(|(_, t)| t).collect();
        highlights.sort_by_key(|t| std::cmp::Reverse(t.len()));
        let top: Vec<String> = highlights
            .iter()
            .take(3)
            .map(|t| format!("• {}", first_sentence(t)))
            .collect();
        Ok(format!(
            "The last {} messages, from {} people. The longest points:\n{}",
            recent.len(),
            people.len(),
            top.join("\n")
        ))
    }

    async fn search(&self, room: Uuid, query: &str) -> anyhow::Result<String> {
        let words: Vec<String> = query
            .to_lowercase()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let found: Vec<String> = self
            .recent(room, Uuid::nil(), 500)
            .await?
            .into_iter()
            .rev()
            .filter(|(_, t)| {
                let t = t.to_lowercase();
                !t.contains("@mathia") && words.iter().all(|w| t.contains(w.as_str()))
            })
            .take(5)
            .map(|(_, t)| format!("• {}", first_sentence(&t)))
            .collect();
        Ok(if found.is_empty() {
            format!("No recent message here mentions \"{query}\".")
        } else {
            format!("Recent messages about \"{query}\":\n{}", found.join("\n"))
        })
    }

    async fn ask_llm(&self, room: Uuid, request: Uuid, text: &str) -> anyhow::Result<String> {
        self.stream_llm(
            room,
            request,
            "You are Mathia, a helpful assistant in a group chat. Answer briefly. You cannot move money.",
            text,
        )
        .await
    }

    /// Stream the model's answer as chunks and return the whole.
    async fn stream_llm(
        &self,
        room: Uuid,
        request: Uuid,
        system: &str,
        prompt: &str,
    ) -> anyhow::Result<String> {
        let llm = self.llm.as_ref().context("no model configured")?;
        let mut s = llm.stream(system, prompt).await?;
        let mut whole = String::new();
        let mut seq = 0u32;
        while let Some(delta) = s.next().await {
            let delta = delta?;
            self.chunk(room, request, seq, &delta, false).await;
            seq += 1;
            whole.push_str(&delta);
        }
        self.chunk(room, request, seq, "", true).await;
        Ok(whole)
    }

    async fn chunk(&self, room: Uuid, request: Uuid, seq: u32, delta: &str, done: bool) {
        let p = self.subjects.prefix();
        let subject = if p.is_empty() {
            format!("live.{room}.ai")
        } else {
            format!("{p}.live.{room}.ai")
        };
        let frame =
            serde_json::json!({"request_id": request, "seq": seq, "delta": delta, "done": done});
        let _ = self.nats.publish(subject, frame.to_string().into()).await;
    }

    /// Commit the final answer as the assistant's message, quoting the request.
    async fn reply(&self, request: Uuid, room: Uuid, text: &str) -> anyhow::Result<()> {
        let Some(keys) = self.keystore.room_keys(&self.pool, room).await? else {
            return Ok(()); // the room is gone
        };
        let message_id = derived(request, "reply");
        let (key, wrapped) = handlers::keystore::new_message_key(&keys.current, message_id);
        let body = crypto::seal(
            &key,
            &crypto::field_aad(message_id, "body"),
            text.as_bytes(),
        );
        let envelope = CommandEnvelope {
            command_id: message_id,
            correlation_id: request,
            actor: Actor {
                user_id: None,
                role: Role::System,
            },
            issued_at: Utc::now(),
            request_hash: hex(&Sha256::digest(
                format!("assistant-reply|{request}").as_bytes(),
            )),
            command: Command::Chat(ChatCommand::AssistantReply {
                room_id: room,
                message_id,
                in_reply_to: request,
                body,
                key_version: keys.version,
                message_key: Bytes64(wrapped),
                sent_at: Utc::now(),
            }),
            expected_version: None,
        };
        let reply_to = format!("{}.{message_id}", self.subjects.outcome_inbox("assistant"));
        bus::publish_command(&self.js, &self.subjects, &envelope, &reply_to).await?;
        Ok(())
    }
}

fn problem(o: &Outcome) -> String {
    o.body["message"]
        .as_str()
        .or_else(|| o.body["detail"].as_str())
        .unwrap_or("it was refused")
        .to_owned()
}

fn first_sentence(t: &str) -> String {
    let s = t.split(['.', '!', '?', '\n']).next().unwrap_or(t).trim();
    let s: String = s.chars().take(140).collect();
    s
}

fn money(minor: i64, currency: &str) -> String {
    let scale = currency
        .parse::<commands::money::Currency>()
        .map(|c| u32::from(c.scale()))
        .unwrap_or(2);
    let d = 10i64.pow(scale);
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    if scale == 0 {
        format!("{sign}{m} {currency}")
    } else {
        format!(
            "{sign}{}.{:0w$} {currency}",
            m / d as u64,
            m % d as u64,
            w = scale as usize
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64_token() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_use_the_configured_rates_in_integers_and_invert_them() {
        let r = FixedRates::parse("USD/KES=129.25, EUR/KES=140.1").unwrap();
        assert_eq!(
            convert("100", r.rate("USD", "KES").unwrap()).unwrap(),
            "12925.00"
        );
        assert_eq!(
            convert("12.5", r.rate("EUR", "KES").unwrap()).unwrap(),
            "1751.25"
        );
        assert_eq!(
            convert("1292.5", r.rate("KES", "USD").unwrap()).unwrap(),
            "10.00"
        );
        assert!(r.rate("USD", "GBP").is_none());
        assert!(FixedRates::parse("USD-KES=1").is_err());
        assert!(FixedRates::parse("USD/KES=abc").is_err());
        assert_eq!(money(123_456, "KES"), "1234.56 KES");
        assert_eq!(money(-50, "USD"), "-0.50 USD");
    }
}
