//! Room keys as the send path needs them, reused for a moment.
//!
//! Every message send seals its body under the room's current key, which is a
//! keystore read and two unwraps. A room's keys change only by rotation (a new
//! version) and by deletion (none left), and the handler decides both against
//! the send: a body sealed under a version rotated away meanwhile is refused
//! with `key_version_conflict` ("send again"), a send to a deleted room with
//! `room_not_found`. So a read less than [`RoomKeyCache::FRESH`] old serves:
//! it only widens by that moment a race that exists anyway between the read
//! and the decision. A rotation or deletion made through this instance, and a
//! send refused with 409 or 404, drop the room's entry at once, so the retry the
//! problem asks for reads the keystore. Entries older than `FRESH` are dropped,
//! so a deleted room's key does not outlive its deletion here by more than a
//! moment either.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use handlers::keystore::{Keystore, RoomKeys};
use sqlx::PgPool;
use uuid::Uuid;

/// Recently read room keys, per room.
#[derive(Default)]
pub struct RoomKeyCache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    keys: HashMap<Uuid, (Instant, RoomKeys)>,
    swept: Option<Instant>,
}

impl RoomKeyCache {
    /// How long a read is used for.
    pub const FRESH: Duration = Duration::from_millis(250);

    /// `room`'s keys, from a read less than [`Self::FRESH`] old or from the keystore.
    pub async fn get(
        &self,
        keystore: &Keystore,
        pool: &PgPool,
        room: Uuid,
    ) -> Result<Option<RoomKeys>, sqlx::Error> {
        if let Some(keys) = self.recent(room) {
            return Ok(Some(keys));
        }
        let keys = keystore.room_keys(pool, room).await?;
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.swept.is_none_or(|at| now - at >= Self::FRESH) {
            entries.keys.retain(|_, (at, _)| now - *at < Self::FRESH);
            entries.swept = Some(now);
        }
        match &keys {
            Some(k) => {
                entries.keys.insert(room, (now, k.clone()));
            }
            None => {
                entries.keys.remove(&room);
            }
        }
        Ok(keys)
    }

    /// Drop `room`'s keys (after a rotation or a deletion this instance made,
    /// or a send refused because the room's keys changed).
    pub fn forget(&self, room: Uuid) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.keys.remove(&room);
    }

    fn recent(&self, room: Uuid) -> Option<RoomKeys> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .keys
            .get(&room)
            .filter(|(at, _)| at.elapsed() < Self::FRESH)
            .map(|(_, k)| k.clone())
    }
}
