//! Keyset paging shared by the list endpoints: an opaque cursor
//! `base64url("<list>:<key>:<id>")` (the list's tag keeps one list's cursor
//! out of another) and the common `limit` rule.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};

/// The cursor after the row with sort key `key` and id `id` in list `list`.
pub fn cursor(list: &str, key: i64, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{list}:{key}:{id}"))
}

/// The (key, id) of a cursor of list `list`; a 422 on the `cursor` field otherwise.
pub fn parse_cursor(list: &str, c: &str) -> ApiResult<(i64, Uuid)> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let rest = s.strip_prefix(list)?.strip_prefix(':')?;
            let (key, id) = rest.split_once(':')?;
            Some((key.parse().ok()?, id.parse().ok()?))
        })
        .ok_or_else(|| ApiError::field("cursor", "not a cursor of this list"))
}

/// A page size: 1 to 100, 50 by default.
pub fn limit(l: Option<i64>) -> ApiResult<i64> {
    let l = l.unwrap_or(50);
    if !(1..=100).contains(&l) {
        return Err(ApiError::field("limit", "1 to 100"));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_another_lists_cursor_is_refused() {
        let id = Uuid::now_v7();
        assert_eq!(parse_cursor("r1", &cursor("r1", 42, id)).unwrap(), (42, id));
        assert!(parse_cursor("n1", &cursor("r1", 42, id)).is_err());
        assert!(parse_cursor("r1", "!!").is_err());
        assert!(limit(Some(0)).is_err() && limit(Some(101)).is_err());
        assert_eq!(limit(None).unwrap(), 50);
    }
}
