//! The bus: JetStream stream and consumer definitions, the command envelope, the outcome.
//!
//! The definitions are the JSON files in `deploy/nats/` (the same ones an operator
//! feeds to `nats stream add --config`), embedded here and created or updated
//! idempotently at start.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream};
use chrono::{DateTime, Utc};
use commands::{Actor, Command};
use events::trace::{self, TraceContext};
use events::{Subjects, headers};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const COMMANDS_STREAM: &str = include_str!("../../deploy/nats/COMMANDS.stream.json");
const EVENTS_STREAM: &str = include_str!("../../deploy/nats/EVENTS.stream.json");
const HANDLERS_CONSUMER: &str = include_str!("../../deploy/nats/COMMANDS.handlers.consumer.json");
const PROJECTOR_CONSUMER: &str = include_str!("../../deploy/nats/EVENTS.projector.consumer.json");

/// The durable consumer every handlers instance pulls from.
pub const HANDLERS: &str = "handlers";

/// A command on its way to the handlers: the body of a `COMMANDS` message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// The command id: the `Idempotency-Key` made unique per principal and route,
    /// the `Nats-Msg-Id`, and the ledger's primary key.
    pub command_id: Uuid,
    /// The request that started it.
    pub correlation_id: Uuid,
    /// Who it acts for.
    pub actor: Actor,
    /// When the gateway accepted it.
    pub issued_at: DateTime<Utc>,
    /// SHA-256 of the request (method, path, canonical body): a retry with the
    /// same key and a different body is refused.
    pub request_hash: String,
    /// The command.
    pub command: Command,
    /// `If-Match`: the target stream must be at exactly this version, or the
    /// command is rejected with 412 (optimistic concurrency for clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<i64>,
}

/// A decided command's answer, as stored in the ledger and sent to the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The command.
    pub command_id: Uuid,
    /// HTTP status of the answer.
    pub status: u16,
    /// Answer body (the resource, or the rejection).
    pub body: serde_json::Value,
    /// Global position of the last event it appended; none for a rejection.
    pub position: Option<i64>,
    /// The request hash the command was decided with.
    pub request_hash: String,
    /// True when this answer comes from the ledger (the command was decided before).
    #[serde(default)]
    pub replayed: bool,
}

fn parse<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> anyhow::Result<T> {
    serde_json::from_str(json)
        .with_context(|| format!("the embedded definition of {what} does not parse"))
}

/// The `COMMANDS` stream's configuration under `subjects`' prefix.
pub fn commands_stream_config(subjects: &Subjects) -> anyhow::Result<stream::Config> {
    let mut config: stream::Config = parse(COMMANDS_STREAM, "COMMANDS")?;
    config.name = subjects.commands_stream();
    config.subjects = vec![subjects.all_commands()];
    Ok(config)
}

/// The `EVENTS` stream's configuration under `subjects`' prefix.
pub fn events_stream_config(subjects: &Subjects) -> anyhow::Result<stream::Config> {
    let mut config: stream::Config = parse(EVENTS_STREAM, "EVENTS")?;
    config.name = subjects.events_stream();
    config.subjects = vec![subjects.all_events()];
    Ok(config)
}

/// The handlers' durable consumer on `COMMANDS`.
pub fn handlers_consumer_config(subjects: &Subjects) -> anyhow::Result<pull::Config> {
    let mut config: pull::Config = parse(HANDLERS_CONSUMER, "the handlers consumer")?;
    config.filter_subject = subjects.all_commands();
    Ok(config)
}

/// Projector `name`'s durable consumer on `EVENTS`, filtered to its domains.
pub fn projector_consumer_config(
    subjects: &Subjects,
    name: &str,
    domains: &[&str],
) -> anyhow::Result<pull::Config> {
    let mut config: pull::Config = parse(PROJECTOR_CONSUMER, "the projector consumer")?;
    config.durable_name = Some(format!("proj-{name}"));
    config.description = Some(format!(
        "projector `{name}`: wakes it and tracks its progress"
    ));
    match domains {
        [one] => config.filter_subject = subjects.domain_events(one),
        many => {
            config.filter_subject = String::new();
            config.filter_subjects = many.iter().map(|d| subjects.domain_events(d)).collect();
        }
    }
    Ok(config)
}

/// Both streams' configurations, with `replicas` copies each (0: the definitions').
pub fn stream_configs(subjects: &Subjects, replicas: usize) -> anyhow::Result<Vec<stream::Config>> {
    let mut configs = vec![
        commands_stream_config(subjects)?,
        events_stream_config(subjects)?,
    ];
    if replicas > 0 {
        for c in &mut configs {
            c.num_replicas = replicas;
        }
    }
    Ok(configs)
}

/// Create or update both streams. Safe to call from every instance at every start.
pub async fn ensure_streams(js: &jetstream::Context, subjects: &Subjects) -> anyhow::Result<()> {
    ensure_streams_replicated(js, subjects, 0).await
}

/// [`ensure_streams`] with `replicas` copies of each stream (0: the definitions'
/// `num_replicas`). A JetStream cluster runs them at 3 (`deploy/cluster/nats/`).
pub async fn ensure_streams_replicated(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> anyhow::Result<()> {
    for config in stream_configs(subjects, replicas)? {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .with_context(|| format!("creating or updating stream {name}"))?;
    }
    Ok(())
}

/// Create (or update) a durable pull consumer and return it.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    config: pull::Config,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let name = config.durable_name.clone().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .with_context(|| format!("looking up stream {stream_name}"))?;
    match stream.create_consumer(config.clone()).await {
        Ok(consumer) => Ok(consumer),
        // An existing consumer whose config changed: update it in place.
        Err(_) => stream
            .update_consumer(config)
            .await
            .with_context(|| format!("creating or updating consumer {name} on {stream_name}")),
    }
}

/// What became of a published command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// `COMMANDS` stored it; `duplicate` when it already held this command id.
    Stored {
        /// JetStream dropped it as a duplicate of the same command id.
        duplicate: bool,
    },
    /// The ack never came: it may or may not be stored. Answer 202, never "failed":
    /// a client retry with the same key is safe either way.
    Unknown,
}

/// Publish a command to `COMMANDS` and wait for the stream's ack.
/// An error means it was certainly not stored (no stream, refused).
/// Its `traceparent` names a span derived from the command id as the sender
/// (a role's own command); the gateway sends its request span with [`publish_command_in`].
pub async fn publish_command(
    js: &jetstream::Context,
    subjects: &Subjects,
    envelope: &CommandEnvelope,
    reply_to: &str,
) -> anyhow::Result<Published> {
    publish_command_in(js, subjects, envelope, reply_to, None).await
}

/// [`publish_command`] as a hop of trace `trace` (the sender's span), whose
/// trace id should be the envelope's correlation id.
pub async fn publish_command_in(
    js: &jetstream::Context,
    subjects: &Subjects,
    envelope: &CommandEnvelope,
    reply_to: &str,
    trace: Option<TraceContext>,
) -> anyhow::Result<Published> {
    let trace = trace.unwrap_or_else(|| {
        TraceContext::new(
            envelope.correlation_id,
            trace::publisher_span_id_of(envelope.command_id),
        )
    });
    let payload = serde_json::to_vec(envelope).context("encoding a command envelope")?;
    let publish = jetstream::message::PublishMessage::build()
        .message_id(envelope.command_id.to_string())
        .header(headers::REPLY_TO, reply_to)
        .header(
            headers::REQUEST_ID,
            envelope.correlation_id.to_string().as_str(),
        )
        .header(headers::TRACEPARENT, trace.to_string().as_str())
        .payload(payload.into());
    let ack = js
        .send_publish(subjects.command(&envelope.command.target()), publish)
        .await
        .context("publishing a command")?;
    match tokio::time::timeout(Duration::from_secs(10), ack).await {
        Err(_) => Ok(Published::Unknown),
        Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::TimedOut => {
            Ok(Published::Unknown)
        }
        Ok(Err(e)) => Err(e).context("COMMANDS refused a command"),
        Ok(Ok(ack)) => Ok(Published::Stored {
            duplicate: ack.duplicate,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/cluster/nats/` holds the R3 definitions an operator creates on a
    /// cluster; they must be the single-node ones with 3 replicas, which is what
    /// `MATHIA_NATS_REPLICAS=3` makes the code create.
    #[test]
    fn the_cluster_definitions_are_the_single_node_ones_at_three_replicas() {
        let cluster = [
            include_str!("../../deploy/cluster/nats/COMMANDS.stream.json"),
            include_str!("../../deploy/cluster/nats/EVENTS.stream.json"),
        ];
        let code = stream_configs(&Subjects::default(), 3).unwrap();
        for (file, made) in cluster.iter().zip(code) {
            let file: stream::Config = serde_json::from_str(file).unwrap();
            assert_eq!(file.num_replicas, 3);
            assert_eq!(
                serde_json::to_value(&file).unwrap(),
                serde_json::to_value(&made).unwrap(),
                "{}",
                made.name
            );
        }
        assert!(
            stream_configs(&Subjects::default(), 0)
                .unwrap()
                .iter()
                .all(|c| c.num_replicas == 1)
        );
    }

    #[test]
    fn the_deploy_definitions_parse_and_follow_the_prefix() {
        let s = Subjects::with_prefix("t9");
        let c = commands_stream_config(&s).unwrap();
        assert_eq!(
            (c.name.as_str(), c.subjects[0].as_str()),
            ("T9_COMMANDS", "t9.cmd.>")
        );
        assert_eq!(c.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        let e = events_stream_config(&Subjects::default()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.subjects[0].as_str()),
            ("EVENTS", "evt.>")
        );
        let h = handlers_consumer_config(&s).unwrap();
        assert_eq!(h.durable_name.as_deref(), Some(HANDLERS));
        assert_eq!(h.ack_policy, jetstream::consumer::AckPolicy::Explicit);
        let p = projector_consumer_config(&s, "wallet", &["wallet"]).unwrap();
        assert_eq!(
            (p.durable_name.as_deref(), p.filter_subject.as_str()),
            (Some("proj-wallet"), "t9.evt.wallet.>")
        );
    }
}
