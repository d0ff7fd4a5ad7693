//! Invoices as pure decide/evolve: drafts, sending (numbering), payments,
//! voiding, overdue marking and recurring schedules.
//!
//! **Gap-free numbers.** Each issuer has one counter stream per year
//! ([`counter_stream`]). `SendInvoice` reads it and appends
//! `InvoiceNumberAssigned { seq: last + 1 }` there together with `InvoiceSent`
//! on the invoice, in one commit. Two sends decided on the same counter
//! version cannot both commit (the handler's read-set check and the unique
//! `(stream_id, version)` key), so the loser is decided again on the new
//! version; a refused send appends nothing, so it takes no number. Numbers are
//! per issuer (a business numbers its own invoices) and per UTC year of the
//! send, so one busy issuer never queues the others.
//!
//! **Payments** are ordinary wallet transfers: `PayInvoice` decides the
//! wallet's own [`WalletCommand::Transfer`] (ownership, currency, fee, daily
//! limit, no overdraft, frozen accounts) and adds `InvoicePaymentReceived`
//! (and `InvoicePaid` when nothing remains) to the same commit.
//!
//! **The scheduler** marks an invoice overdue (`MarkOverdue`) and runs a
//! recurring schedule (`RunSchedule`) with command ids derived from what they
//! fire ([`overdue_command_id`], [`run_command_id`]), and the aggregates refuse
//! an occurrence that is not the next one, so two schedulers or a restart do
//! it once.

use chrono::{DateTime, Datelike, Duration, Months, NaiveDateTime, Utc};
use events::invoice::{
    COUNTER, Client, DOMAIN, INVOICE, Interval, InvoiceEvent, Line, SCHEDULE, Template,
};
use events::{Event, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::money::{Amount, Currency, MAX_AMOUNT};
use crate::wallet::{WalletCommand, user_wallet_id};
use crate::{Actor, Decision, Rejection, Role, StateSet};

/// Most lines on one invoice.
pub const MAX_LINES: usize = 100;
/// Longest line description, in characters.
pub const MAX_DESCRIPTION: usize = 200;
/// Largest quantity of one line.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Longest memo or void reason, in characters.
pub const MAX_MEMO: usize = 1000;
/// Longest client name or e-mail address, in characters.
pub const MAX_CLIENT_TEXT: usize = 200;
/// Longest "due after" of a schedule: a year.
pub const MAX_DUE_AFTER_SECS: i64 = 366 * 86_400;

const COUNTER_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f69_6e76_636e_7400_0001);
const RUN_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f69_6e76_7275_6e00_0001);
const OVERDUE_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f69_6e76_6f76_6400_0001);

/// The stream of invoice `id`.
pub fn invoice_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, INVOICE, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The number counter of `issuer` in `year`.
pub fn counter_stream(issuer: Uuid, year: i32) -> StreamId {
    let id = Uuid::new_v5(&COUNTER_NS, format!("{issuer}|{year}").as_bytes());
    StreamId::new(DOMAIN, COUNTER, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The stream of schedule `id`.
pub fn schedule_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, SCHEDULE, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The invoice a schedule's run at `run_at` makes, and the id of the command
/// that makes it: one per occurrence, whoever fires it.
pub fn run_command_id(schedule: Uuid, run_at: DateTime<Utc>) -> Uuid {
    Uuid::new_v5(
        &RUN_NS,
        format!("{schedule}|{}", run_at.timestamp_micros()).as_bytes(),
    )
}

/// The id of the command marking `invoice` overdue: one per invoice.
pub fn overdue_command_id(invoice: Uuid) -> Uuid {
    Uuid::new_v5(&OVERDUE_NS, invoice.as_bytes())
}

/// Where an invoice is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Editable, unnumbered, visible to the issuer only.
    #[default]
    Draft,
    /// Numbered and payable.
    Sent,
    /// Payable, past its due time.
    Overdue,
    /// Nothing due.
    Paid,
    /// Cancelled.
    Void,
}

impl Status {
    /// The name in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Sent => "sent",
            Status::Overdue => "overdue",
            Status::Paid => "paid",
            Status::Void => "void",
        }
    }
}

/// The state of one invoice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// `InvoiceDrafted` happened.
    pub exists: bool,
    /// Its id.
    pub invoice_id: Uuid,
    /// Who bills.
    pub issuer: Uuid,
    /// Who is billed.
    pub client: Client,
    /// ISO code.
    pub currency: String,
    /// Lines.
    pub lines: Vec<Line>,
    /// Sum of the lines.
    pub total: i64,
    /// Paid so far.
    pub paid: i64,
    /// Due at.
    pub due_at: Option<DateTime<Utc>>,
    /// Memo.
    pub memo: Option<String>,
    /// Status.
    pub status: Status,
    /// `INV-YYYY-NNNNN` once sent.
    pub number: Option<String>,
    /// The schedule that made it.
    pub schedule_id: Option<Uuid>,
}

impl Invoice {
    /// Fold one event in.
    pub fn evolve(&mut self, e: &InvoiceEvent) {
        match e {
            InvoiceEvent::InvoiceDrafted {
                invoice_id,
                issuer,
                client,
                currency,
                lines,
                total,
                due_at,
                memo,
                schedule_id,
            } => {
                *self = Invoice {
                    exists: true,
                    invoice_id: *invoice_id,
                    issuer: *issuer,
                    client: client.clone(),
                    currency: currency.clone(),
                    lines: lines.clone(),
                    total: *total,
                    paid: 0,
                    due_at: Some(*due_at),
                    memo: memo.clone(),
                    status: Status::Draft,
                    number: None,
                    schedule_id: *schedule_id,
                }
            }
            InvoiceEvent::InvoiceSent { number, .. } => {
                self.status = Status::Sent;
                self.number = Some(number.clone());
            }
            InvoiceEvent::InvoicePaymentReceived { paid, .. } => self.paid = *paid,
            InvoiceEvent::InvoicePaid { .. } => self.status = Status::Paid,
            InvoiceEvent::InvoiceOverdue { .. } => self.status = Status::Overdue,
            InvoiceEvent::InvoiceVoided { .. } => self.status = Status::Void,
            _ => {}
        }
    }

    /// What remains to pay.
    pub fn due(&self) -> i64 {
        self.total - self.paid
    }

    /// The invoice as write answers show it.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "invoice_id": self.invoice_id,
            "number": self.number,
            "status": self.status.as_str(),
            "issuer_id": self.issuer,
            "client": self.client,
            "currency": self.currency,
            "lines": self.lines,
            "total": self.total,
            "amount_paid": self.paid,
            "amount_due": self.due(),
            "due_at": self.due_at,
            "memo": self.memo,
            "schedule_id": self.schedule_id,
        })
    }
}

/// The state of one issuer's counter in one year.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// The last number taken (0: none yet).
    pub last: i64,
}

impl Counter {
    /// Fold one event in.
    pub fn evolve(&mut self, e: &InvoiceEvent) {
        if let InvoiceEvent::InvoiceNumberAssigned { seq, .. } = e {
            self.last = *seq;
        }
    }
}

/// The state of one recurring schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// `InvoiceScheduleCreated` happened.
    pub exists: bool,
    /// Who bills.
    pub issuer: Uuid,
    /// What each run bills.
    pub template: Option<Template>,
    /// How often.
    pub interval: Option<Interval>,
    /// Zone.
    pub zone: String,
    /// Wall-clock time of the first run: later runs count from it, so a
    /// monthly run on the 31st stays on the last day of shorter months.
    pub first_local: Option<NaiveDateTime>,
    /// The next run; none once cancelled.
    pub next_run_at: Option<DateTime<Utc>>,
}

impl Schedule {
    /// Fold one event in.
    pub fn evolve(&mut self, e: &InvoiceEvent) {
        match e {
            InvoiceEvent::InvoiceScheduleCreated {
                issuer,
                template,
                interval,
                zone,
                local,
                next_run_at,
                ..
            } => {
                *self = Schedule {
                    exists: true,
                    issuer: *issuer,
                    template: Some(template.clone()),
                    interval: Some(*interval),
                    zone: zone.clone(),
                    first_local: Some(*local),
                    next_run_at: Some(*next_run_at),
                }
            }
            InvoiceEvent::InvoiceScheduleRan { next_run_at, .. } => {
                self.next_run_at = Some(*next_run_at)
            }
            InvoiceEvent::InvoiceScheduleCancelled { .. } => self.next_run_at = None,
            _ => {}
        }
    }
}

/// The `k`-th run after the first: `first` + k intervals, in `zone`.
fn nth_run(
    zone: &str,
    first: NaiveDateTime,
    interval: Interval,
    k: u32,
) -> Option<(NaiveDateTime, DateTime<Utc>)> {
    let local = match interval {
        Interval::Weekly => first.checked_add_signed(Duration::weeks(i64::from(k)))?,
        Interval::Monthly => first.checked_add_months(Months::new(k))?,
    };
    Some((local, crate::reminder::instant(zone, local)?))
}

/// The first run strictly after `after` (a scheduler that was down for long
/// makes one invoice for what it missed, then goes on).
pub fn next_run(
    zone: &str,
    first: NaiveDateTime,
    interval: Interval,
    after: DateTime<Utc>,
) -> Option<(NaiveDateTime, DateTime<Utc>)> {
    (1..10_000)
        .filter_map(|k| nth_run(zone, first, interval, k))
        .find(|(_, at)| *at > after)
}

/// A line as a client writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineInput {
    /// What is billed.
    pub description: String,
    /// How many, 1 to [`MAX_QUANTITY`].
    pub quantity: i64,
    /// Price of one in minor units, 0 to 10^15.
    pub unit_price: i64,
}

/// A field a client got wrong: the gateway turns it into a 422 field error
/// before anything is sent; the aggregate refuses the same (never trusting the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// The field, as the API names it (`lines[2].quantity`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field: field.into(),
        message: message.into(),
    }
}

fn printable(s: &str, max: usize) -> bool {
    s.chars().count() <= max && !s.chars().any(char::is_control)
}

/// The lines with their amounts, and the total, computed in integer minor
/// units with overflow checks (each amount and the total at most 10^15, the
/// total at least 1).
pub fn price(inputs: &[LineInput]) -> Result<(Vec<Line>, i64), Vec<FieldProblem>> {
    let mut errors = vec![];
    if inputs.is_empty() || inputs.len() > MAX_LINES {
        errors.push(problem("lines", format!("1 to {MAX_LINES} lines")));
    }
    let mut lines = Vec::with_capacity(inputs.len());
    let mut total: i64 = 0;
    for (i, l) in inputs.iter().enumerate() {
        let d = l.description.trim();
        if d.is_empty() || !printable(&l.description, MAX_DESCRIPTION) {
            errors.push(problem(
                format!("lines[{i}].description"),
                format!("1 to {MAX_DESCRIPTION} printable characters"),
            ));
        }
        if !(1..=MAX_QUANTITY).contains(&l.quantity) {
            errors.push(problem(
                format!("lines[{i}].quantity"),
                format!("a whole number from 1 to {MAX_QUANTITY}"),
            ));
        }
        if !(0..=MAX_AMOUNT).contains(&l.unit_price) {
            errors.push(problem(
                format!("lines[{i}].unit_price"),
                format!("whole minor units from 0 to {MAX_AMOUNT}"),
            ));
        }
        let amount = l
            .quantity
            .checked_mul(l.unit_price)
            .filter(|a| (0..=MAX_AMOUNT).contains(a));
        match amount {
            Some(a) => {
                total = total.saturating_add(a);
                lines.push(Line {
                    description: d.to_owned(),
                    quantity: l.quantity,
                    unit_price: l.unit_price,
                    amount: a,
                });
            }
            None => errors.push(problem(
                format!("lines[{i}]"),
                format!("quantity × unit_price must be at most {MAX_AMOUNT}"),
            )),
        }
    }
    if errors.is_empty() && !(1..=MAX_AMOUNT).contains(&total) {
        errors.push(problem(
            "lines",
            format!("the total must be between 1 and {MAX_AMOUNT} minor units"),
        ));
    }
    if errors.is_empty() {
        Ok((lines, total))
    } else {
        Err(errors)
    }
}

/// Check who is billed: at least one of user, e-mail and name; never the issuer.
pub fn check_client(client: &Client, issuer: Uuid) -> Result<(), Vec<FieldProblem>> {
    let mut errors = vec![];
    if client.user_id.is_none() && client.email.is_none() && client.name.is_none() {
        errors.push(problem(
            "client",
            "give a user_id, an email or a name (or several)",
        ));
    }
    if client.user_id == Some(issuer) {
        errors.push(problem("client.user_id", "you cannot bill yourself"));
    }
    if let Some(e) = &client.email {
        let at = e.find('@');
        if !printable(e, MAX_CLIENT_TEXT)
            || e.contains(char::is_whitespace)
            || at.is_none_or(|i| i == 0 || i + 1 == e.len())
        {
            errors.push(problem("client.email", "an e-mail address"));
        }
    }
    if let Some(n) = &client.name
        && (n.trim().is_empty() || !printable(n, MAX_CLIENT_TEXT))
    {
        errors.push(problem(
            "client.name",
            format!("1 to {MAX_CLIENT_TEXT} printable characters"),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Check a memo or reason.
pub fn check_memo(field: &str, memo: &Option<String>) -> Result<(), Vec<FieldProblem>> {
    match memo {
        Some(m) if !printable(m, MAX_MEMO) => Err(vec![problem(
            field,
            format!("at most {MAX_MEMO} printable characters"),
        )]),
        _ => Ok(()),
    }
}

fn rejected(problems: Vec<FieldProblem>) -> Rejection {
    let first = problems
        .first()
        .map(|p| format!("{}: {}", p.field, p.message))
        .unwrap_or_default();
    Rejection::new(422, "invalid", first).with_details(json!({
        "errors": problems.iter().map(|p| json!({"field": p.field, "message": p.message})).collect::<Vec<_>>(),
    }))
}

fn not_found() -> Rejection {
    Rejection::new(404, "invoice_not_found", "no such invoice")
}

/// The issuer (the actor, a person) and the priced lines and total of a
/// draft or a schedule's template, after the same checks the gateway makes.
fn issuer_and_priced(
    actor: &Actor,
    client: &Client,
    lines: &[LineInput],
    memo: &Option<String>,
) -> Result<(Uuid, Vec<Line>, i64), Rejection> {
    let Some(issuer) = actor.user_id else {
        return Err(Rejection::new(
            403,
            "forbidden",
            "invoices are issued by people",
        ));
    };
    let (lines, total) = price(lines).map_err(rejected)?;
    check_client(client, issuer).map_err(rejected)?;
    check_memo("memo", memo).map_err(rejected)?;
    Ok((issuer, lines, total))
}

fn schedule_not_found() -> Rejection {
    Rejection::new(
        404,
        "invoice_schedule_not_found",
        "no such invoice schedule",
    )
}

fn not_payable(status: Status) -> Rejection {
    match status {
        Status::Void => Rejection::new(409, "invoice_void", "this invoice was voided"),
        Status::Paid => Rejection::new(409, "invoice_paid", "this invoice is paid"),
        _ => Rejection::new(409, "invoice_not_sent", "this invoice has not been sent"),
    }
}

/// Commands of invoices and their schedules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum InvoiceCommand {
    /// Draft an invoice (the actor is the issuer).
    CreateInvoice {
        /// New id (the command id).
        invoice_id: Uuid,
        /// Who is billed.
        client: Client,
        /// Currency.
        currency: Currency,
        /// Lines as written; amounts are computed here.
        lines: Vec<LineInput>,
        /// When it is due.
        due_at: DateTime<Utc>,
        /// Free text.
        memo: Option<String>,
        /// The gateway's clock.
        at: DateTime<Utc>,
    },
    /// Issue a draft: number it and make it payable (the issuer).
    SendInvoice {
        /// The invoice.
        invoice_id: Uuid,
        /// The issuer (the actor): whose counter.
        issuer: Uuid,
        /// The gateway's clock: the number's year.
        at: DateTime<Utc>,
    },
    /// Cancel an invoice nobody paid anything on (the issuer).
    VoidInvoice {
        /// The invoice.
        invoice_id: Uuid,
        /// Why.
        reason: Option<String>,
        /// The gateway's clock.
        at: DateTime<Utc>,
    },
    /// Pay (part of) an invoice from the actor's wallet in its currency.
    PayInvoice {
        /// The transfer id (the command id).
        payment_id: Uuid,
        /// The invoice.
        invoice_id: Uuid,
        /// Its issuer (read by the gateway; checked against the invoice).
        issuer: Uuid,
        /// Its currency (likewise).
        currency: Currency,
        /// Who pays: the actor, from their wallet in `currency`.
        payer: Uuid,
        /// How much.
        amount: Amount,
        /// The transfer fee the payer pays on top (the gateway's schedule).
        fee: Option<Amount>,
        /// The actor presented the invoice's payment link (the gateway checked it).
        via_link: bool,
        /// The gateway's clock.
        at: DateTime<Utc>,
    },
    /// Mark a sent invoice past its due time overdue (the scheduler only).
    MarkOverdue {
        /// The invoice.
        invoice_id: Uuid,
        /// The scheduler's clock.
        at: DateTime<Utc>,
    },
    /// Create a recurring schedule (the actor is the issuer).
    CreateSchedule {
        /// New id (the command id).
        schedule_id: Uuid,
        /// Who is billed.
        client: Client,
        /// Currency.
        currency: Currency,
        /// Lines as written.
        lines: Vec<LineInput>,
        /// Each invoice is due this long after it is sent, in seconds.
        due_after_secs: i64,
        /// Free text.
        memo: Option<String>,
        /// How often.
        interval: Interval,
        /// IANA zone.
        zone: String,
        /// Wall-clock time of the first run, in `zone`.
        local: NaiveDateTime,
        /// The gateway's clock: the first run must be after it.
        at: DateTime<Utc>,
    },
    /// Make and send the invoice of the run due at `run_at` (the scheduler only).
    RunSchedule {
        /// The schedule.
        schedule_id: Uuid,
        /// The run (must be the schedule's next).
        run_at: DateTime<Utc>,
        /// The schedule's issuer (read by the scheduler; checked).
        issuer: Uuid,
        /// The scheduler's clock: the number's year.
        at: DateTime<Utc>,
    },
    /// Stop a schedule (the issuer).
    CancelSchedule {
        /// The schedule.
        schedule_id: Uuid,
        /// The gateway's clock.
        at: DateTime<Utc>,
    },
}

impl InvoiceCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            InvoiceCommand::CreateInvoice { .. } => "invoice.CreateInvoice",
            InvoiceCommand::SendInvoice { .. } => "invoice.SendInvoice",
            InvoiceCommand::VoidInvoice { .. } => "invoice.VoidInvoice",
            InvoiceCommand::PayInvoice { .. } => "invoice.PayInvoice",
            InvoiceCommand::MarkOverdue { .. } => "invoice.MarkOverdue",
            InvoiceCommand::CreateSchedule { .. } => "invoice.CreateSchedule",
            InvoiceCommand::RunSchedule { .. } => "invoice.RunSchedule",
            InvoiceCommand::CancelSchedule { .. } => "invoice.CancelSchedule",
        }
    }

    /// The stream the command is addressed to.
    pub fn target(&self) -> StreamId {
        match self {
            InvoiceCommand::CreateInvoice { invoice_id, .. }
            | InvoiceCommand::SendInvoice { invoice_id, .. }
            | InvoiceCommand::VoidInvoice { invoice_id, .. }
            | InvoiceCommand::PayInvoice { invoice_id, .. }
            | InvoiceCommand::MarkOverdue { invoice_id, .. } => invoice_stream(*invoice_id),
            InvoiceCommand::CreateSchedule { schedule_id, .. }
            | InvoiceCommand::RunSchedule { schedule_id, .. }
            | InvoiceCommand::CancelSchedule { schedule_id, .. } => schedule_stream(*schedule_id),
        }
    }

    /// The wallet transfer a payment is.
    fn transfer(&self) -> Option<WalletCommand> {
        match self {
            InvoiceCommand::PayInvoice {
                payment_id,
                issuer,
                currency,
                payer,
                amount,
                fee,
                at,
                ..
            } => Some(WalletCommand::Transfer {
                transfer_id: *payment_id,
                from: user_wallet_id(*payer, *currency),
                to: user_wallet_id(*issuer, *currency),
                currency: *currency,
                amount: *amount,
                reference: None,
                fee: *fee,
                at: *at,
            }),
            _ => None,
        }
    }

    /// Every stream the decision reads or appends to (a payment: the
    /// invoice and its transfer's accounts).
    pub fn streams(&self) -> Vec<StreamId> {
        match self {
            InvoiceCommand::SendInvoice {
                invoice_id,
                issuer,
                at,
            } => vec![
                invoice_stream(*invoice_id),
                counter_stream(*issuer, at.year()),
            ],
            InvoiceCommand::PayInvoice { invoice_id, .. } => {
                let mut s = vec![invoice_stream(*invoice_id)];
                if let Some(t) = self.transfer() {
                    s.extend(t.streams());
                }
                s
            }
            InvoiceCommand::RunSchedule {
                schedule_id,
                run_at,
                issuer,
                at,
            } => vec![
                schedule_stream(*schedule_id),
                invoice_stream(run_command_id(*schedule_id, *run_at)),
                counter_stream(*issuer, at.year()),
            ],
            _ => vec![self.target()],
        }
    }

    /// Decide against the loaded states.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        let decision =
            |events: Vec<(StreamId, Event)>, status: u16, answer: serde_json::Value| Decision {
                events,
                status,
                answer,
                keys: vec![],
            };
        let ev = |s: &StreamId, e: InvoiceEvent| (s.clone(), Event::Invoice(e));
        match self {
            InvoiceCommand::CreateInvoice {
                invoice_id,
                client,
                currency,
                lines,
                due_at,
                memo,
                at,
            } => {
                let stream = invoice_stream(*invoice_id);
                if states.invoice(&stream).exists {
                    return Err(Rejection::new(
                        409,
                        "invoice_exists",
                        "this invoice id is taken",
                    ));
                }
                let (issuer, lines, total) = issuer_and_priced(actor, client, lines, memo)?;
                if due_at <= at {
                    return Err(rejected(vec![problem("due_at", "must be in the future")]));
                }
                let drafted = InvoiceEvent::InvoiceDrafted {
                    invoice_id: *invoice_id,
                    issuer,
                    client: client.clone(),
                    currency: currency.code().to_owned(),
                    lines,
                    total,
                    due_at: *due_at,
                    memo: memo.clone(),
                    schedule_id: None,
                };
                let mut after = Invoice::default();
                after.evolve(&drafted);
                Ok(decision(vec![ev(&stream, drafted)], 201, after.json()))
            }
            InvoiceCommand::SendInvoice {
                invoice_id,
                issuer,
                at,
            } => {
                let stream = invoice_stream(*invoice_id);
                let invoice = states.invoice(&stream);
                if !invoice.exists
                    || Some(invoice.issuer) != actor.user_id
                    || invoice.issuer != *issuer
                {
                    return Err(not_found());
                }
                match invoice.status {
                    Status::Draft => {}
                    Status::Void => return Err(not_payable(Status::Void)),
                    _ => {
                        return Err(Rejection::new(
                            409,
                            "invoice_already_sent",
                            "this invoice was sent already",
                        ));
                    }
                }
                if invoice.due_at.is_some_and(|d| d <= *at) {
                    return Err(Rejection::new(
                        422,
                        "due_at_passed",
                        "the invoice's due time has passed; void it and draft another",
                    ));
                }
                let events = number_and_send(states, &stream, invoice.issuer, *invoice_id, *at);
                let mut after = invoice;
                for (_, e) in &events {
                    if let Event::Invoice(e) = e {
                        after.evolve(e);
                    }
                }
                Ok(decision(events, 200, after.json()))
            }
            InvoiceCommand::VoidInvoice {
                invoice_id,
                reason,
                at,
            } => {
                let stream = invoice_stream(*invoice_id);
                let mut invoice = states.invoice(&stream);
                if !invoice.exists || Some(invoice.issuer) != actor.user_id {
                    return Err(not_found());
                }
                check_memo("reason", reason).map_err(rejected)?;
                if matches!(invoice.status, Status::Void | Status::Paid) {
                    return Err(not_payable(invoice.status));
                }
                if invoice.paid > 0 {
                    return Err(Rejection::new(
                        409,
                        "invoice_has_payments",
                        "money was paid on this invoice; refund the payments instead of voiding it",
                    ));
                }
                let voided = InvoiceEvent::InvoiceVoided {
                    reason: reason.clone(),
                    at: *at,
                };
                invoice.evolve(&voided);
                Ok(decision(vec![ev(&stream, voided)], 200, invoice.json()))
            }
            InvoiceCommand::PayInvoice {
                payment_id,
                invoice_id,
                issuer,
                currency,
                payer,
                amount,
                via_link,
                at,
                ..
            } => {
                let stream = invoice_stream(*invoice_id);
                let mut invoice = states.invoice(&stream);
                let payer = *payer;
                if actor.user_id != Some(payer) {
                    return Err(not_found());
                }
                let allowed = *via_link || invoice.client.user_id == Some(payer);
                if !invoice.exists
                    || !allowed
                    || invoice.status == Status::Draft
                    || invoice.issuer != *issuer
                    || invoice.currency != currency.code()
                {
                    return Err(not_found());
                }
                if !matches!(invoice.status, Status::Sent | Status::Overdue) {
                    return Err(not_payable(invoice.status));
                }
                if amount.get() > invoice.due() {
                    return Err(Rejection::new(
                        422,
                        "overpayment",
                        format!(
                            "{} {} remain due on this invoice; pay at most that",
                            invoice.due(),
                            invoice.currency
                        ),
                    )
                    .with_details(json!({ "amount_due": invoice.due() })));
                }
                let mut transfer = self.transfer().ok_or_else(not_found)?;
                if let WalletCommand::Transfer { reference, .. } = &mut transfer {
                    *reference = invoice.number.clone();
                }
                let moved = transfer.decide(actor, states)?;
                let mut events = moved.events;
                let paid = invoice.paid + amount.get();
                let received = InvoiceEvent::InvoicePaymentReceived {
                    payment_id: *payment_id,
                    payer,
                    amount: amount.get(),
                    paid,
                    due: invoice.total - paid,
                    via_link: *via_link && invoice.client.user_id != Some(payer),
                    at: *at,
                };
                invoice.evolve(&received);
                events.push(ev(&stream, received));
                if invoice.due() == 0 {
                    let done = InvoiceEvent::InvoicePaid { at: *at };
                    invoice.evolve(&done);
                    events.push(ev(&stream, done));
                }
                let mut answer = invoice.json();
                answer["payment"] = moved.answer;
                Ok(decision(events, 201, answer))
            }
            InvoiceCommand::MarkOverdue { invoice_id, at } => {
                if actor.role != Role::System {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only the scheduler marks invoices overdue",
                    ));
                }
                let stream = invoice_stream(*invoice_id);
                let mut invoice = states.invoice(&stream);
                if !invoice.exists {
                    return Err(not_found());
                }
                if invoice.status != Status::Sent || invoice.due_at.is_none_or(|d| d > *at) {
                    return Err(Rejection::new(
                        409,
                        "not_overdue",
                        "this invoice is not sent and past its due time",
                    ));
                }
                let overdue = InvoiceEvent::InvoiceOverdue { at: *at };
                invoice.evolve(&overdue);
                Ok(decision(vec![ev(&stream, overdue)], 200, invoice.json()))
            }
            InvoiceCommand::CreateSchedule {
                schedule_id,
                client,
                currency,
                lines,
                due_after_secs,
                memo,
                interval,
                zone,
                local,
                at,
            } => {
                let stream = schedule_stream(*schedule_id);
                if states.invoice_schedule(&stream).exists {
                    return Err(Rejection::new(
                        409,
                        "invoice_schedule_exists",
                        "this schedule id is taken",
                    ));
                }
                let (issuer, lines, total) = issuer_and_priced(actor, client, lines, memo)?;
                if !(1..=MAX_DUE_AFTER_SECS).contains(due_after_secs) {
                    return Err(rejected(vec![problem(
                        "due_after_secs",
                        format!("1 to {MAX_DUE_AFTER_SECS} seconds"),
                    )]));
                }
                let first = crate::reminder::instant(zone, *local).ok_or_else(|| {
                    rejected(vec![problem(
                        "zone",
                        "an IANA time zone such as Africa/Nairobi",
                    )])
                })?;
                if first <= *at {
                    return Err(rejected(vec![problem(
                        "first_run_local",
                        "the first run must be in the future",
                    )]));
                }
                let created = InvoiceEvent::InvoiceScheduleCreated {
                    schedule_id: *schedule_id,
                    issuer,
                    template: Template {
                        client: client.clone(),
                        currency: currency.code().to_owned(),
                        lines,
                        total,
                        due_after_secs: *due_after_secs,
                        memo: memo.clone(),
                    },
                    interval: *interval,
                    zone: zone.clone(),
                    local: *local,
                    next_run_at: first,
                };
                Ok(decision(
                    vec![ev(&stream, created)],
                    201,
                    json!({
                        "schedule_id": schedule_id,
                        "status": "active",
                        "interval": interval,
                        "zone": zone,
                        "next_run_at": first,
                        "total": total,
                        "currency": currency,
                    }),
                ))
            }
            InvoiceCommand::RunSchedule {
                schedule_id,
                run_at,
                issuer,
                at,
            } => {
                if actor.role != Role::System {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only the scheduler runs schedules",
                    ));
                }
                let stream = schedule_stream(*schedule_id);
                let schedule = states.invoice_schedule(&stream);
                let (Some(template), Some(interval), Some(first)) =
                    (&schedule.template, schedule.interval, schedule.first_local)
                else {
                    return Err(schedule_not_found());
                };
                if schedule.issuer != *issuer {
                    return Err(schedule_not_found());
                }
                if schedule.next_run_at != Some(*run_at) || *run_at > *at {
                    return Err(Rejection::new(
                        409,
                        "not_due",
                        "this run is not the schedule's next one, or not due yet",
                    ));
                }
                let invoice_id = run_command_id(*schedule_id, *run_at);
                let istream = invoice_stream(invoice_id);
                if states.invoice(&istream).exists {
                    return Err(Rejection::new(
                        409,
                        "not_due",
                        "this run made its invoice already",
                    ));
                }
                let (next_local, next_run_at) = next_run(&schedule.zone, first, interval, *at)
                    .ok_or_else(|| {
                        Rejection::new(422, "invalid", "the schedule has no next run")
                    })?;
                let drafted = InvoiceEvent::InvoiceDrafted {
                    invoice_id,
                    issuer: *issuer,
                    client: template.client.clone(),
                    currency: template.currency.clone(),
                    lines: template.lines.clone(),
                    total: template.total,
                    due_at: *at + Duration::seconds(template.due_after_secs),
                    memo: template.memo.clone(),
                    schedule_id: Some(*schedule_id),
                };
                let mut invoice = Invoice::default();
                invoice.evolve(&drafted);
                let mut events = vec![ev(&istream, drafted)];
                let sent = number_and_send(states, &istream, *issuer, invoice_id, *at);
                for (_, e) in &sent {
                    if let Event::Invoice(e) = e {
                        invoice.evolve(e);
                    }
                }
                events.extend(sent);
                events.push(ev(
                    &stream,
                    InvoiceEvent::InvoiceScheduleRan {
                        run_at: *run_at,
                        invoice_id,
                        next_run_at,
                        next_local,
                    },
                ));
                let mut answer = invoice.json();
                answer["next_run_at"] = json!(next_run_at);
                Ok(decision(events, 201, answer))
            }
            InvoiceCommand::CancelSchedule { schedule_id, at } => {
                let stream = schedule_stream(*schedule_id);
                let schedule = states.invoice_schedule(&stream);
                if !schedule.exists || Some(schedule.issuer) != actor.user_id {
                    return Err(schedule_not_found());
                }
                if schedule.next_run_at.is_none() {
                    return Err(Rejection::new(
                        409,
                        "invoice_schedule_cancelled",
                        "this schedule was cancelled already",
                    ));
                }
                Ok(decision(
                    vec![ev(
                        &stream,
                        InvoiceEvent::InvoiceScheduleCancelled { at: *at },
                    )],
                    200,
                    json!({ "schedule_id": schedule_id, "status": "cancelled", "next_run_at": null }),
                ))
            }
        }
    }
}

/// Take the next number of `issuer`'s counter for the year of `at` and send
/// the invoice with it: the two events of one commit.
fn number_and_send(
    states: &StateSet,
    invoice: &StreamId,
    issuer: Uuid,
    invoice_id: Uuid,
    at: DateTime<Utc>,
) -> Vec<(StreamId, Event)> {
    let year = at.year();
    let counter = counter_stream(issuer, year);
    let seq = states.invoice_counter(&counter).last + 1;
    vec![
        (
            counter,
            Event::Invoice(InvoiceEvent::InvoiceNumberAssigned {
                issuer,
                year,
                seq,
                invoice_id,
            }),
        ),
        (
            invoice.clone(),
            Event::Invoice(InvoiceEvent::InvoiceSent {
                number: events::invoice::number(year, seq),
                year,
                seq,
                at,
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn user(id: Uuid) -> Actor {
        Actor {
            user_id: Some(id),
            role: Role::User,
        }
    }

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
    }

    fn line(q: i64, p: i64) -> LineInput {
        LineInput {
            description: "work".into(),
            quantity: q,
            unit_price: p,
        }
    }

    fn run(states: &mut StateSet, actor: &Actor, c: InvoiceCommand) -> Result<Decision, Rejection> {
        crate::aggregate::decide_and_apply(states, actor, c)
    }

    fn drafted(states: &mut StateSet, issuer: Uuid, now: DateTime<Utc>) -> Uuid {
        let id = Uuid::now_v7();
        run(
            states,
            &user(issuer),
            InvoiceCommand::CreateInvoice {
                invoice_id: id,
                client: Client {
                    name: Some("Acme".into()),
                    ..Client::default()
                },
                currency: "KES".parse().unwrap(),
                lines: vec![line(3, 200), line(1, 400)],
                due_at: now + Duration::days(30),
                memo: None,
                at: now,
            },
        )
        .unwrap();
        id
    }

    #[test]
    fn totals_are_integer_products_with_overflow_refused() {
        let (lines, total) = price(&[line(3, 200), line(1, 400), line(2, 0)]).unwrap();
        assert_eq!(lines[0].amount, 600);
        assert_eq!(total, 1000);
        assert!(price(&[]).is_err());
        assert!(price(&[line(0, 1)]).is_err());
        assert!(price(&[line(1, -1)]).is_err());
        assert!(price(&[line(2, 0)]).is_err(), "a total of 0 bills nothing");
        assert!(price(&[line(MAX_QUANTITY, MAX_AMOUNT)]).is_err());
        let near = MAX_AMOUNT / 2 + 1;
        assert!(
            price(&[line(1, near), line(1, near)]).is_err(),
            "the sum too"
        );
    }

    #[test]
    fn sends_number_gap_free_per_issuer_and_restart_in_a_new_year_and_refusals_take_nothing() {
        let (alice, carol) = (Uuid::now_v7(), Uuid::now_v7());
        let mut states = StateSet::default();
        let now = at(2026, 12, 30);
        let send = |states: &mut StateSet, issuer: Uuid, id: Uuid, when: DateTime<Utc>| {
            run(
                states,
                &user(issuer),
                InvoiceCommand::SendInvoice {
                    invoice_id: id,
                    issuer,
                    at: when,
                },
            )
        };
        let ids: Vec<Uuid> = (0..3).map(|_| drafted(&mut states, alice, now)).collect();
        assert_eq!(
            send(&mut states, alice, ids[0], now).unwrap().answer["number"],
            "INV-2026-00001"
        );
        // Refused: sent twice, someone else's, voided. None takes a number.
        assert_eq!(
            send(&mut states, alice, ids[0], now).unwrap_err().code,
            "invoice_already_sent"
        );
        assert_eq!(
            send(&mut states, carol, ids[1], now).unwrap_err().code,
            "invoice_not_found"
        );
        run(
            &mut states,
            &user(alice),
            InvoiceCommand::VoidInvoice {
                invoice_id: ids[2],
                reason: None,
                at: now,
            },
        )
        .unwrap();
        assert_eq!(
            send(&mut states, alice, ids[2], now).unwrap_err().code,
            "invoice_void"
        );
        assert_eq!(
            send(&mut states, alice, ids[1], now).unwrap().answer["number"],
            "INV-2026-00002"
        );
        // Another issuer counts on their own; a new year starts again at 1.
        let theirs = drafted(&mut states, carol, now);
        assert_eq!(
            send(&mut states, carol, theirs, now).unwrap().answer["number"],
            "INV-2026-00001"
        );
        let jan = drafted(&mut states, alice, now);
        assert_eq!(
            send(&mut states, alice, jan, at(2027, 1, 2))
                .unwrap()
                .answer["number"],
            "INV-2027-00001"
        );
    }

    #[test]
    fn only_the_scheduler_marks_overdue_and_only_once_past_the_due_time() {
        let alice = Uuid::now_v7();
        let mut states = StateSet::default();
        let now = at(2026, 6, 1);
        let id = drafted(&mut states, alice, now);
        let system = Actor {
            user_id: None,
            role: Role::System,
        };
        let mark = |when| InvoiceCommand::MarkOverdue {
            invoice_id: id,
            at: when,
        };
        let late = now + Duration::days(31);
        assert_eq!(
            run(&mut states, &system, mark(late)).unwrap_err().code,
            "not_overdue",
            "a draft"
        );
        run(
            &mut states,
            &user(alice),
            InvoiceCommand::SendInvoice {
                invoice_id: id,
                issuer: alice,
                at: now,
            },
        )
        .unwrap();
        assert_eq!(
            run(&mut states, &user(alice), mark(late))
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            run(&mut states, &system, mark(now)).unwrap_err().code,
            "not_overdue"
        );
        assert_eq!(
            run(&mut states, &system, mark(late)).unwrap().answer["status"],
            "overdue"
        );
        assert_eq!(
            run(&mut states, &system, mark(late)).unwrap_err().code,
            "not_overdue"
        );
    }

    #[test]
    fn monthly_runs_count_from_the_first_so_the_31st_stays_at_month_end() {
        let first = NaiveDate::from_ymd_opt(2027, 1, 31)
            .unwrap()
            .and_hms_opt(9, 0, 0)
            .unwrap();
        let start = crate::reminder::instant("UTC", first).unwrap();
        let (l1, _) = next_run("UTC", first, Interval::Monthly, start).unwrap();
        assert_eq!(l1.date(), NaiveDate::from_ymd_opt(2027, 2, 28).unwrap());
        let (l2, t2) =
            next_run("UTC", first, Interval::Monthly, start + Duration::days(30)).unwrap();
        assert_eq!(l2.date(), NaiveDate::from_ymd_opt(2027, 3, 31).unwrap());
        let (l3, _) = next_run("UTC", first, Interval::Weekly, t2).unwrap();
        assert_eq!(l3.date(), NaiveDate::from_ymd_opt(2027, 4, 4).unwrap());
    }
}
