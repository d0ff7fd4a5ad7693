//! The OpenAPI 3.1 document, generated from the handlers' annotations. The
//! router is built from the same annotations, so the two cannot disagree
//! (and a test checks every documented operation is served).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::routes::{
    accounts, admin, attachments, commands, fx, health, invoices, itineraries, messages,
    moderation, notes, payments, reminders, rooms, sync, wallets, webhooks, ws,
};
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mathia API",
        description = "Chat, wallet and itineraries, event-sourced. Writes accept `Idempotency-Key` and answer with the \
                       position they reached (`Mathia-Position`); reads accept `after_position` to wait for it. Errors \
                       are `application/problem+json` with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&Bearer),
    tags(
        (name = "accounts", description = "Register, log in, tokens"),
        (name = "wallet", description = "Double-entry wallets: open, deposit, transfer, withdraw, holds (post, void, expiry), limits, balances, history; invoices (gap-free numbers, payments, payment links, recurring schedules)"),
        (name = "chat", description = "Rooms, members, messages (sealed at rest), threads, receipts, unread counts, search, moderation, notes"),
        (name = "itineraries", description = "Trips with typed reservations in local time + IANA zone, sharing, day plan, budget, conflicts, trip room, events catalogue, travel search"),
        (name = "commands", description = "Poll a command answered 202"),
        (name = "reminders", description = "Reminders fired by the scheduler, and the notification inbox"),
        (name = "webhooks", description = "Outbound webhooks: signed deliveries of your own events, retries with backoff, dead letters, redrive"),
        (name = "realtime", description = "WebSocket subscriptions, long-poll sync with the same cursors, presence"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every documented route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(accounts::register))
        .routes(routes!(accounts::login))
        .routes(routes!(accounts::refresh))
        .routes(routes!(accounts::logout))
        .routes(routes!(accounts::me))
        .routes(routes!(wallets::open_wallet, wallets::list_wallets))
        .routes(routes!(wallets::get_wallet))
        .routes(routes!(wallets::list_entries))
        .routes(routes!(wallets::deposit))
        .routes(routes!(wallets::withdraw))
        .routes(routes!(wallets::transfer))
        .routes(routes!(wallets::set_limits))
        .routes(routes!(wallets::linked_transfer))
        .routes(routes!(fx::quote))
        .routes(routes!(fx::convert))
        .routes(routes!(wallets::refund))
        .routes(routes!(wallets::open_dispute))
        .routes(routes!(wallets::add_evidence))
        .routes(routes!(wallets::resolve_dispute))
        .routes(routes!(wallets::get_dispute))
        .routes(routes!(payments::provider_webhook))
        .routes(routes!(payments::top_up))
        .routes(routes!(wallets::reconciliation))
        .routes(routes!(wallets::reconciliation_runs))
        .routes(routes!(wallets::journal))
        .routes(routes!(wallets::balance_at))
        .routes(routes!(wallets::place_hold))
        .routes(routes!(wallets::get_hold))
        .routes(routes!(wallets::post_hold))
        .routes(routes!(wallets::void_hold))
        .routes(routes!(invoices::create_invoice, invoices::list_invoices))
        .routes(routes!(invoices::get_invoice))
        .routes(routes!(invoices::send_invoice))
        .routes(routes!(invoices::void_invoice))
        .routes(routes!(invoices::pay_invoice))
        .routes(routes!(invoices::get_by_link))
        .routes(routes!(invoices::pay_by_link))
        .routes(routes!(invoices::create_schedule))
        .routes(routes!(invoices::get_schedule))
        .routes(routes!(invoices::cancel_schedule))
        .routes(routes!(rooms::create_room, rooms::list_rooms))
        .routes(routes!(rooms::public_rooms))
        .routes(routes!(
            rooms::get_room,
            rooms::update_room,
            rooms::delete_room
        ))
        .routes(routes!(rooms::archive_room))
        .routes(routes!(rooms::rotate_key))
        .routes(routes!(rooms::list_members))
        .routes(routes!(rooms::invite))
        .routes(routes!(rooms::list_invites))
        .routes(routes!(rooms::join))
        .routes(routes!(rooms::decline))
        .routes(routes!(rooms::leave))
        .routes(routes!(rooms::moderate_member))
        .routes(routes!(rooms::set_role))
        .routes(routes!(messages::send, messages::timeline))
        .routes(routes!(
            messages::get_message,
            messages::edit,
            messages::redact
        ))
        .routes(routes!(messages::history))
        .routes(routes!(attachments::upload))
        .routes(routes!(attachments::download))
        .routes(routes!(messages::add_reaction, messages::remove_reaction))
        .routes(routes!(messages::receipt))
        .routes(routes!(messages::threads))
        .routes(routes!(messages::thread))
        .routes(routes!(messages::search))
        .routes(routes!(moderation::report))
        .routes(routes!(moderation::list_flags))
        .routes(routes!(moderation::clear_flag))
        .routes(routes!(moderation::mute, moderation::unmute))
        .routes(routes!(moderation::list_mutes))
        .routes(routes!(moderation::admin_flags))
        .routes(routes!(notes::pin_note, notes::list_notes))
        .routes(routes!(notes::edit_note, notes::unpin_note))
        .routes(routes!(reminders::set_reminder, reminders::list_reminders))
        .routes(routes!(
            reminders::get_reminder,
            reminders::edit_reminder,
            reminders::cancel_reminder
        ))
        .routes(routes!(reminders::snooze_reminder))
        .routes(routes!(reminders::list_notifications))
        .routes(routes!(reminders::mark_read))
        .routes(routes!(webhooks::register_webhook, webhooks::list_webhooks))
        .routes(routes!(
            webhooks::get_webhook,
            webhooks::update_webhook,
            webhooks::delete_webhook
        ))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(webhooks::list_dead_letters))
        .routes(routes!(webhooks::redrive_one))
        .routes(routes!(webhooks::redrive_all))
        .routes(routes!(ws::ws))
        .routes(routes!(sync::sync))
        .routes(routes!(sync::presence))
        .routes(routes!(
            itineraries::create_itinerary,
            itineraries::list_itineraries
        ))
        .routes(routes!(
            itineraries::get_itinerary,
            itineraries::update_itinerary,
            itineraries::delete_itinerary
        ))
        .routes(routes!(itineraries::archive_itinerary))
        .routes(routes!(itineraries::add_item))
        .routes(routes!(itineraries::update_item, itineraries::remove_item))
        .routes(routes!(itineraries::cancel_item))
        .routes(routes!(itineraries::add_from_catalog))
        .routes(routes!(itineraries::invite, itineraries::list_shares))
        .routes(routes!(itineraries::accept))
        .routes(routes!(itineraries::revoke))
        .routes(routes!(itineraries::transfer))
        .routes(routes!(itineraries::open_room))
        .routes(routes!(itineraries::day_plan))
        .routes(routes!(itineraries::budget))
        .routes(routes!(itineraries::conflicts))
        .routes(routes!(itineraries::public_itinerary))
        .routes(routes!(
            itineraries::add_listing,
            itineraries::search_listings
        ))
        .routes(routes!(itineraries::search_flights))
        .routes(routes!(itineraries::search_hotels))
        .routes(routes!(commands::get_command))
        .routes(routes!(admin::status))
}
