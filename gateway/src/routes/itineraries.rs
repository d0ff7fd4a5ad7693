//! Itineraries: trips, typed reservations, sharing, read models (detail, mine,
//! day plan, budget, conflicts), the trip room, the events catalogue and
//! travel search.
//!
//! Writes are thin: validate what can be validated without state (zones, local
//! times, amounts, lengths; see `commands::itinerary::check_*`), then dispatch
//! one `itinerary.*` command; access and everything stateful is decided by the
//! handler against the trip's stream. `If-Match` guards the whole trip: its
//! stream version is every trip answer's `ETag`.
//!
//! Reads come from the `itinerary` read model: only the owner and active
//! collaborators see a trip; anyone else gets 404, as for a trip that never
//! existed. A public-link trip is also readable, without items' travellers or
//! any member, at `/v1/public/itineraries/{token}`.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use commands::Command;
use commands::itinerary::{
    DetailsPatch, ItemInput, ItemPatch, ItineraryCommand, Slot, check_details, check_item, resolve,
    trip_room_id, zone,
};
use events::chat::Bytes64;
use events::itinerary::{Details, Item, ItemKind, ItemStatus, Money, Place, ShareRole, Visibility};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, ReadParams, find, position_header, wait_for};
use crate::dispatch::send;
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery, RequestId, WriteOptions};
use crate::state::AppState;
use crate::travel::{
    FlightOffer, FlightQuery, HotelOffer, HotelQuery, SearchError, fallback_flights,
    fallback_hotels,
};

/// The read model's name.
pub const MODEL: &str = projections::itinerary::MODEL;

fn rejected(r: commands::Rejection) -> ApiError {
    ApiError::Coded {
        status: http::StatusCode::from_u16(r.status)
            .unwrap_or(http::StatusCode::UNPROCESSABLE_ENTITY),
        code: r.code,
        message: r.message,
        extra: Default::default(),
    }
}

fn not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "itinerary_not_found",
        "no such itinerary",
    )
}

fn link_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

// ---------- request bodies ----------

/// Create an itinerary.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"title": "Nairobi → London, Christmas", "region": "United Kingdom", "start_date": "2026-12-20",
    "end_date": "2026-12-28", "zone": "Europe/London", "budget": {"GBP": 250000, "KES": 5000000}, "visibility": "shared",
    "metadata": {"purpose": "family"}}))]
pub struct CreateItineraryRequest {
    /// 1 to 200 bytes.
    pub title: String,
    /// Region or destination.
    pub region: Option<String>,
    /// First day, in the trip's zone.
    #[schema(value_type = String, format = Date)]
    pub start_date: NaiveDate,
    /// Last day (inclusive).
    #[schema(value_type = String, format = Date)]
    pub end_date: NaiveDate,
    /// Default IANA zone (the day plan is drawn in it).
    pub zone: String,
    /// Planned spend per ISO 4217 currency, in minor units.
    #[serde(default)]
    pub budget: BTreeMap<String, i64>,
    /// `private` (default), `shared` or `public_link`.
    #[schema(value_type = Option<String>)]
    pub visibility: Option<Visibility>,
    /// Free-form JSON object (at most 8 KiB).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// Change an itinerary's details: absent fields keep their value.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"title": "Christmas in London", "budget": {"GBP": 300000}}))]
pub struct UpdateItineraryRequest {
    /// Title.
    pub title: Option<String>,
    /// Region ("" clears).
    pub region: Option<String>,
    /// First day.
    #[schema(value_type = Option<String>, format = Date)]
    pub start_date: Option<NaiveDate>,
    /// Last day.
    #[schema(value_type = Option<String>, format = Date)]
    pub end_date: Option<NaiveDate>,
    /// Zone.
    pub zone: Option<String>,
    /// Budget (replaces the whole map).
    pub budget: Option<BTreeMap<String, i64>>,
    /// Visibility (owner only). Turning `public_link` on mints a token; turning it off revokes it.
    #[schema(value_type = Option<String>)]
    pub visibility: Option<Visibility>,
    /// Metadata (replaces the object).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// A local date-time in an IANA zone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlotBody {
    /// Wall-clock time where it happens, without offset.
    #[schema(value_type = String, example = "2026-12-20T23:30:00")]
    pub local: NaiveDateTime,
    /// IANA zone.
    #[schema(example = "Africa/Nairobi")]
    pub zone: String,
}

impl From<&SlotBody> for Slot {
    fn from(s: &SlotBody) -> Slot {
        Slot {
            local: s.local,
            zone: s.zone.clone(),
        }
    }
}

/// An amount in minor units.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoneyBody {
    /// Minor units, 0 or more.
    #[schema(example = 85000)]
    pub amount: i64,
    /// ISO 4217.
    #[schema(example = "GBP")]
    pub currency: String,
}

impl From<&MoneyBody> for Money {
    fn from(m: &MoneyBody) -> Money {
        Money {
            amount: m.amount,
            currency: m.currency.clone(),
        }
    }
}

/// A place.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceBody {
    /// Name.
    #[schema(example = "Jomo Kenyatta International")]
    pub name: String,
    /// IATA, station or venue code.
    #[schema(example = "NBO")]
    pub code: Option<String>,
    /// Address or city.
    pub address: Option<String>,
}

impl From<&PlaceBody> for Place {
    fn from(p: &PlaceBody) -> Place {
        Place {
            name: p.name.clone(),
            code: p.code.clone(),
            address: p.address.clone(),
        }
    }
}

/// Add an item; with `provider` and `booking_reference` it is an idempotent upsert.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "flight", "title": "KQ 100 Nairobi → London",
    "start": {"local": "2026-12-20T23:30:00", "zone": "Africa/Nairobi"},
    "end": {"local": "2026-12-21T06:10:00", "zone": "Europe/London"},
    "locations": [{"name": "Jomo Kenyatta International", "code": "NBO"}, {"name": "Heathrow", "code": "LHR"}],
    "booking_reference": "X7K2QP", "provider": "kenya-airways", "status": "confirmed",
    "price": {"amount": 85000, "currency": "GBP"}, "travellers": []}))]
pub struct ItemRequest {
    /// `flight`, `hotel`, `bus`, `train`, `transfer`, `event`, `activity` or `note`.
    #[schema(value_type = String)]
    pub kind: ItemKind,
    /// Title.
    pub title: String,
    /// Start (departure, check-in).
    pub start: SlotBody,
    /// End (arrival, check-out); may be in another zone.
    pub end: SlotBody,
    /// Places: one, or departure then arrival.
    #[serde(default)]
    pub locations: Vec<PlaceBody>,
    /// PNR / confirmation number.
    pub booking_reference: Option<String>,
    /// Who it is booked with.
    pub provider: Option<String>,
    /// `pending` (default), `confirmed` or `cancelled`.
    #[schema(value_type = Option<String>)]
    pub status: Option<ItemStatus>,
    /// Price.
    pub price: Option<MoneyBody>,
    /// Notes.
    pub notes: Option<String>,
    /// User ids travelling on it; empty: everyone on the trip.
    #[serde(default)]
    pub travellers: Vec<Uuid>,
}

impl ItemRequest {
    fn input(&self) -> ItemInput {
        ItemInput {
            kind: self.kind,
            title: self.title.clone(),
            start: (&self.start).into(),
            end: (&self.end).into(),
            locations: self.locations.iter().map(Into::into).collect(),
            booking_reference: self.booking_reference.clone(),
            provider: self.provider.clone(),
            status: self.status.unwrap_or(ItemStatus::Pending),
            price: self.price.as_ref().map(Into::into),
            notes: self.notes.clone(),
            travellers: self.travellers.clone(),
        }
    }
}

/// Change an item: absent fields keep their value; "" clears a text field.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"status": "confirmed", "price": {"amount": 79000, "currency": "GBP"}}))]
pub struct ItemPatchRequest {
    /// Kind.
    #[schema(value_type = Option<String>)]
    pub kind: Option<ItemKind>,
    /// Title.
    pub title: Option<String>,
    /// Start.
    pub start: Option<SlotBody>,
    /// End.
    pub end: Option<SlotBody>,
    /// Places (replaces the list).
    pub locations: Option<Vec<PlaceBody>>,
    /// Booking reference.
    pub booking_reference: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Status.
    #[schema(value_type = Option<String>)]
    pub status: Option<ItemStatus>,
    /// Price.
    pub price: Option<MoneyBody>,
    /// Notes.
    pub notes: Option<String>,
    /// Travellers (replaces the list).
    pub travellers: Option<Vec<Uuid>>,
}

/// Invite someone.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "0193a1b2-0000-7000-8000-000000000002", "role": "editor"}))]
pub struct ShareRequest {
    /// The user.
    pub user_id: Uuid,
    /// `editor` or `viewer`.
    #[schema(value_type = String)]
    pub role: ShareRole,
}

/// Hand the trip over.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// A current collaborator.
    pub user_id: Uuid,
}

/// Add a catalogue event (admins).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"category": "concert", "title": "Sauti Sol — farewell tour", "place": "London",
    "venue": {"name": "O2 Academy Brixton"}, "start": {"local": "2026-12-22T19:30:00", "zone": "Europe/London"},
    "end": {"local": "2026-12-22T23:00:00", "zone": "Europe/London"}, "price": {"amount": 4500, "currency": "GBP"},
    "provider": "ticketmaster"}))]
pub struct ListingRequest {
    /// `concert`, `conference`, `festival`, `sport`, `activity`…
    pub category: String,
    /// Title.
    pub title: String,
    /// City or area people search by.
    pub place: String,
    /// Venue.
    pub venue: Option<PlaceBody>,
    /// Start.
    pub start: SlotBody,
    /// End.
    pub end: SlotBody,
    /// Ticket price.
    pub price: Option<MoneyBody>,
    /// Who sells it.
    pub provider: Option<String>,
}

/// Add a catalogue event to the itinerary.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromCatalogRequest {
    /// The catalogue event.
    pub listing_id: Uuid,
    /// Who goes (empty: everyone).
    #[serde(default)]
    pub travellers: Vec<Uuid>,
}

// ---------- helpers ----------

/// The caller's role on a trip (`owner`, `editor`, `viewer`); 404 unless active.
async fn role_of(state: &AppState, itinerary: Uuid, user: Uuid) -> ApiResult<String> {
    find(state, MODEL, || {
        sqlx::query_scalar(
            "SELECT role FROM proj_itinerary_members WHERE itinerary_id = $1 AND user_id = $2 AND state = 'active'",
        )
        .bind(itinerary)
        .bind(user)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(not_found)
}

fn check_slot(field: &str, s: &SlotBody) -> ApiResult<()> {
    resolve(&s.into()).map(|_| ()).map_err(|r| ApiError::Coded {
        status: http::StatusCode::UNPROCESSABLE_ENTITY,
        code: r.code,
        message: format!("{field}: {}", r.message),
        extra: Default::default(),
    })
}

// ---------- itinerary writes ----------

/// Create an itinerary; the caller owns it.
#[utoipa::path(post, path = "/v1/itineraries", tag = "itineraries", security(("bearer" = [])),
    request_body = CreateItineraryRequest, params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "created; `ETag` is its version",
            example = json!({"itinerary_id": "0193…", "owner": "0193…", "details": {"title": "Nairobi → London, Christmas",
                "region": "United Kingdom", "start_date": "2026-12-20", "end_date": "2026-12-28", "zone": "Europe/London",
                "budget": {"GBP": 250000}, "visibility": "shared", "metadata": {}}, "link_token": null, "position": 81, "version": 1})),
        (status = 202, description = "poll Location"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, description = "invalid zone, dates, currency or amount", body = Problem)))]
pub async fn create_itinerary(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<CreateItineraryRequest>,
) -> ApiResult<Response> {
    let details = check_details(&Details {
        title: req.title.clone(),
        region: req.region.clone(),
        start_date: req.start_date,
        end_date: req.end_date,
        zone: req.zone.clone(),
        budget: req.budget.clone(),
        visibility: req.visibility.unwrap_or(Visibility::Private),
        metadata: req.metadata.clone().unwrap_or(Value::Null),
    })
    .map_err(rejected)?;
    // A time-ordered id: "my itineraries" pages newest first by it.
    let cmd = ItineraryCommand::Create {
        itinerary_id: Uuid::now_v7(),
        details,
        link_token: link_token(),
    };
    send(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// Change an itinerary's details (owner or editor; visibility: owner). `If-Match` makes it conditional.
#[utoipa::path(patch, path = "/v1/itineraries/{itinerary_id}", tag = "itineraries", security(("bearer" = [])),
    request_body = UpdateItineraryRequest,
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header),
        ("If-Match" = Option<String>, Header, description = "the ETag of the itinerary, e.g. \"7\"")),
    responses((status = 200, description = "changed"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "viewers cannot write", body = Problem), (status = 404, body = Problem),
        (status = 409, description = "archived", body = Problem), (status = 412, description = "If-Match failed", body = Problem),
        (status = 422, body = Problem)))]
pub async fn update_itinerary(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
    AppJson(req): AppJson<UpdateItineraryRequest>,
) -> ApiResult<Response> {
    if let Some(z) = &req.zone {
        zone(z).map_err(rejected)?;
    }
    let cmd = ItineraryCommand::Update {
        itinerary_id,
        patch: DetailsPatch {
            title: req.title.clone(),
            region: req.region.clone(),
            start_date: req.start_date,
            end_date: req.end_date,
            zone: req.zone.clone(),
            budget: req.budget.clone(),
            visibility: req.visibility,
            metadata: req.metadata.clone(),
        },
        link_token: link_token(),
    };
    send(&state, &principal, "PATCH", &uri, &options, rid, &req, cmd).await
}

/// Archive an itinerary: read-only from now on (owner).
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/archive", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "archived"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 412, body = Problem)))]
pub async fn archive_itinerary(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::Archive { itinerary_id };
    send(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Delete an itinerary (owner); its trip room is archived.
#[utoipa::path(delete, path = "/v1/itineraries/{itinerary_id}", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "deleted"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 412, body = Problem)))]
pub async fn delete_itinerary(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::Delete { itinerary_id };
    send(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await
}

// ---------- items ----------

/// Add an item. With `provider` and `booking_reference` already on the trip it
/// updates that item instead (200, `upsert: "updated"`) or changes nothing
/// (200, `upsert: "unchanged"`): re-importing a booking is idempotent.
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/items", tag = "itineraries", security(("bearer" = [])),
    request_body = ItemRequest,
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 201, description = "added", example = json!({"itinerary_id": "0193…", "item_id": "0193…", "kind": "flight",
            "title": "KQ 100 Nairobi → London",
            "start": {"local": "2026-12-20T23:30:00", "zone": "Africa/Nairobi", "utc": "2026-12-20T20:30:00Z"},
            "end": {"local": "2026-12-21T06:10:00", "zone": "Europe/London", "utc": "2026-12-21T06:10:00Z"},
            "status": "confirmed", "price": {"amount": 85000, "currency": "GBP"}, "upsert": "created", "position": 90, "version": 4})),
        (status = 200, description = "upserted onto the item with the same provider and booking reference"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 412, body = Problem),
        (status = 422, description = "unknown zone, local time in a DST gap, end before start, bad amount", body = Problem)))]
pub async fn add_item(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
    AppJson(req): AppJson<ItemRequest>,
) -> ApiResult<Response> {
    let input = req.input();
    check_item(Uuid::nil(), &input).map_err(rejected)?;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |command_id| {
            Ok(Command::Itinerary(ItineraryCommand::AddItem {
                itinerary_id,
                item_id: command_id,
                item: input,
            }))
        },
    )
    .await
}

/// Change an item (owner or editor).
#[utoipa::path(patch, path = "/v1/itineraries/{itinerary_id}/items/{item_id}", tag = "itineraries", security(("bearer" = [])),
    request_body = ItemPatchRequest,
    params(("itinerary_id" = Uuid, Path), ("item_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header),
        ("If-Match" = Option<String>, Header, description = "the itinerary's ETag")),
    responses((status = 200, description = "changed"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 412, description = "another edit came first", body = Problem), (status = 422, body = Problem)))]
pub async fn update_item(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((itinerary_id, item_id)): AppPath<(Uuid, Uuid)>,
    AppJson(req): AppJson<ItemPatchRequest>,
) -> ApiResult<Response> {
    for (f, s) in [("start", &req.start), ("end", &req.end)] {
        if let Some(s) = s {
            check_slot(f, s)?;
        }
    }
    let cmd = ItineraryCommand::UpdateItem {
        itinerary_id,
        item_id,
        patch: ItemPatch {
            kind: req.kind,
            title: req.title.clone(),
            start: req.start.as_ref().map(Into::into),
            end: req.end.as_ref().map(Into::into),
            locations: req
                .locations
                .as_ref()
                .map(|l| l.iter().map(Into::into).collect()),
            booking_reference: req.booking_reference.clone(),
            provider: req.provider.clone(),
            status: req.status,
            price: req.price.as_ref().map(Into::into),
            notes: req.notes.clone(),
            travellers: req.travellers.clone(),
        },
    };
    send(&state, &principal, "PATCH", &uri, &options, rid, &req, cmd).await
}

/// Cancel an item: it stays on the trip, counts for nothing.
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/items/{item_id}/cancel", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("item_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "cancelled"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 412, body = Problem)))]
pub async fn cancel_item(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((itinerary_id, item_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::CancelItem {
        itinerary_id,
        item_id,
    };
    send(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Remove an item.
#[utoipa::path(delete, path = "/v1/itineraries/{itinerary_id}/items/{item_id}", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("item_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "removed"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 412, body = Problem)))]
pub async fn remove_item(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((itinerary_id, item_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::RemoveItem {
        itinerary_id,
        item_id,
    };
    send(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await
}

// ---------- sharing ----------

/// Invite a user as editor or viewer (owner).
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/shares", tag = "itineraries", security(("bearer" = [])),
    request_body = ShareRequest, params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "invited", example = json!({"itinerary_id": "0193…", "user_id": "0193…", "role": "editor", "state": "invited", "position": 95, "version": 6})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn invite(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
    AppJson(req): AppJson<ShareRequest>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::Invite {
        itinerary_id,
        user_id: req.user_id,
        role: req.role,
    };
    send(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// Accept your invitation; you join the trip room too, if it is open.
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/shares/accept", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "a collaborator now"), (status = 401, body = Problem),
        (status = 404, description = "no invitation", body = Problem)))]
pub async fn accept(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::Accept { itinerary_id };
    send(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Revoke a share or invitation (owner), or leave or decline (yourself). A revoked
/// collaborator's next read or write is a 404; they leave the trip room.
#[utoipa::path(delete, path = "/v1/itineraries/{itinerary_id}/shares/{user_id}", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("user_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "revoked"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((itinerary_id, user_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::Revoke {
        itinerary_id,
        user_id,
    };
    send(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await
}

/// Hand the trip to a collaborator (owner); you stay as an editor.
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/owner", tag = "itineraries", security(("bearer" = [])),
    request_body = TransferRequest, params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "handed over"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, description = "not a collaborator", body = Problem)))]
pub async fn transfer(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
    AppJson(req): AppJson<TransferRequest>,
) -> ApiResult<Response> {
    let cmd = ItineraryCommand::TransferOwnership {
        itinerary_id,
        to: req.user_id,
    };
    send(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// One person on a trip.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShareView {
    /// User.
    pub user_id: Uuid,
    /// `owner`, `editor` or `viewer`.
    pub role: String,
    /// `active` or `invited`.
    pub state: String,
}

/// The trip's people.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShareList {
    /// Owner first.
    pub items: Vec<ShareView>,
}

/// Who the trip is shared with (any collaborator).
#[utoipa::path(get, path = "/v1/itineraries/{itinerary_id}/shares", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = ShareList), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn list_shares(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(itinerary_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    role_of(&state, itinerary_id, principal.user_id).await?;
    let rows = sqlx::query(
        "SELECT user_id, role, state FROM proj_itinerary_members WHERE itinerary_id = $1
         ORDER BY role = 'owner' DESC, since_position",
    )
    .bind(itinerary_id)
    .fetch_all(&state.pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| ShareView {
            user_id: r.get("user_id"),
            role: r.get("role"),
            state: r.get("state"),
        })
        .collect();
    Ok((position_header(position), Json(ShareList { items })).into_response())
}

// ---------- the trip room ----------

/// Open the trip's chat room (owner or editor). Its members are the trip's
/// people, kept in step with sharing; changes to the trip are posted into it
/// as system messages (sender `00000000-0000-0000-0000-000000000000`).
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/room", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "opened", example = json!({"itinerary_id": "0193…", "room_id": "5d2c…", "members": ["0193…"], "position": 99, "version": 8})),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "already open (`room_id` in the problem)", body = Problem)))]
pub async fn open_room(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let (_, wrapped) = state.keystore.new_room_key(trip_room_id(itinerary_id), 1);
    let cmd = ItineraryCommand::OpenRoom {
        itinerary_id,
        room_key: Bytes64(wrapped),
    };
    send(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

// ---------- reads ----------

/// An itinerary as a collaborator sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItineraryView {
    /// Id.
    pub itinerary_id: Uuid,
    /// Owner.
    pub owner_id: Uuid,
    /// Your role.
    pub role: String,
    /// Title.
    pub title: String,
    /// Region.
    pub region: Option<String>,
    /// First day.
    #[schema(value_type = String, format = Date)]
    pub start_date: NaiveDate,
    /// Last day.
    #[schema(value_type = String, format = Date)]
    pub end_date: NaiveDate,
    /// IANA zone.
    pub zone: String,
    /// Planned spend per currency.
    #[schema(value_type = Object)]
    pub budget: Value,
    /// `private`, `shared` or `public_link`.
    pub visibility: String,
    /// Public link token (owner only).
    pub link_token: Option<String>,
    /// Metadata.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Read-only.
    pub archived: bool,
    /// Trip room, once opened.
    pub room_id: Option<Uuid>,
    /// Stream version (the ETag).
    pub version: i64,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Items in true chronological order (by UTC start, then end). Only in the detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub items: Option<Vec<Value>>,
}

const TRIP_COLUMNS: &str = "i.itinerary_id, i.owner_id, i.title, i.region, i.start_date, i.end_date, i.zone, i.budget,
    i.visibility, i.link_token, i.metadata, i.archived, i.room_id, i.version, i.created_at, i.updated_at";

fn trip_view(r: &sqlx::postgres::PgRow, role: String) -> ItineraryView {
    let owner = role == "owner";
    ItineraryView {
        itinerary_id: r.get("itinerary_id"),
        owner_id: r.get("owner_id"),
        role,
        title: r.get("title"),
        region: r.get("region"),
        start_date: r.get("start_date"),
        end_date: r.get("end_date"),
        zone: r.get("zone"),
        budget: r.get("budget"),
        visibility: r.get("visibility"),
        link_token: if owner { r.get("link_token") } else { None },
        metadata: r.get("metadata"),
        archived: r.get("archived"),
        room_id: r.get("room_id"),
        version: r.get("version"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        items: None,
    }
}

async fn items_of(state: &AppState, itinerary: Uuid) -> ApiResult<Vec<Item>> {
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT item FROM proj_itinerary_items WHERE itinerary_id = $1 ORDER BY start_at, end_at, item_id",
    )
    .bind(itinerary)
    .fetch_all(&state.pool)
    .await?;
    rows.into_iter()
        .map(|v| serde_json::from_value(v).map_err(|e| ApiError::Internal(e.into())))
        .collect()
}

async fn trip_row(state: &AppState, itinerary: Uuid) -> ApiResult<sqlx::postgres::PgRow> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TRIP_COLUMNS} FROM proj_itineraries i WHERE i.itinerary_id = $1"
    )))
    .bind(itinerary)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(not_found)
}

fn with_etag(position: i64, version: i64) -> http::HeaderMap {
    let mut h = position_header(position);
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{version}\"")) {
        h.insert(http::header::ETAG, v);
    }
    h
}

/// The itinerary with its items in true chronological order (by UTC instant).
#[utoipa::path(get, path = "/v1/itineraries/{itinerary_id}", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ReadParams,
        ("If-None-Match" = Option<String>, Header, description = "an ETag you hold: 304 without a body while it is current")),
    responses((status = 200, body = ItineraryView, description = "`ETag` is the version to send as `If-Match` (or `If-None-Match`)"),
        (status = 304, description = "not changed since the ETag in `If-None-Match`"),
        (status = 401, body = Problem), (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn get_itinerary(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(itinerary_id): AppPath<Uuid>,
    after: AfterPosition,
    request_headers: http::HeaderMap,
) -> ApiResult<Response> {
    // `"7"` or `W/"7"`; anything else matches nothing.
    let held: i64 = request_headers
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .parse()
                .ok()
        })
        .unwrap_or(-1);
    let position = wait_for(&state, MODEL, after).await?;
    // One round trip, one row, and the body built where it is, as text: the
    // trip's object without its closing brace, then its items as the projector
    // keeps them, answer texts already joined in order (`items_body`, migration
    // 202612020120). Building the items as jsonb on each read cost 3× as much
    // on 100 items, aggregating their stored texts on each read still ~0.4 ms.
    // A client holding the current version (`If-None-Match`) gets 304 and no body.
    let row = find(&state, MODEL, || {
        sqlx::query(
            "SELECT i.version, CASE WHEN i.version = $3 THEN NULL ELSE left(jsonb_build_object(
                'itinerary_id', i.itinerary_id, 'owner_id', i.owner_id, 'role', m.role, 'title', i.title,
                'region', i.region, 'start_date', i.start_date, 'end_date', i.end_date, 'zone', i.zone,
                'budget', i.budget, 'visibility', i.visibility,
                'link_token', CASE WHEN m.role = 'owner' THEN i.link_token END,
                'metadata', i.metadata, 'archived', i.archived, 'room_id', i.room_id, 'version', i.version,
                'created_at', to_char(i.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                'updated_at', to_char(i.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             )::text, -1) || ', \"items\": [' || i.items_body || ']}' END AS body
             FROM proj_itineraries i
             JOIN proj_itinerary_members m
               ON m.itinerary_id = i.itinerary_id AND m.user_id = $2 AND m.state = 'active'
             WHERE i.itinerary_id = $1",
        )
        .bind(itinerary_id)
        .bind(principal.user_id)
        .bind(held)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(not_found)?;
    let mut headers = with_etag(position, row.get("version"));
    let Some(body) = row.get::<Option<String>, _>("body") else {
        return Ok((http::StatusCode::NOT_MODIFIED, headers).into_response());
    };
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok((headers, body).into_response())
}

/// The same trip through its public link: details and items, read only, no people.
#[utoipa::path(get, path = "/v1/public/itineraries/{token}", tag = "itineraries",
    params(("token" = String, Path)),
    responses((status = 200, body = ItineraryView), (status = 404, body = Problem)))]
pub async fn public_itinerary(
    State(state): State<AppState>,
    AppPath(token): AppPath<String>,
) -> ApiResult<Response> {
    if token.len() != 43 {
        return Err(not_found());
    }
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TRIP_COLUMNS} FROM proj_itineraries i WHERE i.link_token = $1 AND i.visibility = 'public_link'"
    )))
    .bind(&token)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(not_found)?;
    let mut view = trip_view(&row, "public".into());
    // The room is for the trip's people; a link reader has no business with it.
    view.room_id = None;
    let items = items_of(&state, view.itinerary_id).await?;
    view.items = Some(
        items
            .into_iter()
            .map(|mut i| {
                i.travellers.clear();
                commands::itinerary::item_json(view.itinerary_id, &i)
            })
            .collect(),
    );
    Ok(Json(view).into_response())
}

/// Paging of "my itineraries".
#[derive(Debug, Deserialize, IntoParams)]
pub struct MineParams {
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    /// `active` (default: owned and shared with you) or `invited` (invitations waiting for you).
    pub state: Option<String>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

/// A page of itineraries.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItineraryPage {
    /// Newest first.
    pub items: Vec<ItineraryView>,
    /// Cursor of the next page, if any.
    pub next: Option<String>,
}

/// Your itineraries, owned and shared with you, newest first, with cursor paging.
#[utoipa::path(get, path = "/v1/itineraries", tag = "itineraries", security(("bearer" = [])),
    params(MineParams),
    responses((status = 200, body = ItineraryPage), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub async fn list_itineraries(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(q): AppQuery<MineParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 100"));
    }
    let member_state = match q.state.as_deref() {
        None | Some("active") => "active",
        Some("invited") => "invited",
        Some(_) => return Err(ApiError::field("state", "`active` or `invited`")),
    };
    let before = match &q.cursor {
        None => Uuid::max(),
        Some(c) => URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| Uuid::from_slice(&b).ok())
            .ok_or_else(|| ApiError::Malformed("cursor is not one this API gave out".into()))?,
    };
    // The page of memberships first, then its trips: joined before the limit,
    // the planner merged with a walk of every trip id above the cursor (9,831
    // rows for a page deep in a list of 10,000).
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TRIP_COLUMNS}, m.role AS my_role
         FROM (SELECT itinerary_id, role FROM proj_itinerary_members
               WHERE user_id = $1 AND state = $2 AND itinerary_id < $3
               ORDER BY itinerary_id DESC LIMIT $4) m
         JOIN proj_itineraries i ON i.itinerary_id = m.itinerary_id
         ORDER BY m.itinerary_id DESC"
    )))
    .bind(principal.user_id)
    .bind(member_state)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let items: Vec<ItineraryView> = rows
        .iter()
        .take(limit as usize)
        .map(|r| trip_view(r, r.get("my_role")))
        .collect();
    let next = more
        .then(|| {
            items
                .last()
                .map(|v| URL_SAFE_NO_PAD.encode(v.itinerary_id.as_bytes()))
        })
        .flatten();
    Ok((
        position_header(position),
        Json(ItineraryPage { items, next }),
    )
        .into_response())
}

/// The zone of a day plan.
#[derive(Debug, Deserialize, IntoParams)]
pub struct DaysParams {
    /// IANA zone to draw the days in (default: the trip's).
    pub zone: Option<String>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

/// One item on one day.
#[derive(Debug, Serialize, ToSchema)]
pub struct DayEntry {
    /// Item.
    pub item_id: Uuid,
    /// Kind.
    pub kind: String,
    /// Title.
    pub title: String,
    /// Status.
    pub status: String,
    /// Start, local in the plan's zone.
    #[schema(value_type = String, example = "2026-12-20T20:30:00")]
    pub starts_local: NaiveDateTime,
    /// End, local in the plan's zone.
    #[schema(value_type = String, example = "2026-12-21T06:10:00")]
    pub ends_local: NaiveDateTime,
    /// Start as booked (local + its own zone).
    #[schema(value_type = Object)]
    pub start: Value,
    /// End as booked.
    #[schema(value_type = Object)]
    pub end: Value,
    /// It starts on this day.
    pub starts_today: bool,
    /// It ends on this day.
    pub ends_today: bool,
}

/// One day.
#[derive(Debug, Serialize, ToSchema)]
pub struct Day {
    /// The date in the plan's zone.
    #[schema(value_type = String, format = Date)]
    pub date: NaiveDate,
    /// What happens, by start.
    pub items: Vec<DayEntry>,
}

/// A day-by-day plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct DayPlan {
    /// The zone the days are drawn in.
    pub zone: String,
    /// Every day of the trip, and any day an item touches outside it.
    pub days: Vec<Day>,
}

/// The plan day by day, drawn in the trip's zone (or `zone`): an item is on every
/// day its span touches there, so an overnight flight is on both days.
#[utoipa::path(get, path = "/v1/itineraries/{itinerary_id}/days", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), DaysParams),
    responses((status = 200, body = DayPlan), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 422, description = "unknown zone", body = Problem)))]
pub async fn day_plan(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(itinerary_id): AppPath<Uuid>,
    AppQuery(q): AppQuery<DaysParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    role_of(&state, itinerary_id, principal.user_id).await?;
    let row = trip_row(&state, itinerary_id).await?;
    let zone_name: String = q.zone.unwrap_or_else(|| row.get("zone"));
    let tz = zone(&zone_name).map_err(rejected)?;
    let (first, last): (NaiveDate, NaiveDate) = (row.get("start_date"), row.get("end_date"));
    let items = items_of(&state, itinerary_id).await?;
    let mut days: BTreeMap<NaiveDate, Vec<DayEntry>> = BTreeMap::new();
    let mut d = first;
    while d <= last && days.len() < 366 {
        days.insert(d, vec![]);
        d += Duration::days(1);
    }
    for item in &items {
        let s = tz
            .from_utc_datetime(&item.start.utc.naive_utc())
            .naive_local();
        let e = tz
            .from_utc_datetime(&item.end.utc.naive_utc())
            .naive_local();
        // An end at midnight belongs to the day before.
        let last_day = if e > s && e.time() == chrono::NaiveTime::MIN {
            e.date() - Duration::days(1)
        } else {
            e.date()
        };
        let mut day = s.date();
        let mut n = 0;
        while day <= last_day && n < 62 {
            days.entry(day).or_default().push(DayEntry {
                item_id: item.item_id,
                kind: item.kind.as_str().into(),
                title: item.title.clone(),
                status: item.status.as_str().into(),
                starts_local: s,
                ends_local: e,
                start: serde_json::to_value(&item.start).unwrap_or_default(),
                end: serde_json::to_value(&item.end).unwrap_or_default(),
                starts_today: day == s.date(),
                ends_today: day == last_day,
            });
            day += Duration::days(1);
            n += 1;
        }
    }
    let plan = DayPlan {
        zone: tz.name().to_owned(),
        days: days
            .into_iter()
            .map(|(date, items)| Day { date, items })
            .collect(),
    };
    Ok((position_header(position), Json(plan)).into_response())
}

/// Budget of one currency.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetLine {
    /// ISO 4217.
    pub currency: String,
    /// Planned (the itinerary's budget), minor units.
    pub planned: i64,
    /// Sum of confirmed items.
    pub booked: i64,
    /// Sum of pending items.
    pub pending: i64,
    /// Planned less booked (negative: over budget).
    pub remaining: i64,
}

/// Planned vs booked, per currency (integer minor units; no conversion).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"lines": [{"currency": "GBP", "planned": 250000, "booked": 85000, "pending": 32000, "remaining": 165000}]}))]
pub struct Budget {
    /// One line per currency that is planned or spent.
    pub lines: Vec<BudgetLine>,
}

/// Budget planned vs booked per currency. Cancelled items count for nothing.
#[utoipa::path(get, path = "/v1/itineraries/{itinerary_id}/budget", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = Budget), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn budget(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(itinerary_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    role_of(&state, itinerary_id, principal.user_id).await?;
    let planned: Value = trip_row(&state, itinerary_id).await?.get("budget");
    let planned: BTreeMap<String, i64> = serde_json::from_value(planned).unwrap_or_default();
    let rows = sqlx::query(
        "SELECT price_currency,
                COALESCE(SUM(price_amount) FILTER (WHERE status = 'confirmed'), 0)::BIGINT AS booked,
                COALESCE(SUM(price_amount) FILTER (WHERE status = 'pending'), 0)::BIGINT AS pending
         FROM proj_itinerary_items WHERE itinerary_id = $1 AND price_currency IS NOT NULL
         GROUP BY price_currency",
    )
    .bind(itinerary_id)
    .fetch_all(&state.pool)
    .await?;
    let mut lines: BTreeMap<String, BudgetLine> = planned
        .into_iter()
        .map(|(c, p)| {
            (
                c.clone(),
                BudgetLine {
                    currency: c,
                    planned: p,
                    booked: 0,
                    pending: 0,
                    remaining: p,
                },
            )
        })
        .collect();
    for r in rows {
        let c: String = r.get("price_currency");
        let line = lines.entry(c.clone()).or_insert(BudgetLine {
            currency: c,
            planned: 0,
            booked: 0,
            pending: 0,
            remaining: 0,
        });
        line.booked = r.get("booked");
        line.pending = r.get("pending");
        line.remaining = line.planned - line.booked;
    }
    let body = Budget {
        lines: lines.into_values().collect(),
    };
    Ok((position_header(position), Json(body)).into_response())
}

/// A named item in a conflict.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictSide {
    /// Item.
    pub item_id: Uuid,
    /// Its title.
    pub title: String,
    /// Its kind.
    pub kind: String,
}

/// Two items of the same traveller that overlap in time.
#[derive(Debug, Serialize, ToSchema)]
pub struct Conflict {
    /// The one that starts first.
    pub a: ConflictSide,
    /// The other.
    pub b: ConflictSide,
    /// The travellers on both (empty: everyone on the trip).
    pub travellers: Vec<Uuid>,
    /// Where the overlap starts.
    pub overlap_start: DateTime<Utc>,
    /// Where it ends.
    pub overlap_end: DateTime<Utc>,
}

/// The conflicts of a trip.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictList {
    /// By the first item's start.
    pub items: Vec<Conflict>,
}

/// Whether two items overlap for someone, and for whom. Notes and cancelled
/// items never conflict; a hotel conflicts only with another hotel (you sleep
/// there while you do other things).
pub fn conflict(a: &Item, b: &Item) -> Option<Conflict> {
    let counts = |i: &Item| i.kind != ItemKind::Note && i.status != ItemStatus::Cancelled;
    if !counts(a) || !counts(b) {
        return None;
    }
    if (a.kind == ItemKind::Hotel) != (b.kind == ItemKind::Hotel) {
        return None;
    }
    let (start, end) = (a.start.utc.max(b.start.utc), a.end.utc.min(b.end.utc));
    if start >= end {
        return None;
    }
    let travellers: Vec<Uuid> = match (a.travellers.is_empty(), b.travellers.is_empty()) {
        (true, true) => vec![],
        (true, false) => b.travellers.clone(),
        (false, true) => a.travellers.clone(),
        (false, false) => {
            let sa: BTreeSet<_> = a.travellers.iter().collect();
            let both: Vec<Uuid> = b
                .travellers
                .iter()
                .filter(|t| sa.contains(t))
                .copied()
                .collect();
            if both.is_empty() {
                return None;
            }
            both
        }
    };
    let side = |i: &Item| ConflictSide {
        item_id: i.item_id,
        title: i.title.clone(),
        kind: i.kind.as_str().into(),
    };
    Some(Conflict {
        a: side(a),
        b: side(b),
        travellers,
        overlap_start: start,
        overlap_end: end,
    })
}

/// Overlapping items of the same traveller, both named.
#[utoipa::path(get, path = "/v1/itineraries/{itinerary_id}/conflicts", tag = "itineraries", security(("bearer" = [])),
    params(("itinerary_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = ConflictList, example = json!({"items": [{"a": {"item_id": "0193…", "title": "Museum tour", "kind": "activity"},
        "b": {"item_id": "0193…", "title": "Train to Paris", "kind": "train"}, "travellers": [],
        "overlap_start": "2026-12-23T09:00:00Z", "overlap_end": "2026-12-23T10:00:00Z"}]})),
        (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn conflicts(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(itinerary_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    role_of(&state, itinerary_id, principal.user_id).await?;
    let items = items_of(&state, itinerary_id).await?;
    let mut found = vec![];
    // Items are by start: only later items that start before this one ends can overlap it.
    for (i, a) in items.iter().enumerate() {
        for b in items[i + 1..]
            .iter()
            .take_while(|b| b.start.utc < a.end.utc)
        {
            found.extend(conflict(a, b));
        }
    }
    Ok((
        position_header(position),
        Json(ConflictList { items: found }),
    )
        .into_response())
}

// ---------- the events catalogue ----------

/// Add an event to the catalogue (admins).
#[utoipa::path(post, path = "/v1/catalog/events", tag = "itineraries", security(("bearer" = [])),
    request_body = ListingRequest, params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "added"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "not an admin", body = Problem), (status = 422, body = Problem)))]
pub async fn add_listing(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<ListingRequest>,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden(
            "only admins and providers add catalogue events".into(),
        ));
    }
    check_slot("start", &req.start)?;
    check_slot("end", &req.end)?;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |command_id| {
            Ok(Command::Itinerary(ItineraryCommand::AddListing {
                listing_id: command_id,
                category: req.category.clone(),
                title: req.title.clone(),
                place: req.place.clone(),
                venue: req.venue.as_ref().map(Into::into),
                start: (&req.start).into(),
                end: (&req.end).into(),
                price: req.price.as_ref().map(Into::into),
                provider: req.provider.clone(),
            }))
        },
    )
    .await
}

/// A catalogue search.
#[derive(Debug, Deserialize, IntoParams)]
pub struct CatalogParams {
    /// City or area (case-insensitive, exact).
    pub place: String,
    /// First day (local at the event), inclusive.
    pub from: Option<NaiveDate>,
    /// Last day, inclusive.
    pub to: Option<NaiveDate>,
    /// Category filter.
    pub category: Option<String>,
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

/// Catalogue events.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListingPage {
    /// By start.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<Value>,
}

/// Search the events catalogue by place and date range (anyone signed in).
#[utoipa::path(get, path = "/v1/catalog/events", tag = "itineraries", security(("bearer" = [])),
    params(CatalogParams),
    responses((status = 200, body = ListingPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
pub async fn search_listings(
    State(state): State<AppState>,
    _principal: Principal,
    AppQuery(q): AppQuery<CatalogParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 100"));
    }
    if q.place.trim().is_empty() || q.place.len() > 200 {
        return Err(ApiError::field("place", "1 to 200 bytes"));
    }
    if let (Some(f), Some(t)) = (q.from, q.to)
        && t < f
    {
        return Err(ApiError::field("to", "must not be before `from`"));
    }
    let items: Vec<Value> = sqlx::query_scalar(
        "SELECT listing FROM proj_itinerary_listings
         WHERE lower(place) = lower($1)
           AND ($2::date IS NULL OR ((listing->'end'->>'local')::timestamp)::date >= $2)
           AND ($3::date IS NULL OR ((listing->'start'->>'local')::timestamp)::date <= $3)
           AND ($4::text IS NULL OR category = lower($4))
         ORDER BY start_at, listing_id LIMIT $5",
    )
    .bind(q.place.trim())
    .bind(q.from)
    .bind(q.to)
    .bind(&q.category)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    Ok((position_header(position), Json(ListingPage { items })).into_response())
}

/// Add a catalogue event to the itinerary as an `event` item (owner or editor).
#[utoipa::path(post, path = "/v1/itineraries/{itinerary_id}/items/from-catalog", tag = "itineraries", security(("bearer" = [])),
    request_body = FromCatalogRequest,
    params(("itinerary_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 201, description = "added as an item"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "no such itinerary or catalogue event", body = Problem),
        (status = 409, description = "already on the itinerary", body = Problem)))]
pub async fn add_from_catalog(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(itinerary_id): AppPath<Uuid>,
    AppJson(req): AppJson<FromCatalogRequest>,
) -> ApiResult<Response> {
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |command_id| {
            Ok(Command::Itinerary(ItineraryCommand::AddListingItem {
                itinerary_id,
                item_id: command_id,
                listing_id: req.listing_id,
                travellers: req.travellers.clone(),
            }))
        },
    )
    .await
}

// ---------- travel search ----------

/// A flight search.
#[derive(Debug, Deserialize, IntoParams)]
pub struct FlightParams {
    /// IATA code, 3 letters.
    pub origin: String,
    /// IATA code, 3 letters.
    pub destination: String,
    /// Departure date.
    pub date: NaiveDate,
    /// 1 to 9 (default 1).
    pub adults: Option<u8>,
}

/// Flight offers.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"source": "provider", "offers": [{"id": "1", "price": {"amount": 85000, "currency": "GBP"},
    "segments": [{"carrier": "KQ", "number": "100", "from": "NBO", "to": "LHR",
        "departure_local": "2026-12-20T23:30:00", "arrival_local": "2026-12-21T06:10:00"}]}]}))]
pub struct FlightResults {
    /// `provider`, or `fallback` for a labelled sample (no live provider answered).
    pub source: String,
    /// Offers.
    pub offers: Vec<FlightOffer>,
}

/// A hotel search.
#[derive(Debug, Deserialize, IntoParams)]
pub struct HotelParams {
    /// IATA city code, 3 letters.
    pub city: String,
    /// Check-in.
    pub check_in: NaiveDate,
    /// Check-out (after check-in).
    pub check_out: NaiveDate,
    /// 1 to 9 (default 1).
    pub adults: Option<u8>,
}

/// Hotel offers.
#[derive(Debug, Serialize, ToSchema)]
pub struct HotelResults {
    /// `provider` or `fallback`.
    pub source: String,
    /// Offers.
    pub offers: Vec<HotelOffer>,
}

fn iata(field: &str, code: &str) -> ApiResult<String> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(code.to_ascii_uppercase())
    } else {
        Err(ApiError::field(field, "a 3-letter IATA code"))
    }
}

fn adults(n: Option<u8>) -> ApiResult<u8> {
    let n = n.unwrap_or(1);
    if (1..=9).contains(&n) {
        Ok(n)
    } else {
        Err(ApiError::field("adults", "1 to 9"))
    }
}

fn unavailable(e: SearchError) -> ApiError {
    ApiError::Coded {
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        code: "travel_search_unavailable".into(),
        message: e.to_string(),
        extra: [("retry_after".to_owned(), 30.into())]
            .into_iter()
            .collect(),
    }
}

/// Search flights with the configured provider. No provider or no answer: 503,
/// unless the fallback is on (then a sample labelled `source: "fallback"`). Counts toward the daily search quota.
#[utoipa::path(get, path = "/v1/travel/flights", tag = "itineraries", security(("bearer" = [])),
    params(FlightParams),
    responses((status = 200, body = FlightResults), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
pub async fn search_flights(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(q): AppQuery<FlightParams>,
) -> ApiResult<Response> {
    let query = FlightQuery {
        origin: iata("origin", &q.origin)?,
        destination: iata("destination", &q.destination)?,
        date: q.date,
        adults: adults(q.adults)?,
    };
    crate::ratelimit::charge(
        &state,
        "searches_per_day",
        principal.user_id,
        state.settings.searches_per_day,
        86_400,
    )
    .await?;
    let body = match state.travel.flights.flights(&query).await {
        Ok(offers) => FlightResults {
            source: "provider".into(),
            offers,
        },
        Err(e) if state.travel.fallback => {
            tracing::warn!(error = %e, "flight search answered from the fallback");
            FlightResults {
                source: "fallback".into(),
                offers: fallback_flights(&query),
            }
        }
        Err(e) => return Err(unavailable(e)),
    };
    Ok(Json(body).into_response())
}

/// Search hotels with the configured provider (same rules as flights).
#[utoipa::path(get, path = "/v1/travel/hotels", tag = "itineraries", security(("bearer" = [])),
    params(HotelParams),
    responses((status = 200, body = HotelResults), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
pub async fn search_hotels(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(q): AppQuery<HotelParams>,
) -> ApiResult<Response> {
    if q.check_out <= q.check_in {
        return Err(ApiError::field("check_out", "must be after check_in"));
    }
    let query = HotelQuery {
        city: iata("city", &q.city)?,
        check_in: q.check_in,
        check_out: q.check_out,
        adults: adults(q.adults)?,
    };
    crate::ratelimit::charge(
        &state,
        "searches_per_day",
        principal.user_id,
        state.settings.searches_per_day,
        86_400,
    )
    .await?;
    let body = match state.travel.hotels.hotels(&query).await {
        Ok(offers) => HotelResults {
            source: "provider".into(),
            offers,
        },
        Err(e) if state.travel.fallback => {
            tracing::warn!(error = %e, "hotel search answered from the fallback");
            HotelResults {
                source: "fallback".into(),
                offers: fallback_hotels(&query),
            }
        }
        Err(e) => return Err(unavailable(e)),
    };
    Ok(Json(body).into_response())
}
