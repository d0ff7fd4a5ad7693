//! Invoices: drafts, sending (an `INV-YYYY-NNNNN` number, gap-free per issuer
//! and year), voiding, payments (ledger transfers from the payer's wallet to
//! the issuer's), payment links, recurring schedules.
//!
//! Who sees what: the issuer sees and changes their invoices; the billed
//! user (`client.user_id`) sees and pays them once sent; whoever holds the
//! payment link sees the invoice, and any logged-in user holding it can pay.
//! Anyone else gets 404, and nothing is written for them. The link token is
//! an HMAC of the invoice id under the master key (`Keystore::invoice_link`):
//! nothing secret rests in an event, a read model or a saved answer.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use commands::invoice::{FieldProblem, InvoiceCommand, LineInput, check_client, check_memo, price};
use commands::money::{Amount, Currency};
use events::invoice::{Client, Interval};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{
    AfterPosition, ReadParams, find, look_again_when_missing, position_header, wait_for,
};
use crate::dispatch::send as command;
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{AppJson, AppPath, AppQuery, RequestId, WriteOptions};
use crate::paging::{cursor, limit, parse_cursor};
use crate::routes::wallets::transfer_fee;
use crate::state::AppState;

/// Invoices are applied by the wallet projector (a payment's legs and its invoice row move together).
const MODEL: &str = "wallet";

/// Who is billed: a registered user, an address and name, or both.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientRequest {
    /// A registered user: they see the invoice in their list and can pay it.
    pub user_id: Option<Uuid>,
    /// E-mail address (≤ 200 characters).
    #[schema(example = "accounts@acme.example")]
    pub email: Option<String>,
    /// Name printed on the invoice (≤ 200 characters).
    #[schema(example = "Acme Ltd")]
    pub name: Option<String>,
}

/// One line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    /// What is billed (1 to 200 characters).
    #[schema(example = "Design work")]
    pub description: String,
    /// How many, 1 to 1,000,000.
    #[schema(example = 3)]
    pub quantity: i64,
    /// Price of one, integer minor units, 0 to 10^15.
    #[schema(example = 150000)]
    pub unit_price: i64,
}

/// Draft an invoice.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInvoiceRequest {
    /// Who is billed.
    pub client: ClientRequest,
    /// ISO 4217 code; payments move between the payer's and your wallet in it.
    #[schema(example = "KES")]
    pub currency: String,
    /// 1 to 100 lines; amounts and the total are computed by the server.
    pub lines: Vec<LineRequest>,
    /// When payment is due (RFC 3339, in the future).
    pub due_at: DateTime<Utc>,
    /// Free text (≤ 1000 characters).
    pub memo: Option<String>,
}

/// Void an invoice.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    /// Why (≤ 1000 characters).
    pub reason: Option<String>,
}

/// Pay (part of) an invoice from your wallet in its currency.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayRequest {
    /// Minor units, 1 to what remains due.
    #[schema(example = 50000)]
    pub amount: i64,
}

/// A recurring invoice: a template billed on a schedule.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateScheduleRequest {
    /// Who is billed.
    pub client: ClientRequest,
    /// ISO 4217 code.
    pub currency: String,
    /// The lines of each invoice.
    pub lines: Vec<LineRequest>,
    /// `weekly` or `monthly`.
    #[schema(value_type = String, example = "monthly")]
    pub interval: Interval,
    /// Wall-clock time of the first run in `zone` (later runs keep it); or give `first_run_at`.
    #[schema(value_type = Option<String>, example = "2027-01-01T09:00:00")]
    pub first_run_local: Option<NaiveDateTime>,
    /// The first run as an instant; or give `first_run_local`.
    pub first_run_at: Option<DateTime<Utc>>,
    /// IANA zone (default `UTC`).
    #[schema(example = "Africa/Nairobi")]
    pub zone: Option<String>,
    /// Each invoice is due this many seconds after it is sent (default 30 days).
    pub due_after_secs: Option<i64>,
    /// Free text.
    pub memo: Option<String>,
}

/// One line, priced.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LineView {
    /// What.
    pub description: String,
    /// How many.
    pub quantity: i64,
    /// Price of one.
    pub unit_price: i64,
    /// quantity × unit_price.
    pub amount: i64,
}

/// One payment.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentView {
    /// The ledger transfer id.
    pub payment_id: Uuid,
    /// Who paid.
    pub payer: Uuid,
    /// How much.
    pub amount: i64,
    /// Paid through the link.
    pub via_link: bool,
    /// When.
    pub paid_at: DateTime<Utc>,
}

/// An invoice.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceView {
    /// Id.
    pub invoice_id: Uuid,
    /// `INV-YYYY-NNNNN`; null while a draft.
    pub number: Option<String>,
    /// `draft`, `sent`, `overdue`, `paid` or `void`.
    pub status: String,
    /// Who bills.
    pub issuer_id: Uuid,
    /// Who is billed.
    #[schema(value_type = ClientRequest)]
    pub client: Client,
    /// Currency.
    pub currency: String,
    /// Lines.
    pub lines: Vec<LineView>,
    /// Sum of the lines.
    pub total: i64,
    /// Paid so far.
    pub amount_paid: i64,
    /// What remains.
    pub amount_due: i64,
    /// Due at.
    pub due_at: DateTime<Utc>,
    /// Memo.
    pub memo: Option<String>,
    /// The schedule that made it.
    pub schedule_id: Option<Uuid>,
    /// Created (drafted) at.
    pub created_at: DateTime<Utc>,
    /// Sent at.
    pub sent_at: Option<DateTime<Utc>>,
    /// Paid in full at.
    pub paid_at: Option<DateTime<Utc>>,
    /// Voided at.
    pub voided_at: Option<DateTime<Utc>>,
    /// The payment link (issuer and link holders; once sent): `/v1/invoices/links/{token}`.
    pub payment_link: Option<String>,
    /// Payments, oldest first (issuer and client only).
    pub payments: Vec<PaymentView>,
    /// Version (for `If-Match`).
    pub version: i64,
}

/// A page of invoices, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoicePage {
    /// Invoices (without payments).
    pub items: Vec<InvoiceView>,
    /// Next page; null at the end.
    pub next: Option<String>,
}

/// The answer to a write on an invoice.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceResult {
    /// Id.
    pub invoice_id: Uuid,
    /// Number once sent.
    pub number: Option<String>,
    /// Status after the write.
    pub status: String,
    /// Total.
    pub total: i64,
    /// Paid so far.
    pub amount_paid: i64,
    /// What remains.
    pub amount_due: i64,
    /// The payment (payments only): the transfer's answer with the payer's balance.
    #[schema(value_type = Option<Object>)]
    pub payment: Option<serde_json::Value>,
    /// Global position reached.
    pub position: i64,
    /// Invoice stream version.
    pub version: i64,
}

/// A recurring schedule.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    /// Id.
    pub schedule_id: Uuid,
    /// `active` or `cancelled`.
    pub status: String,
    /// `weekly` or `monthly`.
    pub interval: String,
    /// IANA zone.
    pub zone: String,
    /// The next run; null once cancelled.
    pub next_run_at: Option<DateTime<Utc>>,
    /// Invoices made so far.
    pub runs: i32,
    /// The last invoice made.
    pub last_invoice: Option<Uuid>,
    /// What each run bills.
    #[schema(value_type = Object)]
    pub template: serde_json::Value,
    /// Version.
    pub version: i64,
}

/// Listing.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListParams {
    /// `issued` (default: yours to others) or `received` (billed to you).
    pub role: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has this position.
    pub after_position: Option<i64>,
}

fn invoice_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "invoice_not_found",
        "no such invoice",
    )
}

fn invalid(problems: Vec<FieldProblem>) -> ApiError {
    ApiError::Invalid(
        problems
            .into_iter()
            .map(|p| FieldError {
                field: p.field,
                message: p.message,
            })
            .collect(),
    )
}

/// Everything about a draft or template the aggregate would refuse, refused
/// here first so that bad input writes nothing (not even a ledger row).
async fn validated(
    state: &AppState,
    issuer: Uuid,
    client: &ClientRequest,
    currency: &str,
    lines: &[LineRequest],
    memo: &Option<String>,
) -> ApiResult<(Client, Currency, Vec<LineInput>)> {
    let mut problems = vec![];
    let cur = currency
        .parse::<Currency>()
        .map_err(|e| problems.push(commands_problem("currency", e.to_string())))
        .ok();
    let inputs: Vec<LineInput> = lines
        .iter()
        .map(|l| LineInput {
            description: l.description.clone(),
            quantity: l.quantity,
            unit_price: l.unit_price,
        })
        .collect();
    let client = Client {
        user_id: client.user_id,
        email: client.email.clone(),
        name: client.name.clone(),
    };
    for r in [
        price(&inputs).map(|_| ()),
        check_client(&client, issuer),
        check_memo("memo", memo),
    ] {
        if let Err(p) = r {
            problems.extend(p);
        }
    }
    if problems.is_empty()
        && let Some(user) = client.user_id
    {
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE user_id = $1)")
                .bind(user)
                .fetch_one(&state.pool)
                .await?;
        if !known {
            problems.push(commands_problem("client.user_id", "no such user".into()));
        }
    }
    match cur {
        Some(c) if problems.is_empty() => Ok((client, c, inputs)),
        _ => Err(invalid(problems)),
    }
}

fn commands_problem(field: &str, message: String) -> FieldProblem {
    FieldProblem {
        field: field.to_owned(),
        message,
    }
}

/// Draft an invoice: it gets its number when you send it.
#[utoipa::path(post, path = "/v1/invoices", tag = "wallet", security(("bearer" = [])), request_body = CreateInvoiceRequest,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, body = InvoiceResult), (status = 202, description = "poll Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, description = "invalid lines, client, currency or due time", body = Problem), (status = 429, body = Problem)))]
pub async fn create_invoice(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<CreateInvoiceRequest>,
) -> ApiResult<Response> {
    let (client, currency, lines) = validated(
        &state,
        principal.user_id,
        &req.client,
        &req.currency,
        &req.lines,
        &req.memo,
    )
    .await?;
    let now = Utc::now();
    if req.due_at <= now {
        return Err(ApiError::field("due_at", "must be in the future"));
    }
    let (due_at, memo) = (req.due_at, req.memo.clone());
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |invoice_id| {
            Ok(InvoiceCommand::CreateInvoice {
                invoice_id,
                client,
                currency,
                lines,
                due_at,
                memo,
                at: now,
            }
            .into())
        },
    )
    .await
}

const COLUMNS: &str = "invoice_id, number, status, issuer, client_user, client_email, client_name, currency, lines,
    total, amount_paid, due_at, memo, schedule_id, created_at, sent_at, paid_at, voided_at, version";

fn view(state: &AppState, r: &sqlx::postgres::PgRow, link: bool) -> InvoiceView {
    let invoice_id: Uuid = r.get("invoice_id");
    let status: String = r.get("status");
    let total: i64 = r.get("total");
    let paid: i64 = r.get("amount_paid");
    InvoiceView {
        invoice_id,
        number: r.get("number"),
        payment_link: (link && status != "draft").then(|| {
            format!(
                "/v1/invoices/links/{}",
                state.keystore.invoice_link(invoice_id)
            )
        }),
        status,
        issuer_id: r.get("issuer"),
        client: Client {
            user_id: r.get("client_user"),
            email: r.get("client_email"),
            name: r.get("client_name"),
        },
        currency: r.get("currency"),
        lines: serde_json::from_value(r.get("lines")).unwrap_or_default(),
        total,
        amount_paid: paid,
        amount_due: total - paid,
        due_at: r.get("due_at"),
        memo: r.get("memo"),
        schedule_id: r.get("schedule_id"),
        created_at: r.get("created_at"),
        sent_at: r.get("sent_at"),
        paid_at: r.get("paid_at"),
        voided_at: r.get("voided_at"),
        payments: vec![],
        version: r.get("version"),
    }
}

async fn payments(state: &AppState, invoice_id: Uuid) -> ApiResult<Vec<PaymentView>> {
    let rows = sqlx::query(
        "SELECT payment_id, payer, amount, via_link, paid_at FROM proj_invoice_payments
         WHERE invoice_id = $1 ORDER BY position",
    )
    .bind(invoice_id)
    .fetch_all(&state.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| PaymentView {
            payment_id: r.get("payment_id"),
            payer: r.get("payer"),
            amount: r.get("amount"),
            via_link: r.get("via_link"),
            paid_at: r.get("paid_at"),
        })
        .collect())
}

/// The invoice row if `user` may see it: its issuer, or its client once sent.
async fn visible(state: &AppState, id: Uuid, user: Uuid) -> ApiResult<sqlx::postgres::PgRow> {
    let query = format!(
        "SELECT {COLUMNS} FROM proj_invoices
         WHERE invoice_id = $1 AND (issuer = $2 OR (client_user = $2 AND status <> 'draft'))"
    );
    let query: std::sync::Arc<str> = query.into();
    find(state, MODEL, || {
        sqlx::query(sqlx::AssertSqlSafe(query.clone()))
            .bind(id)
            .bind(user)
            .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(invoice_not_found)
}

fn with_etag(position: i64, version: i64) -> http::HeaderMap {
    let mut headers = position_header(position);
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{version}\"")) {
        headers.insert(http::header::ETAG, v);
    }
    headers
}

/// Invoices you issued (`role=issued`, the default) or that bill you (`role=received`; drafts are not shown).
#[utoipa::path(get, path = "/v1/invoices", tag = "wallet", security(("bearer" = [])), params(ListParams),
    responses((status = 200, body = InvoicePage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)))]
pub async fn list_invoices(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<ListParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    let limit = limit(params.limit)?;
    let received = match params.role.as_deref() {
        None | Some("issued") => false,
        Some("received") => true,
        Some(_) => return Err(ApiError::field("role", "issued or received")),
    };
    if let Some(s) = &params.status
        && !["draft", "sent", "overdue", "paid", "void"].contains(&s.as_str())
    {
        return Err(ApiError::field(
            "status",
            "draft, sent, overdue, paid or void",
        ));
    }
    let (after_us, after_id) = match &params.cursor {
        Some(c) => parse_cursor("i1", c)?,
        None => (i64::MIN, Uuid::nil()),
    };
    let whose = if received {
        "client_user = $1 AND status <> 'draft'"
    } else {
        "issuer = $1"
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS}, (extract(epoch FROM created_at) * 1000000)::bigint AS us FROM proj_invoices
         WHERE {whose} AND ($2::text IS NULL OR status = $2)
           AND ((extract(epoch FROM created_at) * 1000000)::bigint, invoice_id) > ($3, $4)
         ORDER BY created_at, invoice_id LIMIT $5"
    )))
    .bind(principal.user_id)
    .bind(&params.status)
    .bind(after_us)
    .bind(after_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let items = rows
        .iter()
        .take(limit as usize)
        .map(|r| view(&state, r, !received))
        .collect();
    let next = rows
        .get(limit as usize - 1)
        .filter(|_| more)
        .map(|r| cursor("i1", r.get("us"), r.get("invoice_id")));
    Ok((position_header(position), Json(InvoicePage { items, next })).into_response())
}

/// One invoice: its issuer sees it (with the payment link), its client once it is sent.
#[utoipa::path(get, path = "/v1/invoices/{invoice_id}", tag = "wallet", security(("bearer" = [])),
    params(("invoice_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = InvoiceView), (status = 401, body = Problem),
        (status = 404, description = "no such invoice, or not yours", body = Problem), (status = 503, body = Problem)))]
pub async fn get_invoice(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let row = visible(&state, id, principal.user_id).await?;
    let issuer: Uuid = row.get("issuer");
    let mut v = view(&state, &row, issuer == principal.user_id);
    v.payments = payments(&state, id).await?;
    Ok((with_etag(position, v.version), Json(v)).into_response())
}

/// The issuer's own invoice, or 404 before anything is sent.
async fn issued(state: &AppState, id: Uuid, user: Uuid, after: AfterPosition) -> ApiResult<()> {
    wait_for(state, MODEL, after).await?;
    let mine: bool = look_again_when_missing(
        state,
        MODEL,
        || async {
            Ok(sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM proj_invoices WHERE invoice_id = $1 AND issuer = $2)",
            )
            .bind(id)
            .bind(user)
            .fetch_one(&state.pool)
            .await?)
        },
        |mine| *mine,
    )
    .await?;
    if mine {
        Ok(())
    } else {
        Err(invoice_not_found())
    }
}

/// Send (issue) a draft: it takes the next `INV-YYYY-NNNNN` number of your
/// year, gap-free, and becomes payable.
#[utoipa::path(post, path = "/v1/invoices/{invoice_id}/send", tag = "wallet", security(("bearer" = [])),
    params(("invoice_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header), ReadParams),
    responses((status = 200, body = InvoiceResult), (status = 202, description = "poll Location"), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, description = "invoice_already_sent, invoice_void", body = Problem),
        (status = 412, body = Problem), (status = 422, description = "due_at_passed", body = Problem)))]
pub async fn send_invoice(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(invoice_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    issued(&state, invoice_id, principal.user_id, after).await?;
    let cmd = InvoiceCommand::SendInvoice {
        invoice_id,
        issuer: principal.user_id,
        at: Utc::now(),
    };
    command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Void an invoice nothing was paid on; it can never be paid afterwards.
#[utoipa::path(post, path = "/v1/invoices/{invoice_id}/void", tag = "wallet", security(("bearer" = [])),
    request_body = VoidRequest,
    params(("invoice_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header), ReadParams),
    responses((status = 200, body = InvoiceResult), (status = 202, description = "poll Location"), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "invoice_void, invoice_paid, invoice_has_payments", body = Problem),
        (status = 412, body = Problem), (status = 422, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn void_invoice(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(invoice_id): AppPath<Uuid>,
    after: AfterPosition,
    AppJson(req): AppJson<VoidRequest>,
) -> ApiResult<Response> {
    check_memo("reason", &req.reason).map_err(invalid)?;
    issued(&state, invoice_id, principal.user_id, after).await?;
    let cmd = InvoiceCommand::VoidInvoice {
        invoice_id,
        reason: req.reason.clone(),
        at: Utc::now(),
    };
    command(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// Send a payment: a ledger transfer from the caller's wallet in the
/// invoice's currency to the issuer's (fees, limits and no-overdraft as for
/// any transfer), with the invoice's payment in the same commit.
#[allow(clippy::too_many_arguments)]
async fn pay(
    state: &AppState,
    principal: &Principal,
    options: &WriteOptions,
    rid: Uuid,
    uri: &http::Uri,
    row: &sqlx::postgres::PgRow,
    via_link: bool,
    req: &PayRequest,
) -> ApiResult<Response> {
    let amount = Amount::new(req.amount).map_err(|e| ApiError::field("amount", e.to_string()))?;
    let currency: Currency = row
        .get::<String, _>("currency")
        .parse()
        .map_err(|e: commands::money::UnknownCurrency| anyhow::anyhow!(e))?;
    // No overpayment check here from the read model: the aggregate decides it on
    // the invoice's current version, and a retried key must get its first answer
    // (a payment that fitted then may not fit what remains now).
    let cmd = InvoiceCommand::PayInvoice {
        payment_id: Uuid::nil(),
        invoice_id: row.get("invoice_id"),
        issuer: row.get("issuer"),
        currency,
        payer: principal.user_id,
        amount,
        fee: transfer_fee(state, amount),
        via_link,
        at: Utc::now(),
    };
    dispatch(
        state,
        principal,
        Route::post(uri),
        options,
        rid,
        req,
        |payment_id| {
            let mut cmd = cmd;
            if let InvoiceCommand::PayInvoice { payment_id: p, .. } = &mut cmd {
                *p = payment_id;
            }
            Ok(cmd.into())
        },
    )
    .await
}

/// Pay (part of) an invoice billed to you, from your wallet in its currency.
#[utoipa::path(post, path = "/v1/invoices/{invoice_id}/payments", tag = "wallet", security(("bearer" = [])),
    request_body = PayRequest,
    params(("invoice_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "the payment's transfer id is derived from it"), ReadParams),
    responses((status = 201, body = InvoiceResult), (status = 202, description = "poll Location"), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 404, description = "no such invoice, not billed to you, or you have no wallet in its currency", body = Problem),
        (status = 409, description = "invoice_void, invoice_paid", body = Problem),
        (status = 422, description = "overpayment, insufficient_funds, a limit", body = Problem), (status = 429, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn pay_invoice(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(invoice_id): AppPath<Uuid>,
    after: AfterPosition,
    AppJson(req): AppJson<PayRequest>,
) -> ApiResult<Response> {
    wait_for(&state, MODEL, after).await?;
    let row = visible(&state, invoice_id, principal.user_id).await?;
    if row.get::<Option<Uuid>, _>("client_user") != Some(principal.user_id) {
        // The issuer cannot pay their own invoice; to them it is "not billed to you".
        return Err(invoice_not_found());
    }
    pay(&state, &principal, &options, rid, &uri, &row, false, &req).await
}

async fn by_link(state: &AppState, token: &str) -> ApiResult<sqlx::postgres::PgRow> {
    let id = state
        .keystore
        .open_invoice_link(token)
        .ok_or_else(invoice_not_found)?;
    find(state, MODEL, || {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM proj_invoices WHERE invoice_id = $1 AND status <> 'draft'"
        )))
        .bind(id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(invoice_not_found)
}

/// An invoice through its payment link: whoever holds the link sees it (no login needed).
#[utoipa::path(get, path = "/v1/invoices/links/{token}", tag = "wallet",
    params(("token" = String, Path), ReadParams),
    responses((status = 200, body = InvoiceView), (status = 404, description = "not a payment link", body = Problem),
        (status = 429, body = Problem)))]
pub async fn get_by_link(
    State(state): State<AppState>,
    AppPath(token): AppPath<String>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let row = by_link(&state, &token).await?;
    let v = view(&state, &row, true);
    Ok((with_etag(position, v.version), Json(v)).into_response())
}

/// Pay an invoice through its payment link, as any logged-in user, from your wallet in its currency.
#[utoipa::path(post, path = "/v1/invoices/links/{token}/payments", tag = "wallet", security(("bearer" = [])),
    request_body = PayRequest,
    params(("token" = String, Path), ("Idempotency-Key" = Option<String>, Header), ReadParams),
    responses((status = 201, body = InvoiceResult), (status = 202, description = "poll Location"), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 404, description = "not a payment link, or you have no wallet in its currency", body = Problem),
        (status = 409, description = "invoice_void, invoice_paid", body = Problem),
        (status = 422, description = "overpayment, insufficient_funds, same_wallet, a limit", body = Problem), (status = 429, body = Problem)))]
#[allow(clippy::too_many_arguments)] // axum extractors
pub async fn pay_by_link(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(token): AppPath<String>,
    after: AfterPosition,
    AppJson(req): AppJson<PayRequest>,
) -> ApiResult<Response> {
    wait_for(&state, MODEL, after).await?;
    let row = by_link(&state, &token).await?;
    pay(&state, &principal, &options, rid, &uri, &row, true, &req).await
}

/// Bill a client on a schedule: the scheduler makes and sends each invoice
/// (numbered like any other) exactly once per run.
#[utoipa::path(post, path = "/v1/invoices/schedules", tag = "wallet", security(("bearer" = [])), request_body = CreateScheduleRequest,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "created", example = json!({"schedule_id": "0193…", "status": "active", "interval": "monthly",
        "zone": "Africa/Nairobi", "next_run_at": "2027-01-01T06:00:00Z", "total": 450000, "currency": "KES", "position": 9, "version": 1})),
        (status = 202, description = "poll Location"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn create_schedule(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<CreateScheduleRequest>,
) -> ApiResult<Response> {
    let (client, currency, lines) = validated(
        &state,
        principal.user_id,
        &req.client,
        &req.currency,
        &req.lines,
        &req.memo,
    )
    .await?;
    let zone = req.zone.clone().unwrap_or_else(|| "UTC".into());
    let tz: chrono_tz::Tz = zone
        .parse()
        .map_err(|_| ApiError::field("zone", "an IANA time zone such as Africa/Nairobi"))?;
    let local = match (req.first_run_local, req.first_run_at) {
        (Some(l), None) => l,
        (None, Some(at)) => at.with_timezone(&tz).naive_local(),
        _ => {
            return Err(ApiError::field(
                "first_run_local",
                "give exactly one of first_run_local and first_run_at",
            ));
        }
    };
    let now = Utc::now();
    match commands::reminder::instant(&zone, local) {
        Some(at) if at > now => {}
        _ => {
            return Err(ApiError::field(
                "first_run_local",
                "the first run must be in the future",
            ));
        }
    }
    let due_after_secs = req.due_after_secs.unwrap_or(30 * 86_400);
    if !(1..=commands::invoice::MAX_DUE_AFTER_SECS).contains(&due_after_secs) {
        return Err(ApiError::field("due_after_secs", "1 to 31,622,400 seconds"));
    }
    let (interval, memo) = (req.interval, req.memo.clone());
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |schedule_id| {
            Ok(InvoiceCommand::CreateSchedule {
                schedule_id,
                client,
                currency,
                lines,
                due_after_secs,
                memo,
                interval,
                zone,
                local,
                at: now,
            }
            .into())
        },
    )
    .await
}

fn schedule_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "invoice_schedule_not_found",
        "no such invoice schedule",
    )
}

/// One of your schedules.
#[utoipa::path(get, path = "/v1/invoices/schedules/{schedule_id}", tag = "wallet", security(("bearer" = [])),
    params(("schedule_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = ScheduleView), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn get_schedule(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let r = find(&state, MODEL, || {
        sqlx::query(
            "SELECT schedule_id, status, every, zone, next_run_at, runs, last_invoice, template, version
             FROM proj_invoice_schedules WHERE schedule_id = $1 AND issuer = $2",
        )
        .bind(id)
        .bind(principal.user_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(schedule_not_found)?;
    let v = ScheduleView {
        schedule_id: r.get("schedule_id"),
        status: r.get("status"),
        interval: r.get("every"),
        zone: r.get("zone"),
        next_run_at: r.get("next_run_at"),
        runs: r.get("runs"),
        last_invoice: r.get("last_invoice"),
        template: r.get("template"),
        version: r.get("version"),
    };
    Ok((with_etag(position, v.version), Json(v)).into_response())
}

/// Stop a schedule: no more runs.
#[utoipa::path(post, path = "/v1/invoices/schedules/{schedule_id}/cancel", tag = "wallet", security(("bearer" = [])),
    params(("schedule_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "cancelled"), (status = 202, description = "poll Location"), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, description = "invoice_schedule_cancelled", body = Problem)))]
pub async fn cancel_schedule(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(schedule_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let mine: bool = look_again_when_missing(
        &state,
        MODEL,
        || async {
            Ok(sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM proj_invoice_schedules WHERE schedule_id = $1 AND issuer = $2)",
            )
            .bind(schedule_id)
            .bind(principal.user_id)
            .fetch_one(&state.pool)
            .await?)
        },
        |mine| *mine,
    )
    .await?;
    if !mine {
        return Err(schedule_not_found());
    }
    let cmd = InvoiceCommand::CancelSchedule {
        schedule_id,
        at: Utc::now(),
    };
    command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}
