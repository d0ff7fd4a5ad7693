//! Wallets: open, deposit (admin), transfer, withdraw; balances and history.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use commands::Command;
use commands::money::{Amount, Currency};
use commands::wallet::{WalletCommand, user_wallet_id};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, ReadParams, position_header, wait_for};
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{AppJson, AppPath, AppQuery, RequestId, WriteOptions};
use crate::state::AppState;

const MODEL: &str = "wallet";

/// Open a wallet.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenWalletRequest {
    /// ISO 4217 code: KES, USD, EUR, GBP, UGX, TZS, NGN, ZAR, JPY.
    #[schema(example = "KES")]
    pub currency: String,
}

/// Balances in minor units.
#[derive(Debug, Serialize, ToSchema)]
pub struct Balance {
    /// The wallet.
    pub wallet_id: Uuid,
    /// Currency.
    pub currency: String,
    /// Settled balance.
    pub posted: i64,
    /// Held by pending transfers.
    pub pending: i64,
    /// What can be spent now: posted − pending.
    pub available: i64,
}

/// A wallet.
#[derive(Debug, Serialize, ToSchema)]
pub struct Wallet {
    /// Wallet id (deterministic per owner and currency).
    pub wallet_id: Uuid,
    /// Owner.
    pub owner_id: Uuid,
    /// Currency.
    pub currency: String,
    /// Balances.
    pub balance: Balance,
    /// Stream version (use with `If-Match`).
    pub version: i64,
    /// Opened at.
    pub opened_at: DateTime<Utc>,
}

/// The answer to a money movement.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransferResult {
    /// The transfer id (= the command id).
    pub transfer_id: Uuid,
    /// deposit, transfer, withdrawal.
    pub kind: String,
    /// Always `posted` for now.
    pub status: String,
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// Debited wallet (a system float for deposits).
    pub from_wallet: Uuid,
    /// Credited wallet (a system float for withdrawals).
    pub to_wallet: Uuid,
    /// Client reference.
    pub reference: Option<String>,
    /// The caller's wallet after the movement.
    pub balance: Balance,
    /// Global position reached: pass as `after_position` to read it back.
    pub position: i64,
    /// The caller's wallet's stream version after the movement.
    pub version: i64,
}

/// The answer to opening a wallet.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenedWallet {
    /// Wallet id.
    pub wallet_id: Uuid,
    /// Owner.
    pub owner_id: Uuid,
    /// Currency.
    pub currency: String,
    /// Balances (zero).
    pub balance: Balance,
    /// Global position reached.
    pub position: i64,
    /// Stream version (1).
    pub version: i64,
}

/// Move money to another wallet of the same currency.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// Your wallet to debit.
    pub from_wallet: Uuid,
    /// The wallet to credit; or give `to_user`.
    pub to_wallet: Option<Uuid>,
    /// The user to credit (their wallet in `currency`); or give `to_wallet`.
    pub to_user: Option<Uuid>,
    /// Minor units, 1 to 10^15.
    #[schema(example = 2500)]
    pub amount: i64,
    /// Currency of both wallets.
    #[schema(example = "KES")]
    pub currency: String,
    /// Free text shown to both sides (≤ 140 characters).
    pub reference: Option<String>,
}

/// Credit a wallet (admins; providers will use webhooks).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// Minor units.
    pub amount: i64,
    /// The wallet's currency.
    pub currency: String,
    /// Provider reference.
    pub reference: Option<String>,
}

/// Pay out of a wallet.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WithdrawRequest {
    /// Minor units.
    pub amount: i64,
    /// The wallet's currency.
    pub currency: String,
    /// Where the money goes, e.g. `mpesa:+254700000000` (≤ 128 characters).
    pub destination: String,
}

/// One ledger leg of a wallet.
#[derive(Debug, Serialize, ToSchema)]
pub struct Entry {
    /// The transfer.
    pub transfer_id: Uuid,
    /// deposit, transfer, withdrawal.
    pub kind: String,
    /// Signed minor units: + credit, − debit.
    pub amount: i64,
    /// The other account.
    pub counterparty: Uuid,
    /// Client reference.
    pub reference: Option<String>,
    /// Balance after this leg.
    pub balance_after: i64,
    /// Wallet stream version of this leg.
    pub version: i64,
    /// Global position.
    pub position: i64,
    /// When.
    pub occurred_at: DateTime<Utc>,
}

/// A page of entries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryPage {
    /// The entries.
    pub items: Vec<Entry>,
    /// Cursor of the next (older) page; null when there is no more.
    pub next: Option<String>,
}

/// Wallets of the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct WalletList {
    /// Every wallet the caller owns.
    pub items: Vec<Wallet>,
}

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PageParams {
    /// 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

fn currency(field: &str, code: &str) -> Result<Currency, FieldError> {
    code.parse()
        .map_err(|e: commands::money::UnknownCurrency| FieldError {
            field: field.into(),
            message: e.to_string(),
        })
}

fn amount(v: i64) -> Result<Amount, FieldError> {
    Amount::new(v).map_err(|e| FieldError {
        field: "amount".into(),
        message: e.to_string(),
    })
}

fn text(field: &str, v: &Option<String>, max: usize) -> Result<Option<String>, FieldError> {
    match v {
        Some(s) if s.chars().count() > max || s.chars().any(char::is_control) => Err(FieldError {
            field: field.into(),
            message: format!("at most {max} printable characters"),
        }),
        other => Ok(other.clone()),
    }
}

fn collect<T>(errors: &mut Vec<FieldError>, r: Result<T, FieldError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

/// Open the caller's wallet in a currency (one per currency).
#[utoipa::path(post, path = "/v1/wallets", tag = "wallet", security(("bearer" = [])), request_body = OpenWalletRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "≤ 255 visible ASCII characters")),
    responses((status = 201, body = OpenedWallet), (status = 202, description = "not decided within the timeout; poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 409, description = "already open", body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn open_wallet(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<OpenWalletRequest>,
) -> ApiResult<Response> {
    let currency = currency("currency", &req.currency).map_err(|e| ApiError::Invalid(vec![e]))?;
    let owner_id = principal.user_id;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |_| {
            Ok(Command::Wallet(WalletCommand::OpenWallet {
                owner_id,
                currency,
            }))
        },
    )
    .await
}

/// The caller's wallets.
#[utoipa::path(get, path = "/v1/wallets", tag = "wallet", security(("bearer" = [])), params(ReadParams),
    responses((status = 200, body = WalletList, headers(("Mathia-Position" = i64, description = "position reflected"))),
        (status = 401, body = Problem), (status = 503, description = "after_position not reached in time", body = Problem)))]
pub async fn list_wallets(
    State(state): State<AppState>,
    principal: Principal,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let rows = sqlx::query(
        "SELECT account_id, owner_id, currency, posted, version, opened_at FROM proj_wallet_accounts
         WHERE owner_id = $1 ORDER BY currency",
    )
    .bind(principal.user_id)
    .fetch_all(&state.pool)
    .await?;
    let items = rows.iter().map(wallet_row).collect();
    Ok((position_header(position), Json(WalletList { items })).into_response())
}

fn wallet_row(r: &sqlx::postgres::PgRow) -> Wallet {
    let wallet_id: Uuid = r.get("account_id");
    let posted: i64 = r.get("posted");
    let currency: String = r.get("currency");
    Wallet {
        wallet_id,
        owner_id: r.get::<Option<Uuid>, _>("owner_id").unwrap_or_default(),
        currency: currency.clone(),
        balance: Balance {
            wallet_id,
            currency,
            posted,
            pending: 0,
            available: posted,
        },
        version: r.get("version"),
        opened_at: r.get("opened_at"),
    }
}

/// One of the caller's wallets.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}", tag = "wallet", security(("bearer" = [])),
    params(("wallet_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = Wallet), (status = 401, body = Problem),
        (status = 404, description = "no such wallet, or not yours", body = Problem), (status = 503, body = Problem)))]
pub async fn get_wallet(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(wallet_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let row = sqlx::query(
        "SELECT account_id, owner_id, currency, posted, version, opened_at FROM proj_wallet_accounts
         WHERE account_id = $1 AND owner_id = $2",
    )
    .bind(wallet_id)
    .bind(principal.user_id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound("no such wallet".into()))?;
    let wallet = wallet_row(&row);
    let mut headers = position_header(position);
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", wallet.version)) {
        headers.insert(http::header::ETAG, v);
    }
    Ok((headers, Json(wallet)).into_response())
}

/// The wallet's ledger legs, newest first, with cursor paging.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}/entries", tag = "wallet", security(("bearer" = [])),
    params(("wallet_id" = Uuid, Path), PageParams),
    responses((status = 200, body = EntryPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn list_entries(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(wallet_id): AppPath<Uuid>,
    AppQuery(page): AppQuery<PageParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let limit = page.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 200"));
    }
    let before = match &page.cursor {
        None => i64::MAX,
        Some(c) => URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("v1:").and_then(|v| v.parse::<i64>().ok()))
            .ok_or_else(|| ApiError::Malformed("cursor is not one this API gave out".into()))?,
    };
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(page.after_position.or(after.0)),
    )
    .await?;
    let owned: Option<Uuid> = sqlx::query_scalar(
        "SELECT account_id FROM proj_wallet_accounts WHERE account_id = $1 AND owner_id = $2",
    )
    .bind(wallet_id)
    .bind(principal.user_id)
    .fetch_optional(&state.pool)
    .await?;
    if owned.is_none() {
        return Err(ApiError::NotFound("no such wallet".into()));
    }
    let rows = sqlx::query(
        "SELECT transfer_id, kind, amount, counterparty, reference, balance_after, version, position, occurred_at
         FROM proj_wallet_entries WHERE account_id = $1 AND version < $2 ORDER BY version DESC LIMIT $3",
    )
    .bind(wallet_id)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let items: Vec<Entry> = rows
        .iter()
        .take(limit as usize)
        .map(|r| Entry {
            transfer_id: r.get("transfer_id"),
            kind: r.get("kind"),
            amount: r.get("amount"),
            counterparty: r.get("counterparty"),
            reference: r.get("reference"),
            balance_after: r.get("balance_after"),
            version: r.get("version"),
            position: r.get("position"),
            occurred_at: r.get("occurred_at"),
        })
        .collect();
    let next = match (more, items.last()) {
        (true, Some(last)) => Some(URL_SAFE_NO_PAD.encode(format!("v1:{}", last.version))),
        _ => None,
    };
    Ok((position_header(position), Json(EntryPage { items, next })).into_response())
}

/// Credit a wallet from the provider float. Admins only.
#[utoipa::path(post, path = "/v1/wallets/{wallet_id}/deposits", tag = "wallet", security(("bearer" = [])),
    request_body = DepositRequest,
    params(("wallet_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "the transfer id is derived from it"), ("If-Match" = Option<String>, Header, description = "the wallet's ETag; 412 if it moved since")),
    responses((status = 201, body = TransferResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem), (status = 412, description = "If-Match does not match", body = Problem), (status = 429, body = Problem)))]
pub async fn deposit(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(wallet_id): AppPath<Uuid>,
    AppJson(req): AppJson<DepositRequest>,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden(
            "deposits are credited by an admin or a payment provider".into(),
        ));
    }
    let mut errors = vec![];
    let amt = collect(&mut errors, amount(req.amount));
    let cur = collect(&mut errors, currency("currency", &req.currency));
    let reference = collect(&mut errors, text("reference", &req.reference, 140));
    let (Some(amount), Some(currency), Some(reference)) = (amt, cur, reference) else {
        return Err(ApiError::Invalid(errors));
    };
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |transfer_id| {
            Ok(Command::Wallet(WalletCommand::Deposit {
                transfer_id,
                wallet_id,
                currency,
                amount,
                reference,
            }))
        },
    )
    .await
}

/// Pay out of one of the caller's wallets.
#[utoipa::path(post, path = "/v1/wallets/{wallet_id}/withdrawals", tag = "wallet", security(("bearer" = [])),
    request_body = WithdrawRequest,
    params(("wallet_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "the transfer id is derived from it"), ("If-Match" = Option<String>, Header, description = "the wallet's ETag; 412 if it moved since")),
    responses((status = 201, body = TransferResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 422, description = "insufficient funds, currency mismatch, invalid fields", body = Problem),
        (status = 412, description = "If-Match does not match", body = Problem), (status = 429, body = Problem)))]
pub async fn withdraw(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(wallet_id): AppPath<Uuid>,
    AppJson(req): AppJson<WithdrawRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let amt = collect(&mut errors, amount(req.amount));
    let cur = collect(&mut errors, currency("currency", &req.currency));
    let dest = req.destination.trim().to_owned();
    if dest.is_empty() || dest.chars().count() > 128 || dest.chars().any(char::is_control) {
        errors.push(FieldError {
            field: "destination".into(),
            message: "1 to 128 printable characters".into(),
        });
    }
    let (Some(amount), Some(currency), true) = (amt, cur, errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |transfer_id| {
            Ok(Command::Wallet(WalletCommand::Withdraw {
                transfer_id,
                wallet_id,
                currency,
                amount,
                destination: dest,
            }))
        },
    )
    .await
}

/// Move money from one of the caller's wallets to another wallet of the same currency.
#[utoipa::path(post, path = "/v1/transfers", tag = "wallet", security(("bearer" = [])), request_body = TransferRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the transfer id is derived from it; a retry answers the first result"), ("If-Match" = Option<String>, Header, description = "the debited wallet's ETag; 412 if it moved since")),
    responses((status = 201, body = TransferResult, headers(("Mathia-Position" = i64), ("Idempotent-Replayed" = bool))),
        (status = 202, description = "not decided within the timeout; poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "your wallet or the recipient's does not exist", body = Problem),
        (status = 409, description = "the same key is still in flight", body = Problem),
        (status = 422, description = "insufficient funds, same wallet, currency mismatch, key reused with another body", body = Problem),
        (status = 412, description = "If-Match does not match", body = Problem), (status = 429, body = Problem)))]
pub async fn transfer(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<TransferRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let amt = collect(&mut errors, amount(req.amount));
    let cur = collect(&mut errors, currency("currency", &req.currency));
    let reference = collect(&mut errors, text("reference", &req.reference, 140));
    let to = match (req.to_wallet, req.to_user, cur) {
        (Some(w), None, _) => Some(w),
        (None, Some(u), Some(c)) => Some(user_wallet_id(u, c)),
        (None, Some(_), None) => None,
        _ => {
            errors.push(FieldError {
                field: "to_wallet".into(),
                message: "give exactly one of to_wallet and to_user".into(),
            });
            None
        }
    };
    let (Some(amount), Some(currency), Some(reference), Some(to)) = (amt, cur, reference, to)
    else {
        return Err(ApiError::Invalid(errors));
    };
    let from = req.from_wallet;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |transfer_id| {
            Ok(Command::Wallet(WalletCommand::Transfer {
                transfer_id,
                from,
                to,
                currency,
                amount,
                reference,
            }))
        },
    )
    .await
}
