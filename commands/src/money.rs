//! Money: currencies with their scale, and amounts in integer minor units.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest amount one movement may carry: 10^15 minor units
/// (ten trillion KES), far below `i64::MAX` so sums of many cannot overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// Currencies Mathia holds, with their number of minor-unit digits.
const CURRENCIES: &[(&str, u8)] = &[
    ("KES", 2),
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("UGX", 0),
    ("TZS", 2),
    ("NGN", 2),
    ("ZAR", 2),
    ("JPY", 0),
];

/// An ISO 4217 currency Mathia supports.
///
/// ```
/// use commands::money::Currency;
/// assert_eq!("kes".parse::<Currency>().unwrap().code(), "KES");
/// assert_eq!("JPY".parse::<Currency>().unwrap().scale(), 0);
/// assert!("XXX".parse::<Currency>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(u8);

/// Not a supported currency code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unsupported currency `{0}`; supported: KES, USD, EUR, GBP, UGX, TZS, NGN, ZAR, JPY")]
pub struct UnknownCurrency(pub String);

impl Currency {
    /// The three-letter code.
    pub fn code(self) -> &'static str {
        CURRENCIES[self.0 as usize].0
    }

    /// Digits after the decimal point (KES 2, JPY 0).
    pub fn scale(self) -> u8 {
        CURRENCIES[self.0 as usize].1
    }

    /// Every supported currency.
    pub fn all() -> impl Iterator<Item = Currency> {
        (0..CURRENCIES.len() as u8).map(Currency)
    }
}

impl std::str::FromStr for Currency {
    type Err = UnknownCurrency;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.to_ascii_uppercase();
        CURRENCIES
            .iter()
            .position(|(c, _)| *c == upper)
            .map(|i| Currency(i as u8))
            .ok_or_else(|| UnknownCurrency(s.chars().take(16).collect()))
    }
}

impl TryFrom<String> for Currency {
    type Error = UnknownCurrency;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A positive amount in minor units, at most [`MAX_AMOUNT`].
///
/// ```
/// use commands::money::Amount;
/// assert_eq!(Amount::new(150).unwrap().get(), 150);
/// assert!(Amount::new(0).is_err());
/// assert!(Amount::new(-5).is_err());
/// assert!(Amount::new(commands::money::MAX_AMOUNT + 1).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

/// An amount that is not in `1..=MAX_AMOUNT`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("amount must be a whole number of minor units between 1 and {MAX_AMOUNT}, got {0}")]
pub struct InvalidAmount(pub i64);

impl Amount {
    /// Validate an amount.
    pub fn new(minor_units: i64) -> Result<Self, InvalidAmount> {
        if (1..=MAX_AMOUNT).contains(&minor_units) {
            Ok(Amount(minor_units))
        } else {
            Err(InvalidAmount(minor_units))
        }
    }

    /// The amount in minor units.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Amount {
    type Error = InvalidAmount;
    fn try_from(v: i64) -> Result<Self, Self::Error> {
        Amount::new(v)
    }
}

impl From<Amount> for i64 {
    fn from(a: Amount) -> i64 {
        a.0
    }
}
