//! Envelope encryption for what people write (ARCHITECTURE "Encryption").
//!
//! Three layers, each AES-256-GCM:
//! - the **master key** (configuration) wraps each room's **data key** (one per key version);
//! - the room data key wraps each message's own **message key**;
//! - the message key seals the body, its edits and the attachment names.
//!
//! Wrapped keys live in the keystore tables, outside the append-only log.
//! Redacting a message deletes its message key; deleting a room deletes the
//! room's data keys and message keys. The log keeps only ciphertext that
//! nothing can open any more.
//!
//! Every seal binds associated data (`message:<id>:body`, `room:<id>:v<n>`…)
//! so a ciphertext cannot be moved to another message or field.
//!
//! ```
//! use commands::crypto::{Key, seal, open};
//! let key = Key::random();
//! let sealed = seal(&key, b"message:1:body", b"hello");
//! assert_eq!(open(&key, b"message:1:body", &sealed).unwrap(), b"hello");
//! assert!(open(&key, b"message:2:body", &sealed).is_err());
//! ```

use std::collections::BTreeSet;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use events::chat::{Bytes64, Sealed};
use hmac::{Hmac, KeyInit as MacKeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// A 256-bit key. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(…)")
    }
}

/// Opening failed: wrong key, tampered bytes, or a destroyed key.
#[derive(Debug, thiserror::Error)]
#[error("cannot open: wrong key, tampered data or wrong context")]
pub struct OpenError;

impl Key {
    /// A fresh random key from the OS generator.
    pub fn random() -> Key {
        Key(rand::random())
    }

    /// A key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Key> {
        bytes.try_into().ok().map(Key)
    }

    /// The raw bytes (to wrap them).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

/// Seal `plaintext` under `key`, bound to `aad`.
pub fn seal(key: &Key, aad: &[u8], plaintext: &[u8]) -> Sealed {
    let nonce: [u8; 12] = rand::random();
    let ct = key
        .cipher()
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // Encryption fails only for inputs beyond 64 GiB; callers cap sizes far below.
        .unwrap_or_default();
    Sealed {
        nonce: Bytes64(nonce.to_vec()),
        ct: Bytes64(ct),
    }
}

/// Open what [`seal`] sealed with the same key and `aad`.
pub fn open(key: &Key, aad: &[u8], sealed: &Sealed) -> Result<Vec<u8>, OpenError> {
    let nonce: [u8; 12] = sealed
        .nonce
        .0
        .as_slice()
        .try_into()
        .map_err(|_| OpenError)?;
    key.cipher()
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &sealed.ct.0,
                aad,
            },
        )
        .map_err(|_| OpenError)
}

/// Wrap `key` under `kek`: nonce ‖ ciphertext, bound to `aad`.
pub fn wrap(kek: &Key, aad: &[u8], key: &Key) -> Vec<u8> {
    let s = seal(kek, aad, key.as_bytes());
    let mut out = s.nonce.0;
    out.extend_from_slice(&s.ct.0);
    out
}

/// Unwrap what [`wrap`] produced.
pub fn unwrap(kek: &Key, aad: &[u8], wrapped: &[u8]) -> Result<Key, OpenError> {
    if wrapped.len() < 12 {
        return Err(OpenError);
    }
    let sealed = Sealed {
        nonce: Bytes64(wrapped[..12].to_vec()),
        ct: Bytes64(wrapped[12..].to_vec()),
    };
    Key::from_slice(&open(kek, aad, &sealed)?).ok_or(OpenError)
}

/// Associated data of a room data key wrapped by the master key.
pub fn room_key_aad(room: Uuid, version: i32) -> Vec<u8> {
    format!("room:{room}:v{version}").into_bytes()
}

/// Associated data of a message key wrapped by a room data key.
pub fn message_key_aad(message: Uuid) -> Vec<u8> {
    format!("message:{message}:key").into_bytes()
}

/// Associated data of a sealed field of a message (`body`, `attachment`).
pub fn field_aad(message: Uuid, field: &str) -> Vec<u8> {
    format!("message:{message}:{field}").into_bytes()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac =
        <Hmac<Sha256> as MacKeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The room's search key: derived from its version-1 data key, so it dies with the room.
pub fn search_key(room_key_v1: &Key) -> Key {
    Key(hmac(room_key_v1.as_bytes(), &[b"mathia search index v1"]))
}

/// A keyed fingerprint of `data` (hex): compares request bodies without keeping them.
pub fn fingerprint(key: &Key, data: &[u8]) -> String {
    hmac(key.as_bytes(), &[b"fingerprint\0", data])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A bearer capability for `id`: hex of `id ‖ HMAC(key, purpose, id)[..16]`
/// (64 characters, 128 bits a guesser must find). Nothing is stored: the
/// holder of the key recomputes the MAC to check one ([`open_capability`]).
pub fn capability(key: &Key, purpose: &str, id: Uuid) -> String {
    let mac = hmac(key.as_bytes(), &[purpose.as_bytes(), b"\0", id.as_bytes()]);
    id.as_bytes()
        .iter()
        .chain(&mac[..16])
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id a capability made by [`capability`] names, when its MAC is right
/// (compared in constant time).
pub fn open_capability(key: &Key, purpose: &str, token: &str) -> Option<Uuid> {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let id = Uuid::from_slice(&bytes[..16]).ok()?;
    let mac = hmac(key.as_bytes(), &[purpose.as_bytes(), b"\0", id.as_bytes()]);
    let diff = mac[..16]
        .iter()
        .zip(&bytes[16..])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (diff == 0).then_some(id)
}

/// Longest prefix indexed per word, in characters; longer query terms are cut to it.
pub const MAX_PREFIX: usize = 24;
/// Shortest searchable term, in characters.
pub const MIN_TERM: usize = 2;

/// The words of `text`: lower-cased runs of letters and digits.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// A term's keyed token: the first 8 bytes of its HMAC, big-endian, as the
/// `BIGINT` the index stores. Within one room's vocabulary a collision is
/// vanishingly rare, and harmless: the hits are decrypted (and highlighted)
/// for members of that room only.
fn token(key: &Key, term: &str) -> i64 {
    token_with(&term_mac(key), term)
}

/// The keyed MAC state every term's token starts from: HMAC's key blocks and
/// the `term\0` label hashed once, then cloned per term (half the hashing).
fn term_mac(key: &Key) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as MacKeyInit>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!());
    mac.update(b"term\0");
    mac
}

fn token_with(base: &Hmac<Sha256>, term: &str) -> i64 {
    let full = base
        .clone()
        .chain_update(term.as_bytes())
        .finalize()
        .into_bytes();
    let mut t = [0u8; 8];
    t.copy_from_slice(&full[..8]);
    i64::from_be_bytes(t)
}

/// The blind index of `text`: one keyed token per distinct prefix (2 to
/// [`MAX_PREFIX`] characters) of each word. Without the room's search key the
/// tokens say nothing; with it, a query term's token finds every word it begins.
/// Ascending and distinct, so the same text always gives the same array.
pub fn index_tokens(key: &Key, text: &str) -> Vec<i64> {
    let base = term_mac(key);
    let mut prefixes = BTreeSet::new();
    for w in words(text) {
        let ends = w.char_indices().map(|(i, _)| i).chain([w.len()]);
        for end in ends.skip(MIN_TERM).take(MAX_PREFIX + 1 - MIN_TERM) {
            prefixes.insert(w[..end].to_owned());
        }
    }
    let tokens: BTreeSet<i64> = prefixes.iter().map(|p| token_with(&base, p)).collect();
    tokens.into_iter().collect()
}

/// The tokens a query looks up: one per term (every term must match a word's prefix).
pub fn query_tokens(key: &Key, terms: &[String]) -> Vec<i64> {
    terms
        .iter()
        .map(|t| {
            let cut: String = t.chars().take(MAX_PREFIX).collect();
            token(key, &cut)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_keys_unwrap_only_with_their_kek_and_context() {
        let master = Key::random();
        let room = Key::random();
        let w = wrap(&master, b"room:a:v1", &room);
        assert_eq!(unwrap(&master, b"room:a:v1", &w).unwrap(), room);
        assert!(unwrap(&master, b"room:a:v2", &w).is_err());
        assert!(unwrap(&Key::random(), b"room:a:v1", &w).is_err());
    }

    #[test]
    fn a_capability_opens_only_under_its_key_and_purpose_and_untouched() {
        let (k, id) = (Key::random(), Uuid::now_v7());
        let t = capability(&k, "link", id);
        assert_eq!(t.len(), 64);
        assert_eq!(open_capability(&k, "link", &t), Some(id));
        assert_eq!(open_capability(&k, "other", &t), None);
        assert_eq!(open_capability(&Key::random(), "link", &t), None);
        let mut flipped = t.clone().into_bytes();
        flipped[63] = if flipped[63] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            open_capability(&k, "link", &String::from_utf8(flipped).unwrap()),
            None
        );
        assert_eq!(open_capability(&k, "link", "zz"), None);
        assert_eq!(open_capability(&k, "link", &"é".repeat(32)), None);
    }

    #[test]
    fn a_prefix_of_any_word_finds_it_and_other_words_do_not() {
        let k = Key::random();
        let idx = index_tokens(&k, "Meet at the Kilimanjaro café, 5pm!");
        for term in ["kili", "kilimanjaro", "caf", "café", "5p", "meet"] {
            let t = query_tokens(&k, &[term.to_lowercase()]);
            assert!(idx.contains(&t[0]), "{term} should match");
        }
        for term in ["ilim", "kilimanjaros", "tea"] {
            let t = query_tokens(&k, &[term.into()]);
            assert!(!idx.contains(&t[0]), "{term} should not match");
        }
        // Another room's key gives unrelated tokens.
        let other = index_tokens(&Key::random(), "Meet at the Kilimanjaro café, 5pm!");
        assert!(idx.iter().all(|t| !other.contains(t)));
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
    }

    #[test]
    fn tokens_keep_their_stored_form_and_every_prefix_up_to_the_cap_is_indexed() {
        // The stored BIGINTs are HMAC(search key, "term\0" ‖ prefix)[..8], big-endian:
        // a change here would leave every existing index unreadable.
        let k = Key(std::array::from_fn(|i| i as u8));
        let full = hmac(k.as_bytes(), &[b"term\0", "kil".as_bytes()]);
        let want = i64::from_be_bytes(full[..8].try_into().unwrap());
        assert_eq!(query_tokens(&k, &["kil".into()]), vec![want]);
        // A 30-letter word: prefixes of 2 to 24 characters (23 tokens), none longer.
        let word = "ä".repeat(30);
        let idx = index_tokens(&k, &word);
        assert_eq!(idx.len(), MAX_PREFIX + 1 - MIN_TERM);
        for len in [MIN_TERM, MAX_PREFIX] {
            assert!(idx.contains(&token(&k, &"ä".repeat(len))), "{len}");
        }
        assert!(!idx.contains(&token(&k, &"ä".repeat(MAX_PREFIX + 1))));
        assert!(!idx.contains(&token(&k, "ä")));
    }

    #[test]
    fn keys_never_print() {
        assert_eq!(format!("{:?}", Key::random()), "Key(…)");
    }
}
