//! The handlers role: pull commands from `COMMANDS`, decide them in batches,
//! append their events and ledger rows in one transaction, answer, then ack.
//!
//! A batch is whatever the consumer has ready (up to [`HandlerConfig::batch_max`]).
//! Commands are decided one after another against a working copy of the states,
//! so two spends on one wallet inside a batch see each other. Then one
//! transaction writes everything:
//!
//! 1. read-set validation: every stream the batch read must still be at the
//!    version the decisions saw (another instance may have appended since);
//! 2. the ledger rows (rejections too: a failed transfer stays failed);
//! 3. the events, with positions from the commit-order fence (see [`crate::store`]);
//! 4. commit; only then answers go out and messages are acked.
//!
//! On a conflict (a stale read set, a `(stream_id, version)` or ledger key taken
//! by another instance) the batch's cached states are dropped and the whole
//! batch is decided again from the store. A crash before the ack means
//! redelivery, and the ledger turns the redelivered command into a replay of
//! the stored answer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use commands::{Loaded, StateSet};
use events::trace::{self, TraceContext};
use events::{StreamId, Subjects, headers};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{self, CommandEnvelope, Outcome};
use crate::ledger;
use crate::store::{self, PendingEvent, SNAPSHOT_EVERY, StoreError};

/// Tuning of the handlers role.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Most commands decided in one transaction.
    pub batch_max: usize,
    /// Most stream states kept in memory between batches.
    pub cache_max: usize,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            batch_max: 512,
            cache_max: 200_000,
        }
    }
}

/// What the handlers role needs.
#[derive(Clone)]
pub struct Handlers {
    /// The event store.
    pub pool: PgPool,
    /// NATS (answers go out on core NATS).
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Subject and stream names.
    pub subjects: Subjects,
    /// Tuning.
    pub config: HandlerConfig,
}

struct Incoming {
    msg: jetstream::Message,
    envelope: CommandEnvelope,
    reply_to: Option<String>,
    /// The sender's span (the `traceparent` header), our parent.
    parent: Option<TraceContext>,
}

impl Handlers {
    /// Run until `shutdown`: pull, decide, append, answer, ack.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = bus::handlers_consumer_config(&self.subjects)?;
        let mut cache: HashMap<StreamId, Loaded> = HashMap::new();
        tracing::info!(consumer = bus::HANDLERS, "handlers started");
        while !shutdown.is_cancelled() {
            // (Re)create the consumer each time the pull stream fails, so a deleted
            // consumer or a recreated stream heals on its own.
            let messages = match bus::ensure_consumer(
                &self.js,
                &self.subjects.commands_stream(),
                config.clone(),
            )
            .await
            {
                Ok(consumer) => {
                    consumer
                        .stream()
                        .max_messages_per_batch(self.config.batch_max)
                        .heartbeat(Duration::from_secs(5))
                        .expires(Duration::from_secs(30))
                        .messages()
                        .await
                }
                Err(e) => {
                    // The stream itself may be gone (deleted by an operator): put it back.
                    let _ = bus::ensure_streams(&self.js, &self.subjects).await;
                    Err(async_nats::jetstream::consumer::StreamError::with_source(
                        async_nats::jetstream::consumer::StreamErrorKind::Other,
                        format!("{e:#}"),
                    ))
                }
            };
            let messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull from COMMANDS; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            let mut chunks = messages.ready_chunks(self.config.batch_max);
            loop {
                let chunk = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    chunk = chunks.next() => chunk,
                };
                let Some(chunk) = chunk else { break };
                let mut batch = Vec::with_capacity(chunk.len());
                let mut broken = false;
                for m in chunk {
                    match m {
                        Ok(msg) => batch.push(msg),
                        Err(e) => {
                            tracing::warn!(error = %e, "COMMANDS pull stream failed; reopening");
                            broken = true;
                        }
                    }
                }
                if !batch.is_empty()
                    && let Err(e) = self.process(batch, &mut cache).await
                {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "a command batch failed; it will be redelivered"
                    );
                    cache.clear();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if broken {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn process(
        &self,
        messages: Vec<jetstream::Message>,
        cache: &mut HashMap<StreamId, Loaded>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut batch = Vec::with_capacity(messages.len());
        for msg in messages {
            match serde_json::from_slice::<CommandEnvelope>(&msg.payload) {
                Ok(envelope) => {
                    let reply_to = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(headers::REPLY_TO))
                        .map(|v| v.to_string());
                    let parent = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(headers::TRACEPARENT))
                        .and_then(|v| TraceContext::parse(v.as_str()));
                    batch.push(Incoming {
                        msg,
                        envelope,
                        reply_to,
                        parent,
                    });
                }
                Err(e) => {
                    // Not ours to decide: a malformed envelope can never succeed. Drop it loudly.
                    tracing::error!(subject = %msg.subject, error = %e, "undecodable command envelope terminated");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
            }
        }
        let mut attempt = 0;
        let outcomes = loop {
            attempt += 1;
            match self.decide_and_commit(&batch, cache).await {
                Ok(outcomes) => break outcomes,
                Err(StoreError::Conflict { constraint }) if attempt < 20 => {
                    metrics::counter!("mathia_command_batch_conflicts_total").increment(1);
                    tracing::debug!(%constraint, attempt, "batch conflicted with another writer; deciding again");
                    for inc in &batch {
                        for s in inc.envelope.command.streams() {
                            cache.remove(&s);
                        }
                    }
                }
                Err(e) => {
                    for inc in &batch {
                        let _ = inc
                            .msg
                            .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                            .await;
                    }
                    return Err(e).context("deciding a batch of commands");
                }
            }
        };
        let decided_at = Instant::now();
        metrics::histogram!("mathia_command_batch_phase_seconds", "phase" => "decide_commit")
            .record(decided_at.duration_since(started).as_secs_f64());
        for (inc, outcome) in batch.iter().zip(outcomes) {
            let kind = if outcome.status < 400 {
                "accepted"
            } else {
                "rejected"
            };
            // The handler's span for this command continues the sender's trace; its
            // span id is derived from the command id, so the relay can name it as
            // the parent of the events' messages (see `events::trace`).
            let me = TraceContext::new(
                inc.envelope.correlation_id,
                trace::span_id_of(inc.envelope.command_id),
            );
            let span = tracing::info_span!(
                "handlers.command",
                command = inc.envelope.command.name(),
                trace_id = %me.trace_id_hex(),
                span_id = %me.span_id_hex(),
                parent_span_id = inc.parent.map(|p| p.span_id_hex()),
            );
            // One line per command, keyed by the request id the gateway logged: grep it across roles.
            span.in_scope(|| {
                tracing::debug!(
                    command = inc.envelope.command.name(),
                    command_id = %outcome.command_id,
                    request_id = %inc.envelope.correlation_id,
                    status = outcome.status,
                    position = outcome.position,
                    replayed = outcome.replayed,
                    "command {kind}"
                )
            });
            metrics::counter!("mathia_commands_total", "command" => inc.envelope.command.name(), "outcome" => kind)
                .increment(1);
            // From the gateway's accepting it to its decision: queueing, deciding, committing.
            let latency = (Utc::now() - inc.envelope.issued_at)
                .num_microseconds()
                .unwrap_or(0)
                .max(0) as f64
                / 1e6;
            metrics::histogram!("mathia_command_seconds", "command" => inc.envelope.command.name(), "outcome" => kind)
                .record(latency);
            if let Some(reply_to) = &inc.reply_to
                && let Ok(body) = serde_json::to_vec(&outcome)
                && let Err(e) = self.client.publish(reply_to.clone(), body.into()).await
            {
                tracing::warn!(error = %e, command_id = %outcome.command_id, "could not answer the gateway; it will poll");
            }
            if let Err(e) = inc.msg.ack().await {
                tracing::warn!(error = %e, "ack failed; the command will be redelivered and replayed from the ledger");
            }
        }
        metrics::histogram!("mathia_command_batch_phase_seconds", "phase" => "answer_ack")
            .record(decided_at.elapsed().as_secs_f64());
        metrics::histogram!("mathia_command_batch_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("mathia_command_batch_size").record(batch.len() as f64);
        Ok(())
    }

    /// Decide every command of the batch and commit; the outcomes in batch order.
    async fn decide_and_commit(
        &self,
        batch: &[Incoming],
        cache: &mut HashMap<StreamId, Loaded>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let ids: Vec<Uuid> = batch.iter().map(|i| i.envelope.command_id).collect();
        let load_started = Instant::now();
        let decided = ledger::find(&self.pool, &ids).await?;

        // Load what the cache lacks, for the commands not decided yet.
        let mut wanted: HashSet<StreamId> = HashSet::new();
        for inc in batch
            .iter()
            .filter(|i| !decided.contains_key(&i.envelope.command_id))
        {
            wanted.extend(inc.envelope.command.streams());
        }
        let missing: Vec<StreamId> = wanted
            .iter()
            .filter(|s| !cache.contains_key(*s))
            .cloned()
            .collect();
        for (stream, loaded) in store::load_streams(&self.pool, &missing).await? {
            cache.insert(stream, loaded);
        }
        let mut working = StateSet::default();
        for s in &wanted {
            if let Some(l) = cache.get(s) {
                working.insert(s.clone(), l.clone());
            }
        }
        let read_set: Vec<(String, i64)> = wanted
            .iter()
            .map(|s| {
                (
                    s.as_str().to_owned(),
                    working.get(s).map_or(0, |l| l.version),
                )
            })
            .collect();

        // Decide in order. Events are staged per command so positions can be filled in after the fence.
        let now = Utc::now();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // (index in batch, its events, the decision, the target's version after it)
        let mut staged: Vec<(usize, Vec<PendingEvent>, commands::Decision, i64)> = Vec::new();
        let mut entries: Vec<(usize, ledger::Entry)> = Vec::new();
        let mut seen: HashMap<Uuid, usize> = HashMap::new();
        let mut touched: HashSet<StreamId> = HashSet::new();
        for (i, inc) in batch.iter().enumerate() {
            let env = &inc.envelope;
            if let Some(prior) = decided.get(&env.command_id) {
                outcomes[i] = Some(prior.clone());
                continue;
            }
            if seen.contains_key(&env.command_id) {
                continue; // a redelivered twin inside this batch: answered from the first below
            }
            seen.insert(env.command_id, i);
            let current = working.get(&env.command.target()).map_or(0, |l| l.version);
            let decided = match env.expected_version {
                Some(expected) if expected != current => Err(commands::Rejection::new(
                    412,
                    "precondition_failed",
                    format!("the resource is at version {current}, not {expected}; read it again"),
                )
                .with_details(serde_json::json!({ "current_version": current }))),
                _ => env.command.decide(&env.actor, &working),
            };
            match decided {
                Ok(decision) => {
                    let versions = working.apply(&decision.events);
                    // The target's version right after this command (not after the batch):
                    // it becomes the answer's `version` and ETag.
                    let target_version =
                        working.get(&env.command.target()).map_or(0, |l| l.version);
                    let pending: Vec<PendingEvent> = decision
                        .events
                        .iter()
                        .zip(versions)
                        .map(|((stream, event), version)| {
                            touched.insert(stream.clone());
                            PendingEvent {
                                event_id: Uuid::now_v7(),
                                stream_id: stream.clone(),
                                version,
                                event: event.clone(),
                                occurred_at: now,
                                correlation_id: env.correlation_id,
                                causation_id: env.command_id,
                                actor: env.actor.user_id,
                            }
                        })
                        .collect();
                    staged.push((i, pending, decision, target_version));
                }
                Err(rejection) => {
                    let outcome = Outcome {
                        command_id: env.command_id,
                        status: rejection.status,
                        body: serde_json::to_value(&rejection).unwrap_or_default(),
                        position: None,
                        request_hash: env.request_hash.clone(),
                        replayed: false,
                    };
                    entries.push((i, entry(env, &outcome)));
                    outcomes[i] = Some(outcome);
                }
            }
        }

        let txn_started = Instant::now();
        metrics::histogram!("mathia_command_batch_phase_seconds", "phase" => "load_decide")
            .record(txn_started.duration_since(load_started).as_secs_f64());
        let mut tx = self.pool.begin().await?;
        // 1. Read-set validation: nobody appended to what we read since we read it.
        if !read_set.is_empty() {
            let names: Vec<&str> = read_set.iter().map(|(s, _)| s.as_str()).collect();
            let current = store::stream_versions(&mut tx, &names).await?;
            if let Some((stream, _)) = read_set
                .iter()
                .find(|(s, v)| current.get(s).copied().unwrap_or(0) != *v)
            {
                return Err(StoreError::Conflict {
                    constraint: format!("read set ({stream})"),
                });
            }
        }
        // 2. Positions: the fence is taken by `append`; fill answers once we know them.
        let all_events: Vec<PendingEvent> = staged
            .iter()
            .flat_map(|(_, p, _, _)| p.iter().cloned())
            .collect();
        let snapshots: Vec<(StreamId, Loaded)> = touched
            .iter()
            .filter_map(|s| {
                let l = working.get(s)?;
                let before = read_set
                    .iter()
                    .find(|(n, _)| n == s.as_str())
                    .map_or(0, |(_, v)| *v);
                (l.version / SNAPSHOT_EVERY > before / SNAPSHOT_EVERY)
                    .then(|| (s.clone(), l.clone()))
            })
            .collect();
        store::save_snapshots(&mut tx, &snapshots).await?;
        // Ledger rows of rejections do not depend on positions: write them before the fence.
        let rejected: Vec<ledger::Entry> = entries.iter().map(|(_, e)| e.clone()).collect();
        ledger::insert(&mut tx, &rejected)
            .await
            .map_err(StoreError::from_db)?;
        // Keys the decisions created or destroyed commit with their events.
        let key_ops: Vec<commands::KeyOp> = staged
            .iter()
            .flat_map(|(_, _, d, _)| d.keys.iter().cloned())
            .collect();
        crate::keystore::apply(&mut tx, &key_ops)
            .await
            .map_err(StoreError::from_db)?;
        let first = store::append(&mut tx, &all_events).await?;
        let mut accepted = Vec::with_capacity(staged.len());
        let mut offset = 0i64;
        for (i, pending, decision, version) in &staged {
            let env = &batch[*i].envelope;
            offset += pending.len() as i64;
            let position = first + offset - 1;
            let mut body = decision.answer.clone();
            if let Some(obj) = body.as_object_mut() {
                obj.insert("position".into(), position.into());
                obj.insert("version".into(), (*version).into());
            }
            let outcome = Outcome {
                command_id: env.command_id,
                status: decision.status,
                body,
                position: Some(position),
                request_hash: env.request_hash.clone(),
                replayed: false,
            };
            accepted.push(entry(env, &outcome));
            outcomes[*i] = Some(outcome);
        }
        ledger::insert(&mut tx, &accepted)
            .await
            .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        metrics::histogram!("mathia_command_batch_phase_seconds", "phase" => "transaction")
            .record(txn_started.elapsed().as_secs_f64());

        // Committed: the working states are now the truth.
        if cache.len() > self.config.cache_max {
            cache.clear();
        }
        for (stream, loaded) in working.into_inner() {
            cache.insert(stream, loaded);
        }
        // Twins inside the batch get their first's answer.
        for (i, inc) in batch.iter().enumerate() {
            if outcomes[i].is_none()
                && let Some(&first) = seen.get(&inc.envelope.command_id)
            {
                outcomes[i] = outcomes[first].clone().map(|o| Outcome {
                    replayed: true,
                    ..o
                });
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.ok_or_else(|| {
                    StoreError::Db(sqlx::Error::Protocol(
                        "a command of the batch got no outcome".into(),
                    ))
                })
            })
            .collect()
    }
}

fn entry(env: &CommandEnvelope, outcome: &Outcome) -> ledger::Entry {
    ledger::Entry {
        principal: env.actor.user_id,
        command_type: env.command.name().to_owned(),
        stream_id: env.command.target().as_str().to_owned(),
        outcome: outcome.clone(),
    }
}
