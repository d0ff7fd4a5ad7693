//! Payment provider webhooks: deposits confirmed by an M-Pesa-style or a
//! Stripe-style provider credit the wallet, exactly once.
//!
//! 1. The raw body is verified before it is parsed: `Mathia-Signature: t=<unix
//!    seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>` (Stripe's scheme),
//!    compared in constant time; a timestamp more than 300 s away → 401.
//! 2. The inbox (`payment_webhook_inbox`) keeps each provider event id once: a
//!    duplicate answers 200 at once and changes nothing.
//! 3. The payment's state (`payment_intents`) only moves forward (pending →
//!    completed | failed): a late `pending` never undoes `completed`.
//! 4. `completed` publishes a `wallet.Deposit` whose command id is derived from
//!    (provider, payment id): however often or in whatever order the provider
//!    delivers, the ledger credits once. The publish happens before the inbox
//!    row commits, so a failed publish leaves nothing behind and the provider's
//!    retry does it again.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::Utc;
use commands::money::{Amount, Currency};
use commands::wallet::WalletCommand;
use commands::{Actor, Command, Role};
use handlers::bus::{self, CommandEnvelope};
use hmac::{Hmac, KeyInit as _, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::AppPath;
use crate::state::AppState;

/// The webhook signing secret; its `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSecret(pub String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// Largest clock difference accepted between the signature's timestamp and ours.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;

const DEPOSIT_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f70_6179_6d65_6e74_0001);

/// The deposit command id of `payment_id` at `provider`.
pub fn deposit_command_id(provider: &str, payment_id: &str) -> Uuid {
    Uuid::new_v5(&DEPOSIT_NS, format!("{provider}:{payment_id}").as_bytes())
}

/// A provider's event, as both supported providers deliver it here.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id": "evt_1Q2w3E", "type": "payment.completed", "payment_id": "ws_CO_0112202612345",
    "wallet_id": "0190d6a2-7c1e-7a55-9a43-7a3c1b2d4e5f", "amount": 150000, "currency": "KES"}))]
pub struct ProviderEvent {
    /// The provider's event id (the inbox key).
    pub id: String,
    /// `payment.pending`, `payment.completed` or `payment.failed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The provider's payment reference (STK push checkout id, payment intent id).
    pub payment_id: String,
    /// The wallet credited (the metadata our payment request carried).
    pub wallet_id: Uuid,
    /// Minor units.
    pub amount: i64,
    /// ISO code.
    pub currency: String,
}

/// The answer to a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct Received {
    /// Always true: the delivery is stored (or was already).
    pub received: bool,
    /// A delivery of an event id seen before.
    pub duplicate: bool,
    /// The payment's state after it: pending, completed, failed.
    pub status: String,
}

fn unauthorized(code: &str, message: &str) -> ApiError {
    ApiError::Coded {
        status: http::StatusCode::UNAUTHORIZED,
        code: code.into(),
        message: message.into(),
        extra: Default::default(),
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Check `header` against `body`: the timestamp within the tolerance of `now`,
/// then the HMAC in constant time.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
) -> Result<(), ApiError> {
    let mut t = None;
    let mut sigs = vec![];
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.extend(hex_decode(v)),
            _ => {}
        }
    }
    let (Some(t), false) = (t, sigs.is_empty()) else {
        return Err(unauthorized(
            "bad_signature",
            "Mathia-Signature must be t=<unix seconds>,v1=<hex hmac>",
        ));
    };
    if (now - t).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err(unauthorized(
            "stale_signature",
            "the signature's timestamp is more than 300 s away",
        ));
    }
    for sig in sigs {
        let mut mac = <Hmac<Sha256>>::new_from_slice(secret)
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("the webhook secret is unusable")))?;
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        // `verify_slice` compares in constant time.
        if mac.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(unauthorized(
        "bad_signature",
        "the signature does not match the body",
    ))
}

/// A Stripe event (`{"id", "type": "payment_intent.succeeded", "data": {"object":
/// <payment intent>}}`), as the card provider delivers it.
#[derive(Debug, Deserialize)]
struct StripeEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: StripeData,
}

#[derive(Debug, Deserialize)]
struct StripeData {
    object: StripeIntent,
}

#[derive(Debug, Deserialize)]
struct StripeIntent {
    id: String,
    amount: i64,
    #[serde(default)]
    amount_received: Option<i64>,
    currency: String,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

/// Either wire shape: ours (flat) or Stripe's (the intent under `data.object`,
/// the wallet in its metadata, the currency in lower case).
fn parse_event(body: &[u8]) -> Result<ProviderEvent, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("not a provider event: {e}")))?;
    if value.get("data").is_some() {
        let e: StripeEvent = serde_json::from_value(value)
            .map_err(|e| ApiError::Malformed(format!("not a payment intent event: {e}")))?;
        let intent = e.data.object;
        let wallet_id = intent
            .metadata
            .get("wallet_id")
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| {
                ApiError::field(
                    "data.object.metadata.wallet_id",
                    "the payment intent names no wallet",
                )
            })?;
        let amount = match e.kind.as_str() {
            "payment_intent.succeeded" => intent.amount_received.unwrap_or(intent.amount),
            _ => intent.amount,
        };
        return Ok(ProviderEvent {
            id: e.id,
            kind: e.kind,
            payment_id: intent.id,
            wallet_id,
            amount,
            currency: intent.currency.to_uppercase(),
        });
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::Malformed(format!("not a provider event: {e}")))
}

fn rank(status: &str) -> i16 {
    match status {
        "pending" => 1,
        _ => 2,
    }
}

/// Receive a payment provider's webhook (no bearer token: the signature authenticates it).
#[utoipa::path(post, path = "/v1/webhooks/payments/{provider}", tag = "wallet", request_body = ProviderEvent,
    params(("provider" = String, Path, description = "`mpesa` (STK push deposits) or `card`"),
        ("Mathia-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<raw body>\")>")),
    responses((status = 200, body = Received, description = "stored, or a duplicate of a stored delivery"),
        (status = 400, body = Problem), (status = 401, description = "bad_signature, stale_signature", body = Problem),
        (status = 404, description = "unknown provider", body = Problem), (status = 422, body = Problem),
        (status = 503, description = "no webhook secret configured, or the command bus is down (the provider retries)", body = Problem)))]
pub async fn provider_webhook(
    State(state): State<AppState>,
    AppPath(provider): AppPath<String>,
    headers: http::HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    if provider != "mpesa" && provider != "card" {
        return Err(ApiError::NotFound("no such payment provider".into()));
    }
    let Some(WebhookSecret(secret)) = state.settings.payments_webhook_secret.as_ref() else {
        return Err(ApiError::Unavailable(
            "payment webhooks are not configured".into(),
        ));
    };
    // The card provider signs with Stripe's header name; the scheme is the same.
    let header = headers
        .get("mathia-signature")
        .or_else(|| headers.get("stripe-signature"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Err(e) = verify_signature(secret.as_bytes(), header, &body, Utc::now().timestamp()) {
        // A forged or replayed delivery is worth an operator's eye (the header itself is not kept).
        crate::audit::record(
            &state.pool,
            None,
            "payment_webhook.rejected",
            Some(&provider),
            None,
            serde_json::json!({"reason": "signature"}),
        )
        .await;
        return Err(e);
    }
    let event = parse_event(&body)?;
    let status = match event.kind.as_str() {
        "payment.pending" | "payment_intent.processing" | "payment_intent.requires_action" => {
            "pending"
        }
        "payment.completed" | "payment_intent.succeeded" => "completed",
        "payment.failed" | "payment_intent.payment_failed" | "payment_intent.canceled" => "failed",
        _ => {
            return Err(ApiError::field(
                "type",
                "payment.pending, payment.completed, payment.failed, or a payment_intent.* event",
            ));
        }
    };
    let amount = Amount::new(event.amount).map_err(|e| ApiError::field("amount", e.to_string()))?;
    let currency: Currency =
        event
            .currency
            .parse()
            .map_err(|e: commands::money::UnknownCurrency| {
                ApiError::field("currency", e.to_string())
            })?;
    for (field, v) in [("id", &event.id), ("payment_id", &event.payment_id)] {
        if v.is_empty() || v.len() > 255 || v.chars().any(char::is_control) {
            return Err(ApiError::field(field, "1 to 255 printable characters"));
        }
    }
    let payload: serde_json::Value = serde_json::from_slice(&body).map_err(anyhow::Error::from)?;
    let mut tx = state.pool.begin().await?;
    let fresh = sqlx::query(
        "INSERT INTO payment_webhook_inbox (provider, event_id, event_type, payment_id, payload)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&provider)
    .bind(&event.id)
    .bind(&event.kind)
    .bind(&event.payment_id)
    .bind(&payload)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        let current: Option<String> = sqlx::query_scalar(
            "SELECT status FROM payment_intents WHERE provider = $1 AND payment_id = $2",
        )
        .bind(&provider)
        .bind(&event.payment_id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.rollback().await?;
        let body = Received {
            received: true,
            duplicate: true,
            status: current.unwrap_or_else(|| status.to_owned()),
        };
        return Ok(Json(body).into_response());
    }
    // Forward only: the row changes when the new state ranks higher.
    let moved = sqlx::query(
        "INSERT INTO payment_intents (provider, payment_id, wallet_id, amount, currency, status, rank)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (provider, payment_id) DO UPDATE
           SET status = EXCLUDED.status, rank = EXCLUDED.rank, amount = EXCLUDED.amount, updated_at = now()
           WHERE payment_intents.rank < EXCLUDED.rank
         RETURNING status",
    )
    .bind(&provider)
    .bind(&event.payment_id)
    .bind(event.wallet_id)
    .bind(event.amount)
    .bind(currency.code())
    .bind(status)
    .bind(rank(status))
    .fetch_optional(&mut *tx)
    .await?;
    let current: String = match moved {
        Some(r) => r.get("status"),
        None => {
            sqlx::query_scalar(
                "SELECT status FROM payment_intents WHERE provider = $1 AND payment_id = $2",
            )
            .bind(&provider)
            .bind(&event.payment_id)
            .fetch_one(&mut *tx)
            .await?
        }
    };
    if current == "completed" && status == "completed" {
        let command_id = deposit_command_id(&provider, &event.payment_id);
        let envelope = CommandEnvelope {
            command_id,
            correlation_id: command_id,
            actor: Actor {
                user_id: None,
                role: Role::System,
            },
            issued_at: Utc::now(),
            request_hash: format!("payment:{provider}:{}", event.payment_id),
            command: Command::Wallet(WalletCommand::Deposit {
                transfer_id: command_id,
                wallet_id: event.wallet_id,
                currency,
                amount,
                reference: Some(format!("{provider}:{}", event.payment_id)),
            }),
            expected_version: None,
        };
        let inbox = format!("{}.{command_id}", state.subjects.outcome_inbox("payments"));
        match bus::publish_command(&state.js, &state.subjects, &envelope, &inbox).await {
            Ok(bus::Published::Stored { .. }) => {}
            _ => {
                // Nothing commits: the provider's retry publishes again (same command id).
                return Err(ApiError::Unavailable(
                    "the command bus did not take the deposit".into(),
                ));
            }
        }
        sqlx::query(
            "UPDATE payment_intents SET deposit_id = $3 WHERE provider = $1 AND payment_id = $2",
        )
        .bind(&provider)
        .bind(&event.payment_id)
        .bind(command_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    metrics::counter!("mathia_payment_webhooks_total", "provider" => provider.clone(), "status" => current.clone())
        .increment(1);
    Ok(Json(Received {
        received: true,
        duplicate: false,
        status: current,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256>>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("t={t},v1={hex}")
    }

    #[test]
    fn amounts_go_out_as_decimal_strings_at_the_currency_scale() {
        let kes: Currency = "KES".parse().unwrap();
        let jpy: Currency = "JPY".parse().unwrap();
        assert_eq!(decimal(Amount::new(1_550).unwrap(), kes), "15.50");
        assert_eq!(decimal(Amount::new(5).unwrap(), kes), "0.05");
        assert_eq!(decimal(Amount::new(1_550).unwrap(), jpy), "1550");
    }

    #[test]
    fn a_signature_is_checked_on_the_raw_body_within_300_seconds() {
        let (secret, body, now) = (
            b"whsec".as_slice(),
            br#"{"id":"e1"}"#.as_slice(),
            1_800_000_000,
        );
        assert!(verify_signature(secret, &sign(secret, now - 300, body), body, now).is_ok());
        let stale =
            verify_signature(secret, &sign(secret, now - 301, body), body, now).unwrap_err();
        assert!(matches!(stale, ApiError::Coded { ref code, .. } if code == "stale_signature"));
        // One byte of the body changed, another secret, garbage: refused.
        assert!(
            verify_signature(secret, &sign(secret, now, body), br#"{"id":"e2"}"#, now).is_err()
        );
        assert!(verify_signature(b"other", &sign(secret, now, body), body, now).is_err());
        assert!(verify_signature(secret, "t=abc,v1=zz", body, now).is_err());
        assert!(verify_signature(secret, "", body, now).is_err());
    }
}

/// A request to collect money into a wallet (an STK push to a phone).
#[derive(Debug, Clone)]
pub struct PaymentRequest {
    /// The wallet to credit once the provider confirms.
    pub wallet_id: Uuid,
    /// How much.
    pub amount: Amount,
    /// Currency.
    pub currency: Currency,
    /// The payer's phone (digits, country code first), for an STK push; none for a card.
    pub phone_number: Option<String>,
    /// Our idempotency reference: the provider answers the same payment for it.
    pub reference: String,
}

/// The provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentCreated {
    /// The provider's payment id (what its webhooks name).
    pub payment_id: String,
    /// Its state as the provider reports it (`PENDING`, `requires_payment_method`, …).
    pub state: String,
    /// For a card payment: the secret the client's card SDK confirms the
    /// payment with (handed to the payer only, never logged or stored).
    pub client_secret: Option<String>,
}

/// Why a payment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// No provider configured.
    #[error("no payment provider is configured")]
    Unconfigured,
    /// The provider refused the request (4xx).
    #[error("the payment provider refused the request: {0}")]
    Refused(String),
    /// The provider is unreachable or failed (5xx, timeout, bad answer).
    #[error("the payment provider is unavailable: {0}")]
    Unavailable(String),
}

/// The outbound side of a payment provider: create a payment (STK push / payment intent).
pub trait PaymentGateway: Send + Sync {
    /// Ask the provider to collect `request`.
    fn create_payment<'a>(
        &'a self,
        request: &'a PaymentRequest,
    ) -> futures::future::BoxFuture<'a, Result<PaymentCreated, PaymentError>>;
}

/// What both providers share: a client with a 10 s timeout, a base URL and a
/// bearer key, and how an answer is read (4xx: refused with the provider's
/// message; 5xx or a transport error: unavailable; the URL never in an error).
struct ProviderHttp {
    client: reqwest::Client,
    base: String,
    key: WebhookSecret,
}

impl ProviderHttp {
    fn new(base: &str, key: WebhookSecret) -> Result<Self, PaymentError> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| PaymentError::Unavailable(e.to_string()))?;
        Ok(ProviderHttp {
            client,
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// A POST to `path` with the bearer key and our reference as the idempotency key.
    fn post(&self, path: &str, reference: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key.0)
            .header("idempotency-key", reference)
    }

    /// The answer's JSON body; `refusal` points at the message in a 4xx body.
    async fn read(
        sent: Result<reqwest::Response, reqwest::Error>,
        refusal: &str,
    ) -> Result<serde_json::Value, PaymentError> {
        let res = sent.map_err(|e| PaymentError::Unavailable(e.without_url().to_string()))?;
        let status = res.status();
        let body: serde_json::Value = res.json().await.unwrap_or_default();
        if status.is_client_error() {
            return Err(PaymentError::Refused(
                body.pointer(refusal)
                    .and_then(|d| d.as_str())
                    .unwrap_or("refused")
                    .chars()
                    .take(200)
                    .collect(),
            ));
        }
        if !status.is_success() {
            return Err(PaymentError::Unavailable(format!("status {status}")));
        }
        Ok(body)
    }
}

/// A provider's payment id, if it is one we can keep (1 to 255 characters).
fn payment_id(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .filter(|id| !id.is_empty() && id.len() <= 255)
        .map(str::to_owned)
}

/// An M-Pesa STK-push provider over HTTP (IntaSend-style wire format):
/// `POST {base}/api/v1/payment/mpesa-stk-push/` with a bearer key and
/// `{"amount": "15.00", "currency", "phone_number", "api_ref"}` (a decimal string
/// from minor units, never a float), answered `{"invoice": {"invoice_id", "state"}}`.
pub struct HttpPaymentGateway(ProviderHttp);

impl HttpPaymentGateway {
    /// A gateway to `base` with API key `key`.
    pub fn new(base: &str, key: WebhookSecret) -> Result<Self, PaymentError> {
        ProviderHttp::new(base, key).map(HttpPaymentGateway)
    }
}

/// `amount` minor units as the decimal string the provider expects (1500 KES → "15.00").
pub fn decimal(amount: Amount, currency: Currency) -> String {
    let scale = u32::from(currency.scale());
    let unit = 10i64.pow(scale);
    let (major, minor) = (amount.get() / unit, amount.get() % unit);
    if scale == 0 {
        major.to_string()
    } else {
        format!("{major}.{minor:0width$}", width = scale as usize)
    }
}

impl PaymentGateway for HttpPaymentGateway {
    fn create_payment<'a>(
        &'a self,
        request: &'a PaymentRequest,
    ) -> futures::future::BoxFuture<'a, Result<PaymentCreated, PaymentError>> {
        Box::pin(async move {
            let sent = self
                .0
                .post("/api/v1/payment/mpesa-stk-push/", &request.reference)
                .json(&serde_json::json!({
                    "amount": decimal(request.amount, request.currency),
                    "currency": request.currency.code(),
                    "phone_number": request.phone_number,
                    "api_ref": request.reference,
                    "wallet_id": request.wallet_id,
                }))
                .send()
                .await;
            let body = ProviderHttp::read(sent, "/detail").await?;
            let invoice = &body["invoice"];
            match (
                payment_id(&invoice["invoice_id"]),
                invoice["state"].as_str(),
            ) {
                (Some(id), Some(state)) => Ok(PaymentCreated {
                    payment_id: id,
                    state: state.to_owned(),
                    client_secret: None,
                }),
                _ => Err(PaymentError::Unavailable(
                    "an answer without an invoice".into(),
                )),
            }
        })
    }
}

/// A card provider over HTTP (Stripe's wire format): `POST {base}/v1/payment_intents`,
/// form-encoded (`amount` in minor units, `currency` in lower case,
/// `metadata[wallet_id]`, `metadata[reference]`), a bearer secret key and an
/// `Idempotency-Key`; answered with the intent (`id`, `status`, `client_secret`),
/// or `{"error": {"type", "message"}}`.
pub struct HttpCardGateway(ProviderHttp);

impl HttpCardGateway {
    /// A gateway to `base` with secret key `key`.
    pub fn new(base: &str, key: WebhookSecret) -> Result<Self, PaymentError> {
        ProviderHttp::new(base, key).map(HttpCardGateway)
    }
}

impl PaymentGateway for HttpCardGateway {
    fn create_payment<'a>(
        &'a self,
        request: &'a PaymentRequest,
    ) -> futures::future::BoxFuture<'a, Result<PaymentCreated, PaymentError>> {
        Box::pin(async move {
            let wallet = request.wallet_id.to_string();
            let amount = request.amount.get().to_string();
            let currency = request.currency.code().to_ascii_lowercase();
            let form = [
                ("amount", amount.as_str()),
                ("currency", currency.as_str()),
                ("metadata[wallet_id]", wallet.as_str()),
                ("metadata[reference]", request.reference.as_str()),
                ("automatic_payment_methods[enabled]", "true"),
            ];
            let sent = self
                .0
                .post("/v1/payment_intents", &request.reference)
                .form(&form)
                .send()
                .await;
            let body = ProviderHttp::read(sent, "/error/message").await?;
            match (
                payment_id(&body["id"]),
                body["status"].as_str(),
                body["client_secret"].as_str(),
            ) {
                (Some(id), Some(state), Some(secret)) => Ok(PaymentCreated {
                    payment_id: id,
                    state: state.to_owned(),
                    client_secret: Some(secret.to_owned()),
                }),
                _ => Err(PaymentError::Unavailable(
                    "an answer without a payment intent".into(),
                )),
            }
        })
    }
}

/// Top up a wallet from a phone.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount": 150000, "currency": "KES", "phone_number": "254700000001"}))]
pub struct TopUpRequest {
    /// Minor units.
    pub amount: i64,
    /// The wallet's currency.
    pub currency: String,
    /// `mpesa` (an STK push to `phone_number`, the default) or `card` (a
    /// payment intent the client confirms with `client_secret`).
    pub method: Option<String>,
    /// For `mpesa`: the phone the STK push goes to, 10 to 15 digits, country code first.
    pub phone_number: Option<String>,
}

/// A started top-up: the wallet is credited when the provider's webhook says `completed`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUp {
    /// The provider's payment id.
    pub payment_id: String,
    /// `mpesa` or `card`.
    pub provider: String,
    /// `pending`.
    pub status: String,
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// For `card`: what the client's card SDK confirms the payment with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// Start a top-up of one of your wallets: an STK push to your phone, or a card payment intent.
#[utoipa::path(post, path = "/v1/wallets/{wallet_id}/topups", tag = "wallet", security(("bearer" = [])), request_body = TopUpRequest,
    params(("wallet_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "sent to the provider, which answers the same payment for it")),
    responses((status = 201, body = TopUp), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem),
        (status = 502, description = "the provider refused", body = Problem), (status = 503, description = "no provider for the method, or it is down", body = Problem)))]
pub async fn top_up(
    State(state): State<AppState>,
    principal: crate::auth::Principal,
    options: crate::extract::WriteOptions,
    AppPath(wallet_id): AppPath<Uuid>,
    crate::extract::AppJson(req): crate::extract::AppJson<TopUpRequest>,
) -> ApiResult<Response> {
    let amount = Amount::new(req.amount).map_err(|e| ApiError::field("amount", e.to_string()))?;
    let currency: Currency =
        req.currency
            .parse()
            .map_err(|e: commands::money::UnknownCurrency| {
                ApiError::field("currency", e.to_string())
            })?;
    let provider = match req.method.as_deref().unwrap_or("mpesa") {
        "mpesa" => "mpesa",
        "card" => "card",
        _ => return Err(ApiError::field("method", "mpesa or card")),
    };
    let phone = match (provider, req.phone_number.as_deref().map(str::trim)) {
        ("mpesa", Some(p))
            if (10..=15).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit()) =>
        {
            Some(p.to_owned())
        }
        ("mpesa", _) => {
            return Err(ApiError::field(
                "phone_number",
                "10 to 15 digits, country code first",
            ));
        }
        (_, Some(_)) => {
            return Err(ApiError::field(
                "phone_number",
                "only an mpesa top-up goes to a phone",
            ));
        }
        (_, None) => None,
    };
    let owned =
        crate::routes::wallets::owned_currency(&state, wallet_id, principal.user_id).await?;
    match owned {
        None => return Err(ApiError::NotFound("no such wallet".into())),
        Some(c) if c != currency.code() => {
            return Err(ApiError::field("currency", format!("the wallet holds {c}")));
        }
        Some(_) => {}
    }
    let configured = match provider {
        "mpesa" => (
            state.settings.payments_url.as_deref(),
            state.settings.payments_api_key.clone(),
        ),
        _ => (
            state.settings.card_url.as_deref(),
            state.settings.card_api_key.clone(),
        ),
    };
    let (Some(base), Some(key)) = configured else {
        return Err(ApiError::Unavailable(format!(
            "no {provider} payment provider is configured"
        )));
    };
    let unavailable = |e: PaymentError| ApiError::Unavailable(e.to_string());
    let gateway: Box<dyn PaymentGateway> = match provider {
        "mpesa" => Box::new(HttpPaymentGateway::new(base, key).map_err(unavailable)?),
        _ => Box::new(HttpCardGateway::new(base, key).map_err(unavailable)?),
    };
    let reference = match &options.idempotency_key {
        Some(k) => deposit_command_id(&principal.user_id.to_string(), k).to_string(),
        None => Uuid::now_v7().to_string(),
    };
    let request = PaymentRequest {
        wallet_id,
        amount,
        currency,
        phone_number: phone,
        reference,
    };
    let created = gateway
        .create_payment(&request)
        .await
        .map_err(|e| match e {
            PaymentError::Refused(m) => ApiError::Coded {
                status: http::StatusCode::BAD_GATEWAY,
                code: "provider_refused".into(),
                message: m,
                extra: Default::default(),
            },
            other => ApiError::Unavailable(other.to_string()),
        })?;
    sqlx::query(
        "INSERT INTO payment_intents (provider, payment_id, wallet_id, amount, currency, status, rank)
         VALUES ($5, $1, $2, $3, $4, 'pending', 1) ON CONFLICT DO NOTHING",
    )
    .bind(&created.payment_id)
    .bind(wallet_id)
    .bind(amount.get())
    .bind(currency.code())
    .bind(provider)
    .execute(&state.pool)
    .await?;
    let status: String = sqlx::query_scalar(
        "SELECT status FROM payment_intents WHERE provider = $2 AND payment_id = $1",
    )
    .bind(&created.payment_id)
    .bind(provider)
    .fetch_one(&state.pool)
    .await?;
    let body = TopUp {
        payment_id: created.payment_id,
        provider: provider.into(),
        status,
        amount: amount.get(),
        currency: currency.code().into(),
        client_secret: created.client_secret,
    };
    Ok((http::StatusCode::CREATED, Json(body)).into_response())
}
