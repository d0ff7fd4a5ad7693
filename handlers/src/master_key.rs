//! Master key rotation: re-wrap every room data key and re-seal every webhook
//! signing secret from the old master key to a new one, in one transaction.
//!
//! The master key wraps only keystore rows (`chat_room_keys.wrapped`,
//! `webhook_secrets.sealed`); the event log never holds anything sealed by it,
//! so rotating it rewrites no event and every message stays readable (its
//! message key is wrapped by the room key, which does not change). Room keys
//! themselves rotate per room (`POST /v1/rooms/{id}/keys/rotate`).
//!
//! The rotation is idempotent: a row that already opens with the new key is
//! left alone, so an interrupted run (it commits all or nothing anyway) or a
//! second run is harmless. A row that opens with neither key stops it before
//! anything is written. Every process must be stopped first and restarted with
//! the new key after (see deploy/RUNBOOK.md "Key rotation").

use anyhow::Context as _;
use commands::crypto::{self, Key};
use events::chat::{Bytes64, Sealed};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// What a rotation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rotated {
    /// Room data keys re-wrapped.
    pub room_keys: u64,
    /// Webhook secrets re-sealed.
    pub webhook_secrets: u64,
    /// Rows that were already under the new key.
    pub already_new: u64,
}

fn split(sealed: &[u8]) -> Option<Sealed> {
    (sealed.len() > 12).then(|| Sealed {
        nonce: Bytes64(sealed[..12].to_vec()),
        ct: Bytes64(sealed[12..].to_vec()),
    })
}

/// Move every keystore row from `old` to `new` (one transaction; writers are
/// locked out of both tables meanwhile).
pub async fn rotate(pool: &PgPool, old: &Key, new: &Key) -> anyhow::Result<Rotated> {
    anyhow::ensure!(
        old.as_bytes() != new.as_bytes(),
        "the new master key is the old one"
    );
    let mut done = Rotated::default();
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE chat_room_keys, webhook_secrets IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query("SELECT room_id, version, wrapped FROM chat_room_keys")
        .fetch_all(&mut *tx)
        .await?;
    for r in rows {
        let (room, version): (Uuid, i32) = (r.get("room_id"), r.get("version"));
        let wrapped: Vec<u8> = r.get("wrapped");
        let aad = crypto::room_key_aad(room, version);
        let key = match crypto::unwrap(old, &aad, &wrapped) {
            Ok(k) => k,
            Err(_) if crypto::unwrap(new, &aad, &wrapped).is_ok() => {
                done.already_new += 1;
                continue;
            }
            Err(_) => anyhow::bail!(
                "room {room} key version {version} opens with neither master key: nothing was changed"
            ),
        };
        sqlx::query("UPDATE chat_room_keys SET wrapped = $3 WHERE room_id = $1 AND version = $2")
            .bind(room)
            .bind(version)
            .bind(crypto::wrap(new, &aad, &key))
            .execute(&mut *tx)
            .await?;
        done.room_keys += 1;
    }
    let rows = sqlx::query("SELECT endpoint_id, sealed FROM webhook_secrets")
        .fetch_all(&mut *tx)
        .await?;
    for r in rows {
        let endpoint: Uuid = r.get("endpoint_id");
        let sealed: Vec<u8> = r.get("sealed");
        let aad = commands::webhook::secret_aad(endpoint);
        let parts = split(&sealed)
            .with_context(|| format!("webhook {endpoint}'s secret is not a sealed value"))?;
        let secret = match crypto::open(old, &aad, &parts) {
            Ok(s) => s,
            Err(_) if crypto::open(new, &aad, &parts).is_ok() => {
                done.already_new += 1;
                continue;
            }
            Err(_) => anyhow::bail!(
                "webhook {endpoint}'s secret opens with neither master key: nothing was changed"
            ),
        };
        let s = crypto::seal(new, &aad, &secret);
        let mut out = s.nonce.0;
        out.extend_from_slice(&s.ct.0);
        sqlx::query("UPDATE webhook_secrets SET sealed = $2 WHERE endpoint_id = $1")
            .bind(endpoint)
            .bind(out)
            .execute(&mut *tx)
            .await?;
        done.webhook_secrets += 1;
    }
    tx.commit().await?;
    Ok(done)
}
