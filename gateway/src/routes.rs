//! One module per resource.

pub mod accounts;
pub mod admin;
pub mod attachments;
pub mod commands;
pub mod fx;
pub mod health;
pub mod invoices;
pub mod itineraries;
pub mod messages;
pub mod moderation;
pub mod notes;
pub mod payments;
pub mod reminders;
pub mod rooms;
pub mod sync;
pub mod wallets;
pub mod webhooks;
pub mod ws;

use crate::error::ApiError;

/// Anything unrouted: a problem, not axum's empty 404.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// A known path with another method: 405 as a problem.
pub async fn method_not_allowed() -> ApiError {
    ApiError::Coded {
        status: http::StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed".into(),
        message: "this endpoint does not accept that method; see /openapi.json".into(),
        extra: Default::default(),
    }
}
