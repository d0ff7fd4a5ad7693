//! The keystore: wrapped room and message keys, outside the append-only log.
//!
//! Rows here are the only way to open what the log holds sealed, so deleting
//! one is erasure (crypto-shredding): a redaction deletes a message key, a room
//! deletion every key of the room, in the same transaction as the event that
//! records it. The tables are not read models: a rebuild never touches them.
//! Back them up apart from the event store and keep those backups short, or
//! an old backup keeps a destroyed key alive.

use std::collections::HashMap;

use commands::KeyOp;
use commands::crypto::{self, Key};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

const INVOICE_LINK: &str = "mathia invoice payment link v1";

/// A room's keys as a writer needs them.
#[derive(Debug, Clone)]
pub struct RoomKeys {
    /// The current key version.
    pub version: i32,
    /// The current data key: wraps new message keys.
    pub current: Key,
    /// The search key (from version 1): fingerprints and index tokens.
    pub search: Key,
}

/// Opens keys: holds the master key from configuration.
#[derive(Clone, Debug)]
pub struct Keystore {
    master: Key,
}

impl Keystore {
    /// A keystore under `master`.
    pub fn new(master: Key) -> Self {
        Keystore { master }
    }

    /// A fresh room key, and its form wrapped by the master key.
    pub fn new_room_key(&self, room: Uuid, version: i32) -> (Key, Vec<u8>) {
        let key = Key::random();
        let wrapped = crypto::wrap(&self.master, &crypto::room_key_aad(room, version), &key);
        (key, wrapped)
    }

    /// Unwrap a room key read from `chat_room_keys`.
    pub fn open_room_key(&self, room: Uuid, version: i32, wrapped: &[u8]) -> Option<Key> {
        crypto::unwrap(&self.master, &crypto::room_key_aad(room, version), wrapped).ok()
    }

    /// Seal a webhook endpoint's signing secret: nonce ‖ ciphertext, bound to the endpoint.
    pub fn seal_webhook_secret(&self, endpoint: Uuid, secret: &[u8]) -> Vec<u8> {
        let s = crypto::seal(
            &self.master,
            &commands::webhook::secret_aad(endpoint),
            secret,
        );
        let mut out = s.nonce.0;
        out.extend_from_slice(&s.ct.0);
        out
    }

    /// The payment link token of `invoice` (nothing stored; see [`crypto::capability`]).
    pub fn invoice_link(&self, invoice: Uuid) -> String {
        crypto::capability(&self.master, INVOICE_LINK, invoice)
    }

    /// The invoice a payment link token names, if it is one of ours.
    pub fn open_invoice_link(&self, token: &str) -> Option<Uuid> {
        crypto::open_capability(&self.master, INVOICE_LINK, token)
    }

    /// The signing secret of `endpoint`; none once the endpoint is deleted.
    pub async fn webhook_secret(
        &self,
        conn: &mut PgConnection,
        endpoint: Uuid,
    ) -> Result<Option<Vec<u8>>, sqlx::Error> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT sealed FROM webhook_secrets WHERE endpoint_id = $1")
                .bind(endpoint)
                .fetch_optional(conn)
                .await?;
        Ok(sealed.filter(|s| s.len() > 12).and_then(|s| {
            let sealed = events::chat::Sealed {
                nonce: events::chat::Bytes64(s[..12].to_vec()),
                ct: events::chat::Bytes64(s[12..].to_vec()),
            };
            crypto::open(
                &self.master,
                &commands::webhook::secret_aad(endpoint),
                &sealed,
            )
            .ok()
        }))
    }

    /// The room's current key (and its version) and its search key, in one
    /// read; none once the room is deleted (or if it never existed).
    pub async fn room_keys(
        &self,
        pool: &PgPool,
        room: Uuid,
    ) -> Result<Option<RoomKeys>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT version, wrapped FROM chat_room_keys WHERE room_id = $1
               AND (version = 1 OR version = (SELECT max(version) FROM chat_room_keys WHERE room_id = $1))",
        )
        .bind(room)
        .fetch_all(pool)
        .await?;
        let mut opened: Vec<(i32, Key)> = rows
            .iter()
            .filter_map(|r| {
                let version: i32 = r.get("version");
                let wrapped: Vec<u8> = r.get("wrapped");
                self.open_room_key(room, version, &wrapped)
                    .map(|k| (version, k))
            })
            .collect();
        opened.sort_by_key(|(v, _)| *v);
        let (Some((1, first)), Some((version, current))) =
            (opened.first().cloned(), opened.last().cloned())
        else {
            return Ok(None);
        };
        Ok(Some(RoomKeys {
            version,
            current,
            search: crypto::search_key(&first),
        }))
    }

    /// The room's search key (derived from key version 1, so it dies with the room).
    pub async fn search_key(
        &self,
        conn: &mut PgConnection,
        room: Uuid,
    ) -> Result<Option<Key>, sqlx::Error> {
        let wrapped: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT wrapped FROM chat_room_keys WHERE room_id = $1 AND version = 1",
        )
        .bind(room)
        .fetch_optional(conn)
        .await?;
        Ok(wrapped
            .and_then(|w| self.open_room_key(room, 1, &w))
            .map(|k| crypto::search_key(&k)))
    }

    /// The search keys of `rooms` (those that still have one).
    pub async fn search_keys(
        &self,
        pool: &PgPool,
        rooms: &[Uuid],
    ) -> Result<HashMap<Uuid, Key>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT room_id, wrapped FROM chat_room_keys WHERE room_id = ANY($1) AND version = 1",
        )
        .bind(rooms)
        .fetch_all(pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let room: Uuid = r.get("room_id");
                let w: Vec<u8> = r.get("wrapped");
                self.open_room_key(room, 1, &w)
                    .map(|k| (room, crypto::search_key(&k)))
            })
            .collect())
    }

    /// The keys of `messages` that still exist, unwrapped.
    pub async fn message_keys(
        &self,
        conn: &mut PgConnection,
        messages: &[Uuid],
    ) -> Result<HashMap<Uuid, Key>, sqlx::Error> {
        if messages.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = sqlx::query(
            "SELECT m.message_id, m.room_id, m.key_version, m.wrapped AS mk, r.wrapped AS rk
             FROM chat_message_keys m
             JOIN chat_room_keys r ON r.room_id = m.room_id AND r.version = m.key_version
             WHERE m.message_id = ANY($1)",
        )
        .bind(messages)
        .fetch_all(conn)
        .await?;
        Ok(
            self.open_message_keys(rows.iter().map(|r| WrappedMessageKey {
                message: r.get("message_id"),
                room: r.get("room_id"),
                version: r.get("key_version"),
                message_key: r.get("mk"),
                room_key: r.get("rk"),
            })),
        )
    }

    /// Unwrap message keys read with their room keys (each room key once).
    pub fn open_message_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = WrappedMessageKey<'a>>,
    ) -> HashMap<Uuid, Key> {
        let mut room_keys: HashMap<(Uuid, i32), Option<Key>> = HashMap::new();
        let mut out = HashMap::new();
        for k in keys {
            let rk = room_keys
                .entry((k.room, k.version))
                .or_insert_with(|| self.open_room_key(k.room, k.version, k.room_key));
            if let Some(key) = rk.as_ref().and_then(|rk| {
                crypto::unwrap(rk, &crypto::message_key_aad(k.message), k.message_key).ok()
            }) {
                out.insert(k.message, key);
            }
        }
        out
    }
}

/// A message key as stored, with the room key that wraps it.
#[derive(Debug, Clone, Copy)]
pub struct WrappedMessageKey<'a> {
    /// The message.
    pub message: Uuid,
    /// Its room.
    pub room: Uuid,
    /// The room key version that wrapped it.
    pub version: i32,
    /// `chat_message_keys.wrapped`.
    pub message_key: &'a [u8],
    /// `chat_room_keys.wrapped` of that room and version.
    pub room_key: &'a [u8],
}

/// A fresh message key wrapped by `room_key`.
pub fn new_message_key(room_key: &Key, message: Uuid) -> (Key, Vec<u8>) {
    let key = Key::random();
    let wrapped = crypto::wrap(room_key, &crypto::message_key_aad(message), &key);
    (key, wrapped)
}

/// Apply a batch's keystore changes inside the handler's transaction: every
/// key put first (message keys in one statement), then the destructions in order
/// (a batch may post a message and redact it).
pub async fn apply(tx: &mut PgConnection, ops: &[KeyOp]) -> Result<(), sqlx::Error> {
    let (mut ids, mut rooms, mut versions, mut wrapped) = (vec![], vec![], vec![], vec![]);
    for op in ops {
        match op {
            KeyOp::PutRoomKey {
                room_id,
                version,
                wrapped,
            } => {
                sqlx::query(
                    "INSERT INTO chat_room_keys (room_id, version, wrapped) VALUES ($1, $2, $3)",
                )
                .bind(room_id)
                .bind(version)
                .bind(&wrapped.0)
                .execute(&mut *tx)
                .await?;
            }
            KeyOp::PutMessageKey {
                message_id,
                room_id,
                key_version,
                wrapped: w,
            } => {
                ids.push(*message_id);
                rooms.push(*room_id);
                versions.push(*key_version);
                wrapped.push(w.0.clone());
            }
            _ => {}
        }
    }
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO chat_message_keys (message_id, room_id, key_version, wrapped)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int[], $4::bytea[])",
        )
        .bind(&ids)
        .bind(&rooms)
        .bind(&versions)
        .bind(&wrapped)
        .execute(&mut *tx)
        .await?;
    }
    for op in ops {
        match op {
            KeyOp::PutWebhookSecret {
                endpoint_id,
                sealed,
            } => {
                sqlx::query("INSERT INTO webhook_secrets (endpoint_id, sealed) VALUES ($1, $2)")
                    .bind(endpoint_id)
                    .bind(&sealed.0)
                    .execute(&mut *tx)
                    .await?;
            }
            KeyOp::DestroyWebhookSecret { endpoint_id } => {
                sqlx::query("DELETE FROM webhook_secrets WHERE endpoint_id = $1")
                    .bind(endpoint_id)
                    .execute(&mut *tx)
                    .await?;
            }
            KeyOp::DestroyMessageKey { message_id } => {
                sqlx::query("DELETE FROM chat_message_keys WHERE message_id = $1")
                    .bind(message_id)
                    .execute(&mut *tx)
                    .await?;
            }
            KeyOp::BindUpload {
                storage_key,
                message_id,
            } => {
                // The file key now lives only in the message's sealed attachment.
                sqlx::query(
                    "UPDATE chat_uploads SET wrapped_key = NULL, key_version = NULL, message_id = $2
                     WHERE storage_key = $1",
                )
                .bind(storage_key)
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
            }
            KeyOp::DestroyRoomKeys { room_id } => {
                sqlx::query("DELETE FROM chat_uploads WHERE room_id = $1")
                    .bind(room_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM chat_message_keys WHERE room_id = $1")
                    .bind(room_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM chat_room_keys WHERE room_id = $1")
                    .bind(room_id)
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {}
        }
    }
    Ok(())
}
