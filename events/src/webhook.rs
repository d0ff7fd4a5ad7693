//! Outbound webhooks: one stream per endpoint, `webhook.endpoint.<id>`.
//!
//! An endpoint is a URL and an event filter owned by one user. Its signing
//! secret never enters an event: it rests sealed by the master key in the
//! keystore table `webhook_secrets` (see `commands::KeyOp::PutWebhookSecret`),
//! and deleting the endpoint deletes that row in the same transaction.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The domain token of webhook streams and subjects.
pub const DOMAIN: &str = "webhook";
/// The aggregate token.
pub const ENDPOINT: &str = "endpoint";

/// Events of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WebhookEvent {
    /// An endpoint exists, enabled.
    WebhookRegistered {
        /// Endpoint id (= stream id).
        endpoint_id: Uuid,
        /// Whose: only this user's own events are delivered to it.
        owner: Uuid,
        /// Where deliveries are POSTed (http or https).
        url: String,
        /// Event types (`wallet.Credited`) and domain wildcards (`notify.*`).
        filter: Vec<String>,
        /// A note for the owner.
        description: Option<String>,
    },
    /// The URL, filter, description or enabled flag changed.
    WebhookUpdated {
        /// New URL.
        url: Option<String>,
        /// New filter.
        filter: Option<Vec<String>>,
        /// New description.
        description: Option<String>,
        /// Enabled (false: nothing is queued for it, pending deliveries wait).
        enabled: Option<bool>,
    },
    /// The endpoint is gone and its secret destroyed.
    WebhookDeleted,
    /// Dead-lettered deliveries go back to the queue with a fresh schedule.
    DeadLettersRedriven {
        /// One delivery, or every dead letter of the endpoint when none.
        delivery_id: Option<Uuid>,
    },
}

impl WebhookEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            WebhookEvent::WebhookRegistered { .. } => "WebhookRegistered",
            WebhookEvent::WebhookUpdated { .. } => "WebhookUpdated",
            WebhookEvent::WebhookDeleted => "WebhookDeleted",
            WebhookEvent::DeadLettersRedriven { .. } => "DeadLettersRedriven",
        }
    }
}
