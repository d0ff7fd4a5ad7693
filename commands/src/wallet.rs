//! The wallet: ledger accounts (one stream each) and the commands that move money.
//!
//! Every movement is a transfer of two legs on two account streams, decided
//! against both accounts' states and appended in one transaction:
//! the debited account's floor is checked on its current version, so two
//! spends decided on the same stale balance cannot both commit (the second
//! append hits the unique `(stream_id, version)` key and is decided again).
//!
//! Holds (pending transfers) live on the payer's account: `HoldPlaced` moves
//! nothing but raises `pending`, so `available = posted − pending`; a post
//! releases the hold and appends the captured part as ordinary legs in the same
//! commit, a void or an expiry only releases it. Limits are account state too
//! (`LimitsSet` and the rolling window of recent spends), so they are checked
//! on the same version as the balance: atomically with the spend.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use events::StreamId;
use events::wallet::{
    ACCOUNT, AccountKind, DOMAIN, DisputeOutcome, EntryKind, FxRate, HoldEnd, Leg, WalletEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::money::{Amount, Currency, MAX_AMOUNT};
use crate::{Actor, Decision, Rejection, Role, StateSet};
use events::Event;

/// How many shards the provider float of each currency is split into, so that
/// deposits and withdrawals do not all queue on one account stream.
pub const FLOAT_SHARDS: u128 = 16;

/// The window `daily_spend_limit` counts over.
pub const SPEND_WINDOW_HOURS: i64 = 24;

/// Longest a hold may stay pending: 30 days.
pub const MAX_HOLD_SECS: i64 = 30 * 24 * 3600;

/// Most destinations a payout allow-list holds.
pub const MAX_ALLOW_LIST: usize = 20;

const NAMESPACE: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f77_616c_6c65_745f_6e73);

/// The wallet id of `owner`'s account in `currency`: one wallet per user and
/// currency, so opening it twice is a conflict, and a sender can address a
/// recipient by user id.
pub fn user_wallet_id(owner: Uuid, currency: Currency) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("user:{owner}:{currency}").as_bytes())
}

/// The float shard of `currency` that transfer `transfer_id` goes through.
pub fn float_account_id(currency: Currency, transfer_id: Uuid) -> Uuid {
    let shard = transfer_id.as_u128() % FLOAT_SHARDS;
    Uuid::new_v5(&NAMESPACE, format!("float:{currency}:{shard}").as_bytes())
}

/// The fee account shard of `currency` that transfer `transfer_id` pays its fee to.
pub fn fee_account_id(currency: Currency, transfer_id: Uuid) -> Uuid {
    let shard = transfer_id.as_u128() % FLOAT_SHARDS;
    Uuid::new_v5(&NAMESPACE, format!("fees:{currency}:{shard}").as_bytes())
}

/// The disputes account shard of `currency` that dispute `dispute_id` holds its money in.
pub fn disputes_account_id(currency: Currency, dispute_id: Uuid) -> Uuid {
    let shard = dispute_id.as_u128() % FLOAT_SHARDS;
    Uuid::new_v5(
        &NAMESPACE,
        format!("disputes:{currency}:{shard}").as_bytes(),
    )
}

/// The currency desk shard of `currency` that conversion `conversion_id` goes through.
pub fn fx_account_id(currency: Currency, conversion_id: Uuid) -> Uuid {
    let shard = conversion_id.as_u128() % FLOAT_SHARDS;
    Uuid::new_v5(&NAMESPACE, format!("fx:{currency}:{shard}").as_bytes())
}

/// The id of the buying side of conversion `conversion_id` (the selling side
/// carries the conversion id itself), so that each side balances on its own.
pub fn conversion_buy_id(conversion_id: Uuid) -> Uuid {
    leg_id(conversion_id, "buy")
}

/// `amount` minor units of `from` at `rate_micros` (units of `to` per
/// 1,000,000 of `from`, major units) in minor units of `to`, rounded down;
/// none when it overflows the largest amount.
///
/// ```
/// use commands::money::Currency;
/// use commands::wallet::convert_minor;
/// let (usd, kes, jpy): (Currency, Currency, Currency) =
///     ("USD".parse().unwrap(), "KES".parse().unwrap(), "JPY".parse().unwrap());
/// // 100.00 USD at 129.25 → 12,925.00 KES.
/// assert_eq!(convert_minor(10_000, usd, kes, 129_250_000), Some(1_292_500));
/// // 1.00 USD at 151.337 JPY → 151 JPY (scale 0), rounded down.
/// assert_eq!(convert_minor(100, usd, jpy, 151_337_000), Some(151));
/// ```
pub fn convert_minor(amount: i64, from: Currency, to: Currency, rate_micros: i64) -> Option<i64> {
    let num = i128::from(amount)
        .checked_mul(i128::from(rate_micros))?
        .checked_mul(10i128.pow(u32::from(to.scale())))?;
    let den = 1_000_000i128 * 10i128.pow(u32::from(from.scale()));
    i64::try_from(num / den).ok().filter(|v| *v <= MAX_AMOUNT)
}

/// Longest dispute reason or evidence text.
pub const MAX_DISPUTE_TEXT: usize = 2000;

/// The id of leg `tag` of transfer `transfer_id` (a fee, or one leg of a linked
/// transfer), so that each leg is its own spend in the daily window.
pub fn leg_id(transfer_id: Uuid, tag: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("leg:{transfer_id}:{tag}").as_bytes())
}

/// Most legs in one linked transfer.
pub const MAX_LINKED_LEGS: usize = 10;

/// The command id of the expiry of `hold_id`: one per hold, so a scheduler
/// that fires twice (or two schedulers) is answered from the command ledger.
pub fn expiry_command_id(hold_id: Uuid) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("expire:{hold_id}").as_bytes())
}

/// The stream of ledger account `account_id`.
pub fn account_stream(account_id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, ACCOUNT, &account_id.to_string())
        .expect("a uuid is a valid subject token")
}

/// A pending transfer, on the payer's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Reserved minor units.
    pub amount: i64,
    /// The account that may receive it.
    pub counterparty: Uuid,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// Client reference.
    pub reference: Option<String>,
}

/// A wallet's spending limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest single withdrawal.
    pub max_withdraw_amount: Option<i64>,
    /// Most that may leave within any rolling 24 h.
    pub daily_spend_limit: Option<i64>,
    /// Allowed payout destinations; none: any.
    pub payout_allow_list: Option<Vec<String>>,
}

/// One spend in the rolling window: when, how much, which transfer or hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    /// When it was issued.
    pub at: DateTime<Utc>,
    /// Minor units.
    pub amount: i64,
    /// The transfer or hold.
    pub transfer_id: Uuid,
}

/// The state of one ledger account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Whether `AccountOpened` has happened.
    pub opened: bool,
    /// The account id.
    pub account_id: Uuid,
    /// Its owner, none for system accounts.
    pub owner_id: Option<Uuid>,
    /// ISO code.
    pub currency: String,
    /// User or system.
    pub kind: Option<AccountKind>,
    /// Lowest allowed balance; none: unbounded.
    pub floor: Option<i64>,
    /// Posted balance in minor units.
    pub posted: i64,
    /// Debits reserved by open holds.
    #[serde(default)]
    pub pending: i64,
    /// Open holds by id.
    #[serde(default)]
    pub holds: BTreeMap<Uuid, Hold>,
    /// Holds that ended, and how (so a late post or void is answered precisely).
    #[serde(default)]
    pub ended: BTreeMap<Uuid, HoldEnd>,
    /// Spending limits.
    #[serde(default)]
    pub limits: Limits,
    /// Spends of the last 24 h (user wallets only), oldest first.
    #[serde(default)]
    pub spends: VecDeque<Spend>,
    /// Refunded so far, per transfer received (only transfers with refunds).
    #[serde(default)]
    pub refunded: BTreeMap<Uuid, i64>,
    /// Open disputes on transfers this account received; while any is open the
    /// account is frozen.
    #[serde(default)]
    pub disputes: BTreeMap<Uuid, OpenDispute>,
}

/// A dispute not resolved yet, on the payee's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenDispute {
    /// The disputed transfer.
    pub transfer_id: Uuid,
    /// The payer's account.
    pub payer: Uuid,
    /// Minor units moved to the disputes account.
    pub held: i64,
}

impl Account {
    /// Fold one event in.
    pub fn evolve(&mut self, event: &WalletEvent) {
        match event {
            WalletEvent::AccountOpened {
                account_id,
                owner_id,
                currency,
                kind,
                floor,
            } => {
                self.opened = true;
                self.account_id = *account_id;
                self.owner_id = *owner_id;
                self.currency = currency.clone();
                self.kind = Some(*kind);
                self.floor = *floor;
            }
            WalletEvent::Debited(leg) => {
                self.posted = leg.balance_after;
                if let Some(original) = leg.refund_of {
                    *self.refunded.entry(original).or_default() += leg.amount;
                }
                let spend = matches!(
                    leg.kind,
                    EntryKind::Transfer | EntryKind::Withdrawal | EntryKind::Fee
                );
                if let (true, Some(at)) = (spend && self.kind == Some(AccountKind::User), leg.at)
                    && !self.spends.iter().any(|s| s.transfer_id == leg.transfer_id)
                {
                    self.record_spend(at, leg.amount, leg.transfer_id);
                }
            }
            WalletEvent::Credited(leg) => self.posted = leg.balance_after,
            WalletEvent::HoldPlaced {
                hold_id,
                amount,
                counterparty,
                reference,
                expires_at,
                at,
                pending_after,
            } => {
                self.pending = *pending_after;
                self.holds.insert(
                    *hold_id,
                    Hold {
                        amount: *amount,
                        counterparty: *counterparty,
                        expires_at: *expires_at,
                        reference: reference.clone(),
                    },
                );
                if self.kind == Some(AccountKind::User) {
                    self.record_spend(*at, *amount, *hold_id);
                }
            }
            WalletEvent::HoldReleased {
                hold_id,
                posted,
                end,
                pending_after,
                ..
            } => {
                self.pending = *pending_after;
                self.holds.remove(hold_id);
                self.ended.insert(*hold_id, *end);
                // The hold counted in the window when placed: keep what was captured, drop the rest.
                if let Some(i) = self.spends.iter().position(|s| s.transfer_id == *hold_id) {
                    if *posted > 0 {
                        self.spends[i].amount = *posted;
                    } else {
                        self.spends.remove(i);
                    }
                }
            }
            WalletEvent::DisputeOpened {
                dispute_id,
                transfer_id,
                payer,
                held,
                ..
            } => {
                self.disputes.insert(
                    *dispute_id,
                    OpenDispute {
                        transfer_id: *transfer_id,
                        payer: *payer,
                        held: *held,
                    },
                );
            }
            WalletEvent::DisputeEvidenceAdded { .. } => {}
            WalletEvent::DisputeResolved {
                dispute_id,
                outcome,
                held,
            } => {
                if let Some(d) = self.disputes.remove(dispute_id)
                    && *outcome == DisputeOutcome::Lost
                {
                    // What the payer got back counts as refunded.
                    *self.refunded.entry(d.transfer_id).or_default() += *held;
                }
            }
            WalletEvent::LimitsSet {
                max_withdraw_amount,
                daily_spend_limit,
                payout_allow_list,
            } => {
                self.limits = Limits {
                    max_withdraw_amount: *max_withdraw_amount,
                    daily_spend_limit: *daily_spend_limit,
                    payout_allow_list: payout_allow_list.clone(),
                };
            }
        }
    }

    fn record_spend(&mut self, at: DateTime<Utc>, amount: i64, transfer_id: Uuid) {
        self.spends.push_back(Spend {
            at,
            amount,
            transfer_id,
        });
        // Forget what no window ending at or after `at` can count.
        let horizon = at - Duration::hours(SPEND_WINDOW_HOURS);
        self.spends.retain(|s| s.at > horizon);
    }

    /// What can be spent now: posted less pending debits less the floor.
    pub fn available(&self) -> i64 {
        match self.floor {
            Some(floor) => self
                .posted
                .saturating_sub(self.pending)
                .saturating_sub(floor),
            None => i64::MAX,
        }
    }

    /// Minor units spent in the 24 h ending at `now` (holds count while open).
    pub fn spent_since(&self, now: DateTime<Utc>) -> i64 {
        let horizon = now - Duration::hours(SPEND_WINDOW_HOURS);
        self.spends
            .iter()
            .filter(|s| s.at > horizon)
            .map(|s| s.amount)
            .sum()
    }

    /// The balances every write answers with.
    pub fn balance_json(&self) -> serde_json::Value {
        json!({
            "wallet_id": self.account_id,
            "currency": self.currency,
            "posted": self.posted,
            "pending": self.pending,
            "available": self.posted - self.pending,
        })
    }

    fn limits_json(&self, now: DateTime<Utc>) -> serde_json::Value {
        let spent = self.spent_since(now);
        json!({
            "max_withdraw_amount": self.limits.max_withdraw_amount,
            "daily_spend_limit": self.limits.daily_spend_limit,
            "payout_allow_list": self.limits.payout_allow_list,
            "spent_last_24h": spent,
            "daily_remaining": self.limits.daily_spend_limit.map(|l| (l - spent).max(0)),
        })
    }

    /// Refuse a spend of `amount` at `now` that the daily limit does not leave room for.
    fn check_daily(&self, amount: i64, now: DateTime<Utc>) -> Result<(), Rejection> {
        let Some(limit) = self.limits.daily_spend_limit else {
            return Ok(());
        };
        let spent = self.spent_since(now);
        let remaining = (limit - spent).max(0);
        if amount <= remaining {
            return Ok(());
        }
        // The window frees up as its oldest spends age out.
        let horizon = now - Duration::hours(SPEND_WINDOW_HOURS);
        let next_release = self
            .spends
            .iter()
            .filter(|s| s.at > horizon)
            .map(|s| s.at + Duration::hours(SPEND_WINDOW_HOURS))
            .min();
        Err(Rejection::new(
            422,
            "daily_spend_limit_exceeded",
            format!(
                "this would exceed the wallet's daily spend limit of {limit}; {remaining} remains in the last 24 hours"
            ),
        )
        .with_details(json!({
            "limit": "daily_spend_limit",
            "limit_amount": limit,
            "spent": spent,
            "remaining": remaining,
            "requested": amount,
            "next_release_at": next_release,
        })))
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn default_hold_secs() -> i64 {
    24 * 3600
}

/// Commands of the wallet domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WalletCommand {
    /// Open `owner_id`'s wallet in `currency`.
    OpenWallet {
        /// The owner.
        owner_id: Uuid,
        /// Its currency.
        currency: Currency,
    },
    /// Credit a wallet from the provider float (admin, or a provider webhook).
    Deposit {
        /// The transfer id (the command id).
        transfer_id: Uuid,
        /// The wallet credited.
        wallet_id: Uuid,
        /// Its currency, which the wallet must have.
        currency: Currency,
        /// How much.
        amount: Amount,
        /// Provider reference.
        reference: Option<String>,
    },
    /// Move money from the actor's wallet to another wallet of the same currency.
    Transfer {
        /// The transfer id (the command id).
        transfer_id: Uuid,
        /// The debited wallet, owned by the actor.
        from: Uuid,
        /// The credited wallet.
        to: Uuid,
        /// The currency the client means; both wallets must hold it.
        currency: Currency,
        /// How much.
        amount: Amount,
        /// Free text shown to both sides.
        reference: Option<String>,
        /// The fee the payer pays on top, to a fee account shard (the
        /// gateway's configured schedule); none: no fee.
        #[serde(default)]
        fee: Option<Amount>,
        /// When the gateway issued it (the daily limit's clock).
        #[serde(default = "now")]
        at: DateTime<Utc>,
    },
    /// Several legs from the actor's wallets that commit or fail as one
    /// (splits, paying several people at once).
    Linked {
        /// The transfer id (the command id).
        transfer_id: Uuid,
        /// The legs, in order; each is checked on the balances the previous left.
        legs: Vec<LinkedLeg>,
        /// When the gateway issued it.
        at: DateTime<Utc>,
    },
    /// Sell money of one of the actor's wallets for another currency, into
    /// another of the actor's wallets, at the rate the gateway quoted: two
    /// transfers, each through the currency desk of its own currency, so that
    /// every currency balances by itself, with the rate recorded on all four
    /// legs. A conversion moves the owner's money between the owner's wallets,
    /// so it is not a spend for the daily limit (what leaves the bought wallet
    /// later is).
    Convert {
        /// The conversion id (the command id; the selling side's transfer id).
        conversion_id: Uuid,
        /// The wallet sold from, owned by the actor.
        from: Uuid,
        /// The wallet bought into, owned by the actor.
        to: Uuid,
        /// The sold wallet's currency.
        from_currency: Currency,
        /// The bought wallet's currency.
        to_currency: Currency,
        /// Minor units of `from_currency` sold.
        amount: Amount,
        /// Units of `to_currency` per 1,000,000 of `from_currency`.
        rate_micros: i64,
        /// The rate the client was quoted and agreed to; when it differs from
        /// `rate_micros` the conversion is refused (`rate_changed`).
        #[serde(default)]
        quoted_rate_micros: Option<i64>,
        /// When the gateway issued it.
        at: DateTime<Utc>,
    },
    /// Pay money out of the actor's wallet to a destination outside Mathia.
    Withdraw {
        /// The transfer id (the command id).
        transfer_id: Uuid,
        /// The debited wallet, owned by the actor.
        wallet_id: Uuid,
        /// Its currency.
        currency: Currency,
        /// How much.
        amount: Amount,
        /// Where the money goes (e.g. `mpesa:+254700000000`).
        destination: String,
        /// When the gateway issued it.
        #[serde(default = "now")]
        at: DateTime<Utc>,
    },
    /// Reserve money on the actor's wallet for a payee: a pending transfer.
    PlaceHold {
        /// The hold id (the command id).
        hold_id: Uuid,
        /// The payer's wallet, owned by the actor.
        from: Uuid,
        /// The payee's wallet.
        to: Uuid,
        /// Both wallets' currency.
        currency: Currency,
        /// How much to reserve.
        amount: Amount,
        /// Free text.
        reference: Option<String>,
        /// Seconds until the hold expires, 1 to [`MAX_HOLD_SECS`].
        #[serde(default = "default_hold_secs")]
        timeout_secs: i64,
        /// When the gateway issued it.
        at: DateTime<Utc>,
    },
    /// Capture a hold, wholly or in part; the rest returns to the payer.
    PostHold {
        /// The hold.
        hold_id: Uuid,
        /// The payer's wallet (where the hold lives).
        from: Uuid,
        /// The payee's wallet.
        to: Uuid,
        /// How much to capture; none: all of it.
        amount: Option<Amount>,
        /// When the gateway issued it.
        at: DateTime<Utc>,
    },
    /// Release a hold without moving money (the payee or an admin).
    VoidHold {
        /// The hold.
        hold_id: Uuid,
        /// The payer's wallet.
        from: Uuid,
        /// The payee's wallet.
        to: Uuid,
        /// When the gateway issued it.
        at: DateTime<Utc>,
    },
    /// Release a hold whose timeout has passed (the system's scheduler only).
    ExpireHold {
        /// The hold.
        hold_id: Uuid,
        /// The payer's wallet.
        from: Uuid,
        /// When the scheduler fired.
        at: DateTime<Utc>,
    },
    /// Give back part or all of a transfer the actor received (several refunds
    /// may follow one another; together never more than the original).
    Refund {
        /// The refund's own transfer id (the command id).
        refund_id: Uuid,
        /// The transfer (or leg) refunded.
        transfer_id: Uuid,
        /// The wallet that received it: debited now.
        payee: Uuid,
        /// The wallet that paid it: credited now.
        payer: Uuid,
        /// What the original moved (from the immutable history).
        original_amount: i64,
        /// Currency.
        currency: Currency,
        /// How much to give back.
        amount: Amount,
        /// Free text.
        reference: Option<String>,
    },
    /// Dispute a transfer (admins): freeze the payee's account and move the
    /// claimed money (as much of it as the balance allows) to a disputes account.
    OpenDispute {
        /// The dispute id (the command id).
        dispute_id: Uuid,
        /// The disputed transfer (or leg).
        transfer_id: Uuid,
        /// The wallet that received it.
        payee: Uuid,
        /// The wallet that paid it.
        payer: Uuid,
        /// What the original moved (from the immutable history).
        original_amount: i64,
        /// Currency.
        currency: Currency,
        /// Minor units claimed; none: all that is not refunded yet.
        amount: Option<Amount>,
        /// Why.
        reason: String,
    },
    /// Add evidence to an open dispute (the payee or an admin).
    AddDisputeEvidence {
        /// The dispute.
        dispute_id: Uuid,
        /// The payee's wallet.
        payee: Uuid,
        /// The evidence.
        evidence: String,
    },
    /// End a dispute (admins): won releases the money to the payee, lost pays
    /// it to the payer; the account unfreezes when no dispute is left open.
    ResolveDispute {
        /// The dispute.
        dispute_id: Uuid,
        /// The payee's wallet.
        payee: Uuid,
        /// The payer's wallet.
        payer: Uuid,
        /// Currency.
        currency: Currency,
        /// Won or lost.
        outcome: DisputeOutcome,
    },
    /// Replace the wallet's spending limits (its owner or an admin).
    SetLimits {
        /// The wallet.
        wallet_id: Uuid,
        /// Largest single withdrawal, 0 to 10^15; none: no cap.
        max_withdraw_amount: Option<i64>,
        /// Most per rolling 24 h, 0 to 10^15; none: no cap.
        daily_spend_limit: Option<i64>,
        /// Allowed payout destinations; none: any.
        payout_allow_list: Option<Vec<String>>,
        /// When the gateway issued it (for the answer's `spent_last_24h`).
        at: DateTime<Utc>,
    },
}

/// One leg of a linked transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedLeg {
    /// The debited wallet, owned by the actor.
    pub from: Uuid,
    /// The credited user wallet.
    pub to: Uuid,
    /// Both wallets' currency.
    pub currency: Currency,
    /// How much.
    pub amount: Amount,
    /// Free text.
    pub reference: Option<String>,
}

fn not_found() -> Rejection {
    Rejection::new(404, "wallet_not_found", "no such wallet")
}

fn hold_not_found() -> Rejection {
    Rejection::new(404, "hold_not_found", "no such hold on this wallet")
}

impl WalletCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            WalletCommand::OpenWallet { .. } => "wallet.OpenWallet",
            WalletCommand::Deposit { .. } => "wallet.Deposit",
            WalletCommand::Transfer { .. } => "wallet.Transfer",
            WalletCommand::Withdraw { .. } => "wallet.Withdraw",
            WalletCommand::Convert { .. } => "wallet.Convert",
            WalletCommand::PlaceHold { .. } => "wallet.PlaceHold",
            WalletCommand::PostHold { .. } => "wallet.PostHold",
            WalletCommand::VoidHold { .. } => "wallet.VoidHold",
            WalletCommand::ExpireHold { .. } => "wallet.ExpireHold",
            WalletCommand::SetLimits { .. } => "wallet.SetLimits",
            WalletCommand::Linked { .. } => "wallet.Linked",
            WalletCommand::Refund { .. } => "wallet.Refund",
            WalletCommand::OpenDispute { .. } => "wallet.OpenDispute",
            WalletCommand::AddDisputeEvidence { .. } => "wallet.AddDisputeEvidence",
            WalletCommand::ResolveDispute { .. } => "wallet.ResolveDispute",
        }
    }

    /// The account the command is addressed to.
    pub fn target(&self) -> StreamId {
        match self {
            WalletCommand::OpenWallet { owner_id, currency } => {
                account_stream(user_wallet_id(*owner_id, *currency))
            }
            WalletCommand::Deposit { wallet_id, .. }
            | WalletCommand::Withdraw { wallet_id, .. }
            | WalletCommand::SetLimits { wallet_id, .. } => account_stream(*wallet_id),
            WalletCommand::Transfer { from, .. }
            | WalletCommand::Convert { from, .. }
            | WalletCommand::PlaceHold { from, .. }
            | WalletCommand::PostHold { from, .. }
            | WalletCommand::VoidHold { from, .. }
            | WalletCommand::ExpireHold { from, .. } => account_stream(*from),
            WalletCommand::Linked { legs, .. } => {
                account_stream(legs.first().map_or(Uuid::nil(), |l| l.from))
            }
            WalletCommand::Refund { payee, .. }
            | WalletCommand::OpenDispute { payee, .. }
            | WalletCommand::AddDisputeEvidence { payee, .. }
            | WalletCommand::ResolveDispute { payee, .. } => account_stream(*payee),
        }
    }

    /// Every account stream the decision reads.
    pub fn streams(&self) -> Vec<StreamId> {
        match self {
            WalletCommand::OpenWallet { .. }
            | WalletCommand::SetLimits { .. }
            | WalletCommand::ExpireHold { .. } => vec![self.target()],
            WalletCommand::Deposit {
                transfer_id,
                wallet_id,
                currency,
                ..
            }
            | WalletCommand::Withdraw {
                transfer_id,
                wallet_id,
                currency,
                ..
            } => {
                vec![
                    account_stream(*wallet_id),
                    account_stream(float_account_id(*currency, *transfer_id)),
                ]
            }
            WalletCommand::Transfer {
                from,
                to,
                fee: Some(_),
                currency,
                transfer_id,
                ..
            } => vec![
                account_stream(*from),
                account_stream(*to),
                account_stream(fee_account_id(*currency, *transfer_id)),
            ],
            WalletCommand::Refund { payee, payer, .. } => {
                vec![account_stream(*payee), account_stream(*payer)]
            }
            WalletCommand::Convert {
                conversion_id,
                from,
                to,
                from_currency,
                to_currency,
                ..
            } => vec![
                account_stream(*from),
                account_stream(*to),
                account_stream(fx_account_id(*from_currency, *conversion_id)),
                account_stream(fx_account_id(*to_currency, *conversion_id)),
            ],
            WalletCommand::OpenDispute {
                dispute_id,
                payee,
                payer,
                currency,
                ..
            }
            | WalletCommand::ResolveDispute {
                dispute_id,
                payee,
                payer,
                currency,
                ..
            } => vec![
                account_stream(*payee),
                account_stream(*payer),
                account_stream(disputes_account_id(*currency, *dispute_id)),
            ],
            WalletCommand::AddDisputeEvidence { payee, .. } => vec![account_stream(*payee)],
            WalletCommand::Linked { legs, .. } => {
                let mut streams: Vec<StreamId> = vec![];
                for s in legs
                    .iter()
                    .flat_map(|l| [account_stream(l.from), account_stream(l.to)])
                {
                    if !streams.contains(&s) {
                        streams.push(s);
                    }
                }
                streams
            }
            WalletCommand::Transfer { from, to, .. }
            | WalletCommand::PlaceHold { from, to, .. }
            | WalletCommand::PostHold { from, to, .. }
            | WalletCommand::VoidHold { from, to, .. } => {
                vec![account_stream(*from), account_stream(*to)]
            }
        }
    }

    /// The fields a client chose, named as the API names them: a retry with
    /// the same id and another body is told which of these differs.
    pub fn request_fields(&self) -> serde_json::Value {
        match self {
            WalletCommand::OpenWallet { currency, .. } => json!({ "currency": currency }),
            WalletCommand::Deposit {
                wallet_id,
                currency,
                amount,
                reference,
                ..
            } => {
                json!({ "wallet_id": wallet_id, "currency": currency, "amount": amount, "reference": reference })
            }
            WalletCommand::Transfer {
                from,
                to,
                currency,
                amount,
                reference,
                ..
            } => {
                json!({ "from_wallet": from, "to_wallet": to, "currency": currency, "amount": amount, "reference": reference })
            }
            WalletCommand::Refund {
                transfer_id,
                amount,
                reference,
                ..
            } => json!({ "transfer_id": transfer_id, "amount": amount, "reference": reference }),
            WalletCommand::Convert {
                from,
                to,
                from_currency,
                to_currency,
                amount,
                ..
            } => json!({ "from_wallet": from, "to_wallet": to, "currency": from_currency,
                         "to_currency": to_currency, "amount": amount }),
            WalletCommand::OpenDispute {
                transfer_id,
                amount,
                reason,
                ..
            } => json!({ "transfer_id": transfer_id, "amount": amount, "reason": reason }),
            WalletCommand::AddDisputeEvidence {
                dispute_id,
                evidence,
                ..
            } => json!({ "dispute_id": dispute_id, "evidence": evidence }),
            WalletCommand::ResolveDispute {
                dispute_id,
                outcome,
                ..
            } => json!({ "dispute_id": dispute_id, "outcome": outcome }),
            WalletCommand::Linked { legs, .. } => json!({
                "legs": legs.iter().map(|l| json!({ "from_wallet": l.from, "to_wallet": l.to, "currency": l.currency,
                                                     "amount": l.amount, "reference": l.reference })).collect::<Vec<_>>(),
            }),
            WalletCommand::Withdraw {
                wallet_id,
                currency,
                amount,
                destination,
                ..
            } => {
                json!({ "wallet_id": wallet_id, "currency": currency, "amount": amount, "destination": destination })
            }
            WalletCommand::PlaceHold {
                from,
                to,
                currency,
                amount,
                reference,
                timeout_secs,
                ..
            } => {
                json!({ "from_wallet": from, "to_wallet": to, "currency": currency, "amount": amount,
                         "reference": reference, "timeout_secs": timeout_secs })
            }
            WalletCommand::PostHold {
                hold_id, amount, ..
            } => json!({ "hold_id": hold_id, "amount": amount }),
            WalletCommand::VoidHold { hold_id, .. } | WalletCommand::ExpireHold { hold_id, .. } => {
                json!({ "hold_id": hold_id })
            }
            WalletCommand::SetLimits {
                wallet_id,
                max_withdraw_amount,
                daily_spend_limit,
                payout_allow_list,
                ..
            } => json!({ "wallet_id": wallet_id, "max_withdraw_amount": max_withdraw_amount,
                         "daily_spend_limit": daily_spend_limit, "payout_allow_list": payout_allow_list }),
        }
    }

    /// Decide against the loaded account states. A rejection carries the
    /// request's fields (`details.request`), so the ledger row of a failed
    /// command can say which field a reused id changed.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        self.decide_inner(actor, states).map_err(|mut r| {
            let request = self.request_fields();
            match &mut r.details {
                serde_json::Value::Object(m) => {
                    m.insert("request".into(), request);
                }
                other => *other = json!({ "request": request }),
            }
            r
        })
    }

    fn decide_inner(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        match self {
            WalletCommand::OpenWallet { owner_id, currency } => {
                if actor.user_id != Some(*owner_id) && actor.role != Role::Admin {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "a wallet can only be opened for yourself",
                    ));
                }
                let id = user_wallet_id(*owner_id, *currency);
                let stream = account_stream(id);
                if states.wallet(&stream).opened {
                    return Err(Rejection::new(
                        409,
                        "wallet_exists",
                        format!("you already have a {currency} wallet"),
                    )
                    .with_details(json!({ "wallet_id": id })));
                }
                let opened = WalletEvent::AccountOpened {
                    account_id: id,
                    owner_id: Some(*owner_id),
                    currency: currency.code().to_owned(),
                    kind: AccountKind::User,
                    floor: Some(0),
                };
                let mut account = Account::default();
                account.evolve(&opened);
                Ok(Decision {
                    events: vec![(stream, Event::Wallet(opened))],
                    status: 201,
                    answer: json!({
                        "wallet_id": id,
                        "owner_id": owner_id,
                        "currency": currency,
                        "balance": account.balance_json(),
                    }),
                    keys: vec![],
                })
            }
            WalletCommand::Deposit {
                transfer_id,
                wallet_id,
                currency,
                amount,
                reference,
            } => {
                if actor.role == Role::User {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "deposits are credited by an admin or a payment provider",
                    ));
                }
                let wallet = states.wallet(&account_stream(*wallet_id));
                if !wallet.opened || wallet.kind != Some(AccountKind::User) {
                    return Err(not_found());
                }
                check_currency(&wallet, *currency)?;
                let float_id = float_account_id(*currency, *transfer_id);
                let (mut events, float) = float_account(states, float_id, *currency);
                let (debit, credit) = legs(
                    *transfer_id,
                    &float,
                    &wallet,
                    *amount,
                    EntryKind::Deposit,
                    reference,
                    None,
                )?;
                events.push(debit);
                events.push(credit);
                Ok(self.transfer_decision(
                    events,
                    *transfer_id,
                    EntryKind::Deposit,
                    *amount,
                    &wallet,
                    float_id,
                    *wallet_id,
                    reference,
                ))
            }
            WalletCommand::Transfer {
                transfer_id,
                from,
                to,
                currency,
                amount,
                reference,
                fee,
                at,
            } => {
                let (source, target) = payer_and_payee(actor, states, *from, *to, *currency)?;
                let total = amount.get() + fee.map_or(0, Amount::get);
                source.check_daily(total, *at)?;
                if total > source.available() {
                    return Err(insufficient(&source, total));
                }
                let (debit, credit) = legs(
                    *transfer_id,
                    &source,
                    &target,
                    *amount,
                    EntryKind::Transfer,
                    reference,
                    Some(*at),
                )?;
                let mut events = vec![debit, credit];
                if let Some(fee) = fee {
                    // The fee leg is decided on the balance the transfer leg left.
                    let paid = evolved(&source, &events);
                    let fee_id = fee_account_id(*currency, *transfer_id);
                    let (opened, fees) =
                        system_account(states, fee_id, *currency, AccountKind::SystemFees);
                    let (fee_debit, fee_credit) = legs(
                        leg_id(*transfer_id, "fee"),
                        &paid,
                        &fees,
                        *fee,
                        EntryKind::Fee,
                        reference,
                        Some(*at),
                    )?;
                    events.extend(opened);
                    events.push(fee_debit);
                    events.push(fee_credit);
                }
                let mut decision = self.transfer_decision(
                    events,
                    *transfer_id,
                    EntryKind::Transfer,
                    *amount,
                    &source,
                    *from,
                    *to,
                    reference,
                );
                decision.answer["fee"] = json!(fee.map_or(0, Amount::get));
                Ok(decision)
            }
            WalletCommand::Convert {
                conversion_id,
                from,
                to,
                from_currency,
                to_currency,
                amount,
                rate_micros,
                quoted_rate_micros,
                at,
            } => {
                if quoted_rate_micros.is_some_and(|q| q != *rate_micros) {
                    return Err(Rejection::new(
                        409,
                        "rate_changed",
                        "the rate moved since the quote; ask for a new quote",
                    )
                    .with_details(json!({ "rate_micros": rate_micros, "quoted_rate_micros": quoted_rate_micros })));
                }
                let source = owned_wallet(actor, states, *from)?;
                check_currency(&source, *from_currency)?;
                // Money may enter a frozen wallet; it only may not leave it.
                let target = states.wallet(&account_stream(*to));
                if !target.opened
                    || target.kind != Some(AccountKind::User)
                    || target.owner_id != actor.user_id
                {
                    return Err(Rejection::new(
                        404,
                        "recipient_not_found",
                        "no such wallet of yours to convert into",
                    ));
                }
                check_currency(&target, *to_currency)?;
                if from_currency == to_currency {
                    return Err(Rejection::new(
                        422,
                        "same_currency",
                        "a conversion needs wallets of two currencies; use a transfer",
                    ));
                }
                if *rate_micros <= 0 {
                    return Err(Rejection::new(
                        422,
                        "invalid_rate",
                        "the rate must be positive",
                    ));
                }
                let bought =
                    convert_minor(amount.get(), *from_currency, *to_currency, *rate_micros)
                        .ok_or_else(|| {
                            Rejection::new(
                                422,
                                "amount_too_large",
                                "the converted amount exceeds the largest movement",
                            )
                        })?;
                let bought = Amount::new(bought).map_err(|_| {
                    Rejection::new(
                        422,
                        "amount_too_small",
                        format!(
                            "{} minor units of {from_currency} buy nothing at this rate",
                            amount.get()
                        ),
                    )
                    .with_details(json!({ "rate_micros": rate_micros }))
                })?;
                if amount.get() > source.available() {
                    return Err(insufficient(&source, amount.get()));
                }
                let fx = FxRate {
                    conversion_id: *conversion_id,
                    from: from_currency.code().to_owned(),
                    to: to_currency.code().to_owned(),
                    rate_micros: *rate_micros,
                    sold: amount.get(),
                    bought: bought.get(),
                };
                let (mut events, sell_desk) = system_account(
                    states,
                    fx_account_id(*from_currency, *conversion_id),
                    *from_currency,
                    AccountKind::SystemFx,
                );
                let (opened, buy_desk) = system_account(
                    states,
                    fx_account_id(*to_currency, *conversion_id),
                    *to_currency,
                    AccountKind::SystemFx,
                );
                events.extend(opened);
                let reference = Some(format!("fx:{from_currency}/{to_currency}"));
                let (sell_debit, sell_credit) = legs(
                    *conversion_id,
                    &source,
                    &sell_desk,
                    *amount,
                    EntryKind::Conversion,
                    &reference,
                    Some(*at),
                )?;
                let (buy_debit, buy_credit) = legs(
                    conversion_buy_id(*conversion_id),
                    &buy_desk,
                    &target,
                    bought,
                    EntryKind::Conversion,
                    &reference,
                    Some(*at),
                )?;
                for mut leg in [sell_debit, sell_credit, buy_debit, buy_credit] {
                    if let Event::Wallet(WalletEvent::Debited(l) | WalletEvent::Credited(l)) =
                        &mut leg.1
                    {
                        l.fx = Some(fx.clone());
                    }
                    events.push(leg);
                }
                let sold_after = evolved(&source, &events);
                let bought_after = evolved(&target, &events);
                Ok(Decision {
                    events,
                    status: 201,
                    answer: json!({
                        "conversion_id": conversion_id,
                        "kind": "conversion",
                        "status": "posted",
                        "from_wallet": from,
                        "to_wallet": to,
                        "sold": { "amount": amount.get(), "currency": from_currency, "transfer_id": conversion_id },
                        "bought": { "amount": bought.get(), "currency": to_currency,
                                    "transfer_id": conversion_buy_id(*conversion_id) },
                        "rate_micros": rate_micros,
                        "balance": sold_after.balance_json(),
                        "to_balance": bought_after.balance_json(),
                        "request": self.request_fields(),
                    }),
                    keys: vec![],
                })
            }
            WalletCommand::Refund {
                refund_id,
                transfer_id,
                payee,
                payer,
                original_amount,
                currency,
                amount,
                reference,
            } => {
                let source = states.wallet(&account_stream(*payee));
                let mine = source.owner_id.is_some() && source.owner_id == actor.user_id;
                if !source.opened || !(mine || actor.role == Role::Admin) {
                    return Err(Rejection::new(
                        404,
                        "transfer_not_found",
                        "no such transfer received",
                    ));
                }
                check_currency(&source, *currency)?;
                not_frozen(&source)?;
                let target = states.wallet(&account_stream(*payer));
                if !target.opened || target.kind != Some(AccountKind::User) {
                    return Err(Rejection::new(
                        422,
                        "not_refundable",
                        "only transfers between users' wallets can be refunded",
                    ));
                }
                let refunded = source.refunded.get(transfer_id).copied().unwrap_or(0);
                let remaining = original_amount - refunded;
                if amount.get() > remaining {
                    return Err(Rejection::new(
                        422,
                        "refund_exceeds_original",
                        format!("{remaining} of the original {original_amount} is left to refund"),
                    )
                    .with_details(json!({
                        "original": original_amount,
                        "refunded": refunded,
                        "remaining": remaining,
                        "requested": amount.get(),
                    })));
                }
                let (mut debit, mut credit) = legs(
                    *refund_id,
                    &source,
                    &target,
                    *amount,
                    EntryKind::Refund,
                    reference,
                    None,
                )?;
                for (_, e) in [&mut debit, &mut credit] {
                    if let Event::Wallet(WalletEvent::Debited(l) | WalletEvent::Credited(l)) = e {
                        l.refund_of = Some(*transfer_id);
                    }
                }
                let mut decision = self.transfer_decision(
                    vec![debit, credit],
                    *refund_id,
                    EntryKind::Refund,
                    *amount,
                    &source,
                    *payee,
                    *payer,
                    reference,
                );
                decision.answer["refund_of"] = json!(transfer_id);
                decision.answer["refunded_total"] = json!(refunded + amount.get());
                decision.answer["refundable_remaining"] = json!(remaining - amount.get());
                Ok(decision)
            }
            WalletCommand::OpenDispute {
                dispute_id,
                transfer_id,
                payee,
                payer,
                original_amount,
                currency,
                amount,
                reason,
            } => {
                if actor.role == Role::User {
                    return Err(Rejection::new(403, "forbidden", "admins open disputes"));
                }
                let source = states.wallet(&account_stream(*payee));
                let target = states.wallet(&account_stream(*payer));
                if !source.opened || !target.opened {
                    return Err(Rejection::new(
                        404,
                        "transfer_not_found",
                        "no such transfer",
                    ));
                }
                check_currency(&source, *currency)?;
                if source
                    .disputes
                    .values()
                    .any(|d| d.transfer_id == *transfer_id)
                {
                    return Err(Rejection::new(
                        409,
                        "dispute_exists",
                        "this transfer already has an open dispute",
                    ));
                }
                let disputable =
                    original_amount - source.refunded.get(transfer_id).copied().unwrap_or(0);
                let claimed = amount.map_or(disputable, Amount::get);
                if claimed <= 0 || claimed > disputable {
                    return Err(Rejection::new(
                        422,
                        "dispute_exceeds_original",
                        format!("{disputable} of the transfer is left to dispute"),
                    )
                    .with_details(
                        json!({ "remaining": disputable.max(0), "requested": claimed }),
                    ));
                }
                // Move aside what the balance allows now; the freeze keeps the rest from leaving.
                let held = claimed.min(source.available().max(0));
                let opened = WalletEvent::DisputeOpened {
                    dispute_id: *dispute_id,
                    transfer_id: *transfer_id,
                    payer: *payer,
                    held,
                    amount: claimed,
                    reason: reason.clone(),
                };
                let mut events = vec![(account_stream(*payee), Event::Wallet(opened))];
                if let Ok(held_amount) = Amount::new(held) {
                    let pool_id = disputes_account_id(*currency, *dispute_id);
                    let (opened_pool, pool) =
                        system_account(states, pool_id, *currency, AccountKind::SystemDisputes);
                    let (debit, credit) = legs(
                        *dispute_id,
                        &source,
                        &pool,
                        held_amount,
                        EntryKind::Dispute,
                        &Some(format!("dispute of {transfer_id}")),
                        None,
                    )?;
                    events.extend(opened_pool);
                    events.push(debit);
                    events.push(credit);
                }
                let after = evolved(&source, &events);
                Ok(Decision {
                    events,
                    status: 201,
                    answer: json!({
                        "dispute_id": dispute_id,
                        "transfer_id": transfer_id,
                        "status": "open",
                        "amount": claimed,
                        "held": held,
                        "frozen": true,
                        "balance": after.balance_json(),
                        "request": self.request_fields(),
                    }),
                    keys: vec![],
                })
            }
            WalletCommand::AddDisputeEvidence {
                dispute_id,
                payee,
                evidence,
            } => {
                let source = states.wallet(&account_stream(*payee));
                let mine = source.owner_id.is_some() && source.owner_id == actor.user_id;
                if !(mine || actor.role != Role::User) || !source.disputes.contains_key(dispute_id)
                {
                    return Err(Rejection::new(
                        404,
                        "dispute_not_found",
                        "no such open dispute",
                    ));
                }
                if evidence.trim().is_empty() || evidence.chars().count() > MAX_DISPUTE_TEXT {
                    return Err(Rejection::new(
                        422,
                        "invalid_evidence",
                        format!("evidence is 1 to {MAX_DISPUTE_TEXT} characters"),
                    ));
                }
                let added = WalletEvent::DisputeEvidenceAdded {
                    dispute_id: *dispute_id,
                    evidence: evidence.clone(),
                };
                Ok(Decision {
                    events: vec![(account_stream(*payee), Event::Wallet(added))],
                    status: 200,
                    answer: json!({ "dispute_id": dispute_id, "status": "open", "request": self.request_fields() }),
                    keys: vec![],
                })
            }
            WalletCommand::ResolveDispute {
                dispute_id,
                payee,
                payer,
                currency,
                outcome,
            } => {
                if actor.role == Role::User {
                    return Err(Rejection::new(403, "forbidden", "admins resolve disputes"));
                }
                let source = states.wallet(&account_stream(*payee));
                let Some(dispute) = source.disputes.get(dispute_id).cloned() else {
                    return Err(Rejection::new(
                        404,
                        "dispute_not_found",
                        "no such open dispute",
                    ));
                };
                if dispute.payer != *payer {
                    return Err(Rejection::new(
                        404,
                        "dispute_not_found",
                        "no such open dispute",
                    ));
                }
                let resolved = WalletEvent::DisputeResolved {
                    dispute_id: *dispute_id,
                    outcome: *outcome,
                    held: dispute.held,
                };
                let mut events = vec![(account_stream(*payee), Event::Wallet(resolved))];
                if let Ok(held) = Amount::new(dispute.held) {
                    let pool =
                        states.wallet(&account_stream(disputes_account_id(*currency, *dispute_id)));
                    let to = match outcome {
                        DisputeOutcome::Won => evolved(&source, &events),
                        DisputeOutcome::Lost => states.wallet(&account_stream(*payer)),
                    };
                    let (debit, credit) = legs(
                        leg_id(*dispute_id, outcome.as_str()),
                        &pool,
                        &to,
                        held,
                        EntryKind::Dispute,
                        &Some(format!("dispute {} {}", dispute_id, outcome.as_str())),
                        None,
                    )?;
                    events.push(debit);
                    events.push(credit);
                }
                let after = evolved(&source, &events);
                Ok(Decision {
                    events,
                    status: 200,
                    answer: json!({
                        "dispute_id": dispute_id,
                        "status": outcome.as_str(),
                        "moved": dispute.held,
                        "frozen": !after.disputes.is_empty(),
                        "balance": after.balance_json(),
                        "request": self.request_fields(),
                    }),
                    keys: vec![],
                })
            }
            WalletCommand::Linked {
                transfer_id,
                legs: linked,
                at,
            } => {
                if linked.is_empty() || linked.len() > MAX_LINKED_LEGS {
                    return Err(Rejection::new(
                        422,
                        "invalid_legs",
                        format!("a linked transfer has 1 to {MAX_LINKED_LEGS} legs"),
                    ));
                }
                // Each leg is decided on what the previous legs left; any refusal refuses them all.
                let mut working = states.clone();
                let mut events = vec![];
                let mut debited: BTreeMap<Uuid, i64> = BTreeMap::new();
                for (i, leg) in linked.iter().enumerate() {
                    let (source, target) =
                        payer_and_payee(actor, &working, leg.from, leg.to, leg.currency)
                            .map_err(|r| with_leg(r, i))?;
                    source
                        .check_daily(leg.amount.get(), *at)
                        .map_err(|r| with_leg(r, i))?;
                    let (debit, credit) = legs(
                        leg_id(*transfer_id, &i.to_string()),
                        &source,
                        &target,
                        leg.amount,
                        EntryKind::Transfer,
                        &leg.reference,
                        Some(*at),
                    )
                    .map_err(|r| with_leg(r, i))?;
                    *debited.entry(leg.from).or_default() += leg.amount.get();
                    let pair = vec![debit, credit];
                    working.apply(&pair);
                    events.extend(pair);
                }
                let first = working.wallet(&account_stream(linked[0].from));
                let legs_json: Vec<serde_json::Value> = linked
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        json!({
                            "leg_id": leg_id(*transfer_id, &i.to_string()),
                            "from_wallet": l.from, "to_wallet": l.to, "currency": l.currency,
                            "amount": l.amount, "reference": l.reference,
                        })
                    })
                    .collect();
                Ok(Decision {
                    events,
                    status: 201,
                    answer: json!({
                        "transfer_id": transfer_id,
                        "kind": "linked",
                        "status": "posted",
                        "legs": legs_json,
                        "debited": debited,
                        "balance": first.balance_json(),
                        "request": self.request_fields(),
                    }),
                    keys: vec![],
                })
            }
            WalletCommand::Withdraw {
                transfer_id,
                wallet_id,
                currency,
                amount,
                destination,
                at,
            } => {
                let source = owned_wallet(actor, states, *wallet_id)?;
                check_currency(&source, *currency)?;
                if let Some(max) = source.limits.max_withdraw_amount
                    && amount.get() > max
                {
                    return Err(Rejection::new(
                        422,
                        "max_withdraw_amount_exceeded",
                        format!("a single withdrawal from this wallet is at most {max}"),
                    )
                    .with_details(json!({
                        "limit": "max_withdraw_amount",
                        "limit_amount": max,
                        "remaining": max,
                        "requested": amount.get(),
                    })));
                }
                if let Some(list) = &source.limits.payout_allow_list
                    && !list.iter().any(|d| d == destination)
                {
                    return Err(Rejection::new(
                        422,
                        "payout_destination_not_allowed",
                        "the destination is not on this wallet's payout allow-list",
                    )
                    .with_details(json!({
                        "limit": "payout_allow_list",
                        "allowed": list,
                    })));
                }
                source.check_daily(amount.get(), *at)?;
                let float_id = float_account_id(*currency, *transfer_id);
                let (mut events, float) = float_account(states, float_id, *currency);
                let reference = Some(destination.clone());
                let (debit, credit) = legs(
                    *transfer_id,
                    &source,
                    &float,
                    *amount,
                    EntryKind::Withdrawal,
                    &reference,
                    Some(*at),
                )?;
                events.push(debit);
                events.push(credit);
                Ok(self.transfer_decision(
                    events,
                    *transfer_id,
                    EntryKind::Withdrawal,
                    *amount,
                    &source,
                    *wallet_id,
                    float_id,
                    &reference,
                ))
            }
            WalletCommand::PlaceHold {
                hold_id,
                from,
                to,
                currency,
                amount,
                reference,
                timeout_secs,
                at,
            } => {
                if !(1..=MAX_HOLD_SECS).contains(timeout_secs) {
                    return Err(Rejection::new(
                        422,
                        "invalid_timeout",
                        format!("timeout_secs must be between 1 and {MAX_HOLD_SECS}"),
                    ));
                }
                let (source, _target) = payer_and_payee(actor, states, *from, *to, *currency)?;
                source.check_daily(amount.get(), *at)?;
                if amount.get() > source.available() {
                    return Err(insufficient(&source, amount.get()));
                }
                let expires_at = *at + Duration::seconds(*timeout_secs);
                let placed = WalletEvent::HoldPlaced {
                    hold_id: *hold_id,
                    amount: amount.get(),
                    counterparty: *to,
                    reference: reference.clone(),
                    expires_at,
                    at: *at,
                    pending_after: source.pending + amount.get(),
                };
                let mut after = source.clone();
                after.evolve(&placed);
                Ok(Decision {
                    events: vec![(account_stream(*from), Event::Wallet(placed))],
                    status: 201,
                    answer: json!({
                        "hold_id": hold_id,
                        "status": "pending",
                        "amount": amount.get(),
                        "currency": currency,
                        "from_wallet": from,
                        "to_wallet": to,
                        "reference": reference,
                        "expires_at": expires_at,
                        "balance": after.balance_json(),
                        "request": self.request_fields(),
                    }),
                    keys: vec![],
                })
            }
            WalletCommand::PostHold {
                hold_id,
                from,
                to,
                amount,
                at,
            } => {
                let (source, target, hold) = open_hold(states, *hold_id, *from, *to, *at)?;
                not_frozen(&source)?;
                let payer = source.owner_id.is_some() && source.owner_id == actor.user_id;
                let payee = target.owner_id.is_some() && target.owner_id == actor.user_id;
                if !(payer || payee || actor.role == Role::Admin) {
                    return Err(hold_not_found());
                }
                let captured = amount.map_or(hold.amount, Amount::get);
                if captured > hold.amount {
                    return Err(Rejection::new(
                        422,
                        "post_exceeds_hold",
                        format!("the hold reserves {}; cannot post more", hold.amount),
                    )
                    .with_details(json!({ "held": hold.amount, "requested": captured })));
                }
                let released = WalletEvent::HoldReleased {
                    hold_id: *hold_id,
                    amount: hold.amount,
                    posted: captured,
                    end: HoldEnd::Posted,
                    pending_after: source.pending - hold.amount,
                };
                let mut after_release = source.clone();
                after_release.evolve(&released);
                let captured_amount = Amount::new(captured)
                    .map_err(|e| Rejection::new(422, "invalid_amount", e.to_string()))?;
                let (debit, credit) = legs(
                    *hold_id,
                    &after_release,
                    &target,
                    captured_amount,
                    EntryKind::Transfer,
                    &hold.reference,
                    None,
                )?;
                let events = vec![
                    (account_stream(*from), Event::Wallet(released)),
                    debit,
                    credit,
                ];
                let subject = if payee && !payer { &target } else { &source };
                Ok(self.hold_decision(events, *hold_id, "posted", captured, hold.amount, subject))
            }
            WalletCommand::VoidHold {
                hold_id,
                from,
                to,
                at,
            } => {
                let (source, target, hold) = open_hold(states, *hold_id, *from, *to, *at)?;
                let payee = target.owner_id.is_some() && target.owner_id == actor.user_id;
                if !(payee || actor.role == Role::Admin) {
                    let payer = source.owner_id.is_some() && source.owner_id == actor.user_id;
                    return Err(if payer {
                        Rejection::new(
                            403,
                            "forbidden",
                            "a hold guarantees the payee until it expires: only the payee may void it",
                        )
                    } else {
                        hold_not_found()
                    });
                }
                let released = WalletEvent::HoldReleased {
                    hold_id: *hold_id,
                    amount: hold.amount,
                    posted: 0,
                    end: HoldEnd::Voided,
                    pending_after: source.pending - hold.amount,
                };
                let events = vec![(account_stream(*from), Event::Wallet(released))];
                let subject = if payee { &target } else { &source };
                Ok(self.hold_decision(events, *hold_id, "voided", 0, hold.amount, subject))
            }
            WalletCommand::ExpireHold { hold_id, from, at } => {
                if actor.role != Role::System {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "holds expire by the scheduler only",
                    ));
                }
                let source = states.wallet(&account_stream(*from));
                let Some(hold) = source.holds.get(hold_id).cloned() else {
                    return Err(match source.ended.get(hold_id) {
                        Some(end) => hold_ended(*end),
                        None => hold_not_found(),
                    });
                };
                if *at < hold.expires_at {
                    return Err(Rejection::new(
                        409,
                        "hold_not_due",
                        "the hold has not reached its timeout",
                    )
                    .with_details(json!({ "expires_at": hold.expires_at })));
                }
                let released = WalletEvent::HoldReleased {
                    hold_id: *hold_id,
                    amount: hold.amount,
                    posted: 0,
                    end: HoldEnd::Expired,
                    pending_after: source.pending - hold.amount,
                };
                let events = vec![(account_stream(*from), Event::Wallet(released))];
                Ok(self.hold_decision(events, *hold_id, "expired", 0, hold.amount, &source))
            }
            WalletCommand::SetLimits {
                wallet_id,
                max_withdraw_amount,
                daily_spend_limit,
                payout_allow_list,
                at,
            } => {
                let wallet = states.wallet(&account_stream(*wallet_id));
                let mine = wallet.owner_id.is_some() && wallet.owner_id == actor.user_id;
                if !wallet.opened
                    || wallet.kind != Some(AccountKind::User)
                    || !(mine || actor.role == Role::Admin)
                {
                    return Err(not_found());
                }
                for (name, v) in [
                    ("max_withdraw_amount", max_withdraw_amount),
                    ("daily_spend_limit", daily_spend_limit),
                ] {
                    if v.is_some_and(|v| !(0..=MAX_AMOUNT).contains(&v)) {
                        return Err(Rejection::new(
                            422,
                            "invalid_limit",
                            format!("{name} must be between 0 and {MAX_AMOUNT}"),
                        ));
                    }
                }
                if payout_allow_list
                    .as_ref()
                    .is_some_and(|l| l.len() > MAX_ALLOW_LIST)
                {
                    return Err(Rejection::new(
                        422,
                        "invalid_limit",
                        format!("a payout allow-list holds at most {MAX_ALLOW_LIST} destinations"),
                    ));
                }
                let set = WalletEvent::LimitsSet {
                    max_withdraw_amount: *max_withdraw_amount,
                    daily_spend_limit: *daily_spend_limit,
                    payout_allow_list: payout_allow_list.clone(),
                };
                let mut after = wallet.clone();
                after.evolve(&set);
                Ok(Decision {
                    events: vec![(account_stream(*wallet_id), Event::Wallet(set))],
                    status: 200,
                    answer: json!({
                        "wallet_id": wallet_id,
                        "limits": after.limits_json(*at),
                        "balance": after.balance_json(),
                        "request": self.request_fields(),
                    }),
                    keys: vec![],
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn transfer_decision(
        &self,
        events: Vec<(StreamId, Event)>,
        transfer_id: Uuid,
        kind: EntryKind,
        amount: Amount,
        subject: &Account,
        from: Uuid,
        to: Uuid,
        reference: &Option<String>,
    ) -> Decision {
        let after = evolved(subject, &events);
        Decision {
            events,
            status: 201,
            answer: json!({
                "transfer_id": transfer_id,
                "kind": kind.as_str(),
                "status": "posted",
                "amount": amount.get(),
                "currency": subject.currency,
                "from_wallet": from,
                "to_wallet": to,
                "reference": reference,
                "balance": after.balance_json(),
                "request": self.request_fields(),
            }),
            keys: vec![],
        }
    }

    fn hold_decision(
        &self,
        events: Vec<(StreamId, Event)>,
        hold_id: Uuid,
        status: &str,
        posted: i64,
        held: i64,
        subject: &Account,
    ) -> Decision {
        let after = evolved(subject, &events);
        Decision {
            events,
            status: 200,
            answer: json!({
                "hold_id": hold_id,
                "status": status,
                "held": held,
                "posted": posted,
                "released": held - posted,
                "currency": subject.currency,
                "balance": after.balance_json(),
                "request": self.request_fields(),
            }),
            keys: vec![],
        }
    }
}

/// `subject` after the decided events on its own stream: the balance in the
/// answer is the wallet the caller acts on, after the move.
fn evolved(subject: &Account, events: &[(StreamId, Event)]) -> Account {
    let mut after = subject.clone();
    let stream = account_stream(subject.account_id);
    for (s, event) in events {
        if s == &stream
            && let Event::Wallet(e) = event
        {
            after.evolve(e);
        }
    }
    after
}

/// A leg's refusal, saying which leg.
fn with_leg(mut r: Rejection, i: usize) -> Rejection {
    match &mut r.details {
        serde_json::Value::Object(m) => {
            m.insert("leg".into(), i.into());
        }
        other => *other = json!({ "leg": i }),
    }
    r
}

fn hold_ended(end: HoldEnd) -> Rejection {
    Rejection::new(
        409,
        &format!("hold_already_{}", end.as_str()),
        format!("the hold is already {}", end.as_str()),
    )
}

/// The payer's account, the payee's and the open hold between them, refused
/// once the hold ended or its timeout passed (the expiry will release it).
fn open_hold(
    states: &StateSet,
    hold_id: Uuid,
    from: Uuid,
    to: Uuid,
    at: DateTime<Utc>,
) -> Result<(Account, Account, Hold), Rejection> {
    let source = states.wallet(&account_stream(from));
    let target = states.wallet(&account_stream(to));
    let Some(hold) = source.holds.get(&hold_id).cloned() else {
        return Err(match source.ended.get(&hold_id) {
            Some(end) => hold_ended(*end),
            None => hold_not_found(),
        });
    };
    if hold.counterparty != to || !target.opened {
        return Err(hold_not_found());
    }
    if at >= hold.expires_at {
        return Err(Rejection::new(
            409,
            "hold_expired",
            "the hold reached its timeout; it is being released",
        )
        .with_details(json!({ "expires_at": hold.expires_at })));
    }
    Ok((source, target, hold))
}

/// The actor's wallet `from` and a distinct user wallet `to`, both in `currency`.
fn payer_and_payee(
    actor: &Actor,
    states: &StateSet,
    from: Uuid,
    to: Uuid,
    currency: Currency,
) -> Result<(Account, Account), Rejection> {
    let source = owned_wallet(actor, states, from)?;
    check_currency(&source, currency)?;
    if from == to {
        return Err(Rejection::new(
            422,
            "same_wallet",
            "cannot transfer from a wallet to itself",
        ));
    }
    let target = states.wallet(&account_stream(to));
    // Only user wallets receive transfers; system accounts move through deposits and withdrawals.
    if !target.opened || target.kind != Some(AccountKind::User) {
        return Err(Rejection::new(
            404,
            "recipient_not_found",
            "no such recipient wallet",
        ));
    }
    if source.currency != target.currency {
        return Err(Rejection::new(
            422,
            "currency_mismatch",
            format!(
                "cannot move {} into a {} wallet; convert first",
                source.currency, target.currency
            ),
        ));
    }
    Ok((source, target))
}

fn check_currency(wallet: &Account, currency: Currency) -> Result<(), Rejection> {
    if wallet.currency == currency.code() {
        Ok(())
    } else {
        Err(Rejection::new(
            422,
            "currency_mismatch",
            format!("the wallet holds {}, not {currency}", wallet.currency),
        ))
    }
}

/// The actor's own opened wallet, which money may leave; someone else's is
/// "not found" (existence is private).
fn owned_wallet(actor: &Actor, states: &StateSet, wallet_id: Uuid) -> Result<Account, Rejection> {
    let wallet = states.wallet(&account_stream(wallet_id));
    if !wallet.opened || wallet.kind != Some(AccountKind::User) {
        return Err(not_found());
    }
    if wallet.owner_id != actor.user_id {
        return Err(not_found());
    }
    not_frozen(&wallet)?;
    Ok(wallet)
}

/// Refuse moving money out of an account with an open dispute.
fn not_frozen(wallet: &Account) -> Result<(), Rejection> {
    if wallet.disputes.is_empty() {
        return Ok(());
    }
    Err(Rejection::new(
        422,
        "account_frozen",
        "the wallet is frozen while a dispute on it is open",
    )
    .with_details(json!({ "disputes": wallet.disputes.keys().collect::<Vec<_>>() })))
}

/// The float shard's state, with the event that opens it if this is its first use.
fn float_account(
    states: &StateSet,
    float_id: Uuid,
    currency: Currency,
) -> (Vec<(StreamId, Event)>, Account) {
    system_account(states, float_id, currency, AccountKind::SystemFloat)
}

/// A system account's state, with the event that opens it on first use.
fn system_account(
    states: &StateSet,
    id: Uuid,
    currency: Currency,
    kind: AccountKind,
) -> (Vec<(StreamId, Event)>, Account) {
    let stream = account_stream(id);
    let mut float = states.wallet(&stream);
    if float.opened {
        return (vec![], float);
    }
    let opened = WalletEvent::AccountOpened {
        account_id: id,
        owner_id: None,
        currency: currency.code().to_owned(),
        kind,
        floor: None,
    };
    float.evolve(&opened);
    (vec![(stream, Event::Wallet(opened))], float)
}

fn insufficient(debited: &Account, amount: i64) -> Rejection {
    Rejection::new(
        422,
        "insufficient_funds",
        "the wallet's available balance is below the amount",
    )
    .with_details(json!({
        "available": debited.available(),
        "posted": debited.posted,
        "pending": debited.pending,
        "requested": amount,
    }))
}

/// An event with the stream it is appended to.
type Appended = (StreamId, Event);

/// The two legs of a transfer, checked against the debited account's floor
/// (money reserved by its open holds stays covered).
fn legs(
    transfer_id: Uuid,
    debited: &Account,
    credited: &Account,
    amount: Amount,
    kind: EntryKind,
    reference: &Option<String>,
    at: Option<DateTime<Utc>>,
) -> Result<(Appended, Appended), Rejection> {
    if debited.account_id == credited.account_id {
        return Err(Rejection::new(
            422,
            "same_wallet",
            "both legs of a transfer are on one account",
        ));
    }
    let amount = amount.get();
    let debited_after = debited.posted.checked_sub(amount).filter(|after| {
        debited
            .floor
            .is_none_or(|f| after.saturating_sub(debited.pending) >= f)
    });
    let Some(debited_after) = debited_after else {
        return Err(insufficient(debited, amount));
    };
    let credited_after = credited.posted.checked_add(amount).ok_or_else(|| {
        Rejection::new(
            422,
            "balance_overflow",
            "the receiving balance would overflow",
        )
    })?;
    let leg = |counterparty, balance_after| Leg {
        transfer_id,
        amount,
        kind,
        counterparty,
        reference: reference.clone(),
        balance_after,
        at,
        refund_of: None,
        fx: None,
    };
    Ok((
        (
            account_stream(debited.account_id),
            Event::Wallet(WalletEvent::Debited(leg(
                credited.account_id,
                debited_after,
            ))),
        ),
        (
            account_stream(credited.account_id),
            Event::Wallet(WalletEvent::Credited(leg(
                debited.account_id,
                credited_after,
            ))),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;

    fn user(id: Uuid) -> Actor {
        Actor {
            user_id: Some(id),
            role: Role::User,
        }
    }

    fn kes() -> Currency {
        "KES".parse().unwrap()
    }

    /// given: the events of `history` applied; when: `cmd`; then: the decision.
    fn run(
        states: &mut StateSet,
        actor: &Actor,
        cmd: WalletCommand,
    ) -> Result<Decision, Rejection> {
        crate::aggregate::decide_and_apply(states, actor, cmd)
    }

    fn funded(states: &mut StateSet, owner: Uuid, amount: i64) -> Uuid {
        run(
            states,
            &user(owner),
            WalletCommand::OpenWallet {
                owner_id: owner,
                currency: kes(),
            },
        )
        .unwrap();
        let wallet_id = user_wallet_id(owner, kes());
        if amount > 0 {
            let admin = Actor {
                user_id: None,
                role: Role::Admin,
            };
            let dep = WalletCommand::Deposit {
                transfer_id: Uuid::new_v4(),
                wallet_id,
                currency: kes(),
                amount: Amount::new(amount).unwrap(),
                reference: None,
            };
            run(states, &admin, dep).unwrap();
        }
        wallet_id
    }

    #[test]
    fn opening_a_wallet_twice_is_a_conflict() {
        let mut s = StateSet::default();
        let alice = Uuid::new_v4();
        funded(&mut s, alice, 0);
        let again = run(
            &mut s,
            &user(alice),
            WalletCommand::OpenWallet {
                owner_id: alice,
                currency: kes(),
            },
        );
        assert_eq!(again.unwrap_err().code, "wallet_exists");
    }

    #[test]
    fn a_transfer_above_the_balance_is_rejected_and_names_what_is_available() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 100);
        let b = funded(&mut s, bob, 0);
        let cmd = WalletCommand::Transfer {
            currency: kes(),
            transfer_id: Uuid::new_v4(),
            from: a,
            to: b,
            amount: Amount::new(101).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        let err = run(&mut s, &user(alice), cmd).unwrap_err();
        assert_eq!((err.status, err.code.as_str()), (422, "insufficient_funds"));
        assert_eq!(err.details["available"], 100);
    }

    #[test]
    fn nobody_spends_from_a_wallet_they_do_not_own() {
        let mut s = StateSet::default();
        let (alice, mallory) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 100);
        let m = funded(&mut s, mallory, 0);
        let cmd = WalletCommand::Transfer {
            currency: kes(),
            transfer_id: Uuid::new_v4(),
            from: a,
            to: m,
            amount: Amount::new(1).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        assert_eq!(run(&mut s, &user(mallory), cmd).unwrap_err().status, 404);
    }

    #[test]
    fn users_cannot_deposit() {
        let mut s = StateSet::default();
        let alice = Uuid::new_v4();
        let a = funded(&mut s, alice, 0);
        let cmd = WalletCommand::Deposit {
            transfer_id: Uuid::new_v4(),
            wallet_id: a,
            currency: kes(),
            amount: Amount::new(5).unwrap(),
            reference: None,
        };
        assert_eq!(run(&mut s, &user(alice), cmd).unwrap_err().status, 403);
    }

    #[test]
    fn a_transfer_names_its_currency_and_it_must_be_the_wallets() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 100);
        let b = funded(&mut s, bob, 0);
        let cmd = WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: b,
            currency: "JPY".parse().unwrap(),
            amount: Amount::new(10).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        assert_eq!(
            run(&mut s, &user(alice), cmd).unwrap_err().code,
            "currency_mismatch"
        );
    }

    #[test]
    fn system_accounts_receive_neither_transfers_nor_deposits() {
        let mut s = StateSet::default();
        let alice = Uuid::new_v4();
        let a = funded(&mut s, alice, 100); // this opens a float shard
        let float = s
            .clone()
            .into_inner()
            .into_values()
            .find_map(|l| match l.state {
                State::Wallet(acc) if acc.kind == Some(AccountKind::SystemFloat) => {
                    Some(acc.account_id)
                }
                _ => None,
            })
            .unwrap();
        let to_float = WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: float,
            currency: kes(),
            amount: Amount::new(1).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        assert_eq!(run(&mut s, &user(alice), to_float).unwrap_err().status, 404);
        let admin = Actor {
            user_id: None,
            role: Role::Admin,
        };
        let into_float = WalletCommand::Deposit {
            transfer_id: Uuid::new_v4(),
            wallet_id: float,
            currency: kes(),
            amount: Amount::new(1).unwrap(),
            reference: None,
        };
        assert_eq!(run(&mut s, &admin, into_float).unwrap_err().status, 404);
    }

    fn check_invariants(
        s: &StateSet,
        wallets: &[Uuid],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let mut sums: BTreeMap<String, i64> = BTreeMap::new();
        for l in s.clone().into_inner().values() {
            if let State::Wallet(a) = &l.state {
                *sums.entry(a.currency.clone()).or_default() += a.posted;
                let open: i64 = a.holds.values().map(|h| h.amount).sum();
                proptest::prop_assert_eq!(a.pending, open, "pending = Σ open holds");
                if let Some(floor) = a.floor {
                    proptest::prop_assert!(
                        a.posted - a.pending >= floor,
                        "{} below its floor",
                        a.account_id
                    );
                }
                let b = a.balance_json();
                proptest::prop_assert_eq!(
                    b["available"].as_i64(),
                    Some(b["posted"].as_i64().unwrap() - b["pending"].as_i64().unwrap())
                );
            }
        }
        for (currency, sum) in sums {
            proptest::prop_assert_eq!(sum, 0, "Σ posted over {} accounts", currency);
        }
        for w in wallets {
            proptest::prop_assert!(s.wallet(&account_stream(*w)).posted >= 0);
        }
        Ok(())
    }

    proptest::proptest! {
        /// Any sequence of deposits, transfers, withdrawals, holds, posts (partial
        /// too), voids, expiries and limit changes keeps, after every step: Σ = 0
        /// per currency, every wallet at or above its floor with its holds covered,
        /// pending = Σ open holds, available = posted − pending, spends within the
        /// daily limit over the last 24 h; and replaying the log gives the same state.
        #[test]
        fn money_is_conserved(ops in proptest::collection::vec((0u8..12, 0usize..4, 0usize..4, 1i64..500, 0i64..4000), 1..80)) {
            let mut s = StateSet::default();
            let owners: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
            let wallets: Vec<Uuid> = owners.iter().map(|o| funded(&mut s, *o, 0)).collect();
            let admin = Actor { user_id: None, role: Role::Admin };
            let system = Actor { user_id: None, role: Role::System };
            // The state once the wallets are open, and every event decided after it.
            let start = s.clone();
            let mut log: Vec<(StreamId, Event)> = vec![];
            let mut clock = Utc::now();
            let mut holds: Vec<(Uuid, usize, usize)> = vec![];
            // Accepted transfers (id, payer, payee, amount), to refund.
            let mut sent: Vec<(Uuid, usize, usize, i64)> = vec![];
            let mut disputes: Vec<(Uuid, usize, usize)> = vec![];
            let mut legs_sum = 0i64;
            for (op, i, j, amount, secs) in ops {
                clock += Duration::seconds(secs * 30);
                let amt = Amount::new(amount).unwrap();
                let id = Uuid::new_v4();
                let pick = holds.get(amount as usize % holds.len().max(1)).copied();
                let (actor, cmd) = match (op, pick) {
                    (0, _) => (admin.clone(), WalletCommand::Deposit { transfer_id: id, wallet_id: wallets[i], currency: kes(), amount: amt, reference: None }),
                    (1, _) => (user(owners[i]), WalletCommand::Transfer { transfer_id: id, from: wallets[i], to: wallets[j], currency: kes(), amount: amt, reference: None,
                        fee: (secs % 2 == 1).then(|| Amount::new(secs % 50 + 1).unwrap()), at: clock }),
                    (2, _) => (user(owners[i]), WalletCommand::Withdraw { transfer_id: id, wallet_id: wallets[i], currency: kes(), amount: amt, destination: "bank:1".into(), at: clock }),
                    (3, _) => {
                        holds.push((id, i, j));
                        (user(owners[i]), WalletCommand::PlaceHold { hold_id: id, from: wallets[i], to: wallets[j], currency: kes(), amount: amt, reference: None, timeout_secs: secs * 20 + 1, at: clock })
                    }
                    (4, Some((h, a, b))) => (user(owners[b]), WalletCommand::PostHold { hold_id: h, from: wallets[a], to: wallets[b], amount: (secs % 2 == 0).then_some(Amount::new(amount.div_euclid(3).max(1)).unwrap()), at: clock }),
                    (5, Some((h, a, b))) => (user(owners[b]), WalletCommand::VoidHold { hold_id: h, from: wallets[a], to: wallets[b], at: clock }),
                    (6, Some((h, a, _))) => (system.clone(), WalletCommand::ExpireHold { hold_id: h, from: wallets[a], at: clock }),
                    (7, _) => (user(owners[i]), WalletCommand::SetLimits { wallet_id: wallets[i], max_withdraw_amount: Some(amount), daily_spend_limit: (secs % 3 != 0).then_some(secs), payout_allow_list: None, at: clock }),
                    (10, _) if !sent.is_empty() => {
                        let (t, a, b, original) = sent[secs as usize % sent.len()];
                        disputes.push((id, a, b));
                        (admin.clone(), WalletCommand::OpenDispute { dispute_id: id, transfer_id: t, payee: wallets[b], payer: wallets[a],
                            original_amount: original, currency: kes(), amount: None, reason: "chargeback".into() })
                    }
                    (11, _) if !disputes.is_empty() => {
                        let (d, a, b) = disputes[secs as usize % disputes.len()];
                        let outcome = if amount % 2 == 0 { DisputeOutcome::Won } else { DisputeOutcome::Lost };
                        (admin.clone(), WalletCommand::ResolveDispute { dispute_id: d, payee: wallets[b], payer: wallets[a], currency: kes(), outcome })
                    }
                    (9, _) if !sent.is_empty() => {
                        let (t, a, b, original) = sent[secs as usize % sent.len()];
                        (user(owners[b]), WalletCommand::Refund { refund_id: id, transfer_id: t, payee: wallets[b], payer: wallets[a],
                            original_amount: original, currency: kes(), amount: Amount::new(amount % 200 + 1).unwrap(), reference: None })
                    }
                    (8, _) if secs % 2 == 0 => (admin.clone(), WalletCommand::Deposit { transfer_id: id, wallet_id: wallets[j], currency: kes(), amount: amt, reference: None }),
                    // A split: two legs from one wallet that commit or fail together.
                    _ => (user(owners[i]), WalletCommand::Linked { transfer_id: id, at: clock, legs: vec![
                        LinkedLeg { from: wallets[i], to: wallets[j], currency: kes(), amount: amt, reference: None },
                        LinkedLeg { from: wallets[i], to: wallets[(j + 1) % 4], currency: kes(), amount: Amount::new(secs + 1).unwrap(), reference: None },
                    ] }),
                };
                let transfer = match &cmd {
                    WalletCommand::Transfer { from, to, amount, .. } if from != to => Some((id, i, j, amount.get())),
                    _ => None,
                };
                if let Ok(d) = run(&mut s, &actor, cmd) {
                    sent.extend(transfer);
                    for (_, e) in &d.events {
                        match e {
                            Event::Wallet(WalletEvent::Debited(l)) => legs_sum -= l.amount,
                            Event::Wallet(WalletEvent::Credited(l)) => legs_sum += l.amount,
                            _ => {}
                        }
                    }
                    log.extend(d.events);
                }
                proptest::prop_assert_eq!(legs_sum, 0);
                check_invariants(&s, &wallets)?;
                // No transfer is ever refunded above what it moved.
                for (t, _, b, original) in &sent {
                    let refunded = s.wallet(&account_stream(wallets[*b])).refunded.get(t).copied().unwrap_or(0);
                    proptest::prop_assert!(refunded <= *original);
                }
            }
            // Replaying the log from the opened wallets gives the same states.
            let mut replayed = start;
            replayed.apply(&log);
            for (stream, loaded) in s.clone().into_inner().into_iter().filter(|(_, l)| l.version > 0) {
                let again = replayed.get(&stream).map(|l| l.state.clone());
                proptest::prop_assert_eq!(again, Some(loaded.state));
            }
        }

        /// Spends decided one after another against one wallet with a daily
        /// limit never take its last 24 h above the limit or its balance below 0.
        #[test]
        fn a_daily_limit_is_never_exceeded(spends in proptest::collection::vec((1i64..400, 0i64..7200, proptest::bool::ANY), 1..120), limit in 1i64..3000) {
            let mut s = StateSet::default();
            let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
            let a = funded(&mut s, alice, 5_000);
            let b = funded(&mut s, bob, 0);
            let mut clock = Utc::now();
            run(&mut s, &user(alice), WalletCommand::SetLimits { wallet_id: a, max_withdraw_amount: None, daily_spend_limit: Some(limit), payout_allow_list: None, at: clock }).unwrap();
            let mut accepted: Vec<(DateTime<Utc>, i64)> = vec![];
            for (amount, secs, hold) in spends {
                clock += Duration::seconds(secs * 10);
                let amt = Amount::new(amount).unwrap();
                let cmd = if hold {
                    WalletCommand::PlaceHold { hold_id: Uuid::new_v4(), from: a, to: b, currency: kes(), amount: amt, reference: None, timeout_secs: 60, at: clock }
                } else {
                    WalletCommand::Transfer { transfer_id: Uuid::new_v4(), from: a, to: b, currency: kes(), amount: amt, reference: None, fee: None, at: clock }
                };
                match run(&mut s, &user(alice), cmd) {
                    Ok(_) => accepted.push((clock, amount)),
                    Err(e) => proptest::prop_assert!(
                        ["daily_spend_limit_exceeded", "insufficient_funds"].contains(&e.code.as_str()), "{}", e.code),
                }
                let window: i64 = accepted.iter().filter(|(t, _)| *t > clock - Duration::hours(24)).map(|(_, x)| x).sum();
                proptest::prop_assert!(window <= limit, "{} spent in 24 h under a limit of {}", window, limit);
                check_invariants(&s, &[a, b])?;
            }
        }
    }

    #[test]
    fn a_hold_posts_in_part_and_the_rest_returns_to_available() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 1_000);
        let b = funded(&mut s, bob, 0);
        let at = Utc::now();
        let hold_id = Uuid::new_v4();
        let d = run(
            &mut s,
            &user(alice),
            WalletCommand::PlaceHold {
                hold_id,
                from: a,
                to: b,
                currency: kes(),
                amount: Amount::new(600).unwrap(),
                reference: None,
                timeout_secs: 60,
                at,
            },
        )
        .unwrap();
        assert_eq!(
            d.answer["balance"],
            json!({"wallet_id": a, "currency": "KES", "posted": 1000, "pending": 600, "available": 400})
        );
        // The reserved money cannot be spent twice.
        let spend = WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(401).unwrap(),
            reference: None,
            fee: None,
            at,
        };
        assert_eq!(
            run(&mut s, &user(alice), spend).unwrap_err().code,
            "insufficient_funds"
        );
        // The payer cannot void what they promised; the payee posts 250 of it.
        let void = WalletCommand::VoidHold {
            hold_id,
            from: a,
            to: b,
            at,
        };
        assert_eq!(
            run(&mut s, &user(alice), void.clone()).unwrap_err().status,
            403
        );
        let post = WalletCommand::PostHold {
            hold_id,
            from: a,
            to: b,
            amount: Some(Amount::new(250).unwrap()),
            at,
        };
        let d = run(&mut s, &user(bob), post.clone()).unwrap();
        assert_eq!(
            (d.answer["posted"].as_i64(), d.answer["released"].as_i64()),
            (Some(250), Some(350))
        );
        assert_eq!(
            d.answer["balance"]["posted"], 250,
            "the payee sees their own balance"
        );
        let alice_after = s.wallet(&account_stream(a));
        assert_eq!(
            (
                alice_after.posted,
                alice_after.pending,
                alice_after.available()
            ),
            (750, 0, 750)
        );
        assert_eq!(
            run(&mut s, &user(bob), post).unwrap_err().code,
            "hold_already_posted"
        );
        assert_eq!(
            run(&mut s, &user(bob), void).unwrap_err().code,
            "hold_already_posted"
        );
    }

    #[test]
    fn a_hold_expires_once_and_only_when_due_and_only_by_the_system() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 100);
        let b = funded(&mut s, bob, 0);
        let at = Utc::now();
        let hold_id = Uuid::new_v4();
        run(
            &mut s,
            &user(alice),
            WalletCommand::PlaceHold {
                hold_id,
                from: a,
                to: b,
                currency: kes(),
                amount: Amount::new(100).unwrap(),
                reference: None,
                timeout_secs: 60,
                at,
            },
        )
        .unwrap();
        let system = Actor {
            user_id: None,
            role: Role::System,
        };
        let early = WalletCommand::ExpireHold {
            hold_id,
            from: a,
            at: at + Duration::seconds(59),
        };
        assert_eq!(
            run(&mut s, &system, early).unwrap_err().code,
            "hold_not_due"
        );
        let due = WalletCommand::ExpireHold {
            hold_id,
            from: a,
            at: at + Duration::seconds(60),
        };
        assert_eq!(
            run(&mut s, &user(alice), due.clone()).unwrap_err().status,
            403
        );
        // A post after the timeout is refused even before the scheduler fires.
        let late = WalletCommand::PostHold {
            hold_id,
            from: a,
            to: b,
            amount: None,
            at: at + Duration::seconds(61),
        };
        assert_eq!(
            run(&mut s, &user(bob), late).unwrap_err().code,
            "hold_expired"
        );
        run(&mut s, &system, due.clone()).unwrap();
        assert_eq!(
            run(&mut s, &system, due).unwrap_err().code,
            "hold_already_expired"
        );
        assert_eq!(s.wallet(&account_stream(a)).available(), 100);
    }

    #[test]
    fn limits_name_themselves_and_what_remains() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 10_000);
        let b = funded(&mut s, bob, 0);
        let at = Utc::now();
        run(
            &mut s,
            &user(alice),
            WalletCommand::SetLimits {
                wallet_id: a,
                max_withdraw_amount: Some(500),
                daily_spend_limit: Some(1_000),
                payout_allow_list: Some(vec!["mpesa:+254700000001".into()]),
                at,
            },
        )
        .unwrap();
        let w = |amount: i64, dest: &str, at| WalletCommand::Withdraw {
            transfer_id: Uuid::new_v4(),
            wallet_id: a,
            currency: kes(),
            amount: Amount::new(amount).unwrap(),
            destination: dest.into(),
            at,
        };
        let e = run(&mut s, &user(alice), w(501, "mpesa:+254700000001", at)).unwrap_err();
        assert_eq!(
            (
                e.code.as_str(),
                &e.details["limit"],
                &e.details["remaining"]
            ),
            (
                "max_withdraw_amount_exceeded",
                &json!("max_withdraw_amount"),
                &json!(500)
            )
        );
        let e = run(&mut s, &user(alice), w(10, "bank:evil", at)).unwrap_err();
        assert_eq!(e.code, "payout_destination_not_allowed");
        run(&mut s, &user(alice), w(500, "mpesa:+254700000001", at)).unwrap();
        let t = WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(501).unwrap(),
            reference: None,
            fee: None,
            at,
        };
        let e = run(&mut s, &user(alice), t).unwrap_err();
        assert_eq!(
            (
                e.code.as_str(),
                &e.details["remaining"],
                &e.details["spent"]
            ),
            ("daily_spend_limit_exceeded", &json!(500), &json!(500))
        );
        // 24 hours later the window has room again.
        let later = at + Duration::hours(24) + Duration::seconds(1);
        let t = WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(1_000).unwrap(),
            reference: None,
            fee: None,
            at: later,
        };
        run(&mut s, &user(alice), t).unwrap();
    }

    #[test]
    fn a_conversion_is_two_transfers_through_desks_at_the_recorded_rate() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let usd: Currency = "USD".parse().unwrap();
        let k = funded(&mut s, alice, 0);
        run(
            &mut s,
            &user(alice),
            WalletCommand::OpenWallet {
                owner_id: alice,
                currency: usd,
            },
        )
        .unwrap();
        let u = user_wallet_id(alice, usd);
        let admin = Actor {
            user_id: None,
            role: Role::Admin,
        };
        let dep = WalletCommand::Deposit {
            transfer_id: Uuid::new_v4(),
            wallet_id: u,
            currency: usd,
            amount: Amount::new(10_000).unwrap(),
            reference: None,
        };
        run(&mut s, &admin, dep).unwrap();
        let bob_kes = funded(&mut s, bob, 0);
        let convert =
            |id, from, to, from_currency, to_currency, amount: i64| WalletCommand::Convert {
                conversion_id: id,
                from,
                to,
                from_currency,
                to_currency,
                amount: Amount::new(amount).unwrap(),
                rate_micros: 129_250_000,
                quoted_rate_micros: None,
                at: Utc::now(),
            };
        // Into someone else's wallet, within one currency, above the balance: refused, nothing moves.
        let e = run(
            &mut s,
            &user(alice),
            convert(Uuid::new_v4(), u, bob_kes, usd, kes(), 100),
        )
        .unwrap_err();
        assert_eq!(e.code, "recipient_not_found");
        let e = run(
            &mut s,
            &user(alice),
            convert(Uuid::new_v4(), u, u, usd, usd, 100),
        )
        .unwrap_err();
        assert_eq!(e.code, "same_currency");
        let e = run(
            &mut s,
            &user(alice),
            convert(Uuid::new_v4(), u, k, usd, kes(), 10_001),
        )
        .unwrap_err();
        assert_eq!(e.code, "insufficient_funds");
        let id = Uuid::new_v4();
        let d = run(&mut s, &user(alice), convert(id, u, k, usd, kes(), 4_000)).unwrap();
        // 40.00 USD at 129.25 → 5,170.00 KES.
        assert_eq!(
            (
                &d.answer["bought"]["amount"],
                &d.answer["balance"]["posted"],
                &d.answer["to_balance"]["posted"]
            ),
            (&json!(517_000), &json!(6_000), &json!(517_000))
        );
        // Each currency balances through its own desk; every leg carries the rate.
        let sell = s.wallet(&account_stream(fx_account_id(usd, id)));
        let buy = s.wallet(&account_stream(fx_account_id(kes(), id)));
        assert_eq!(
            (sell.kind, sell.posted, buy.kind, buy.posted),
            (
                Some(AccountKind::SystemFx),
                4_000,
                Some(AccountKind::SystemFx),
                -517_000
            )
        );
        let rates: Vec<i64> = d
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Wallet(WalletEvent::Debited(l) | WalletEvent::Credited(l)) => {
                    l.fx.as_ref().map(|f| f.rate_micros)
                }
                _ => None,
            })
            .collect();
        assert_eq!(rates, vec![129_250_000; 4]);
        // Not a spend: the daily window is untouched.
        assert_eq!(
            s.wallet(&account_stream(u))
                .spent_since(Utc::now() - Duration::hours(1)),
            0
        );
        // One cent of JPY-scale rounding buys nothing at a tiny rate: refused, not a zero leg.
        let mut tiny = convert(Uuid::new_v4(), u, k, usd, kes(), 1);
        if let WalletCommand::Convert { rate_micros, .. } = &mut tiny {
            *rate_micros = 1;
        }
        assert_eq!(
            run(&mut s, &user(alice), tiny).unwrap_err().code,
            "amount_too_small"
        );
        // A quote the rate moved away from is refused.
        let mut moved = convert(Uuid::new_v4(), u, k, usd, kes(), 100);
        if let WalletCommand::Convert {
            quoted_rate_micros, ..
        } = &mut moved
        {
            *quoted_rate_micros = Some(129_000_000);
        }
        assert_eq!(
            run(&mut s, &user(alice), moved).unwrap_err().code,
            "rate_changed"
        );
    }

    #[test]
    fn a_fee_goes_to_a_fee_shard_and_counts_against_balance_and_limit() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 1_000);
        let b = funded(&mut s, bob, 0);
        let at = Utc::now();
        let t = |amount: i64, fee: i64| WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(amount).unwrap(),
            reference: None,
            fee: Some(Amount::new(fee).unwrap()),
            at,
        };
        // 995 + 10 does not fit in 1,000: nothing moves.
        let e = run(&mut s, &user(alice), t(995, 10)).unwrap_err();
        assert_eq!(
            (e.code.as_str(), &e.details["requested"]),
            ("insufficient_funds", &json!(1005))
        );
        let id = Uuid::new_v4();
        let cmd = WalletCommand::Transfer {
            transfer_id: id,
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(900).unwrap(),
            reference: None,
            fee: Some(Amount::new(10).unwrap()),
            at,
        };
        let d = run(&mut s, &user(alice), cmd).unwrap();
        assert_eq!(
            (&d.answer["fee"], &d.answer["balance"]["posted"]),
            (&json!(10), &json!(90))
        );
        let fees = s.wallet(&account_stream(fee_account_id(kes(), id)));
        assert_eq!(
            (fees.kind, fees.posted),
            (Some(AccountKind::SystemFees), 10)
        );
        assert_eq!(s.wallet(&account_stream(a)).spent_since(at), 910);
    }

    #[test]
    fn linked_legs_commit_or_fail_as_one() {
        let mut s = StateSet::default();
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 100);
        let b = funded(&mut s, bob, 0);
        let c = funded(&mut s, carol, 0);
        let leg = |to, amount| LinkedLeg {
            from: a,
            to,
            currency: kes(),
            amount: Amount::new(amount).unwrap(),
            reference: None,
        };
        let split = |x, y| WalletCommand::Linked {
            transfer_id: Uuid::new_v4(),
            legs: vec![leg(b, x), leg(c, y)],
            at: Utc::now(),
        };
        let e = run(&mut s, &user(alice), split(60, 41)).unwrap_err();
        assert_eq!(
            (e.code.as_str(), &e.details["leg"]),
            ("insufficient_funds", &json!(1))
        );
        assert_eq!(
            s.wallet(&account_stream(b)).posted,
            0,
            "the first leg did not commit alone"
        );
        let d = run(&mut s, &user(alice), split(60, 40)).unwrap();
        assert_eq!(d.answer["balance"]["posted"], 0);
        assert_eq!(
            (
                s.wallet(&account_stream(b)).posted,
                s.wallet(&account_stream(c)).posted
            ),
            (60, 40)
        );
    }

    #[test]
    fn refunds_are_partial_multiple_and_never_above_the_original() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 1_000);
        let b = funded(&mut s, bob, 500);
        let t = Uuid::new_v4();
        let pay = WalletCommand::Transfer {
            transfer_id: t,
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(300).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        run(&mut s, &user(alice), pay).unwrap();
        let refund = |amount: i64| WalletCommand::Refund {
            refund_id: Uuid::new_v4(),
            transfer_id: t,
            payee: b,
            payer: a,
            original_amount: 300,
            currency: kes(),
            amount: Amount::new(amount).unwrap(),
            reference: None,
        };
        // Only the payee refunds.
        assert_eq!(
            run(&mut s, &user(alice), refund(10)).unwrap_err().status,
            404
        );
        let d = run(&mut s, &user(bob), refund(100)).unwrap();
        assert_eq!(
            (
                &d.answer["refunded_total"],
                &d.answer["refundable_remaining"]
            ),
            (&json!(100), &json!(200))
        );
        run(&mut s, &user(bob), refund(150)).unwrap();
        let e = run(&mut s, &user(bob), refund(51)).unwrap_err();
        assert_eq!(
            (e.code.as_str(), &e.details["remaining"]),
            ("refund_exceeds_original", &json!(50))
        );
        run(&mut s, &user(bob), refund(50)).unwrap();
        assert_eq!(s.wallet(&account_stream(a)).posted, 1_000);
        assert_eq!(s.wallet(&account_stream(b)).posted, 500);
    }

    #[test]
    fn a_dispute_freezes_the_payee_and_ends_as_a_ledger_move() {
        let mut s = StateSet::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = funded(&mut s, alice, 1_000);
        let b = funded(&mut s, bob, 0);
        let admin = Actor {
            user_id: None,
            role: Role::Admin,
        };
        let pay = |t| WalletCommand::Transfer {
            transfer_id: t,
            from: a,
            to: b,
            currency: kes(),
            amount: Amount::new(300).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        let (t1, t2) = (Uuid::new_v4(), Uuid::new_v4());
        run(&mut s, &user(alice), pay(t1)).unwrap();
        run(&mut s, &user(alice), pay(t2)).unwrap();
        let open = |d, t| WalletCommand::OpenDispute {
            dispute_id: d,
            transfer_id: t,
            payee: b,
            payer: a,
            original_amount: 300,
            currency: kes(),
            amount: None,
            reason: "not delivered".into(),
        };
        let (d1, d2) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            run(&mut s, &user(alice), open(d1, t1)).unwrap_err().status,
            403
        );
        let d = run(&mut s, &admin, open(d1, t1)).unwrap();
        assert_eq!(
            (&d.answer["held"], &d.answer["balance"]["posted"]),
            (&json!(300), &json!(300))
        );
        assert_eq!(
            run(&mut s, &admin, open(Uuid::new_v4(), t1))
                .unwrap_err()
                .code,
            "dispute_exists"
        );
        run(&mut s, &admin, open(d2, t2)).unwrap();
        // Frozen: nothing leaves the payee's wallet.
        let spend = WalletCommand::Withdraw {
            transfer_id: Uuid::new_v4(),
            wallet_id: b,
            currency: kes(),
            amount: Amount::new(1).unwrap(),
            destination: "bank:1".into(),
            at: Utc::now(),
        };
        assert_eq!(
            run(&mut s, &user(bob), spend.clone()).unwrap_err().code,
            "account_frozen"
        );
        let evidence = WalletCommand::AddDisputeEvidence {
            dispute_id: d1,
            payee: b,
            evidence: "courier receipt 123".into(),
        };
        run(&mut s, &user(bob), evidence).unwrap();
        let resolve = |d, outcome| WalletCommand::ResolveDispute {
            dispute_id: d,
            payee: b,
            payer: a,
            currency: kes(),
            outcome,
        };
        let r = run(&mut s, &admin, resolve(d1, DisputeOutcome::Lost)).unwrap();
        assert_eq!(r.answer["frozen"], true, "another dispute is still open");
        assert_eq!(s.wallet(&account_stream(a)).posted, 700);
        let r = run(&mut s, &admin, resolve(d2, DisputeOutcome::Won)).unwrap();
        assert_eq!(
            (&r.answer["frozen"], &r.answer["balance"]["posted"]),
            (&json!(false), &json!(300))
        );
        assert_eq!(
            run(&mut s, &admin, resolve(d2, DisputeOutcome::Won))
                .unwrap_err()
                .code,
            "dispute_not_found"
        );
        // The lost dispute counts as refunded: nothing more to refund on t1.
        let refund = WalletCommand::Refund {
            refund_id: Uuid::new_v4(),
            transfer_id: t1,
            payee: b,
            payer: a,
            original_amount: 300,
            currency: kes(),
            amount: Amount::new(1).unwrap(),
            reference: None,
        };
        assert_eq!(
            run(&mut s, &user(bob), refund).unwrap_err().code,
            "refund_exceeds_original"
        );
        run(&mut s, &user(bob), spend).unwrap();
    }

    #[test]
    fn a_rejection_carries_the_request_so_a_reused_id_can_name_the_differing_field() {
        let mut s = StateSet::default();
        let alice = Uuid::new_v4();
        let a = funded(&mut s, alice, 0);
        let t = WalletCommand::Transfer {
            transfer_id: Uuid::new_v4(),
            from: a,
            to: Uuid::new_v4(),
            currency: kes(),
            amount: Amount::new(5).unwrap(),
            reference: None,
            fee: None,
            at: Utc::now(),
        };
        let e = run(&mut s, &user(alice), t).unwrap_err();
        assert_eq!(e.details["request"]["amount"], 5);
    }
}
