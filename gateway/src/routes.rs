//! One module per resource.

pub mod accounts;
pub mod admin;
pub mod commands;
pub mod health;
pub mod wallets;

use crate::error::ApiError;

/// Anything unrouted: a problem, not axum's empty 404.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}
