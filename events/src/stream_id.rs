use std::fmt;

use serde::{Deserialize, Serialize};

/// The identity of one event stream: `<domain>.<aggregate>.<id>`.
///
/// Each part is one NATS subject token, so it may not be empty and may not
/// contain `.`, `*`, `>` or white space.
///
/// ```
/// use events::StreamId;
/// let s = StreamId::new("wallet", "account", "42").unwrap();
/// assert_eq!(s.as_str(), "wallet.account.42");
/// assert_eq!(s.domain(), "wallet");
/// assert_eq!("wallet.account.42".parse::<StreamId>().unwrap(), s);
/// assert!(StreamId::new("wallet", "acc ount", "1").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

/// A stream id that is not three valid subject tokens.
#[derive(Debug, thiserror::Error)]
#[error("invalid stream id `{0}`: want <domain>.<aggregate>.<id>, each a non-empty subject token")]
pub struct StreamIdError(pub String);

fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .all(|c| c.is_ascii_graphic() && c != '.' && c != '*' && c != '>')
}

impl StreamId {
    /// Build a stream id from its three parts.
    pub fn new(domain: &str, aggregate: &str, id: &str) -> Result<Self, StreamIdError> {
        format!("{domain}.{aggregate}.{id}").parse()
    }

    /// The whole id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first token: `wallet`, `chat`, …
    pub fn domain(&self) -> &str {
        self.0.split('.').next().unwrap_or_default()
    }

    /// The second token: the aggregate type.
    pub fn aggregate(&self) -> &str {
        self.0.split('.').nth(1).unwrap_or_default()
    }

    /// The third token: the aggregate's id.
    pub fn id(&self) -> &str {
        self.0.split('.').nth(2).unwrap_or_default()
    }
}

impl std::str::FromStr for StreamId {
    type Err = StreamIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() == 3 && parts.iter().all(|t| valid_token(t)) {
            Ok(StreamId(s.to_owned()))
        } else {
            Err(StreamIdError(s.to_owned()))
        }
    }
}

impl TryFrom<String> for StreamId {
    type Error = StreamIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<StreamId> for String {
    fn from(s: StreamId) -> String {
        s.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
