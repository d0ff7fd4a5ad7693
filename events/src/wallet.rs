//! Wallet events: a double-entry ledger of accounts per owner and currency.
//!
//! Every movement of money is one transfer with two legs: a [`WalletEvent::Debited`]
//! on one account's stream and a [`WalletEvent::Credited`] on the other's, appended
//! in the same transaction, with the same `transfer_id` and amount. Σ credits = Σ debits
//! per currency therefore holds at every committed position.

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
}

impl AccountKind {
    /// The snake_case name used in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::SystemFloat => "system_float",
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
}

impl EntryKind {
    /// The snake_case name used in read models and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deposit => "deposit",
            EntryKind::Transfer => "transfer",
            EntryKind::Withdrawal => "withdrawal",
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
}

impl WalletEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            WalletEvent::AccountOpened { .. } => "AccountOpened",
            WalletEvent::Debited(_) => "Debited",
            WalletEvent::Credited(_) => "Credited",
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
        });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "Debited");
        assert_eq!(v["amount"], 5);
        assert_eq!(serde_json::from_value::<WalletEvent>(v).unwrap(), e);
    }
}
