//! Itinerary events: trips with typed reservations, sharing, a trip room, and
//! the events catalogue.
//!
//! Streams:
//! - `itinerary.trip.<itinerary_id>`: the itinerary, its items (reservations)
//!   and its sharing. One stream per trip keeps every item edit ordered against
//!   every other, so one `If-Match` version guards the whole trip.
//! - `itinerary.listing.<listing_id>`: one entry of the events catalogue
//!   (a concert, a conference), addable to a trip as an `event` item.
//!
//! Times are what a traveller books: a local date-time and an IANA zone. Each
//! [`Moment`] also carries the UTC instant it resolved to when decided, so
//! that ordering, overlap and day plans never depend on the zone database of
//! whoever reads the log later.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The domain token of itinerary streams and subjects.
pub const DOMAIN: &str = "itinerary";
/// The aggregate token of a trip's stream.
pub const TRIP: &str = "trip";
/// The aggregate token of a catalogue entry's stream.
pub const LISTING: &str = "listing";

/// Who may see an itinerary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// The owner and the people it is shared with.
    Private,
    /// The same, announced as a shared trip.
    Shared,
    /// Also anyone holding the link token (read only).
    PublicLink,
}

impl Visibility {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Shared => "shared",
            Visibility::PublicLink => "public_link",
        }
    }
}

/// A collaborator's role (the owner is not a share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareRole {
    /// Reads only.
    Viewer,
    /// Reads and writes items and details.
    Editor,
}

impl ShareRole {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareRole::Viewer => "viewer",
            ShareRole::Editor => "editor",
        }
    }
}

/// What an item reserves (schema.org `*Reservation` types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// `FlightReservation`.
    Flight,
    /// `LodgingReservation`.
    Hotel,
    /// `BusReservation`.
    Bus,
    /// `TrainReservation`.
    Train,
    /// `TaxiReservation` and the like.
    Transfer,
    /// `EventReservation`.
    Event,
    /// A tour, a class, a dinner.
    Activity,
    /// A reminder with a time; reserves nothing.
    Note,
}

impl ItemKind {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Flight => "flight",
            ItemKind::Hotel => "hotel",
            ItemKind::Bus => "bus",
            ItemKind::Train => "train",
            ItemKind::Transfer => "transfer",
            ItemKind::Event => "event",
            ItemKind::Activity => "activity",
            ItemKind::Note => "note",
        }
    }
}

/// A reservation's status (schema.org `ReservationStatusType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// Asked for, not confirmed.
    Pending,
    /// Confirmed: its price counts as booked.
    Confirmed,
    /// Cancelled: kept for the record, counts for nothing.
    Cancelled,
}

impl ItemStatus {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Pending => "pending",
            ItemStatus::Confirmed => "confirmed",
            ItemStatus::Cancelled => "cancelled",
        }
    }
}

/// A local date-time in an IANA zone, and the UTC instant it was resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moment {
    /// Wall-clock time where it happens.
    pub local: NaiveDateTime,
    /// IANA zone, e.g. `Africa/Nairobi`.
    pub zone: String,
    /// The instant.
    pub utc: DateTime<Utc>,
}

/// A place an item happens at, departs from or arrives at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Display name (`Jomo Kenyatta International`).
    pub name: String,
    /// IATA, station or venue code, if any (`NBO`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Street address or city.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// An amount in integer minor units of an ISO 4217 currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Minor units (cents), ≥ 0.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
}

/// An itinerary's editable details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// Title.
    pub title: String,
    /// Region or destination (free text).
    pub region: Option<String>,
    /// First day (in the trip's zone).
    pub start_date: NaiveDate,
    /// Last day (inclusive).
    pub end_date: NaiveDate,
    /// Default IANA zone: where the day-by-day plan is drawn.
    pub zone: String,
    /// Planned spend per currency, minor units.
    pub budget: BTreeMap<String, i64>,
    /// Who may see it.
    pub visibility: Visibility,
    /// Free-form JSON object.
    pub metadata: serde_json::Value,
}

/// One reservation (or note) on a trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Item id.
    pub item_id: Uuid,
    /// What it reserves.
    pub kind: ItemKind,
    /// Title (`KQ 100 NBO → LHR`).
    pub title: String,
    /// Start (departure, check-in).
    pub start: Moment,
    /// End (arrival, check-out).
    pub end: Moment,
    /// Where: one place, or departure then arrival.
    pub locations: Vec<Place>,
    /// The provider's booking reference (PNR).
    pub booking_reference: Option<String>,
    /// Who it is booked with (`kenya-airways`).
    pub provider: Option<String>,
    /// Pending, confirmed or cancelled.
    pub status: ItemStatus,
    /// What it costs.
    pub price: Option<Money>,
    /// Free text.
    pub notes: Option<String>,
    /// Who travels on it; empty: everyone on the trip.
    pub travellers: Vec<Uuid>,
    /// The catalogue entry it was added from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing_id: Option<Uuid>,
}

/// Events of itinerary streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ItineraryEvent {
    // --- trip streams ---
    /// An itinerary exists; its creator owns it.
    ItineraryCreated {
        /// Itinerary id (= stream id).
        itinerary_id: Uuid,
        /// The owner.
        owner: Uuid,
        /// Its details.
        details: Details,
        /// The unguessable token of a public link, when visibility is `public_link`.
        link_token: Option<String>,
    },
    /// The details changed (the whole new details are recorded).
    ItineraryUpdated {
        /// New details.
        details: Details,
        /// The link token now in force (none: no public link).
        link_token: Option<String>,
    },
    /// Read-only from now on.
    ItineraryArchived,
    /// Gone.
    ItineraryDeleted,
    /// An item was added.
    ItemAdded {
        /// The item.
        item: Item,
    },
    /// An item changed (the whole new item is recorded).
    ItemUpdated {
        /// The item.
        item: Item,
    },
    /// An item was cancelled (kept, counts for nothing).
    ItemCancelled {
        /// Which.
        item_id: Uuid,
    },
    /// An item was removed.
    ItemRemoved {
        /// Which.
        item_id: Uuid,
    },
    /// A user was invited as editor or viewer.
    ShareInvited {
        /// Who.
        user_id: Uuid,
        /// As what.
        role: ShareRole,
        /// By whom.
        by: Uuid,
    },
    /// An invitee accepted: a collaborator from now on.
    ShareAccepted {
        /// Who.
        user_id: Uuid,
        /// With which role.
        role: ShareRole,
    },
    /// A share or an invitation was revoked.
    ShareRevoked {
        /// Who.
        user_id: Uuid,
        /// By whom.
        by: Uuid,
    },
    /// The owner handed the trip over; the old owner stays as an editor.
    OwnershipTransferred {
        /// The old owner.
        from: Uuid,
        /// The new owner (was a collaborator).
        to: Uuid,
    },
    /// The trip's chat room was opened.
    RoomOpened {
        /// The room.
        room_id: Uuid,
    },
    // --- listing streams ---
    /// A catalogue entry was added.
    ListingAdded {
        /// Listing id (= stream id).
        listing_id: Uuid,
        /// `concert`, `conference`, `festival`, `sport`, `activity`…
        category: String,
        /// Title.
        title: String,
        /// City or area searched by (`Nairobi`).
        place: String,
        /// Venue.
        venue: Option<Place>,
        /// Start.
        start: Moment,
        /// End.
        end: Moment,
        /// Ticket price.
        price: Option<Money>,
        /// Who sells it.
        provider: Option<String>,
        /// Who added it.
        by: Option<Uuid>,
    },
}

impl ItineraryEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            ItineraryEvent::ItineraryCreated { .. } => "ItineraryCreated",
            ItineraryEvent::ItineraryUpdated { .. } => "ItineraryUpdated",
            ItineraryEvent::ItineraryArchived => "ItineraryArchived",
            ItineraryEvent::ItineraryDeleted => "ItineraryDeleted",
            ItineraryEvent::ItemAdded { .. } => "ItemAdded",
            ItineraryEvent::ItemUpdated { .. } => "ItemUpdated",
            ItineraryEvent::ItemCancelled { .. } => "ItemCancelled",
            ItineraryEvent::ItemRemoved { .. } => "ItemRemoved",
            ItineraryEvent::ShareInvited { .. } => "ShareInvited",
            ItineraryEvent::ShareAccepted { .. } => "ShareAccepted",
            ItineraryEvent::ShareRevoked { .. } => "ShareRevoked",
            ItineraryEvent::OwnershipTransferred { .. } => "OwnershipTransferred",
            ItineraryEvent::RoomOpened { .. } => "RoomOpened",
            ItineraryEvent::ListingAdded { .. } => "ListingAdded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_round_trips_with_local_time_zone_and_instant() {
        let local = NaiveDate::from_ymd_opt(2026, 12, 20)
            .unwrap()
            .and_hms_opt(23, 30, 0)
            .unwrap();
        let m = Moment {
            local,
            zone: "Africa/Nairobi".into(),
            utc: DateTime::from_naive_utc_and_offset(local - chrono::Duration::hours(3), Utc),
        };
        let e = ItineraryEvent::ItemCancelled {
            item_id: Uuid::nil(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "ItemCancelled");
        let mv = serde_json::to_value(&m).unwrap();
        assert_eq!(mv["local"], "2026-12-20T23:30:00");
        assert_eq!(mv["utc"], "2026-12-20T20:30:00Z");
        assert_eq!(serde_json::from_value::<Moment>(mv).unwrap(), m);
    }
}
