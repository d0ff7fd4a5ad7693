//! Currency conversion between a user's own wallets: a quote, then an explicit
//! conversion at the configured rate (`MATHIA_FX_RATES`), recorded on every leg.
//!
//! A conversion is two transfers, each inside one currency: the sold wallet
//! pays the currency desk of its currency, the desk of the other currency pays
//! the bought wallet. Σ debits = Σ credits therefore holds per currency, and
//! the desks' balances are Mathia's position in each currency. A pair missing
//! from the configuration is refused: no rate is ever invented.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use commands::Command;
use commands::money::Currency;
use commands::wallet::{WalletCommand, convert_minor, user_wallet_id};
use projections::assistant::Rates as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{AppJson, AppQuery, RequestId, WriteOptions};
use crate::routes::wallets::{Balance, amount, collect, currency};
use crate::state::AppState;

/// What a quote is asked for.
#[derive(Debug, Deserialize, IntoParams)]
pub struct QuoteParams {
    /// The currency sold (ISO code).
    pub from: String,
    /// The currency bought.
    pub to: String,
    /// Minor units of `from` to sell.
    pub amount: i64,
}

/// What a conversion would give now.
#[derive(Debug, Serialize, ToSchema)]
pub struct Quote {
    /// Currency sold.
    pub from: String,
    /// Currency bought.
    pub to: String,
    /// Minor units of `from` sold.
    pub sold: i64,
    /// Minor units of `to` bought, rounded down.
    pub bought: i64,
    /// The rate as a decimal: units of `to` per unit of `from`.
    #[schema(example = "129.25")]
    pub rate: String,
    /// The same rate in millionths; send it back as `quoted_rate_micros` to
    /// convert only at this rate.
    pub rate_micros: i64,
    /// Where the rate comes from.
    pub source: String,
}

/// `129_250_000` → `"129.25"`.
fn rate_decimal(micros: i64) -> String {
    let frac = format!("{:06}", micros % 1_000_000);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        (micros / 1_000_000).to_string()
    } else {
        format!("{}.{frac}", micros / 1_000_000)
    }
}

fn rate_of(state: &AppState, from: Currency, to: Currency) -> ApiResult<i64> {
    state
        .settings
        .fx_rates
        .rate(from.code(), to.code())
        .filter(|_| from != to)
        .ok_or_else(|| {
            ApiError::coded(
                http::StatusCode::UNPROCESSABLE_ENTITY,
                "rate_unavailable",
                &format!("no rate is configured for {from}/{to}"),
            )
        })
}

/// Quote a conversion: the rate and what `amount` buys now (nothing moves).
#[utoipa::path(get, path = "/v1/fx/quote", tag = "wallet", security(("bearer" = [])), params(QuoteParams),
    responses((status = 200, body = Quote), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, description = "unknown currency, bad amount, or no rate for the pair (`rate_unavailable`)", body = Problem)))]
pub async fn quote(
    State(state): State<AppState>,
    _principal: Principal,
    AppQuery(q): AppQuery<QuoteParams>,
) -> ApiResult<Json<Quote>> {
    let mut errors = vec![];
    let from = collect(&mut errors, currency("from", &q.from));
    let to = collect(&mut errors, currency("to", &q.to));
    let amt = collect(&mut errors, amount(q.amount));
    let (Some(from), Some(to), Some(amt)) = (from, to, amt) else {
        return Err(ApiError::Invalid(errors));
    };
    let rate_micros = rate_of(&state, from, to)?;
    let bought = convert_minor(amt.get(), from, to, rate_micros).unwrap_or(0);
    Ok(Json(Quote {
        from: from.code().into(),
        to: to.code().into(),
        sold: amt.get(),
        bought,
        rate: rate_decimal(rate_micros),
        rate_micros,
        source: state.settings.fx_rates.source().into(),
    }))
}

/// Convert money between two of your wallets.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"from_wallet": "0190d6a2-7c1e-7a55-9a43-7a3c1b2d4e5f", "to_currency": "KES",
    "amount": 10000, "quoted_rate_micros": 129250000}))]
pub struct ConversionRequest {
    /// Your wallet to sell from.
    pub from_wallet: Uuid,
    /// Your wallet to buy into; or give `to_currency` (your wallet in it).
    pub to_wallet: Option<Uuid>,
    /// The currency to buy (your wallet in it must be open); or give `to_wallet`.
    pub to_currency: Option<String>,
    /// Minor units of the sold wallet's currency, 1 to 10^15.
    pub amount: i64,
    /// The `rate_micros` of the quote you accept: if the rate moved, 409 `rate_changed` and nothing moves.
    pub quoted_rate_micros: Option<i64>,
}

/// One side of a conversion.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversionSide {
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// The transfer id of this side (the sold side's is the conversion id).
    pub transfer_id: Uuid,
}

/// A committed conversion.
#[derive(Debug, Serialize, ToSchema)]
pub struct Conversion {
    /// The conversion id (= the command id).
    pub conversion_id: Uuid,
    /// `conversion`.
    pub kind: String,
    /// `posted`.
    pub status: String,
    /// The sold wallet.
    pub from_wallet: Uuid,
    /// The bought wallet.
    pub to_wallet: Uuid,
    /// What left `from_wallet`.
    pub sold: ConversionSide,
    /// What entered `to_wallet` (rounded down).
    pub bought: ConversionSide,
    /// The rate it was made at, in millionths (recorded on every leg).
    pub rate_micros: i64,
    /// The sold wallet after it.
    pub balance: Balance,
    /// The bought wallet after it.
    pub to_balance: Balance,
    /// Global position reached.
    pub position: i64,
    /// The sold wallet's stream version.
    pub version: i64,
    /// The request as decided.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// Convert between two of your wallets at the configured rate: two legs, one per currency, that commit as one.
#[utoipa::path(post, path = "/v1/conversions", tag = "wallet", security(("bearer" = [])), request_body = ConversionRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the conversion id is derived from it; a retry answers the first result")),
    responses((status = 201, body = Conversion, headers(("Mathia-Position" = i64), ("Idempotent-Replayed" = bool))),
        (status = 202, description = "not decided within the timeout; poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "one of the wallets is not yours or not open", body = Problem),
        (status = 409, description = "`rate_changed`: the quoted rate is no longer the rate", body = Problem),
        (status = 422, description = "insufficient funds, same currency, no rate for the pair, amount buys nothing, invalid fields", body = Problem),
        (status = 429, body = Problem)))]
pub async fn convert(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<ConversionRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let amt = collect(&mut errors, amount(req.amount));
    let to_cur = match &req.to_currency {
        Some(c) => collect(&mut errors, currency("to_currency", c)),
        None => None,
    };
    if req.to_wallet.is_some() == req.to_currency.is_some() {
        errors.push(FieldError {
            field: "to_wallet".into(),
            message: "give exactly one of to_wallet and to_currency".into(),
        });
    }
    if req.quoted_rate_micros.is_some_and(|r| r <= 0) {
        errors.push(FieldError {
            field: "quoted_rate_micros".into(),
            message: "a positive number of millionths".into(),
        });
    }
    let Some(amount) = amt.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    // The currencies come from the caller's own wallets; the decision checks
    // them again against the ledger, so a stale read cannot mis-convert.
    let owner = principal.user_id;
    // A wallet opened a moment ago may not be in the read model yet: a miss
    // looks again once the model has caught up with the log.
    let wallet_currency = |wallet: Uuid| {
        let state = state.clone();
        async move {
            crate::routes::wallets::owned_currency(&state, wallet, owner)
                .await?
                .and_then(|c| c.parse::<Currency>().ok())
                .ok_or_else(|| ApiError::NotFound("no such wallet of yours".into()))
        }
    };
    let from_currency = wallet_currency(req.from_wallet).await?;
    let (to, to_currency) = match (req.to_wallet, to_cur) {
        (Some(w), _) => (w, wallet_currency(w).await?),
        (None, Some(c)) => (user_wallet_id(principal.user_id, c), c),
        (None, None) => {
            return Err(ApiError::field(
                "to_wallet",
                "give exactly one of to_wallet and to_currency",
            ));
        }
    };
    if from_currency == to_currency {
        return Err(ApiError::coded(
            http::StatusCode::UNPROCESSABLE_ENTITY,
            "same_currency",
            "a conversion needs wallets of two currencies; use a transfer",
        ));
    }
    let rate_micros = rate_of(&state, from_currency, to_currency)?;
    let (from, quoted_rate_micros) = (req.from_wallet, req.quoted_rate_micros);
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |conversion_id| {
            Ok(Command::Wallet(WalletCommand::Convert {
                conversion_id,
                from,
                to,
                from_currency,
                to_currency,
                amount,
                rate_micros,
                quoted_rate_micros,
                at: Utc::now(),
            }))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_print_as_short_decimals() {
        assert_eq!(rate_decimal(129_250_000), "129.25");
        assert_eq!(rate_decimal(7_737), "0.007737");
        assert_eq!(rate_decimal(2_000_000), "2");
    }
}
