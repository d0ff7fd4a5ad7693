//! Itineraries: trips with typed reservations, sharing, a trip room and the
//! events catalogue, as pure decide/evolve.
//!
//! - Access: the owner, editors and viewers of a trip see it; editors and the
//!   owner change it; only the owner shares, archives, deletes or hands it over.
//!   Anyone else gets `itinerary_not_found`, exactly as for a trip that never
//!   existed (existence is private).
//! - Time: an item's start and end are a local date-time and an IANA zone each
//!   (a flight departs in one zone and lands in another). [`resolve`] turns them
//!   into the UTC instant once, when decided; a local time inside a DST gap is
//!   refused, an ambiguous one (the repeated hour) takes the earlier instant.
//! - Upsert: an item with a provider and a booking reference that the trip
//!   already holds updates that item (or changes nothing if it is the same), so
//!   re-importing a booking confirmation is idempotent.
//! - The trip room: a chat room whose id is derived from the trip's
//!   ([`trip_room_id`]); sharing commands keep its membership in step, in the
//!   same transaction, and a reactor posts changes into it as [`SYSTEM_SENDER`].

use std::collections::{BTreeMap, BTreeSet};

use chrono::offset::LocalResult;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use events::chat::{self as chat_events, Bytes64, ChatEvent, MemberRole, MessageKind, Sealed};
use events::itinerary::{
    DOMAIN, Details, Item, ItemKind, ItemStatus, ItineraryEvent, LISTING, Moment, Money, Place,
    ShareRole, TRIP, Visibility,
};
use events::{Event, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::chat::{message_stream, room_stream};
use crate::money::{Currency, MAX_AMOUNT};
use crate::{Actor, Decision, KeyOp, Rejection, Role, StateSet};

/// The sender of the messages Mathia itself posts into trip rooms.
pub const SYSTEM_SENDER: Uuid = Uuid::nil();
/// Most items on one trip.
pub const MAX_ITEMS: usize = 1000;
/// Longest title, in bytes.
pub const MAX_TITLE: usize = 200;
/// Longest notes, in bytes.
pub const MAX_NOTES: usize = 4000;
/// Largest metadata object, in bytes of JSON.
pub const MAX_METADATA: usize = 8 * 1024;

const ROOM_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f74_7269_705f_726f_6f6d);

/// The stream of trip `id`.
pub fn trip_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, TRIP, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The stream of catalogue entry `id`.
pub fn listing_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, LISTING, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The id of trip `itinerary`'s chat room: one per trip, known before it exists,
/// so sharing commands can read it without a lookup.
pub fn trip_room_id(itinerary: Uuid) -> Uuid {
    Uuid::new_v5(&ROOM_NS, itinerary.as_bytes())
}

/// A local date-time in an IANA zone, as a client books it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Wall-clock time, `2026-12-20T23:30:00`.
    pub local: NaiveDateTime,
    /// IANA zone, `Africa/Nairobi`.
    pub zone: String,
}

fn invalid(code: &str, message: impl Into<String>) -> Rejection {
    Rejection::new(422, code, message)
}

/// Parse an IANA zone name.
pub fn zone(name: &str) -> Result<Tz, Rejection> {
    name.parse::<Tz>().map_err(|_| {
        invalid(
            "invalid_zone",
            format!(
                "`{}` is not an IANA time zone (e.g. Africa/Nairobi)",
                name.chars().take(64).collect::<String>()
            ),
        )
    })
}

/// The instant a local time in `zone` names: refused inside a DST gap, the
/// earlier of the two in the repeated hour.
pub fn resolve(slot: &Slot) -> Result<Moment, Rejection> {
    let tz = zone(&slot.zone)?;
    let utc = match tz.from_local_datetime(&slot.local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        LocalResult::None => {
            return Err(invalid(
                "nonexistent_local_time",
                format!(
                    "{} does not exist in {} (the clocks skip it for daylight saving)",
                    slot.local, slot.zone
                ),
            ));
        }
    };
    Ok(Moment {
        local: slot.local,
        zone: tz.name().to_owned(),
        utc,
    })
}

fn check_text(field: &str, s: &str, max: usize, required: bool) -> Result<(), Rejection> {
    if required && s.trim().is_empty() {
        return Err(invalid(
            "invalid_input",
            format!("{field} must not be empty"),
        ));
    }
    if s.len() > max {
        return Err(invalid(
            "invalid_input",
            format!("{field} must be at most {max} bytes"),
        ));
    }
    if s.chars().any(|c| c == '\0') {
        return Err(invalid("invalid_input", format!("{field} contains NUL")));
    }
    Ok(())
}

fn check_money(field: &str, m: &Money) -> Result<Money, Rejection> {
    let c: Currency = m
        .currency
        .parse()
        .map_err(|e: crate::money::UnknownCurrency| invalid("invalid_currency", e.to_string()))?;
    if !(0..=MAX_AMOUNT).contains(&m.amount) {
        return Err(invalid(
            "invalid_amount",
            format!("{field} must be whole minor units between 0 and {MAX_AMOUNT}"),
        ));
    }
    Ok(Money {
        amount: m.amount,
        currency: c.code().to_owned(),
    })
}

/// Validate and normalise an itinerary's details.
pub fn check_details(d: &Details) -> Result<Details, Rejection> {
    check_text("title", &d.title, MAX_TITLE, true)?;
    if let Some(r) = &d.region {
        check_text("region", r, MAX_TITLE, false)?;
    }
    if d.end_date < d.start_date {
        return Err(invalid(
            "invalid_dates",
            "end_date must not be before start_date",
        ));
    }
    let tz = zone(&d.zone)?;
    let mut budget = BTreeMap::new();
    for (currency, amount) in &d.budget {
        let m = check_money(
            "budget",
            &Money {
                amount: *amount,
                currency: currency.clone(),
            },
        )?;
        budget.insert(m.currency, m.amount);
    }
    if !(d.metadata.is_object() || d.metadata.is_null()) {
        return Err(invalid("invalid_input", "metadata must be a JSON object"));
    }
    if d.metadata.to_string().len() > MAX_METADATA {
        return Err(invalid(
            "invalid_input",
            format!("metadata must be at most {MAX_METADATA} bytes of JSON"),
        ));
    }
    Ok(Details {
        title: d.title.trim().to_owned(),
        region: d.region.clone().filter(|r| !r.trim().is_empty()),
        start_date: d.start_date,
        end_date: d.end_date,
        zone: tz.name().to_owned(),
        budget,
        visibility: d.visibility,
        metadata: if d.metadata.is_null() {
            json!({})
        } else {
            d.metadata.clone()
        },
    })
}

/// An item as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemInput {
    /// What it reserves.
    pub kind: ItemKind,
    /// Title.
    pub title: String,
    /// Start.
    pub start: Slot,
    /// End (≥ start as an instant).
    pub end: Slot,
    /// Places.
    pub locations: Vec<Place>,
    /// PNR.
    pub booking_reference: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Status.
    pub status: ItemStatus,
    /// Price.
    pub price: Option<Money>,
    /// Notes.
    pub notes: Option<String>,
    /// Travellers (empty: everyone).
    pub travellers: Vec<Uuid>,
}

/// A partial change of an item: absent fields keep their value; an empty
/// string clears a text field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemPatch {
    /// Kind.
    pub kind: Option<ItemKind>,
    /// Title.
    pub title: Option<String>,
    /// Start.
    pub start: Option<Slot>,
    /// End.
    pub end: Option<Slot>,
    /// Places (replaces the list).
    pub locations: Option<Vec<Place>>,
    /// PNR.
    pub booking_reference: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Status.
    pub status: Option<ItemStatus>,
    /// Price.
    pub price: Option<Money>,
    /// Notes.
    pub notes: Option<String>,
    /// Travellers (replaces the list).
    pub travellers: Option<Vec<Uuid>>,
}

fn nonempty(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Validate an item and resolve its times.
pub fn check_item(item_id: Uuid, i: &ItemInput) -> Result<Item, Rejection> {
    check_text("title", &i.title, MAX_TITLE, true)?;
    for (f, v) in [
        ("booking_reference", &i.booking_reference),
        ("provider", &i.provider),
    ] {
        if let Some(v) = v {
            check_text(f, v, 128, false)?;
        }
    }
    if let Some(n) = &i.notes {
        check_text("notes", n, MAX_NOTES, false)?;
    }
    if i.locations.len() > 10 {
        return Err(invalid("invalid_input", "at most 10 locations"));
    }
    for p in &i.locations {
        check_text("locations.name", &p.name, MAX_TITLE, true)?;
        for v in [&p.code, &p.address].into_iter().flatten() {
            check_text("locations", v, MAX_TITLE, false)?;
        }
    }
    if i.travellers.len() > 100 {
        return Err(invalid("invalid_input", "at most 100 travellers"));
    }
    let start = resolve(&i.start)?;
    let end = resolve(&i.end)?;
    if end.utc < start.utc {
        return Err(invalid(
            "end_before_start",
            format!(
                "the item ends ({} {}) before it starts ({} {})",
                end.local, end.zone, start.local, start.zone
            ),
        ));
    }
    let price = i
        .price
        .as_ref()
        .map(|p| check_money("price", p))
        .transpose()?;
    let travellers: BTreeSet<Uuid> = i.travellers.iter().copied().collect();
    Ok(Item {
        item_id,
        kind: i.kind,
        title: i.title.trim().to_owned(),
        start,
        end,
        locations: i.locations.clone(),
        booking_reference: nonempty(&i.booking_reference),
        provider: nonempty(&i.provider),
        status: i.status,
        price,
        notes: nonempty(&i.notes),
        travellers: travellers.into_iter().collect(),
        listing_id: None,
    })
}

fn input_of(item: &Item) -> ItemInput {
    ItemInput {
        kind: item.kind,
        title: item.title.clone(),
        start: Slot {
            local: item.start.local,
            zone: item.start.zone.clone(),
        },
        end: Slot {
            local: item.end.local,
            zone: item.end.zone.clone(),
        },
        locations: item.locations.clone(),
        booking_reference: item.booking_reference.clone(),
        provider: item.provider.clone(),
        status: item.status,
        price: item.price.clone(),
        notes: item.notes.clone(),
        travellers: item.travellers.clone(),
    }
}

/// A partial change of an itinerary's details.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetailsPatch {
    /// Title.
    pub title: Option<String>,
    /// Region ("" clears).
    pub region: Option<String>,
    /// First day.
    pub start_date: Option<chrono::NaiveDate>,
    /// Last day.
    pub end_date: Option<chrono::NaiveDate>,
    /// Zone.
    pub zone: Option<String>,
    /// Budget (replaces the map).
    pub budget: Option<BTreeMap<String, i64>>,
    /// Visibility.
    pub visibility: Option<Visibility>,
    /// Metadata (replaces the object).
    pub metadata: Option<serde_json::Value>,
}

/// A trip's access level for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Reads.
    Viewer,
    /// Reads and writes.
    Editor,
    /// Also shares, archives, deletes, hands over.
    Owner,
}

/// The state of one trip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trip {
    /// Created.
    pub exists: bool,
    /// Deleted.
    pub deleted: bool,
    /// Read-only.
    pub archived: bool,
    /// The owner.
    pub owner: Option<Uuid>,
    /// Details.
    pub details: Option<Details>,
    /// Public link token.
    pub link_token: Option<String>,
    /// Collaborators.
    pub shares: BTreeMap<Uuid, ShareRole>,
    /// Pending invitations.
    pub invites: BTreeMap<Uuid, ShareRole>,
    /// Items (removed ones are gone; cancelled ones stay).
    pub items: BTreeMap<Uuid, Item>,
    /// The room, once opened.
    pub room: Option<Uuid>,
}

impl Trip {
    /// Fold one event in.
    pub fn evolve(&mut self, event: &ItineraryEvent) {
        use ItineraryEvent as E;
        match event {
            E::ItineraryCreated {
                owner,
                details,
                link_token,
                ..
            } => {
                self.exists = true;
                self.owner = Some(*owner);
                self.details = Some(details.clone());
                self.link_token = link_token.clone();
            }
            E::ItineraryUpdated {
                details,
                link_token,
            } => {
                self.details = Some(details.clone());
                self.link_token = link_token.clone();
            }
            E::ItineraryArchived => self.archived = true,
            E::ItineraryDeleted => self.deleted = true,
            E::ItemAdded { item } | E::ItemUpdated { item } => {
                self.items.insert(item.item_id, item.clone());
            }
            E::ItemCancelled { item_id } => {
                if let Some(i) = self.items.get_mut(item_id) {
                    i.status = ItemStatus::Cancelled;
                }
            }
            E::ItemRemoved { item_id } => {
                self.items.remove(item_id);
            }
            E::ShareInvited { user_id, role, .. } => {
                self.invites.insert(*user_id, *role);
            }
            E::ShareAccepted { user_id, role } => {
                self.invites.remove(user_id);
                self.shares.insert(*user_id, *role);
            }
            E::ShareRevoked { user_id, .. } => {
                self.invites.remove(user_id);
                self.shares.remove(user_id);
            }
            E::OwnershipTransferred { from, to } => {
                self.shares.remove(to);
                self.shares.insert(*from, ShareRole::Editor);
                self.owner = Some(*to);
            }
            E::RoomOpened { room_id } => self.room = Some(*room_id),
            E::ListingAdded { .. } => {}
        }
    }

    fn live(&self) -> bool {
        self.exists && !self.deleted
    }

    /// `user`'s access, if any.
    pub fn access(&self, user: Option<Uuid>) -> Option<Access> {
        let user = user?;
        if !self.live() {
            return None;
        }
        if self.owner == Some(user) {
            return Some(Access::Owner);
        }
        match self.shares.get(&user)? {
            ShareRole::Editor => Some(Access::Editor),
            ShareRole::Viewer => Some(Access::Viewer),
        }
    }

    /// Travellers must be the trip's people (collaborators or invitees).
    pub fn check_travellers(&self, travellers: &[Uuid]) -> Result<(), Rejection> {
        match travellers.iter().find(|t| {
            self.owner != Some(**t) && !self.shares.contains_key(t) && !self.invites.contains_key(t)
        }) {
            Some(t) => Err(invalid(
                "unknown_traveller",
                format!("{t} is not on this itinerary: share it with them first"),
            )),
            None => Ok(()),
        }
    }

    /// Everyone the trip is shared with, the owner first.
    pub fn people(&self) -> Vec<Uuid> {
        self.owner
            .into_iter()
            .chain(self.shares.keys().copied())
            .collect()
    }
}

/// The state of one catalogue entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The `ListingAdded` event, once it happened.
    pub added: Option<ItineraryEvent>,
}

impl Listing {
    /// Fold one event in.
    pub fn evolve(&mut self, event: &ItineraryEvent) {
        if matches!(event, ItineraryEvent::ListingAdded { .. }) {
            self.added = Some(event.clone());
        }
    }
}

/// Commands of the itinerary domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ItineraryCommand {
    /// Create a trip; the actor owns it.
    Create {
        /// New id.
        itinerary_id: Uuid,
        /// Details.
        details: Details,
        /// A fresh random token, used if the visibility is `public_link`.
        link_token: String,
    },
    /// Change details (owner or editor; visibility: owner only).
    Update {
        /// Trip.
        itinerary_id: Uuid,
        /// What changes.
        patch: DetailsPatch,
        /// A fresh random token, used if a public link is turned on.
        link_token: String,
    },
    /// Make it read-only (owner).
    Archive {
        /// Trip.
        itinerary_id: Uuid,
    },
    /// Delete it (owner).
    Delete {
        /// Trip.
        itinerary_id: Uuid,
    },
    /// Add an item, or update the one with the same provider and booking reference.
    AddItem {
        /// Trip.
        itinerary_id: Uuid,
        /// New item id (ignored when the booking already exists).
        item_id: Uuid,
        /// The item.
        item: ItemInput,
    },
    /// Change an item.
    UpdateItem {
        /// Trip.
        itinerary_id: Uuid,
        /// Item.
        item_id: Uuid,
        /// What changes.
        patch: ItemPatch,
    },
    /// Cancel an item.
    CancelItem {
        /// Trip.
        itinerary_id: Uuid,
        /// Item.
        item_id: Uuid,
    },
    /// Remove an item.
    RemoveItem {
        /// Trip.
        itinerary_id: Uuid,
        /// Item.
        item_id: Uuid,
    },
    /// Invite a user (owner).
    Invite {
        /// Trip.
        itinerary_id: Uuid,
        /// Who.
        user_id: Uuid,
        /// As what.
        role: ShareRole,
    },
    /// Accept an invitation (the invitee).
    Accept {
        /// Trip.
        itinerary_id: Uuid,
    },
    /// Revoke a share or invitation (owner), or leave (the collaborator).
    Revoke {
        /// Trip.
        itinerary_id: Uuid,
        /// Who.
        user_id: Uuid,
    },
    /// Hand the trip to a collaborator (owner).
    TransferOwnership {
        /// Trip.
        itinerary_id: Uuid,
        /// The new owner.
        to: Uuid,
    },
    /// Open the trip's chat room (owner or editor); members are the trip's people.
    OpenRoom {
        /// Trip.
        itinerary_id: Uuid,
        /// The room's first data key, wrapped by the master key.
        room_key: Bytes64,
    },
    /// Post a system message into the trip room (Mathia only).
    PostUpdate {
        /// Trip.
        itinerary_id: Uuid,
        /// Message id.
        message_id: Uuid,
        /// Sealed text.
        body: Sealed,
        /// Room key version wrapping `message_key`.
        key_version: i32,
        /// The message key, wrapped.
        message_key: Bytes64,
        /// When.
        sent_at: DateTime<Utc>,
    },
    /// Add a catalogue entry (admins and providers).
    AddListing {
        /// New id.
        listing_id: Uuid,
        /// Category.
        category: String,
        /// Title.
        title: String,
        /// City or area.
        place: String,
        /// Venue.
        venue: Option<Place>,
        /// Start.
        start: Slot,
        /// End.
        end: Slot,
        /// Ticket price.
        price: Option<Money>,
        /// Seller.
        provider: Option<String>,
    },
    /// Add a catalogue entry to a trip as an `event` item.
    AddListingItem {
        /// Trip.
        itinerary_id: Uuid,
        /// New item id.
        item_id: Uuid,
        /// The entry.
        listing_id: Uuid,
        /// Who goes (empty: everyone).
        travellers: Vec<Uuid>,
    },
}

fn not_found() -> Rejection {
    Rejection::new(404, "itinerary_not_found", "no such itinerary")
}

fn item_not_found() -> Rejection {
    Rejection::new(404, "item_not_found", "no such item on this itinerary")
}

fn forbidden(what: &str) -> Rejection {
    Rejection::new(
        403,
        "forbidden",
        format!("your role on this itinerary cannot {what}"),
    )
}

fn archived() -> Rejection {
    Rejection::new(
        409,
        "itinerary_archived",
        "the itinerary is archived: it is read-only",
    )
}

/// The answer body of an item.
pub fn item_json(itinerary_id: Uuid, item: &Item) -> serde_json::Value {
    let mut v = serde_json::to_value(item).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("itinerary_id".into(), json!(itinerary_id));
    }
    v
}

fn decision(events: Vec<(StreamId, Event)>, status: u16, answer: serde_json::Value) -> Decision {
    Decision {
        events,
        status,
        answer,
        keys: vec![],
    }
}

fn trip_event(id: Uuid, e: ItineraryEvent) -> (StreamId, Event) {
    (trip_stream(id), Event::Itinerary(e))
}

impl ItineraryCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        use ItineraryCommand as C;
        match self {
            C::Create { .. } => "itinerary.Create",
            C::Update { .. } => "itinerary.Update",
            C::Archive { .. } => "itinerary.Archive",
            C::Delete { .. } => "itinerary.Delete",
            C::AddItem { .. } => "itinerary.AddItem",
            C::UpdateItem { .. } => "itinerary.UpdateItem",
            C::CancelItem { .. } => "itinerary.CancelItem",
            C::RemoveItem { .. } => "itinerary.RemoveItem",
            C::Invite { .. } => "itinerary.Invite",
            C::Accept { .. } => "itinerary.Accept",
            C::Revoke { .. } => "itinerary.Revoke",
            C::TransferOwnership { .. } => "itinerary.TransferOwnership",
            C::OpenRoom { .. } => "itinerary.OpenRoom",
            C::PostUpdate { .. } => "itinerary.PostUpdate",
            C::AddListing { .. } => "itinerary.AddListing",
            C::AddListingItem { .. } => "itinerary.AddListingItem",
        }
    }

    fn itinerary_id(&self) -> Option<Uuid> {
        use ItineraryCommand as C;
        match self {
            C::Create { itinerary_id, .. }
            | C::Update { itinerary_id, .. }
            | C::Archive { itinerary_id }
            | C::Delete { itinerary_id }
            | C::AddItem { itinerary_id, .. }
            | C::UpdateItem { itinerary_id, .. }
            | C::CancelItem { itinerary_id, .. }
            | C::RemoveItem { itinerary_id, .. }
            | C::Invite { itinerary_id, .. }
            | C::Accept { itinerary_id }
            | C::Revoke { itinerary_id, .. }
            | C::TransferOwnership { itinerary_id, .. }
            | C::OpenRoom { itinerary_id, .. }
            | C::PostUpdate { itinerary_id, .. }
            | C::AddListingItem { itinerary_id, .. } => Some(*itinerary_id),
            C::AddListing { .. } => None,
        }
    }

    /// The stream the command is addressed to (its `If-Match` version).
    pub fn target(&self) -> StreamId {
        match self {
            ItineraryCommand::AddListing { listing_id, .. } => listing_stream(*listing_id),
            _ => trip_stream(self.itinerary_id().unwrap_or_default()),
        }
    }

    /// Every stream the decision reads.
    pub fn streams(&self) -> Vec<StreamId> {
        use ItineraryCommand as C;
        let Some(id) = self.itinerary_id() else {
            return vec![self.target()];
        };
        let room = room_stream(trip_room_id(id));
        match self {
            C::PostUpdate { message_id, .. } => {
                vec![trip_stream(id), room, message_stream(*message_id)]
            }
            C::AddListingItem { listing_id, .. } => {
                vec![trip_stream(id), listing_stream(*listing_id)]
            }
            // Sharing keeps the room's membership in step.
            C::Accept { .. }
            | C::Revoke { .. }
            | C::TransferOwnership { .. }
            | C::OpenRoom { .. }
            | C::Delete { .. } => vec![trip_stream(id), room],
            _ => vec![trip_stream(id)],
        }
    }

    /// Decide against the loaded states.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        match self {
            ItineraryCommand::AddListing { .. } => self.decide_listing(actor, states),
            _ => self.decide_trip(actor, states),
        }
    }

    fn decide_listing(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        let ItineraryCommand::AddListing {
            listing_id,
            category,
            title,
            place,
            venue,
            start,
            end,
            price,
            provider,
        } = self
        else {
            return Err(not_found());
        };
        {
            if actor.role == Role::User {
                return Err(Rejection::new(
                    403,
                    "forbidden",
                    "only admins and providers add catalogue events",
                ));
            }
            if states.listing(&listing_stream(*listing_id)).added.is_some() {
                return Err(Rejection::new(409, "listing_exists", "this id is taken"));
            }
            check_text("title", title, MAX_TITLE, true)?;
            check_text("place", place, MAX_TITLE, true)?;
            check_text("category", category, 64, true)?;
            let (start, end) = (resolve(start)?, resolve(end)?);
            if end.utc < start.utc {
                return Err(invalid(
                    "end_before_start",
                    "the event ends before it starts",
                ));
            }
            let price = price
                .as_ref()
                .map(|p| check_money("price", p))
                .transpose()?;
            let e = ItineraryEvent::ListingAdded {
                listing_id: *listing_id,
                category: category.trim().to_lowercase(),
                title: title.trim().to_owned(),
                place: place.trim().to_owned(),
                venue: venue.clone(),
                start,
                end,
                price,
                provider: nonempty(provider),
                by: actor.user_id,
            };
            let mut answer = serde_json::to_value(&e).unwrap_or_default();
            if let Some(o) = answer.as_object_mut() {
                o.remove("type");
            }
            Ok(decision(
                vec![(listing_stream(*listing_id), Event::Itinerary(e))],
                201,
                answer,
            ))
        }
    }

    fn decide_trip(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        use ItineraryCommand as C;
        let id = self.itinerary_id().unwrap_or_default();
        let trip = states.trip(&trip_stream(id));
        let me = actor.user_id;
        let access = trip.access(me);
        let see = || access.ok_or_else(not_found);
        let write = |what: &str| -> Result<Access, Rejection> {
            let a = see()?;
            if a < Access::Editor {
                return Err(forbidden(what));
            }
            if trip.archived {
                return Err(archived());
            }
            Ok(a)
        };
        let own = |what: &str| -> Result<(), Rejection> {
            if see()? < Access::Owner {
                return Err(forbidden(what));
            }
            Ok(())
        };
        let room_id = trip_room_id(id);
        let rs = room_stream(room_id);
        let room = states.room(&rs);
        let room_live = room.exists && !room.deleted && !room.archived;
        let base = json!({ "itinerary_id": id });
        match self {
            C::AddListing { .. } => self.decide_listing(actor, states),
            C::Create {
                details,
                link_token,
                ..
            } => {
                let Some(me) = me else {
                    return Err(Rejection::new(403, "forbidden", "the system owns no trips"));
                };
                if trip.exists {
                    return Err(Rejection::new(
                        409,
                        "itinerary_exists",
                        "this itinerary id is taken",
                    ));
                }
                let details = check_details(details)?;
                let link_token =
                    (details.visibility == Visibility::PublicLink).then(|| link_token.clone());
                let answer = json!({
                    "itinerary_id": id, "owner": me, "details": details, "link_token": link_token,
                });
                Ok(decision(
                    vec![trip_event(
                        id,
                        ItineraryEvent::ItineraryCreated {
                            itinerary_id: id,
                            owner: me,
                            details,
                            link_token,
                        },
                    )],
                    201,
                    answer,
                ))
            }
            C::Update {
                patch, link_token, ..
            } => {
                write("change the itinerary")?;
                let mut d = trip.details.clone().ok_or_else(not_found)?;
                if patch.visibility.is_some_and(|v| v != d.visibility) {
                    own("change who can see the itinerary")?;
                }
                if let Some(t) = &patch.title {
                    d.title = t.clone();
                }
                if let Some(r) = &patch.region {
                    d.region = Some(r.clone());
                }
                if let Some(s) = patch.start_date {
                    d.start_date = s;
                }
                if let Some(e) = patch.end_date {
                    d.end_date = e;
                }
                if let Some(z) = &patch.zone {
                    d.zone = z.clone();
                }
                if let Some(b) = &patch.budget {
                    d.budget = b.clone();
                }
                if let Some(v) = patch.visibility {
                    d.visibility = v;
                }
                if let Some(m) = &patch.metadata {
                    d.metadata = m.clone();
                }
                let d = check_details(&d)?;
                let link_token = match (d.visibility, &trip.link_token) {
                    (Visibility::PublicLink, Some(t)) => Some(t.clone()),
                    (Visibility::PublicLink, None) => Some(link_token.clone()),
                    _ => None,
                };
                let answer = json!({ "itinerary_id": id, "details": d, "link_token": link_token });
                Ok(decision(
                    vec![trip_event(
                        id,
                        ItineraryEvent::ItineraryUpdated {
                            details: d,
                            link_token,
                        },
                    )],
                    200,
                    answer,
                ))
            }
            C::Archive { .. } => {
                own("archive the itinerary")?;
                if trip.archived {
                    return Err(archived());
                }
                Ok(decision(
                    vec![trip_event(id, ItineraryEvent::ItineraryArchived)],
                    200,
                    json!({ "itinerary_id": id, "archived": true }),
                ))
            }
            C::Delete { .. } => {
                own("delete the itinerary")?;
                let mut events = vec![trip_event(id, ItineraryEvent::ItineraryDeleted)];
                if room_live {
                    events.push((rs, Event::Chat(ChatEvent::RoomArchived)));
                }
                Ok(decision(
                    events,
                    200,
                    json!({ "itinerary_id": id, "deleted": true }),
                ))
            }
            C::AddItem { item_id, item, .. } => {
                write("add items")?;
                let existing = match (&item.provider, &item.booking_reference) {
                    (Some(p), Some(r)) if !p.trim().is_empty() && !r.trim().is_empty() => {
                        trip.items.values().find(|i| {
                            i.provider.as_deref() == Some(p.trim())
                                && i.booking_reference.as_deref() == Some(r.trim())
                        })
                    }
                    _ => None,
                };
                match existing {
                    Some(old) => {
                        let mut new = check_item(old.item_id, item)?;
                        trip.check_travellers(&new.travellers)?;
                        new.listing_id = old.listing_id;
                        if &new == old {
                            let mut a = item_json(id, old);
                            a["upsert"] = json!("unchanged");
                            return Ok(decision(vec![], 200, a));
                        }
                        let mut a = item_json(id, &new);
                        a["upsert"] = json!("updated");
                        Ok(decision(
                            vec![trip_event(id, ItineraryEvent::ItemUpdated { item: new })],
                            200,
                            a,
                        ))
                    }
                    None => {
                        if trip.items.len() >= MAX_ITEMS {
                            return Err(invalid(
                                "too_many_items",
                                format!("an itinerary holds at most {MAX_ITEMS} items"),
                            ));
                        }
                        if trip.items.contains_key(item_id) {
                            return Err(Rejection::new(
                                409,
                                "item_exists",
                                "this item id is taken",
                            ));
                        }
                        let new = check_item(*item_id, item)?;
                        trip.check_travellers(&new.travellers)?;
                        let mut a = item_json(id, &new);
                        a["upsert"] = json!("created");
                        Ok(decision(
                            vec![trip_event(id, ItineraryEvent::ItemAdded { item: new })],
                            201,
                            a,
                        ))
                    }
                }
            }
            C::UpdateItem { item_id, patch, .. } => {
                write("change items")?;
                let old = trip.items.get(item_id).ok_or_else(item_not_found)?;
                let mut i = input_of(old);
                if let Some(k) = patch.kind {
                    i.kind = k;
                }
                if let Some(t) = &patch.title {
                    i.title = t.clone();
                }
                if let Some(s) = &patch.start {
                    i.start = s.clone();
                }
                if let Some(e) = &patch.end {
                    i.end = e.clone();
                }
                if let Some(l) = &patch.locations {
                    i.locations = l.clone();
                }
                if let Some(b) = &patch.booking_reference {
                    i.booking_reference = Some(b.clone());
                }
                if let Some(p) = &patch.provider {
                    i.provider = Some(p.clone());
                }
                if let Some(s) = patch.status {
                    i.status = s;
                }
                if let Some(p) = &patch.price {
                    i.price = Some(p.clone());
                }
                if let Some(n) = &patch.notes {
                    i.notes = Some(n.clone());
                }
                if let Some(t) = &patch.travellers {
                    i.travellers = t.clone();
                }
                let mut new = check_item(*item_id, &i)?;
                trip.check_travellers(&new.travellers)?;
                new.listing_id = old.listing_id;
                // Two items may not claim the same booking.
                if let (Some(p), Some(r)) = (&new.provider, &new.booking_reference)
                    && trip.items.values().any(|o| {
                        o.item_id != *item_id
                            && o.provider.as_ref() == Some(p)
                            && o.booking_reference.as_ref() == Some(r)
                    })
                {
                    return Err(Rejection::new(
                        409,
                        "booking_exists",
                        "another item already holds this provider and booking reference",
                    ));
                }
                let a = item_json(id, &new);
                Ok(decision(
                    vec![trip_event(id, ItineraryEvent::ItemUpdated { item: new })],
                    200,
                    a,
                ))
            }
            C::CancelItem { item_id, .. } | C::RemoveItem { item_id, .. } => {
                let cancel = matches!(self, C::CancelItem { .. });
                write(if cancel {
                    "cancel items"
                } else {
                    "remove items"
                })?;
                let old = trip.items.get(item_id).ok_or_else(item_not_found)?;
                if cancel && old.status == ItemStatus::Cancelled {
                    return Err(Rejection::new(
                        409,
                        "already_cancelled",
                        "this item is already cancelled",
                    ));
                }
                let e = if cancel {
                    ItineraryEvent::ItemCancelled { item_id: *item_id }
                } else {
                    ItineraryEvent::ItemRemoved { item_id: *item_id }
                };
                Ok(decision(
                    vec![trip_event(id, e)],
                    200,
                    json!({ "itinerary_id": id, "item_id": item_id,
                            "status": if cancel { "cancelled" } else { "removed" } }),
                ))
            }
            C::Invite { user_id, role, .. } => {
                own("share the itinerary")?;
                if trip.archived {
                    return Err(archived());
                }
                if trip.owner == Some(*user_id) || trip.shares.contains_key(user_id) {
                    return Err(Rejection::new(
                        409,
                        "already_shared",
                        "the itinerary is already shared with this user",
                    ));
                }
                if trip.invites.get(user_id) == Some(role) {
                    return Err(Rejection::new(
                        409,
                        "already_invited",
                        "this user is already invited",
                    ));
                }
                Ok(decision(
                    vec![trip_event(
                        id,
                        ItineraryEvent::ShareInvited {
                            user_id: *user_id,
                            role: *role,
                            by: me.unwrap_or_default(),
                        },
                    )],
                    201,
                    json!({ "itinerary_id": id, "user_id": user_id, "role": role, "state": "invited" }),
                ))
            }
            C::Accept { .. } => {
                let Some(me) = me else {
                    return Err(not_found());
                };
                let Some(role) = trip.invites.get(&me).copied().filter(|_| trip.live()) else {
                    return Err(not_found());
                };
                let mut events = vec![trip_event(
                    id,
                    ItineraryEvent::ShareAccepted { user_id: me, role },
                )];
                if room_live && !room.members.contains_key(&me) {
                    events.push((
                        rs,
                        Event::Chat(ChatEvent::MemberJoined {
                            user_id: me,
                            role: MemberRole::Member,
                            via_email: None,
                        }),
                    ));
                }
                Ok(decision(
                    events,
                    200,
                    json!({ "itinerary_id": id, "user_id": me, "role": role, "state": "active" }),
                ))
            }
            C::Revoke { user_id, .. } => {
                // An invitee may decline (revoke their own invitation) without access yet.
                let declining =
                    me == Some(*user_id) && trip.live() && trip.invites.contains_key(user_id);
                if !declining && see()? < Access::Owner && me != Some(*user_id) {
                    return Err(forbidden("revoke shares"));
                }
                if trip.owner == Some(*user_id) {
                    return Err(invalid(
                        "owner_cannot_leave",
                        "the owner cannot be revoked: transfer ownership first",
                    ));
                }
                if !trip.shares.contains_key(user_id) && !trip.invites.contains_key(user_id) {
                    return Err(Rejection::new(
                        404,
                        "share_not_found",
                        "the itinerary is not shared with this user",
                    ));
                }
                let by = me.unwrap_or_default();
                let mut events = vec![trip_event(
                    id,
                    ItineraryEvent::ShareRevoked {
                        user_id: *user_id,
                        by,
                    },
                )];
                if room_live && room.members.contains_key(user_id) {
                    events.push((
                        rs,
                        Event::Chat(ChatEvent::MemberKicked {
                            user_id: *user_id,
                            by,
                        }),
                    ));
                }
                Ok(decision(
                    events,
                    200,
                    json!({ "itinerary_id": id, "user_id": user_id, "state": "revoked" }),
                ))
            }
            C::TransferOwnership { to, .. } => {
                own("hand the itinerary over")?;
                let from = me.unwrap_or_default();
                if !trip.shares.contains_key(to) {
                    return Err(invalid(
                        "not_a_collaborator",
                        "ownership goes to someone the itinerary is already shared with",
                    ));
                }
                let mut events = vec![trip_event(
                    id,
                    ItineraryEvent::OwnershipTransferred { from, to: *to },
                )];
                if room_live && room.members.contains_key(to) {
                    events.push((
                        rs,
                        Event::Chat(ChatEvent::MemberRoleChanged {
                            user_id: *to,
                            role: MemberRole::Owner,
                        }),
                    ));
                }
                Ok(decision(
                    events,
                    200,
                    json!({ "itinerary_id": id, "owner": to, "previous_owner": from }),
                ))
            }
            C::OpenRoom { room_key, .. } => {
                write("open the trip room")?;
                if trip.room.is_some() || room.exists {
                    return Err(Rejection::new(
                        409,
                        "room_exists",
                        "this itinerary already has a room",
                    )
                    .with_details(json!({ "room_id": room_id })));
                }
                let owner = trip.owner.unwrap_or_default();
                let title = trip
                    .details
                    .as_ref()
                    .map(|d| d.title.clone())
                    .unwrap_or_default();
                let mut events = vec![
                    trip_event(id, ItineraryEvent::RoomOpened { room_id }),
                    (
                        rs.clone(),
                        Event::Chat(ChatEvent::RoomCreated {
                            room_id,
                            name: title.chars().take(100).collect(),
                            topic: Some("Trip room: itinerary changes appear here".into()),
                            visibility: chat_events::Visibility::Private,
                            created_by: owner,
                        }),
                    ),
                ];
                for user_id in trip.shares.keys() {
                    events.push((
                        rs.clone(),
                        Event::Chat(ChatEvent::MemberJoined {
                            user_id: *user_id,
                            role: MemberRole::Member,
                            via_email: None,
                        }),
                    ));
                }
                Ok(Decision {
                    events,
                    status: 201,
                    answer: json!({ "itinerary_id": id, "room_id": room_id, "members": trip.people() }),
                    keys: vec![KeyOp::PutRoomKey {
                        room_id,
                        version: 1,
                        wrapped: room_key.clone(),
                    }],
                })
            }
            C::PostUpdate {
                message_id,
                body,
                key_version,
                message_key,
                sent_at,
                ..
            } => {
                if actor.role != Role::System {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only Mathia posts itinerary updates",
                    ));
                }
                if !room_live {
                    return Err(Rejection::new(
                        404,
                        "room_not_found",
                        "the trip has no open room",
                    ));
                }
                if states.message(&message_stream(*message_id)).exists {
                    return Err(Rejection::new(409, "message_exists", "already posted"));
                }
                Ok(Decision {
                    events: vec![(
                        message_stream(*message_id),
                        Event::Chat(ChatEvent::MessagePosted {
                            message_id: *message_id,
                            room_id,
                            sender: SYSTEM_SENDER,
                            kind: MessageKind::Text,
                            body: body.clone(),
                            attachment: None,
                            thread_root: None,
                            quote: None,
                            mentions: vec![],
                            mentions_assistant: false,
                            client_message_id: None,
                            key_version: *key_version,
                            sent_at: *sent_at,
                        }),
                    )],
                    status: 201,
                    answer: json!({ "itinerary_id": id, "room_id": room_id, "message_id": message_id }),
                    keys: vec![KeyOp::PutMessageKey {
                        message_id: *message_id,
                        room_id,
                        key_version: *key_version,
                        wrapped: message_key.clone(),
                    }],
                })
            }
            C::AddListingItem {
                item_id,
                listing_id,
                travellers,
                ..
            } => {
                write("add items")?;
                let Some(ItineraryEvent::ListingAdded {
                    title,
                    venue,
                    start,
                    end,
                    price,
                    provider,
                    ..
                }) = states.listing(&listing_stream(*listing_id)).added
                else {
                    return Err(Rejection::new(
                        404,
                        "listing_not_found",
                        "no such catalogue event",
                    ));
                };
                if trip
                    .items
                    .values()
                    .any(|i| i.listing_id == Some(*listing_id))
                {
                    return Err(Rejection::new(
                        409,
                        "listing_already_added",
                        "this catalogue event is already on the itinerary",
                    )
                    .with_details(base));
                }
                if trip.items.contains_key(item_id) {
                    return Err(Rejection::new(409, "item_exists", "this item id is taken"));
                }
                let item = Item {
                    item_id: *item_id,
                    kind: ItemKind::Event,
                    title,
                    start,
                    end,
                    locations: venue.into_iter().collect(),
                    booking_reference: None,
                    provider,
                    status: ItemStatus::Pending,
                    price,
                    notes: None,
                    travellers: travellers
                        .iter()
                        .copied()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    listing_id: Some(*listing_id),
                };
                trip.check_travellers(&item.travellers)?;
                if trip.items.len() >= MAX_ITEMS {
                    return Err(invalid(
                        "too_many_items",
                        format!("an itinerary holds at most {MAX_ITEMS} items"),
                    ));
                }
                let a = item_json(id, &item);
                Ok(decision(
                    vec![trip_event(id, ItineraryEvent::ItemAdded { item })],
                    201,
                    a,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;
    use crate::Command;

    fn actor(u: Uuid) -> Actor {
        Actor {
            user_id: Some(u),
            role: Role::User,
        }
    }

    fn run(
        states: &mut StateSet,
        who: &Actor,
        cmd: ItineraryCommand,
    ) -> Result<Decision, Rejection> {
        let cmd = Command::Itinerary(cmd);
        let d = cmd.decide(who, states)?;
        states.apply(&d.events);
        Ok(d)
    }

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap()
    }

    fn details() -> Details {
        Details {
            title: "Nairobi to London".into(),
            region: Some("UK".into()),
            start_date: NaiveDate::from_ymd_opt(2026, 12, 20).unwrap(),
            end_date: NaiveDate::from_ymd_opt(2026, 12, 28).unwrap(),
            zone: "Europe/London".into(),
            budget: [("GBP".to_owned(), 150_000)].into_iter().collect(),
            visibility: Visibility::Private,
            metadata: json!({}),
        }
    }

    fn flight() -> ItemInput {
        ItemInput {
            kind: ItemKind::Flight,
            title: "KQ 100".into(),
            start: Slot {
                local: at(2026, 12, 20, 23, 30),
                zone: "Africa/Nairobi".into(),
            },
            end: Slot {
                local: at(2026, 12, 21, 6, 10),
                zone: "Europe/London".into(),
            },
            locations: vec![],
            booking_reference: Some("ABC123".into()),
            provider: Some("kenya-airways".into()),
            status: ItemStatus::Confirmed,
            price: Some(Money {
                amount: 85_000,
                currency: "gbp".into(),
            }),
            notes: None,
            travellers: vec![],
        }
    }

    fn trip(states: &mut StateSet, owner: Uuid) -> Uuid {
        let id = Uuid::new_v4();
        run(
            states,
            &actor(owner),
            ItineraryCommand::Create {
                itinerary_id: id,
                details: details(),
                link_token: "tok".into(),
            },
        )
        .unwrap();
        id
    }

    #[test]
    fn a_midnight_flight_across_zones_resolves_to_the_right_instants() {
        let item = check_item(Uuid::nil(), &flight()).unwrap();
        assert_eq!(item.start.utc.to_rfc3339(), "2026-12-20T20:30:00+00:00");
        assert_eq!(item.end.utc.to_rfc3339(), "2026-12-21T06:10:00+00:00");
        assert_eq!(item.price.unwrap().currency, "GBP");
        // Landing "before" departure in local digits is fine; before it in time is not.
        let mut back = flight();
        back.end.local = at(2026, 12, 20, 19, 0);
        assert_eq!(
            check_item(Uuid::nil(), &back).unwrap_err().code,
            "end_before_start"
        );
    }

    #[test]
    fn dst_gaps_are_refused_and_repeated_hours_take_the_earlier_instant() {
        let gap = Slot {
            local: at(2027, 3, 28, 1, 30),
            zone: "Europe/London".into(),
        };
        assert_eq!(resolve(&gap).unwrap_err().code, "nonexistent_local_time");
        let repeated = Slot {
            local: at(2026, 10, 25, 1, 30),
            zone: "Europe/London".into(),
        };
        assert_eq!(
            resolve(&repeated).unwrap().utc.to_rfc3339(),
            "2026-10-25T00:30:00+00:00"
        );
        let bad = Slot {
            local: at(2026, 1, 1, 0, 0),
            zone: "Mars/Olympus".into(),
        };
        assert_eq!(resolve(&bad).unwrap_err().code, "invalid_zone");
    }

    #[test]
    fn upsert_by_provider_and_booking_reference_is_idempotent() {
        let mut s = StateSet::default();
        let owner = Uuid::new_v4();
        let id = trip(&mut s, owner);
        let add = |item_id| ItineraryCommand::AddItem {
            itinerary_id: id,
            item_id,
            item: flight(),
        };
        let first = run(&mut s, &actor(owner), add(Uuid::new_v4())).unwrap();
        assert_eq!(first.status, 201);
        let again = run(&mut s, &actor(owner), add(Uuid::new_v4())).unwrap();
        assert_eq!(again.status, 200);
        assert!(again.events.is_empty());
        assert_eq!(again.answer["item_id"], first.answer["item_id"]);
        let mut changed = flight();
        changed.status = ItemStatus::Pending;
        let upd = run(
            &mut s,
            &actor(owner),
            ItineraryCommand::AddItem {
                itinerary_id: id,
                item_id: Uuid::new_v4(),
                item: changed,
            },
        )
        .unwrap();
        assert_eq!(upd.answer["upsert"], "updated");
        assert_eq!(s.trip(&trip_stream(id)).items.len(), 1);
    }

    #[test]
    fn viewers_read_only_strangers_see_nothing_and_revoked_editors_lose_access() {
        let mut s = StateSet::default();
        let (owner, ed, viewer, stranger) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let id = trip(&mut s, owner);
        for (u, role) in [(ed, ShareRole::Editor), (viewer, ShareRole::Viewer)] {
            run(
                &mut s,
                &actor(owner),
                ItineraryCommand::Invite {
                    itinerary_id: id,
                    user_id: u,
                    role,
                },
            )
            .unwrap();
            run(
                &mut s,
                &actor(u),
                ItineraryCommand::Accept { itinerary_id: id },
            )
            .unwrap();
        }
        let add = ItineraryCommand::AddItem {
            itinerary_id: id,
            item_id: Uuid::new_v4(),
            item: flight(),
        };
        assert_eq!(
            run(&mut s, &actor(viewer), add.clone()).unwrap_err().status,
            403
        );
        assert_eq!(
            run(&mut s, &actor(stranger), add.clone()).unwrap_err().code,
            "itinerary_not_found"
        );
        assert!(run(&mut s, &actor(ed), add.clone()).is_ok());
        run(
            &mut s,
            &actor(owner),
            ItineraryCommand::Revoke {
                itinerary_id: id,
                user_id: ed,
            },
        )
        .unwrap();
        assert_eq!(run(&mut s, &actor(ed), add).unwrap_err().status, 404);
        // An invitee declines by revoking their own invitation; a stranger cannot.
        let invitee = Uuid::new_v4();
        run(
            &mut s,
            &actor(owner),
            ItineraryCommand::Invite {
                itinerary_id: id,
                user_id: invitee,
                role: ShareRole::Viewer,
            },
        )
        .unwrap();
        let decline = ItineraryCommand::Revoke {
            itinerary_id: id,
            user_id: invitee,
        };
        assert_eq!(
            run(&mut s, &actor(stranger), decline.clone())
                .unwrap_err()
                .status,
            404
        );
        run(&mut s, &actor(invitee), decline).unwrap();
        assert!(s.trip(&trip_stream(id)).invites.is_empty());
        // Editors cannot share; the owner hands over to a collaborator only.
        assert_eq!(
            run(
                &mut s,
                &actor(owner),
                ItineraryCommand::TransferOwnership {
                    itinerary_id: id,
                    to: stranger
                }
            )
            .unwrap_err()
            .code,
            "not_a_collaborator"
        );
        run(
            &mut s,
            &actor(owner),
            ItineraryCommand::TransferOwnership {
                itinerary_id: id,
                to: viewer,
            },
        )
        .unwrap();
        let t = s.trip(&trip_stream(id));
        assert_eq!(t.access(Some(viewer)), Some(Access::Owner));
        assert_eq!(t.access(Some(owner)), Some(Access::Editor));
    }

    #[test]
    fn the_trip_room_follows_the_shares_and_only_mathia_posts_updates() {
        let mut s = StateSet::default();
        let (owner, ed) = (Uuid::new_v4(), Uuid::new_v4());
        let id = trip(&mut s, owner);
        run(
            &mut s,
            &actor(owner),
            ItineraryCommand::Invite {
                itinerary_id: id,
                user_id: ed,
                role: ShareRole::Editor,
            },
        )
        .unwrap();
        let open = run(
            &mut s,
            &actor(owner),
            ItineraryCommand::OpenRoom {
                itinerary_id: id,
                room_key: Bytes64(vec![1; 40]),
            },
        )
        .unwrap();
        assert_eq!(open.keys.len(), 1);
        let rs = room_stream(trip_room_id(id));
        assert_eq!(
            s.room(&rs).members.len(),
            1,
            "an invitee is not a member yet"
        );
        run(
            &mut s,
            &actor(ed),
            ItineraryCommand::Accept { itinerary_id: id },
        )
        .unwrap();
        assert!(s.room(&rs).members.contains_key(&ed));
        let post = ItineraryCommand::PostUpdate {
            itinerary_id: id,
            message_id: Uuid::new_v4(),
            body: Sealed {
                nonce: Bytes64(vec![0; 12]),
                ct: Bytes64(vec![0; 20]),
            },
            key_version: 1,
            message_key: Bytes64(vec![2; 40]),
            sent_at: Utc::now(),
        };
        assert_eq!(
            run(&mut s, &actor(owner), post.clone()).unwrap_err().status,
            403
        );
        let system = Actor {
            user_id: None,
            role: Role::System,
        };
        let d = run(&mut s, &system, post).unwrap();
        assert!(matches!(
            &d.events[0].1,
            Event::Chat(ChatEvent::MessagePosted { sender, .. }) if *sender == SYSTEM_SENDER
        ));
        run(
            &mut s,
            &actor(owner),
            ItineraryCommand::Revoke {
                itinerary_id: id,
                user_id: ed,
            },
        )
        .unwrap();
        assert!(!s.room(&rs).members.contains_key(&ed));
    }

    #[test]
    fn catalogue_events_are_added_by_admins_and_become_items() {
        let mut s = StateSet::default();
        let owner = Uuid::new_v4();
        let id = trip(&mut s, owner);
        let listing_id = Uuid::new_v4();
        let add = ItineraryCommand::AddListing {
            listing_id,
            category: "Concert".into(),
            title: "Sauti Sol live".into(),
            place: "London".into(),
            venue: None,
            start: Slot {
                local: at(2026, 12, 22, 20, 0),
                zone: "Europe/London".into(),
            },
            end: Slot {
                local: at(2026, 12, 22, 23, 0),
                zone: "Europe/London".into(),
            },
            price: None,
            provider: None,
        };
        assert_eq!(
            run(&mut s, &actor(owner), add.clone()).unwrap_err().status,
            403
        );
        let admin = Actor {
            user_id: Some(Uuid::new_v4()),
            role: Role::Admin,
        };
        run(&mut s, &admin, add).unwrap();
        let d = run(
            &mut s,
            &actor(owner),
            ItineraryCommand::AddListingItem {
                itinerary_id: id,
                item_id: Uuid::new_v4(),
                listing_id,
                travellers: vec![],
            },
        )
        .unwrap();
        assert_eq!(d.answer["kind"], "event");
        assert_eq!(d.answer["listing_id"], json!(listing_id));
    }

    proptest::proptest! {
        /// Random adds, edits, cancels and removals: the folded trip's booked and
        /// pending sums per currency equal a recount of what the test itself did,
        /// and folding the decided events from scratch gives the same trip.
        #[test]
        fn sums_from_the_folded_trip_match_a_recount_and_refolding_is_identical(
            ops in proptest::collection::vec((0u8..4, 0usize..8, 0i64..100_000, 0usize..3, 0usize..3), 1..60)
        ) {
            let mut s = StateSet::default();
            let owner = Uuid::new_v4();
            let id = trip(&mut s, owner);
            let mut log: Vec<Event> = vec![];
            // Re-fold needs the creation event too.
            let created = Command::Itinerary(ItineraryCommand::Create {
                itinerary_id: id,
                details: details(),
                link_token: "tok".into(),
            })
            .decide(&actor(owner), &StateSet::default())
            .unwrap();
            log.extend(created.events.into_iter().map(|(_, e)| e));
            let currencies = ["GBP", "KES", "USD"];
            let statuses = [ItemStatus::Pending, ItemStatus::Confirmed, ItemStatus::Cancelled];
            let mut model: BTreeMap<Uuid, (String, i64, ItemStatus)> = BTreeMap::new();
            for (op, pick, amount, c, st) in ops {
                let existing: Vec<Uuid> = model.keys().copied().collect();
                let target = (!existing.is_empty()).then(|| existing[pick % existing.len()]);
                let cmd = match (op, target) {
                    (0, _) | (_, None) => {
                        let mut i = flight();
                        i.booking_reference = None;
                        i.price = Some(Money { amount, currency: currencies[c].into() });
                        i.status = statuses[st];
                        ItineraryCommand::AddItem { itinerary_id: id, item_id: Uuid::new_v4(), item: i }
                    }
                    (1, Some(t)) => ItineraryCommand::UpdateItem {
                        itinerary_id: id,
                        item_id: t,
                        patch: ItemPatch {
                            price: Some(Money { amount, currency: currencies[c].into() }),
                            status: Some(statuses[st]),
                            ..Default::default()
                        },
                    },
                    (2, Some(t)) => ItineraryCommand::CancelItem { itinerary_id: id, item_id: t },
                    (_, Some(t)) => ItineraryCommand::RemoveItem { itinerary_id: id, item_id: t },
                };
                let Ok(d) = run(&mut s, &actor(owner), cmd.clone()) else {
                    // The only refusal here: cancelling what is cancelled.
                    let cancelling = matches!(cmd, ItineraryCommand::CancelItem { .. });
                    proptest::prop_assert!(cancelling);
                    continue;
                };
                log.extend(d.events.iter().map(|(_, e)| e.clone()));
                match cmd {
                    ItineraryCommand::AddItem { item, .. } => {
                        let p = item.price.unwrap();
                        let item_id: Uuid = serde_json::from_value(d.answer["item_id"].clone()).unwrap();
                        model.insert(item_id, (p.currency, p.amount, item.status));
                    }
                    ItineraryCommand::UpdateItem { item_id, patch, .. } => {
                        let p = patch.price.unwrap();
                        model.insert(item_id, (p.currency, p.amount, patch.status.unwrap()));
                    }
                    ItineraryCommand::CancelItem { item_id, .. } => {
                        model.get_mut(&item_id).unwrap().2 = ItemStatus::Cancelled;
                    }
                    ItineraryCommand::RemoveItem { item_id, .. } => {
                        model.remove(&item_id);
                    }
                    _ => unreachable!(),
                }
            }
            let t = s.trip(&trip_stream(id));
            for c in currencies {
                for st in [ItemStatus::Pending, ItemStatus::Confirmed] {
                    let folded: i64 = t.items.values()
                        .filter(|i| i.status == st)
                        .filter_map(|i| i.price.as_ref())
                        .filter(|p| p.currency == c)
                        .map(|p| p.amount)
                        .sum();
                    let recount: i64 = model.values()
                        .filter(|(cc, _, s)| cc == c && *s == st)
                        .map(|(_, a, _)| a)
                        .sum();
                    proptest::prop_assert_eq!(folded, recount);
                }
            }
            let mut refolded = Trip::default();
            for e in &log {
                if let Event::Itinerary(e) = e {
                    refolded.evolve(e);
                }
            }
            proptest::prop_assert_eq!(refolded, t);
        }
    }

    #[test]
    fn travellers_must_be_on_the_trip() {
        let mut s = StateSet::default();
        let owner = Uuid::new_v4();
        let id = trip(&mut s, owner);
        let mut i = flight();
        i.travellers = vec![owner, Uuid::new_v4()];
        let e = run(
            &mut s,
            &actor(owner),
            ItineraryCommand::AddItem {
                itinerary_id: id,
                item_id: Uuid::new_v4(),
                item: i,
            },
        )
        .unwrap_err();
        assert_eq!(e.code, "unknown_traveller");
    }

    #[test]
    fn bad_details_are_refused() {
        let mut d = details();
        d.end_date = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        assert_eq!(check_details(&d).unwrap_err().code, "invalid_dates");
        let mut d = details();
        d.budget.insert("XXX".into(), 1);
        assert_eq!(check_details(&d).unwrap_err().code, "invalid_currency");
        let mut d = details();
        d.budget.insert("KES".into(), -1);
        assert_eq!(check_details(&d).unwrap_err().code, "invalid_amount");
    }
}
