//! Invoices: one stream per invoice (`invoice.invoice.<id>`), one number
//! counter per issuer and year (`invoice.counter.<id>`), one stream per
//! recurring schedule (`invoice.schedule.<id>`).
//!
//! A number is taken by [`InvoiceEvent::InvoiceNumberAssigned`] on the
//! counter in the same commit as [`InvoiceEvent::InvoiceSent`] on the
//! invoice, so the numbers of one issuer and year are 1, 2, 3, … with no gap:
//! a refused command appends nothing and takes nothing. Payments are ordinary
//! ledger transfers (wallet `Debited`/`Credited` legs) committed with
//! [`InvoiceEvent::InvoicePaymentReceived`].

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The domain token of invoice streams and subjects.
pub const DOMAIN: &str = "invoice";
/// The aggregate token of one invoice.
pub const INVOICE: &str = "invoice";
/// The aggregate token of a per-issuer, per-year number counter.
pub const COUNTER: &str = "counter";
/// The aggregate token of a recurring schedule.
pub const SCHEDULE: &str = "schedule";

/// One line of an invoice, in integer minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// What is billed.
    pub description: String,
    /// How many.
    pub quantity: i64,
    /// Price of one, minor units.
    pub unit_price: i64,
    /// quantity × unit_price, computed by the server.
    pub amount: i64,
}

/// Who is billed: a registered user, an address and a name, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// A registered user, who sees and pays the invoice in the app.
    pub user_id: Option<Uuid>,
    /// Where the link would be mailed.
    pub email: Option<String>,
    /// The name printed on the invoice.
    pub name: Option<String>,
}

/// What a schedule bills each time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Who is billed.
    pub client: Client,
    /// ISO 4217 code.
    pub currency: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// Sum of the lines.
    pub total: i64,
    /// Each invoice is due this many seconds after it is sent.
    pub due_after_secs: i64,
    /// Free text.
    pub memo: Option<String>,
}

/// How often a schedule bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    /// Every week at the same local time.
    Weekly,
    /// Every month on the same day (the last day of a shorter month) and local time.
    Monthly,
}

/// Events of the invoice domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum InvoiceEvent {
    /// A draft exists (no number yet).
    InvoiceDrafted {
        /// Invoice id (= stream id).
        invoice_id: Uuid,
        /// Who bills.
        issuer: Uuid,
        /// Who is billed.
        client: Client,
        /// ISO 4217 code.
        currency: String,
        /// The lines.
        lines: Vec<Line>,
        /// Sum of the lines.
        total: i64,
        /// When it is due.
        due_at: DateTime<Utc>,
        /// Free text.
        memo: Option<String>,
        /// The schedule that made it, if any.
        schedule_id: Option<Uuid>,
    },
    /// Issued: numbered, payable.
    InvoiceSent {
        /// `INV-YYYY-NNNNN`.
        number: String,
        /// Its year.
        year: i32,
        /// Its place in the year.
        seq: i64,
        /// When.
        at: DateTime<Utc>,
    },
    /// Money arrived (transfer `payment_id`, committed with this event).
    InvoicePaymentReceived {
        /// The transfer id.
        payment_id: Uuid,
        /// Who paid.
        payer: Uuid,
        /// How much.
        amount: i64,
        /// Paid so far, this payment included.
        paid: i64,
        /// What remains.
        due: i64,
        /// Through the payment link rather than as the named client.
        via_link: bool,
        /// When.
        at: DateTime<Utc>,
    },
    /// Nothing remains due.
    InvoicePaid {
        /// When.
        at: DateTime<Utc>,
    },
    /// The due time passed with money still due (the scheduler).
    InvoiceOverdue {
        /// When it was marked.
        at: DateTime<Utc>,
    },
    /// Cancelled: never payable again.
    InvoiceVoided {
        /// Why.
        reason: Option<String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A number taken, on the issuer's counter of that year.
    InvoiceNumberAssigned {
        /// The issuer.
        issuer: Uuid,
        /// The year.
        year: i32,
        /// The number's place, 1 more than the last.
        seq: i64,
        /// The invoice that got it.
        invoice_id: Uuid,
    },
    /// A recurring schedule exists.
    InvoiceScheduleCreated {
        /// Schedule id (= stream id).
        schedule_id: Uuid,
        /// Who bills.
        issuer: Uuid,
        /// What each run bills.
        template: Template,
        /// How often.
        interval: Interval,
        /// IANA zone the runs keep their wall-clock time in.
        zone: String,
        /// Wall-clock time of the first run.
        local: NaiveDateTime,
        /// The first run.
        next_run_at: DateTime<Utc>,
    },
    /// A run made and sent its invoice.
    InvoiceScheduleRan {
        /// The run (the occurrence it fired).
        run_at: DateTime<Utc>,
        /// The invoice it made.
        invoice_id: Uuid,
        /// The next run.
        next_run_at: DateTime<Utc>,
        /// Its wall-clock time.
        next_local: NaiveDateTime,
    },
    /// No more runs.
    InvoiceScheduleCancelled {
        /// When.
        at: DateTime<Utc>,
    },
}

impl InvoiceEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            InvoiceEvent::InvoiceDrafted { .. } => "InvoiceDrafted",
            InvoiceEvent::InvoiceSent { .. } => "InvoiceSent",
            InvoiceEvent::InvoicePaymentReceived { .. } => "InvoicePaymentReceived",
            InvoiceEvent::InvoicePaid { .. } => "InvoicePaid",
            InvoiceEvent::InvoiceOverdue { .. } => "InvoiceOverdue",
            InvoiceEvent::InvoiceVoided { .. } => "InvoiceVoided",
            InvoiceEvent::InvoiceNumberAssigned { .. } => "InvoiceNumberAssigned",
            InvoiceEvent::InvoiceScheduleCreated { .. } => "InvoiceScheduleCreated",
            InvoiceEvent::InvoiceScheduleRan { .. } => "InvoiceScheduleRan",
            InvoiceEvent::InvoiceScheduleCancelled { .. } => "InvoiceScheduleCancelled",
        }
    }
}

/// The printed number: `INV-2026-00042` (five digits at least; a sixth
/// appears after 99,999 in one year rather than wrapping).
///
/// ```
/// assert_eq!(events::invoice::number(2026, 42), "INV-2026-00042");
/// ```
pub fn number(year: i32, seq: i64) -> String {
    format!("INV-{year:04}-{seq:05}")
}
