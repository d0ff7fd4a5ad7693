//! Wallet events: a double-entry ledger of accounts per owner and currency.
//!
//! Every movement of money is one transfer with two legs: a [`WalletEvent::Debited`]
//! on one account's stream and a [`WalletEvent::Credited`] on the other's, appended
//! in the same transaction, with the same `transfer_id` and amount. Σ credits = Σ debits
//! per currency therefore holds at every committed position.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The domain token of wallet streams and subjects.
pub const DOMAIN: &str = "wallet";
/// The aggregate token of a ledger account's stream.
pub const ACCOUNT: &str = "account";

/// Who an account belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// A user's wallet in one currency.
    User,
    /// The provider float: where deposits come from and withdrawals go to.
    /// Split into shards so that it is never a hot spot.
    SystemFloat,
    /// Where transfer fees go (Mathia's revenue), sharded like the float.
    SystemFees,
    /// Where disputed money waits for the outcome, sharded like the float.
    SystemDisputes,
    /// Mathia's currency desk, one per currency, sharded like the float: a
    /// conversion pays into the desk of one currency and out of the desk of
    /// the other, so each currency balances on its own.
    SystemFx,
}

impl AccountKind {
    /// The snake_case name used in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::SystemFloat => "system_float",
            AccountKind::SystemFees => "system_fees",
            AccountKind::SystemDisputes => "system_disputes",
            AccountKind::SystemFx => "system_fx",
        }
    }
}

/// Why money moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Money entering the system from a provider (or an admin credit).
    Deposit,
    /// Money between two users' wallets.
    Transfer,
    /// Money leaving the system to a payout destination.
    Withdrawal,
    /// A fee on a transfer, to a fee account.
    Fee,
    /// Money going back from a transfer's payee to its payer.
    Refund,
    /// Disputed money moved aside, released back or paid to the payer.
    Dispute,
    /// One side of a currency conversion, through a currency desk.
    Conversion,
}

impl EntryKind {
    /// The snake_case name used in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deposit => "deposit",
            EntryKind::Transfer => "transfer",
            EntryKind::Withdrawal => "withdrawal",
            EntryKind::Fee => "fee",
            EntryKind::Refund => "refund",
            EntryKind::Dispute => "dispute",
            EntryKind::Conversion => "conversion",
        }
    }
}

/// One leg of a transfer, as seen from the account whose stream holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    /// The transfer both legs belong to (the command id).
    pub transfer_id: Uuid,
    /// Amount in minor units, always > 0.
    pub amount: i64,
    /// Why.
    pub kind: EntryKind,
    /// The account on the other side.
    pub counterparty: Uuid,
    /// Free text the client attached (a payout destination, an invoice number).
    pub reference: Option<String>,
    /// This account's posted balance after the leg.
    pub balance_after: i64,
    /// When the command was issued (the gateway's clock): what the rolling
    /// daily spend window counts from. Absent on legs written before limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    /// For a refund: the transfer (or leg) it gives money back for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<Uuid>,
    /// For a conversion leg: the rate it was made at, recorded with the money.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fx: Option<FxRate>,
}

/// The rate a conversion was made at: `rate_micros` units of `to` per
/// 1,000,000 units of `from` (major units, so `USD/KES` 129.25 is 129,250,000),
/// and what went in and came out, so either leg alone tells the whole story.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FxRate {
    /// The conversion (the command id); the two sides are its leg ids.
    pub conversion_id: Uuid,
    /// ISO code of the currency sold.
    pub from: String,
    /// ISO code of the currency bought.
    pub to: String,
    /// Units of `to` per 1,000,000 of `from`.
    pub rate_micros: i64,
    /// Minor units of `from` sold.
    pub sold: i64,
    /// Minor units of `to` bought (rounded down).
    pub bought: i64,
}

/// How a dispute ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeOutcome {
    /// The payee keeps the money: it is released back to them.
    Won,
    /// The payer gets it back.
    Lost,
}

impl DisputeOutcome {
    /// The snake_case name used in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DisputeOutcome::Won => "won",
            DisputeOutcome::Lost => "lost",
        }
    }
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldEnd {
    /// Captured, wholly or in part; the rest went back to available.
    Posted,
    /// Released by the payee or an admin.
    Voided,
    /// Its timeout passed; released by the expiry scheduler.
    Expired,
}

impl HoldEnd {
    /// The snake_case name used in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldEnd::Posted => "posted",
            HoldEnd::Voided => "voided",
            HoldEnd::Expired => "expired",
        }
    }
}

/// Events of one ledger account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WalletEvent {
    /// The account exists from now on.
    AccountOpened {
        /// The account (and stream) id.
        account_id: Uuid,
        /// The user who owns it; none for system accounts.
        owner_id: Option<Uuid>,
        /// ISO 4217 code.
        currency: String,
        /// User wallet or system account.
        kind: AccountKind,
        /// Lowest balance the account may reach; none means unbounded.
        floor: Option<i64>,
    },
    /// Money left this account.
    Debited(Leg),
    /// Money entered this account.
    Credited(Leg),
    /// A pending transfer reserved money on this (the payer's) account: it
    /// stays posted but is no longer available until the hold ends.
    HoldPlaced {
        /// The hold (the pending transfer's id, the command id).
        hold_id: Uuid,
        /// Reserved minor units.
        amount: i64,
        /// The account that may receive it.
        counterparty: Uuid,
        /// Free text.
        reference: Option<String>,
        /// When the expiry scheduler voids it.
        expires_at: DateTime<Utc>,
        /// When it was placed (counts towards the daily spend window).
        at: DateTime<Utc>,
        /// This account's pending debits after the hold.
        pending_after: i64,
    },
    /// A hold ended: its whole amount left pending. When posted, the
    /// `Debited`/`Credited` legs of the captured part follow in the same commit.
    HoldReleased {
        /// The hold.
        hold_id: Uuid,
        /// Minor units released from pending (the hold's whole amount).
        amount: i64,
        /// Of which captured (0 unless posted).
        posted: i64,
        /// Posted, voided or expired.
        end: HoldEnd,
        /// This account's pending debits after the release.
        pending_after: i64,
    },
    /// A transfer this (the payee's) account received is disputed: the account
    /// is frozen (no money leaves it) until every dispute on it is resolved; the
    /// `Debited` leg moving the disputed money to a disputes account follows in
    /// the same commit when `held` > 0.
    DisputeOpened {
        /// The dispute (the command id).
        dispute_id: Uuid,
        /// The disputed transfer (or leg).
        transfer_id: Uuid,
        /// The payer's account.
        payer: Uuid,
        /// Minor units moved aside (what the balance allowed, up to the claim).
        held: i64,
        /// Minor units claimed.
        amount: i64,
        /// Why.
        reason: String,
    },
    /// Evidence for a dispute, from the payee or an admin.
    DisputeEvidenceAdded {
        /// The dispute.
        dispute_id: Uuid,
        /// The evidence (text, a reference to a document).
        evidence: String,
    },
    /// A dispute ended; the legs moving the held money follow in the same commit.
    DisputeResolved {
        /// The dispute.
        dispute_id: Uuid,
        /// Won (released to the payee) or lost (paid to the payer).
        outcome: DisputeOutcome,
        /// Minor units moved by the resolution.
        held: i64,
    },
    /// The owner's spending limits, replacing the previous ones.
    LimitsSet {
        /// Largest single withdrawal; none: no cap.
        max_withdraw_amount: Option<i64>,
        /// Most that may leave the wallet (transfers, withdrawals, holds)
        /// within any rolling 24 hours; none: no cap.
        daily_spend_limit: Option<i64>,
        /// Payout destinations withdrawals may go to; none: any.
        payout_allow_list: Option<Vec<String>>,
    },
}

impl WalletEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            WalletEvent::AccountOpened { .. } => "AccountOpened",
            WalletEvent::Debited(_) => "Debited",
            WalletEvent::Credited(_) => "Credited",
            WalletEvent::HoldPlaced { .. } => "HoldPlaced",
            WalletEvent::HoldReleased { .. } => "HoldReleased",
            WalletEvent::LimitsSet { .. } => "LimitsSet",
            WalletEvent::DisputeOpened { .. } => "DisputeOpened",
            WalletEvent::DisputeEvidenceAdded { .. } => "DisputeEvidenceAdded",
            WalletEvent::DisputeResolved { .. } => "DisputeResolved",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leg_round_trips_with_its_type_tag() {
        let e = WalletEvent::Debited(Leg {
            transfer_id: Uuid::nil(),
            amount: 5,
            kind: EntryKind::Transfer,
            counterparty: Uuid::nil(),
            reference: None,
            balance_after: 10,
            at: None,
            refund_of: None,
            fx: None,
        });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "Debited");
        assert_eq!(v["amount"], 5);
        assert_eq!(serde_json::from_value::<WalletEvent>(v).unwrap(), e);
    }
}
