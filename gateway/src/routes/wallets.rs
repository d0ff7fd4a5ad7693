//! Wallets: open, deposit (admin), transfer, withdraw, holds (place, post,
//! void; expired by the system), limits; balances and history.

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
use crate::consistency::{AfterPosition, ReadParams, find, position_header, wait_for};
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
    /// Spending limits; null until set.
    pub limits: Option<WalletLimits>,
    /// Whether a dispute is open on it (no money may leave it).
    pub frozen: bool,
    /// Stream version (use with `If-Match`).
    pub version: i64,
    /// Opened at.
    pub opened_at: DateTime<Utc>,
}

/// A wallet's spending limits, enforced in the same decision as the spend.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WalletLimits {
    /// Largest single withdrawal (minor units); null: no cap.
    #[schema(example = 50000)]
    pub max_withdraw_amount: Option<i64>,
    /// Most that may leave the wallet (transfers, withdrawals, open and posted
    /// holds) within any rolling 24 hours; null: no cap.
    #[schema(example = 100000)]
    pub daily_spend_limit: Option<i64>,
    /// The only destinations withdrawals may go to; null: any.
    #[schema(example = json!(["mpesa:+254700000001"]))]
    pub payout_allow_list: Option<Vec<String>>,
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
    /// The fee the sender paid on top (transfers only; see `MATHIA_WALLET_FEE_*`).
    pub fee: Option<i64>,
    /// The request as decided; a reused Idempotency-Key is compared against it.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
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
    /// deposit, transfer, withdrawal, fee, refund, dispute, conversion.
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
    /// For a conversion: the rate it was made at (`conversion_id`, `from`, `to`,
    /// `rate_micros` = units of `to` per 1,000,000 of `from`, `sold`, `bought`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub fx: Option<serde_json::Value>,
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
    /// Only legs of this kind: deposit, transfer, withdrawal, fee, refund, dispute, conversion.
    pub kind: Option<String>,
    /// Only legs with this account on the other side.
    pub counterparty: Option<Uuid>,
    /// Only legs with exactly this reference.
    pub reference: Option<String>,
    /// Only legs at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Only legs before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
}

pub(crate) fn currency(field: &str, code: &str) -> Result<Currency, FieldError> {
    code.parse()
        .map_err(|e: commands::money::UnknownCurrency| FieldError {
            field: field.into(),
            message: e.to_string(),
        })
}

pub(crate) fn amount(v: i64) -> Result<Amount, FieldError> {
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

pub(crate) fn collect<T>(errors: &mut Vec<FieldError>, r: Result<T, FieldError>) -> Option<T> {
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
        "SELECT account_id, owner_id, currency, posted, pending, limits, frozen, version, opened_at FROM proj_wallet_accounts
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
    let pending: i64 = r.get("pending");
    let currency: String = r.get("currency");
    Wallet {
        wallet_id,
        owner_id: r.get::<Option<Uuid>, _>("owner_id").unwrap_or_default(),
        currency: currency.clone(),
        balance: Balance {
            wallet_id,
            currency,
            posted,
            pending,
            available: posted - pending,
        },
        limits: r
            .get::<Option<serde_json::Value>, _>("limits")
            .and_then(|l| serde_json::from_value(l).ok()),
        frozen: r.get("frozen"),
        version: r.get("version"),
        opened_at: r.get("opened_at"),
    }
}

/// The currency of `wallet` when `owner` owns it. A wallet opened a moment ago
/// may not be in the read model yet: a miss looks again once it has caught up.
pub(crate) async fn owned_currency(
    state: &AppState,
    wallet: Uuid,
    owner: Uuid,
) -> ApiResult<Option<String>> {
    find(state, MODEL, || {
        sqlx::query_scalar(
            "SELECT currency FROM proj_wallet_accounts WHERE account_id = $1 AND owner_id = $2",
        )
        .bind(wallet)
        .bind(owner)
        .fetch_optional(&state.pool)
    })
    .await
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
    let row = find(&state, MODEL, || {
        sqlx::query(
            "SELECT account_id, owner_id, currency, posted, pending, limits, frozen, version, opened_at FROM proj_wallet_accounts
             WHERE account_id = $1 AND owner_id = $2",
        )
        .bind(wallet_id)
        .bind(principal.user_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound("no such wallet".into()))?;
    let wallet = wallet_row(&row);
    let mut headers = position_header(position);
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", wallet.version)) {
        headers.insert(http::header::ETAG, v);
    }
    Ok((headers, Json(wallet)).into_response())
}

/// The wallet's ledger legs, newest first, with cursor paging; filter by kind,
/// counterparty, reference and time.
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
    if let Some(k) = &page.kind
        && ![
            "deposit",
            "transfer",
            "withdrawal",
            "fee",
            "refund",
            "dispute",
            "conversion",
        ]
        .contains(&k.as_str())
    {
        return Err(ApiError::field(
            "kind",
            "one of deposit, transfer, withdrawal, fee, refund, dispute, conversion",
        ));
    }
    if page
        .reference
        .as_ref()
        .is_some_and(|r| r.chars().count() > 140 || r.contains('\0'))
    {
        return Err(ApiError::field("reference", "at most 140 characters"));
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
    if owned_currency(&state, wallet_id, principal.user_id)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("no such wallet".into()));
    }
    let rows = sqlx::query(
        "SELECT transfer_id, kind, amount, counterparty, reference, balance_after, version, position, occurred_at, fx
         FROM proj_wallet_entries WHERE account_id = $1 AND version < $2
           AND ($4::text IS NULL OR kind = $4) AND ($5::uuid IS NULL OR counterparty = $5)
           AND ($6::text IS NULL OR reference = $6)
           AND ($7::timestamptz IS NULL OR occurred_at >= $7) AND ($8::timestamptz IS NULL OR occurred_at < $8)
         ORDER BY version DESC LIMIT $3",
    )
    .bind(wallet_id)
    .bind(before)
    .bind(limit + 1)
    .bind(&page.kind)
    .bind(page.counterparty)
    .bind(&page.reference)
    .bind(page.from)
    .bind(page.until)
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
            fx: r.get("fx"),
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
                at: Utc::now(),
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
    let fee = transfer_fee(&state, amount);
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
                fee,
                at: Utc::now(),
            }))
        },
    )
    .await
}

/// Reserve money for a payee: a pending transfer that is later posted
/// (wholly or in part), voided by the payee, or expired after its timeout.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"from_wallet": "0190d6a2-7c1e-7a55-9a43-7a3c1b2d4e5f", "to_user": "0190d6a2-7c1e-7a55-9a43-000000000002",
    "amount": 5000, "currency": "KES", "reference": "booking 42", "timeout_secs": 3600}))]
pub struct HoldRequest {
    /// Your wallet to reserve on.
    pub from_wallet: Uuid,
    /// The payee's wallet; or give `to_user`.
    pub to_wallet: Option<Uuid>,
    /// The payee (their wallet in `currency`); or give `to_wallet`.
    pub to_user: Option<Uuid>,
    /// Minor units, 1 to 10^15.
    pub amount: i64,
    /// Currency of both wallets.
    pub currency: String,
    /// Free text (≤ 140 characters).
    pub reference: Option<String>,
    /// Seconds until the hold expires and its money is available again: 1 to 2,592,000 (30 days); default 86,400.
    pub timeout_secs: Option<i64>,
}

/// A placed hold.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldPlaced {
    /// The hold id (= the command id; post and void it by this id).
    pub hold_id: Uuid,
    /// `pending`.
    pub status: String,
    /// Reserved minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// Payer's wallet.
    pub from_wallet: Uuid,
    /// Payee's wallet.
    pub to_wallet: Uuid,
    /// Client reference.
    pub reference: Option<String>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// The payer's wallet after the hold: `pending` up, `available` down.
    pub balance: Balance,
    /// Global position reached.
    pub position: i64,
    /// The payer's wallet's stream version.
    pub version: i64,
    /// The request as decided.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// Capture a hold.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount": 3000}))]
pub struct PostHoldRequest {
    /// Minor units to capture, at most the hold's amount; omitted: all of it. The rest returns to the payer.
    pub amount: Option<i64>,
}

/// How a hold ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldResult {
    /// The hold.
    pub hold_id: Uuid,
    /// `posted`, `voided` or `expired`.
    pub status: String,
    /// What the hold reserved.
    pub held: i64,
    /// What moved to the payee.
    pub posted: i64,
    /// What returned to the payer's available balance.
    pub released: i64,
    /// Currency.
    pub currency: String,
    /// The caller's wallet after it (the payee's when the payee acted).
    pub balance: Balance,
    /// Global position reached.
    pub position: i64,
    /// The payer's wallet's stream version.
    pub version: i64,
    /// The request as decided.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// A hold, as its payer or payee sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldView {
    /// The hold.
    pub hold_id: Uuid,
    /// Payer's wallet.
    pub from_wallet: Uuid,
    /// Payee's wallet.
    pub to_wallet: Uuid,
    /// Reserved minor units.
    pub amount: i64,
    /// Captured minor units.
    pub posted: i64,
    /// `pending`, `posted`, `voided` or `expired`.
    pub status: String,
    /// Client reference.
    pub reference: Option<String>,
    /// When it expires (or expired).
    pub expires_at: DateTime<Utc>,
    /// When it was placed.
    pub placed_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
}

/// Replace a wallet's spending limits (every field; null or omitted removes that limit).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"max_withdraw_amount": 50000, "daily_spend_limit": 100000, "payout_allow_list": ["mpesa:+254700000001"]}))]
pub struct LimitsRequest {
    /// Largest single withdrawal, 0 to 10^15.
    pub max_withdraw_amount: Option<i64>,
    /// Most per rolling 24 hours, 0 to 10^15.
    pub daily_spend_limit: Option<i64>,
    /// Up to 20 destinations of ≤ 128 printable characters; null: any destination.
    pub payout_allow_list: Option<Vec<String>>,
}

/// A wallet's limits after a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitsResult {
    /// The wallet.
    pub wallet_id: Uuid,
    /// The limits now, with `spent_last_24h` and `daily_remaining`.
    #[schema(value_type = Object)]
    pub limits: serde_json::Value,
    /// Balances.
    pub balance: Balance,
    /// Global position reached.
    pub position: i64,
    /// Stream version.
    pub version: i64,
    /// The request as decided.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// Put money aside for a payee until it is posted, voided or expires.
#[utoipa::path(post, path = "/v1/holds", tag = "wallet", security(("bearer" = [])), request_body = HoldRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the hold id is derived from it; a retry answers the first result"),
        ("If-Match" = Option<String>, Header, description = "the payer wallet's ETag")),
    responses((status = 201, body = HoldPlaced), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "the same key is still in flight", body = Problem),
        (status = 422, description = "insufficient funds, daily_spend_limit_exceeded, invalid fields, key reused with another body", body = Problem),
        (status = 412, body = Problem), (status = 429, body = Problem)))]
pub async fn place_hold(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<HoldRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let amt = collect(&mut errors, amount(req.amount));
    let cur = collect(&mut errors, currency("currency", &req.currency));
    let reference = collect(&mut errors, text("reference", &req.reference, 140));
    let timeout_secs = req.timeout_secs.unwrap_or(86_400);
    if !(1..=commands::wallet::MAX_HOLD_SECS).contains(&timeout_secs) {
        errors.push(FieldError {
            field: "timeout_secs".into(),
            message: "between 1 and 2592000 (30 days)".into(),
        });
    }
    let to = recipient(&mut errors, req.to_wallet, req.to_user, cur);
    let (Some(amount), Some(currency), Some(reference), Some(to), true) =
        (amt, cur, reference, to, errors.is_empty())
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
        |hold_id| {
            Ok(Command::Wallet(WalletCommand::PlaceHold {
                hold_id,
                from,
                to,
                currency,
                amount,
                reference,
                timeout_secs,
                at: Utc::now(),
            }))
        },
    )
    .await
}

fn recipient(
    errors: &mut Vec<FieldError>,
    to_wallet: Option<Uuid>,
    to_user: Option<Uuid>,
    currency: Option<Currency>,
) -> Option<Uuid> {
    match (to_wallet, to_user, currency) {
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
    }
}

/// The payer's and payee's wallets of a hold, from the read model (routing
/// only: the decision checks the hold on the payer's account itself).
async fn hold_parties(
    state: &AppState,
    hold_id: Uuid,
    after: AfterPosition,
) -> ApiResult<(Uuid, Uuid)> {
    wait_for(state, MODEL, after).await?;
    let row = find(state, MODEL, || {
        sqlx::query("SELECT from_account, to_account FROM proj_wallet_holds WHERE hold_id = $1")
            .bind(hold_id)
            .fetch_optional(&state.pool)
    })
    .await?;
    row.map(|r| (r.get("from_account"), r.get("to_account")))
        .ok_or_else(|| {
            ApiError::coded(
                http::StatusCode::NOT_FOUND,
                "hold_not_found",
                "no such hold",
            )
        })
}

/// Capture a hold, wholly or in part (its payer, payee or an admin).
#[utoipa::path(post, path = "/v1/holds/{hold_id}/post", tag = "wallet", security(("bearer" = [])), request_body = PostHoldRequest,
    params(("hold_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 200, body = HoldResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "no such hold, or not yours", body = Problem),
        (status = 409, description = "hold_already_posted, hold_already_voided, hold_already_expired, hold_expired", body = Problem),
        (status = 422, description = "post_exceeds_hold, invalid amount", body = Problem), (status = 429, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn post_hold(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(hold_id): AppPath<Uuid>,
    after: AfterPosition,
    AppJson(req): AppJson<PostHoldRequest>,
) -> ApiResult<Response> {
    let captured = match req.amount {
        Some(a) => Some(amount(a).map_err(|e| ApiError::Invalid(vec![e]))?),
        None => None,
    };
    let (from, to) = hold_parties(&state, hold_id, after).await?;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |_| {
            Ok(Command::Wallet(WalletCommand::PostHold {
                hold_id,
                from,
                to,
                amount: captured,
                at: Utc::now(),
            }))
        },
    )
    .await
}

/// Release a hold without moving money (its payee or an admin; the payer waits for the timeout).
#[utoipa::path(post, path = "/v1/holds/{hold_id}/void", tag = "wallet", security(("bearer" = [])),
    params(("hold_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 200, body = HoldResult), (status = 202, description = "poll Location"),
        (status = 401, body = Problem), (status = 403, description = "the payer cannot void a hold", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "hold_already_posted, hold_already_voided, hold_already_expired, hold_expired", body = Problem),
        (status = 429, body = Problem)))]
pub async fn void_hold(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(hold_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let (from, to) = hold_parties(&state, hold_id, after).await?;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &(),
        |_| {
            Ok(Command::Wallet(WalletCommand::VoidHold {
                hold_id,
                from,
                to,
                at: Utc::now(),
            }))
        },
    )
    .await
}

/// A hold (its payer or payee).
#[utoipa::path(get, path = "/v1/holds/{hold_id}", tag = "wallet", security(("bearer" = [])),
    params(("hold_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = HoldView), (status = 401, body = Problem),
        (status = 404, description = "no such hold, or not yours", body = Problem), (status = 503, body = Problem)))]
pub async fn get_hold(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(hold_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let r = find(&state, MODEL, || {
        sqlx::query(
            "SELECT h.* FROM proj_wallet_holds h
             JOIN proj_wallet_accounts f ON f.account_id = h.from_account
             JOIN proj_wallet_accounts t ON t.account_id = h.to_account
             WHERE h.hold_id = $1 AND (f.owner_id = $2 OR t.owner_id = $2)",
        )
        .bind(hold_id)
        .bind(principal.user_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound("no such hold".into()))?;
    let view = HoldView {
        hold_id,
        from_wallet: r.get("from_account"),
        to_wallet: r.get("to_account"),
        amount: r.get("amount"),
        posted: r.get("posted"),
        status: r.get("status"),
        reference: r.get("reference"),
        expires_at: r.get("expires_at"),
        placed_at: r.get("placed_at"),
        ended_at: r.get("ended_at"),
    };
    Ok((position_header(position), Json(view)).into_response())
}

/// Replace the spending limits of one of the caller's wallets.
#[utoipa::path(put, path = "/v1/wallets/{wallet_id}/limits", tag = "wallet", security(("bearer" = [])), request_body = LimitsRequest,
    params(("wallet_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header, description = "the wallet's ETag")),
    responses((status = 200, body = LimitsResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 412, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn set_limits(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(wallet_id): AppPath<Uuid>,
    AppJson(req): AppJson<LimitsRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    for (field, v) in [
        ("max_withdraw_amount", req.max_withdraw_amount),
        ("daily_spend_limit", req.daily_spend_limit),
    ] {
        if v.is_some_and(|v| !(0..=commands::money::MAX_AMOUNT).contains(&v)) {
            errors.push(FieldError {
                field: field.into(),
                message: "between 0 and 10^15 minor units".into(),
            });
        }
    }
    let list = req
        .payout_allow_list
        .as_ref()
        .map(|l| l.iter().map(|d| d.trim().to_owned()).collect::<Vec<_>>());
    if let Some(l) = &list
        && (l.len() > commands::wallet::MAX_ALLOW_LIST
            || l.iter().any(|d| {
                d.is_empty() || d.chars().count() > 128 || d.chars().any(char::is_control)
            }))
    {
        errors.push(FieldError {
            field: "payout_allow_list".into(),
            message: "up to 20 destinations of 1 to 128 printable characters".into(),
        });
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let (max_withdraw_amount, daily_spend_limit) = (req.max_withdraw_amount, req.daily_spend_limit);
    let route = Route {
        method: "PUT",
        path: uri.path(),
    };
    dispatch(&state, &principal, route, &options, rid, &req, |_| {
        Ok(Command::Wallet(WalletCommand::SetLimits {
            wallet_id,
            max_withdraw_amount,
            daily_spend_limit,
            payout_allow_list: list,
            at: Utc::now(),
        }))
    })
    .await
}

/// The configured fee on a transfer of `amount`: fixed + amount × bps / 10,000,
/// rounded down in integer minor units; none when it comes to 0.
pub(crate) fn transfer_fee(state: &AppState, amount: Amount) -> Option<Amount> {
    let proportional =
        (i128::from(amount.get()) * i128::from(state.settings.wallet_fee_bps) / 10_000) as i64;
    let fee = state
        .settings
        .wallet_fee_fixed
        .max(0)
        .saturating_add(proportional);
    Amount::new(fee).ok()
}

/// One leg of a linked transfer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkedLegRequest {
    /// Your wallet to debit.
    pub from_wallet: Uuid,
    /// The wallet to credit; or give `to_user`.
    pub to_wallet: Option<Uuid>,
    /// The user to credit (their wallet in `currency`); or give `to_wallet`.
    pub to_user: Option<Uuid>,
    /// Minor units, 1 to 10^15.
    pub amount: i64,
    /// Currency of both wallets.
    pub currency: String,
    /// Free text (≤ 140 characters).
    pub reference: Option<String>,
}

/// Several legs that commit or fail as one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"legs": [
    {"from_wallet": "0190d6a2-7c1e-7a55-9a43-7a3c1b2d4e5f", "to_user": "0190d6a2-7c1e-7a55-9a43-000000000002", "amount": 6000, "currency": "KES", "reference": "dinner, Bob's share"},
    {"from_wallet": "0190d6a2-7c1e-7a55-9a43-7a3c1b2d4e5f", "to_user": "0190d6a2-7c1e-7a55-9a43-000000000003", "amount": 4000, "currency": "KES", "reference": "dinner, Carol's share"}]}))]
pub struct LinkedRequest {
    /// 1 to 10 legs, decided in order; if any is refused, none moves.
    pub legs: Vec<LinkedLegRequest>,
}

/// The answer to a linked transfer.
#[derive(Debug, Serialize, ToSchema)]
pub struct LinkedResult {
    /// The transfer id (= the command id).
    pub transfer_id: Uuid,
    /// `linked`.
    pub kind: String,
    /// `posted`.
    pub status: String,
    /// The legs as committed, each with its `leg_id`.
    #[schema(value_type = Vec<Object>)]
    pub legs: Vec<serde_json::Value>,
    /// Total debited per wallet.
    #[schema(value_type = Object)]
    pub debited: serde_json::Value,
    /// The first leg's wallet after all legs.
    pub balance: Balance,
    /// Global position reached.
    pub position: i64,
    /// The first leg's wallet's stream version.
    pub version: i64,
    /// The request as decided.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// Move money in several legs that commit or fail as one (splits, paying several people).
#[utoipa::path(post, path = "/v1/transfers/linked", tag = "wallet", security(("bearer" = [])), request_body = LinkedRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the transfer id is derived from it")),
    responses((status = 201, body = LinkedResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "a wallet of some leg does not exist (`leg` says which)", body = Problem),
        (status = 409, body = Problem),
        (status = 422, description = "a leg is refused (`leg` says which): insufficient funds, a limit, currency mismatch; or invalid fields", body = Problem),
        (status = 429, body = Problem)))]
pub async fn linked_transfer(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<LinkedRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    if req.legs.is_empty() || req.legs.len() > commands::wallet::MAX_LINKED_LEGS {
        errors.push(FieldError {
            field: "legs".into(),
            message: "1 to 10 legs".into(),
        });
    }
    let mut legs = vec![];
    for (i, l) in req.legs.iter().enumerate() {
        let mut leg_errors = vec![];
        let amt = collect(&mut leg_errors, amount(l.amount));
        let cur = collect(&mut leg_errors, currency("currency", &l.currency));
        let reference = collect(&mut leg_errors, text("reference", &l.reference, 140));
        let to = recipient(&mut leg_errors, l.to_wallet, l.to_user, cur);
        if let (Some(amount), Some(currency), Some(reference), Some(to)) = (amt, cur, reference, to)
        {
            legs.push(commands::wallet::LinkedLeg {
                from: l.from_wallet,
                to,
                currency,
                amount,
                reference,
            });
        }
        errors.extend(leg_errors.into_iter().map(|e| FieldError {
            field: format!("legs/{i}/{}", e.field),
            message: e.message,
        }));
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |transfer_id| {
            Ok(Command::Wallet(WalletCommand::Linked {
                transfer_id,
                legs,
                at: Utc::now(),
            }))
        },
    )
    .await
}

pub use projections::reconcile::{
    CurrencyReconciliation, ProviderFinding, ProviderReconciliation, Reconciliation,
};

/// Prove Σ debits = Σ credits per currency over the whole log, and match every
/// provider payment with the deposit it credited (admins; audited; kept as a run).
#[utoipa::path(get, path = "/v1/admin/reconciliation", tag = "wallet", security(("bearer" = [])), params(ReadParams),
    responses((status = 200, body = Reconciliation, headers(("Mathia-Position" = i64, description = "position the read-model part reflects"))),
        (status = 401, body = Problem), (status = 403, description = "not an admin", body = Problem), (status = 503, body = Problem)))]
pub async fn reconciliation(
    State(state): State<AppState>,
    principal: Principal,
    after: AfterPosition,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let position = wait_for(&state, MODEL, after).await?;
    sqlx::query(
        "INSERT INTO audit_log (actor, action, subject) VALUES ($1, 'admin.reconciliation', NULL)",
    )
    .bind(principal.user_id)
    .execute(&state.pool)
    .await?;
    let report = projections::reconcile::reconcile(&state.pool).await?;
    projections::reconcile::record(
        &state.pool,
        &report,
        &format!("admin:{}", principal.user_id),
    )
    .await
    .map_err(ApiError::Internal)?;
    Ok((position_header(position), Json(report)).into_response())
}

/// One kept reconciliation run.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReconciliationRun {
    /// Run id.
    pub id: i64,
    /// When it ran.
    pub ran_at: DateTime<Utc>,
    /// `scheduler` or `admin:<user id>`.
    pub ran_by: String,
    /// Its verdict.
    pub balanced: bool,
    /// Unbalanced transfers plus provider findings.
    pub findings: i64,
    /// The whole report, as `GET /v1/admin/reconciliation` answers it.
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
}

/// The latest runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReconciliationRuns {
    /// Up to `limit` runs.
    pub items: Vec<ReconciliationRun>,
}

/// How many runs.
#[derive(Debug, Deserialize, IntoParams)]
pub struct RunsParams {
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
}

/// The latest reconciliation runs, the scheduler's and on-demand ones (admins).
#[utoipa::path(get, path = "/v1/admin/reconciliation/runs", tag = "wallet", security(("bearer" = [])), params(RunsParams),
    responses((status = 200, body = ReconciliationRuns), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, description = "not an admin", body = Problem)))]
pub async fn reconciliation_runs(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(q): AppQuery<RunsParams>,
) -> ApiResult<Json<ReconciliationRuns>> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 100"));
    }
    let items = sqlx::query(
        "SELECT id, ran_at, ran_by, balanced, findings, report FROM reconciliation_runs
         ORDER BY ran_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&state.pool)
    .await?
    .iter()
    .map(|r| ReconciliationRun {
        id: r.get("id"),
        ran_at: r.get("ran_at"),
        ran_by: r.get("ran_by"),
        balanced: r.get("balanced"),
        findings: r.get("findings"),
        report: r.get("report"),
    })
    .collect();
    Ok(Json(ReconciliationRuns { items }))
}

/// The time a point-in-time balance is asked for.
#[derive(Debug, Deserialize, IntoParams)]
pub struct AtParams {
    /// RFC 3339 instant; the balance after every leg that occurred at or before it.
    pub at: DateTime<Utc>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

/// A wallet's balance at an instant.
#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceAt {
    /// The instant asked for.
    pub at: DateTime<Utc>,
    /// Balances then (pending: holds placed by then and not yet ended).
    pub balance: Balance,
    /// The wallet's stream version of the last leg by then (0: none).
    pub version: i64,
}

/// The balance of one of the caller's wallets at a past instant.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}/balance", tag = "wallet", security(("bearer" = [])),
    params(("wallet_id" = Uuid, Path), AtParams),
    responses((status = 200, body = BalanceAt), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn balance_at(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(wallet_id): AppPath<Uuid>,
    AppQuery(q): AppQuery<AtParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, AfterPosition(q.after_position.or(after.0))).await?;
    let currency: String = owned_currency(&state, wallet_id, principal.user_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such wallet".into()))?;
    let row = sqlx::query(
        "SELECT
            coalesce((SELECT balance_after FROM proj_wallet_entries WHERE account_id = $1 AND occurred_at <= $2
                      ORDER BY version DESC LIMIT 1), 0) AS posted,
            coalesce((SELECT version FROM proj_wallet_entries WHERE account_id = $1 AND occurred_at <= $2
                      ORDER BY version DESC LIMIT 1), 0) AS version,
            coalesce((SELECT sum(amount) FROM proj_wallet_holds WHERE from_account = $1 AND placed_at <= $2
                      AND (ended_at IS NULL OR ended_at > $2)), 0)::bigint AS pending",
    )
    .bind(wallet_id)
    .bind(q.at)
    .fetch_one(&state.pool)
    .await?;
    let (posted, pending): (i64, i64) = (row.get("posted"), row.get("pending"));
    let body = BalanceAt {
        at: q.at,
        balance: Balance {
            wallet_id,
            currency,
            posted,
            pending,
            available: posted - pending,
        },
        version: row.get("version"),
    };
    Ok((position_header(position), Json(body)).into_response())
}

/// Paging of the journal.
#[derive(Debug, Deserialize, IntoParams)]
pub struct JournalParams {
    /// Legs after this global position (the `next` of the previous page); default 0.
    pub after: Option<i64>,
    /// 1 to 1000 (default 200).
    pub limit: Option<i64>,
}

/// One journal line: a leg with its account's currency and kind.
#[derive(Debug, Serialize, ToSchema)]
pub struct JournalLine {
    /// Global position.
    pub position: i64,
    /// The account.
    pub account_id: Uuid,
    /// user, system_float, system_fees.
    pub account_kind: String,
    /// Currency.
    pub currency: String,
    /// The transfer (or leg).
    pub transfer_id: Uuid,
    /// deposit, transfer, withdrawal, fee.
    pub kind: String,
    /// Debit (negative) or credit (positive), minor units.
    pub amount: i64,
    /// The other account.
    pub counterparty: Uuid,
    /// Reference.
    pub reference: Option<String>,
    /// The account's balance after it.
    pub balance_after: i64,
    /// When.
    pub occurred_at: DateTime<Utc>,
}

/// A page of the journal, in log order.
#[derive(Debug, Serialize, ToSchema)]
pub struct JournalPage {
    /// Lines.
    pub items: Vec<JournalLine>,
    /// Pass as `after` for the next page; null at the end.
    pub next: Option<i64>,
}

/// Every ledger leg of every account in log order, for auditors (admins; audited).
#[utoipa::path(get, path = "/v1/admin/journal", tag = "wallet", security(("bearer" = [])), params(JournalParams),
    responses((status = 200, body = JournalPage), (status = 401, body = Problem),
        (status = 403, description = "not an admin", body = Problem), (status = 422, body = Problem)))]
pub async fn journal(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(q): AppQuery<JournalParams>,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let limit = q.limit.unwrap_or(200);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 1000"));
    }
    sqlx::query("INSERT INTO audit_log (actor, action, subject) VALUES ($1, 'admin.journal', $2)")
        .bind(principal.user_id)
        .bind(q.after.unwrap_or(0).to_string())
        .execute(&state.pool)
        .await?;
    let rows = sqlx::query(
        "SELECT e.position, e.account_id, a.kind AS account_kind, a.currency, e.transfer_id, e.kind, e.amount,
                e.counterparty, e.reference, e.balance_after, e.occurred_at
         FROM proj_wallet_entries e JOIN proj_wallet_accounts a USING (account_id)
         WHERE e.position > $1 ORDER BY e.position, e.account_id LIMIT $2",
    )
    .bind(q.after.unwrap_or(0))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let mut items: Vec<JournalLine> = rows
        .iter()
        .map(|r| JournalLine {
            position: r.get("position"),
            account_id: r.get("account_id"),
            account_kind: r.get("account_kind"),
            currency: r.get("currency"),
            transfer_id: r.get("transfer_id"),
            kind: r.get("kind"),
            amount: r.get("amount"),
            counterparty: r.get("counterparty"),
            reference: r.get("reference"),
            balance_after: r.get("balance_after"),
            occurred_at: r.get("occurred_at"),
        })
        .collect();
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|l| l.position)
    } else {
        None
    };
    Ok(Json(JournalPage { items, next }).into_response())
}

/// Give back part or all of a transfer you received.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount": 1000, "reference": "one item returned"}))]
pub struct RefundRequest {
    /// Minor units; all refunds of one transfer together at most its amount.
    pub amount: i64,
    /// Free text (≤ 140 characters).
    pub reference: Option<String>,
}

/// Refund part or all of a transfer (or a linked leg, or a posted hold) you
/// received; several refunds may follow, never above the original in total.
#[utoipa::path(post, path = "/v1/transfers/{transfer_id}/refunds", tag = "wallet", security(("bearer" = [])), request_body = RefundRequest,
    params(("transfer_id" = Uuid, Path, description = "the transfer, leg or hold id as it appears in your history"),
        ("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 201, body = TransferResult, description = "also `refund_of`, `refunded_total`, `refundable_remaining`"),
        (status = 202, description = "poll Location"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "no such transfer received by you", body = Problem),
        (status = 422, description = "refund_exceeds_original, insufficient_funds, invalid fields", body = Problem),
        (status = 429, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn refund(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(transfer_id): AppPath<Uuid>,
    after: AfterPosition,
    AppJson(req): AppJson<RefundRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let amt = collect(&mut errors, amount(req.amount));
    let reference = collect(&mut errors, text("reference", &req.reference, 140));
    let (Some(amount), Some(reference)) = (amt, reference) else {
        return Err(ApiError::Invalid(errors));
    };
    wait_for(&state, MODEL, after).await?;
    // The credited leg of the original, on one of the caller's wallets: immutable
    // history, so its amount and parties can travel in the command.
    let row = find(&state, MODEL, || {
        sqlx::query(
            "SELECT e.account_id, e.counterparty, e.amount, a.currency FROM proj_wallet_entries e
             JOIN proj_wallet_accounts a USING (account_id)
             WHERE e.transfer_id = $1 AND e.amount > 0 AND e.kind = 'transfer' AND (a.owner_id = $2 OR $3)
             LIMIT 1",
        )
        .bind(transfer_id)
        .bind(principal.user_id)
        .bind(principal.admin)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(|| ApiError::coded(http::StatusCode::NOT_FOUND, "transfer_not_found", "no such transfer received"))?;
    let currency = currency("currency", &row.get::<String, _>("currency"))
        .map_err(|e| ApiError::Invalid(vec![e]))?;
    let (payee, payer, original_amount): (Uuid, Uuid, i64) = (
        row.get("account_id"),
        row.get("counterparty"),
        row.get("amount"),
    );
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |refund_id| {
            Ok(Command::Wallet(WalletCommand::Refund {
                refund_id,
                transfer_id,
                payee,
                payer,
                original_amount,
                currency,
                amount,
                reference,
            }))
        },
    )
    .await
}

/// Open a dispute on a transfer (admins).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"transfer_id": "0190d6a2-7c1e-7a55-9a43-7a3c1b2d4e5f", "amount": 2500, "reason": "goods not delivered"}))]
pub struct OpenDisputeRequest {
    /// The disputed transfer (or linked leg, or posted hold).
    pub transfer_id: Uuid,
    /// Minor units claimed; omitted: all of it that is not refunded.
    pub amount: Option<i64>,
    /// Why (1 to 2000 characters).
    pub reason: String,
}

/// Evidence for a dispute.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"evidence": "courier receipt KQ-123, signed on delivery"}))]
pub struct EvidenceRequest {
    /// 1 to 2000 characters.
    pub evidence: String,
}

/// End a dispute (admins).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"outcome": "lost"}))]
pub struct ResolveDisputeRequest {
    /// `won`: the payee keeps the money (released back to them); `lost`: it goes back to the payer.
    pub outcome: String,
}

/// A dispute's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct DisputeResult {
    /// The dispute id (= the command id that opened it).
    pub dispute_id: Uuid,
    /// open, won, lost.
    pub status: String,
    /// Whether the payee's wallet is still frozen.
    pub frozen: Option<bool>,
    /// The payee's wallet after it.
    pub balance: Option<Balance>,
    /// Global position reached.
    pub position: i64,
    /// The payee's wallet's stream version.
    pub version: i64,
}

/// A dispute, as its payee, its payer or an admin sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DisputeView {
    /// The dispute.
    pub dispute_id: Uuid,
    /// The disputed transfer.
    pub transfer_id: Uuid,
    /// The payee's wallet (frozen while open).
    pub payee_wallet: Uuid,
    /// The payer's wallet.
    pub payer_wallet: Uuid,
    /// Claimed minor units.
    pub amount: i64,
    /// Moved to the disputes account.
    pub held: i64,
    /// open, won, lost.
    pub status: String,
    /// Why.
    pub reason: String,
    /// Evidence in order: `{evidence, at, position}`.
    #[schema(value_type = Vec<Object>)]
    pub evidence: serde_json::Value,
    /// Opened at.
    pub opened_at: DateTime<Utc>,
    /// Resolved at.
    pub resolved_at: Option<DateTime<Utc>>,
}

fn dispute_text(field: &str, v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty()
        || v.chars().count() > commands::wallet::MAX_DISPUTE_TEXT
        || v.chars().any(|c| c.is_control() && c != '\n')
    {
        return Err(ApiError::field(field, "1 to 2000 printable characters"));
    }
    Ok(v.to_owned())
}

fn dispute_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "dispute_not_found",
        "no such dispute",
    )
}

/// Dispute a transfer: the payee's wallet is frozen and the claimed money moved
/// to a disputes account (admins).
#[utoipa::path(post, path = "/v1/admin/disputes", tag = "wallet", security(("bearer" = [])), request_body = OpenDisputeRequest,
    params(("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 201, body = DisputeResult, description = "also `transfer_id`, `amount`, `held`"), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "transfer_not_found", body = Problem),
        (status = 409, description = "dispute_exists", body = Problem),
        (status = 422, description = "dispute_exceeds_original, invalid fields", body = Problem), (status = 429, body = Problem)))]
pub async fn open_dispute(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    after: AfterPosition,
    AppJson(req): AppJson<OpenDisputeRequest>,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let reason = dispute_text("reason", &req.reason)?;
    let claimed = match req.amount {
        Some(a) => Some(amount(a).map_err(|e| ApiError::Invalid(vec![e]))?),
        None => None,
    };
    wait_for(&state, MODEL, after).await?;
    let row = find(&state, MODEL, || {
        sqlx::query(
            "SELECT e.account_id, e.counterparty, e.amount, a.currency FROM proj_wallet_entries e
             JOIN proj_wallet_accounts a USING (account_id)
             WHERE e.transfer_id = $1 AND e.amount > 0 AND e.kind = 'transfer' LIMIT 1",
        )
        .bind(req.transfer_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(|| {
        ApiError::coded(
            http::StatusCode::NOT_FOUND,
            "transfer_not_found",
            "no such transfer",
        )
    })?;
    let currency = currency("currency", &row.get::<String, _>("currency"))
        .map_err(|e| ApiError::Invalid(vec![e]))?;
    let transfer_id = req.transfer_id;
    let (payee, payer, original_amount): (Uuid, Uuid, i64) = (
        row.get("account_id"),
        row.get("counterparty"),
        row.get("amount"),
    );
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |dispute_id| {
            Ok(Command::Wallet(WalletCommand::OpenDispute {
                dispute_id,
                transfer_id,
                payee,
                payer,
                original_amount,
                currency,
                amount: claimed,
                reason,
            }))
        },
    )
    .await
}

async fn dispute_row(
    state: &AppState,
    dispute_id: Uuid,
    after: AfterPosition,
) -> ApiResult<sqlx::postgres::PgRow> {
    wait_for(state, MODEL, after).await?;
    find(state, MODEL, || {
        sqlx::query(
            "SELECT d.*, a.currency, a.owner_id AS payee_owner, p.owner_id AS payer_owner FROM proj_wallet_disputes d
             JOIN proj_wallet_accounts a ON a.account_id = d.payee
             JOIN proj_wallet_accounts p ON p.account_id = d.payer
             WHERE d.dispute_id = $1",
        )
        .bind(dispute_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(dispute_not_found)
}

/// Add evidence to an open dispute (its payee or an admin).
#[utoipa::path(post, path = "/v1/disputes/{dispute_id}/evidence", tag = "wallet", security(("bearer" = [])), request_body = EvidenceRequest,
    params(("dispute_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 200, body = DisputeResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "no such open dispute on your wallet", body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn add_evidence(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(dispute_id): AppPath<Uuid>,
    after: AfterPosition,
    AppJson(req): AppJson<EvidenceRequest>,
) -> ApiResult<Response> {
    let evidence = dispute_text("evidence", &req.evidence)?;
    let row = dispute_row(&state, dispute_id, after).await?;
    let payee: Uuid = row.get("payee");
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |_| {
            Ok(Command::Wallet(WalletCommand::AddDisputeEvidence {
                dispute_id,
                payee,
                evidence,
            }))
        },
    )
    .await
}

/// End a dispute: won releases the money to the payee, lost pays it to the
/// payer; the wallet unfreezes when no dispute on it is open (admins).
#[utoipa::path(post, path = "/v1/admin/disputes/{dispute_id}/resolve", tag = "wallet", security(("bearer" = [])), request_body = ResolveDisputeRequest,
    params(("dispute_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 200, body = DisputeResult, description = "also `moved`"), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "no such open dispute", body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn resolve_dispute(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(dispute_id): AppPath<Uuid>,
    after: AfterPosition,
    AppJson(req): AppJson<ResolveDisputeRequest>,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let outcome = match req.outcome.as_str() {
        "won" => events::wallet::DisputeOutcome::Won,
        "lost" => events::wallet::DisputeOutcome::Lost,
        _ => return Err(ApiError::field("outcome", "won or lost")),
    };
    let row = dispute_row(&state, dispute_id, after).await?;
    let currency = currency("currency", &row.get::<String, _>("currency"))
        .map_err(|e| ApiError::Invalid(vec![e]))?;
    let (payee, payer): (Uuid, Uuid) = (row.get("payee"), row.get("payer"));
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |_| {
            Ok(Command::Wallet(WalletCommand::ResolveDispute {
                dispute_id,
                payee,
                payer,
                currency,
                outcome,
            }))
        },
    )
    .await
}

/// A dispute (its payee, its payer, or an admin).
#[utoipa::path(get, path = "/v1/disputes/{dispute_id}", tag = "wallet", security(("bearer" = [])),
    params(("dispute_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = DisputeView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn get_dispute(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(dispute_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let r = dispute_row(&state, dispute_id, after).await?;
    let me = Some(principal.user_id);
    if !(principal.admin
        || r.get::<Option<Uuid>, _>("payee_owner") == me
        || r.get::<Option<Uuid>, _>("payer_owner") == me)
    {
        return Err(dispute_not_found());
    }
    Ok(Json(DisputeView {
        dispute_id,
        transfer_id: r.get("transfer_id"),
        payee_wallet: r.get("payee"),
        payer_wallet: r.get("payer"),
        amount: r.get("amount"),
        held: r.get("held"),
        status: r.get("status"),
        reason: r.get("reason"),
        evidence: r.get("evidence"),
        opened_at: r.get("opened_at"),
        resolved_at: r.get("resolved_at"),
    })
    .into_response())
}
