//! The wallet: ledger accounts (one stream each) and the commands that move money.
//!
//! Every movement is a transfer of two legs on two account streams, decided
//! against both accounts' states and appended in one transaction:
//! the debited account's floor is checked on its current version, so two
//! spends decided on the same stale balance cannot both commit (the second
//! append hits the unique `(stream_id, version)` key and is decided again).

use events::StreamId;
use events::wallet::{ACCOUNT, AccountKind, DOMAIN, EntryKind, Leg, WalletEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::money::{Amount, Currency};
use crate::{Actor, Decision, Rejection, Role, StateSet};
use events::Event;

/// How many shards the provider float of each currency is split into, so that
/// deposits and withdrawals do not all queue on one account stream.
pub const FLOAT_SHARDS: u128 = 16;

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

/// The stream of ledger account `account_id`.
pub fn account_stream(account_id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, ACCOUNT, &account_id.to_string())
        .expect("a uuid is a valid subject token")
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
            WalletEvent::Debited(leg) | WalletEvent::Credited(leg) => {
                self.posted = leg.balance_after
            }
        }
    }

    /// What can be spent now: posted less pending debits (no holds yet) less the floor.
    pub fn available(&self) -> i64 {
        match self.floor {
            Some(floor) => self.posted.saturating_sub(floor),
            None => i64::MAX,
        }
    }

    fn balance_json(&self) -> serde_json::Value {
        json!({
            "wallet_id": self.account_id,
            "currency": self.currency,
            "posted": self.posted,
            "pending": 0,
            "available": self.posted,
        })
    }
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
    },
}

fn not_found() -> Rejection {
    Rejection::new(404, "wallet_not_found", "no such wallet")
}

impl WalletCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            WalletCommand::OpenWallet { .. } => "wallet.OpenWallet",
            WalletCommand::Deposit { .. } => "wallet.Deposit",
            WalletCommand::Transfer { .. } => "wallet.Transfer",
            WalletCommand::Withdraw { .. } => "wallet.Withdraw",
        }
    }

    /// The account the command is addressed to.
    pub fn target(&self) -> StreamId {
        match self {
            WalletCommand::OpenWallet { owner_id, currency } => {
                account_stream(user_wallet_id(*owner_id, *currency))
            }
            WalletCommand::Deposit { wallet_id, .. }
            | WalletCommand::Withdraw { wallet_id, .. } => account_stream(*wallet_id),
            WalletCommand::Transfer { from, .. } => account_stream(*from),
        }
    }

    /// Every account stream the decision reads.
    pub fn streams(&self) -> Vec<StreamId> {
        match self {
            WalletCommand::OpenWallet { .. } => vec![self.target()],
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
            WalletCommand::Transfer { from, to, .. } => {
                vec![account_stream(*from), account_stream(*to)]
            }
        }
    }

    /// Decide against the loaded account states.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
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
                )?;
                events.push(debit);
                events.push(credit);
                Ok(transfer_decision(
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
            } => {
                let source = owned_wallet(actor, states, *from)?;
                check_currency(&source, *currency)?;
                if from == to {
                    return Err(Rejection::new(
                        422,
                        "same_wallet",
                        "cannot transfer from a wallet to itself",
                    ));
                }
                let target = states.wallet(&account_stream(*to));
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
                let (debit, credit) = legs(
                    *transfer_id,
                    &source,
                    &target,
                    *amount,
                    EntryKind::Transfer,
                    reference,
                )?;
                Ok(transfer_decision(
                    vec![debit, credit],
                    *transfer_id,
                    EntryKind::Transfer,
                    *amount,
                    &source,
                    *from,
                    *to,
                    reference,
                ))
            }
            WalletCommand::Withdraw {
                transfer_id,
                wallet_id,
                currency,
                amount,
                destination,
            } => {
                let source = owned_wallet(actor, states, *wallet_id)?;
                check_currency(&source, *currency)?;
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
                )?;
                events.push(debit);
                events.push(credit);
                Ok(transfer_decision(
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
        }
    }
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

/// The actor's own opened wallet; someone else's is "not found" (existence is private).
fn owned_wallet(actor: &Actor, states: &StateSet, wallet_id: Uuid) -> Result<Account, Rejection> {
    let wallet = states.wallet(&account_stream(wallet_id));
    if !wallet.opened || wallet.kind != Some(AccountKind::User) {
        return Err(not_found());
    }
    if wallet.owner_id != actor.user_id {
        return Err(not_found());
    }
    Ok(wallet)
}

/// The float shard's state, with the event that opens it if this is its first use.
fn float_account(
    states: &StateSet,
    float_id: Uuid,
    currency: Currency,
) -> (Vec<(StreamId, Event)>, Account) {
    let stream = account_stream(float_id);
    let mut float = states.wallet(&stream);
    if float.opened {
        return (vec![], float);
    }
    let opened = WalletEvent::AccountOpened {
        account_id: float_id,
        owner_id: None,
        currency: currency.code().to_owned(),
        kind: AccountKind::SystemFloat,
        floor: None,
    };
    float.evolve(&opened);
    (vec![(stream, Event::Wallet(opened))], float)
}

/// An event with the stream it is appended to.
type Appended = (StreamId, Event);

/// The two legs of a transfer, checked against the debited account's floor.
fn legs(
    transfer_id: Uuid,
    debited: &Account,
    credited: &Account,
    amount: Amount,
    kind: EntryKind,
    reference: &Option<String>,
) -> Result<(Appended, Appended), Rejection> {
    if debited.account_id == credited.account_id {
        return Err(Rejection::new(
            422,
            "same_wallet",
            "both legs of a transfer are on one account",
        ));
    }
    let amount = amount.get();
    let debited_after = debited
        .posted
        .checked_sub(amount)
        .filter(|after| debited.floor.is_none_or(|f| *after >= f));
    let Some(debited_after) = debited_after else {
        return Err(Rejection::new(
            422,
            "insufficient_funds",
            "the wallet's available balance is below the amount",
        )
        .with_details(json!({ "available": debited.available(), "requested": amount })));
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

#[allow(clippy::too_many_arguments)]
fn transfer_decision(
    events: Vec<(StreamId, Event)>,
    transfer_id: Uuid,
    kind: EntryKind,
    amount: Amount,
    subject: &Account,
    from: Uuid,
    to: Uuid,
    reference: &Option<String>,
) -> Decision {
    // The balance in the answer is the wallet the caller acts on, after the move.
    let mut after = subject.clone();
    for (stream, event) in &events {
        if stream == &account_stream(subject.account_id)
            && let Event::Wallet(e) = event
        {
            after.evolve(e);
        }
    }
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
        }),
        keys: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Loaded, State};

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
        for s in cmd.streams() {
            if !states.contains(&s) {
                states.insert(
                    s.clone(),
                    Loaded {
                        version: 0,
                        state: State::empty_for(&s).unwrap(),
                    },
                );
            }
        }
        let d = cmd.decide(actor, states)?;
        states.apply(&d.events);
        Ok(d)
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

    proptest::proptest! {
        /// Any sequence of deposits, transfers and withdrawals keeps Σ = 0 over all
        /// accounts, keeps every user wallet at or above 0, and the events'
        /// `balance_after` always equals the running sum of the legs.
        #[test]
        fn money_is_conserved(ops in proptest::collection::vec((0u8..3, 0usize..4, 0usize..4, 1i64..500), 1..60)) {
            let mut s = StateSet::default();
            let owners: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
            let wallets: Vec<Uuid> = owners.iter().map(|o| funded(&mut s, *o, 0)).collect();
            let admin = Actor { user_id: None, role: Role::Admin };
            let mut legs_sum = 0i64;
            for (op, i, j, amount) in ops {
                let amount = Amount::new(amount).unwrap();
                let transfer_id = Uuid::new_v4();
                let (actor, cmd) = match op {
                    0 => (admin.clone(), WalletCommand::Deposit { transfer_id, wallet_id: wallets[i], currency: kes(), amount, reference: None }),
                    1 => (user(owners[i]), WalletCommand::Transfer { transfer_id, from: wallets[i], to: wallets[j], currency: kes(), amount, reference: None }),
                    _ => (user(owners[i]), WalletCommand::Withdraw { transfer_id, wallet_id: wallets[i], currency: kes(), amount, destination: "bank:1".into() }),
                };
                if let Ok(d) = run(&mut s, &actor, cmd) {
                    for (_, e) in &d.events {
                        match e {
                            Event::Wallet(WalletEvent::Debited(l)) => legs_sum -= l.amount,
                            Event::Wallet(WalletEvent::Credited(l)) => legs_sum += l.amount,
                            _ => {}
                        }
                    }
                }
            }
            proptest::prop_assert_eq!(legs_sum, 0);
            let total: i64 = s.clone().into_inner().values().map(|l| match &l.state { State::Wallet(a) => a.posted, _ => 0 }).sum();
            proptest::prop_assert_eq!(total, 0);
            for w in &wallets {
                proptest::prop_assert!(s.wallet(&account_stream(*w)).posted >= 0);
            }
        }
    }
}
