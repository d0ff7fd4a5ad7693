//! Itineraries through the HTTP API: typed reservations in local time + zone
//! (a midnight flight across zones, DST), If-Match between two editors,
//! sharing and revocation, upsert by booking, budget against a recount,
//! "my itineraries" paging, conflicts, the trip room with system posts, the
//! events catalogue, travel search against a stub speaking the Amadeus wire
//! format, bad input, and rebuild identity.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use axum::Json;
use axum::extract::{Query, State};
use mathia_tests::{Reply, TestApp};
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

use super::chat::id;

async fn trip(app: &TestApp, token: &str, title: &str) -> (Uuid, Reply) {
    let r = app
        .post(
            "/v1/itineraries",
            Some(token),
            &json!({"title": title, "region": "UK", "start_date": "2026-12-20", "end_date": "2026-12-28",
                    "zone": "Europe/London", "budget": {"GBP": 250000, "KES": 1000000}}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "create itinerary: {}", r.body);
    (id(&r.body["itinerary_id"]), r)
}

fn flight() -> Value {
    json!({"kind": "flight", "title": "KQ 100 Nairobi → London",
        "start": {"local": "2026-12-20T23:30:00", "zone": "Africa/Nairobi"},
        "end": {"local": "2026-12-21T06:10:00", "zone": "Europe/London"},
        "locations": [{"name": "Jomo Kenyatta International", "code": "NBO"}, {"name": "Heathrow", "code": "LHR"}],
        "booking_reference": "X7K2QP", "provider": "kenya-airways", "status": "confirmed",
        "price": {"amount": 85000, "currency": "GBP"}})
}

fn item(kind: &str, title: &str, start: &str, end: &str, zone: &str) -> Value {
    json!({"kind": kind, "title": title, "start": {"local": start, "zone": zone},
        "end": {"local": end, "zone": zone}})
}

async fn add(app: &TestApp, token: &str, trip: Uuid, body: &Value) -> Reply {
    app.post(
        &format!("/v1/itineraries/{trip}/items"),
        Some(token),
        body,
        &[],
    )
    .await
}

async fn read(app: &TestApp, token: &str, path: &str, after: i64) -> Reply {
    let sep = if path.contains('?') { '&' } else { '?' };
    app.get(&format!("{path}{sep}after_position={after}"), Some(token))
        .await
}

fn pos(r: &Reply) -> i64 {
    r.body["position"].as_i64().unwrap_or(0)
}

async fn share(app: &TestApp, owner: &str, trip: Uuid, user: Uuid, token: &str, role: &str) {
    let r = app
        .post(
            &format!("/v1/itineraries/{trip}/shares"),
            Some(owner),
            &json!({"user_id": user, "role": role}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "invite: {}", r.body);
    let r = app
        .post(
            &format!("/v1/itineraries/{trip}/shares/accept"),
            Some(token),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "accept: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_2330_nairobi_flight_landing_0610_in_london_is_stored_ordered_and_on_the_right_days_in_both_zones()
 {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, _) = trip(&app, &alice, "Christmas").await;
    // Added out of order: the hotel first, the flight last.
    let hotel = add(
        &app,
        &alice,
        t,
        &item(
            "hotel",
            "The Savoy",
            "2026-12-21T14:00:00",
            "2026-12-24T11:00:00",
            "Europe/London",
        ),
    )
    .await;
    assert_eq!(hotel.status, 201, "{}", hotel.body);
    let dinner = add(
        &app,
        &alice,
        t,
        &item(
            "activity",
            "Farewell dinner",
            "2026-12-20T18:00:00",
            "2026-12-20T20:00:00",
            "Africa/Nairobi",
        ),
    )
    .await;
    assert_eq!(dinner.status, 201, "{}", dinner.body);
    let f = add(&app, &alice, t, &flight()).await;
    assert_eq!(f.status, 201, "{}", f.body);
    assert_eq!(f.body["start"]["utc"], "2026-12-20T20:30:00Z");
    assert_eq!(f.body["end"]["utc"], "2026-12-21T06:10:00Z");
    assert_eq!(f.body["start"]["local"], "2026-12-20T23:30:00");
    assert_eq!(f.body["end"]["zone"], "Europe/London");

    let detail = read(&app, &alice, &format!("/v1/itineraries/{t}"), pos(&f)).await;
    assert_eq!(detail.status, 200, "{}", detail.body);
    let titles: Vec<&str> = detail.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["title"].as_str().unwrap())
        .collect();
    // 15:00Z dinner, 20:30Z flight, next day 14:00Z hotel: true chronological order.
    assert_eq!(
        titles,
        ["Farewell dinner", "KQ 100 Nairobi → London", "The Savoy"]
    );
    assert_eq!(
        detail.header("etag"),
        Some(format!("\"{}\"", detail.body["version"]).as_str())
    );

    let days_of = |plan: &Value, title: &str| -> Vec<(String, String, String)> {
        plan["days"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|d| {
                d["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| i["title"] == title)
                    .map(|i| {
                        (
                            d["date"].as_str().unwrap().to_owned(),
                            i["starts_local"].as_str().unwrap().to_owned(),
                            i["ends_local"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // In the trip's zone (London): departs 20:30 on the 20th, lands 06:10 on the 21st.
    let london = read(&app, &alice, &format!("/v1/itineraries/{t}/days"), 0).await;
    assert_eq!(london.status, 200, "{}", london.body);
    assert_eq!(london.body["zone"], "Europe/London");
    let fl = days_of(&london.body, "KQ 100 Nairobi → London");
    assert_eq!(
        fl.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["2026-12-20", "2026-12-21"]
    );
    assert_eq!(fl[0].1, "2026-12-20T20:30:00");
    assert_eq!(fl[0].2, "2026-12-21T06:10:00");
    // In Nairobi's zone: departs 23:30 on the 20th, lands 09:10 on the 21st.
    let nairobi = read(
        &app,
        &alice,
        &format!("/v1/itineraries/{t}/days?zone=Africa/Nairobi"),
        0,
    )
    .await;
    let fl = days_of(&nairobi.body, "KQ 100 Nairobi → London");
    assert_eq!(
        fl.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["2026-12-20", "2026-12-21"]
    );
    assert_eq!(fl[0].1, "2026-12-20T23:30:00");
    assert_eq!(fl[1].2, "2026-12-21T09:10:00");
    // The hotel is on each night it covers, and the trip's 9 days are all there.
    assert_eq!(days_of(&london.body, "The Savoy").len(), 4);
    assert_eq!(london.body["days"].as_array().unwrap().len(), 9);
    // An unknown zone is a problem, not a 500.
    app.get(
        &format!("/v1/itineraries/{t}/days?zone=Mars/Base"),
        Some(&alice),
    )
    .await
    .assert_problem(422, "invalid_zone");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dst_transitions_give_true_durations_and_local_times_in_the_gap_are_refused() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, _) = trip(&app, &alice, "Berlin").await;
    // Clocks go back at 03:00 CEST on 25 Oct 2026: a 22:00 → 06:00 night train is 9 hours.
    let train = add(
        &app,
        &alice,
        t,
        &item(
            "train",
            "Nightjet",
            "2026-10-24T22:00:00",
            "2026-10-25T06:00:00",
            "Europe/Berlin",
        ),
    )
    .await;
    assert_eq!(train.status, 201, "{}", train.body);
    assert_eq!(train.body["start"]["utc"], "2026-10-24T20:00:00Z");
    assert_eq!(train.body["end"]["utc"], "2026-10-25T05:00:00Z");
    // The repeated hour takes its first occurrence.
    let early = add(
        &app,
        &alice,
        t,
        &item(
            "note",
            "Wake up",
            "2026-10-25T02:30:00",
            "2026-10-25T02:30:00",
            "Europe/Berlin",
        ),
    )
    .await;
    assert_eq!(early.body["start"]["utc"], "2026-10-25T00:30:00Z");
    // 02:30 on 28 Mar 2027 never happens in Berlin (02:00 → 03:00).
    let before = app.count("events").await;
    add(
        &app,
        &alice,
        t,
        &item(
            "activity",
            "Ghost hour",
            "2027-03-28T02:30:00",
            "2027-03-28T04:00:00",
            "Europe/Berlin",
        ),
    )
    .await
    .assert_problem(422, "nonexistent_local_time");
    assert_eq!(app.count("events").await, before);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_editors_racing_with_the_same_if_match_get_one_success_and_one_412() {
    let app = TestApp::spawn().await;
    let (_, owner) = app.user("owner@test.local").await;
    let (a_id, a) = app.user("a@test.local").await;
    let (b_id, b) = app.user("b@test.local").await;
    let (t, _) = trip(&app, &owner, "Race").await;
    share(&app, &owner, t, a_id, &a, "editor").await;
    share(&app, &owner, t, b_id, &b, "editor").await;
    let f = add(&app, &a, t, &flight()).await;
    let item_id = id(&f.body["item_id"]);
    let detail = read(&app, &a, &format!("/v1/itineraries/{t}"), pos(&f)).await;
    let etag = detail.header("etag").unwrap().to_owned();
    let path = format!("/v1/itineraries/{t}/items/{item_id}");
    let (aisle, window) = (
        json!({"notes": "aisle seat"}),
        json!({"notes": "window seat"}),
    );
    let headers = [("if-match", etag.as_str())];
    let (ra, rb) = tokio::join!(
        app.call("PATCH", &path, Some(&a), Some(&aisle), &headers),
        app.call("PATCH", &path, Some(&b), Some(&window), &headers),
    );
    let mut statuses = [ra.status, rb.status];
    statuses.sort();
    assert_eq!(statuses, [200, 412], "{} / {}", ra.body, rb.body);
    let loser = if ra.status == 412 { &ra } else { &rb };
    loser.assert_problem(412, "precondition_failed");
    let winner = if ra.status == 200 { &ra } else { &rb };
    let after = read(&app, &owner, &format!("/v1/itineraries/{t}"), pos(winner)).await;
    assert_eq!(after.body["items"][0]["notes"], winner.body["notes"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn viewers_cannot_write_strangers_get_404_and_a_revoked_editor_changes_nothing() {
    let app = TestApp::spawn().await;
    let (_, owner) = app.user("owner@test.local").await;
    let (ed_id, ed) = app.user("editor@test.local").await;
    let (v_id, viewer) = app.user("viewer@test.local").await;
    let (_, stranger) = app.user("stranger@test.local").await;
    let (t, _) = trip(&app, &owner, "Shared").await;
    share(&app, &owner, t, ed_id, &ed, "editor").await;
    share(&app, &owner, t, v_id, &viewer, "viewer").await;
    let ok = add(&app, &ed, t, &flight()).await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    let before = app.count("events").await;
    add(
        &app,
        &viewer,
        t,
        &item(
            "note",
            "x",
            "2026-12-22T10:00:00",
            "2026-12-22T10:00:00",
            "Europe/London",
        ),
    )
    .await
    .assert_problem(403, "forbidden");
    add(
        &app,
        &stranger,
        t,
        &item(
            "note",
            "x",
            "2026-12-22T10:00:00",
            "2026-12-22T10:00:00",
            "Europe/London",
        ),
    )
    .await
    .assert_problem(404, "itinerary_not_found");
    for read in ["", "/days", "/budget", "/conflicts", "/shares"] {
        app.get(&format!("/v1/itineraries/{t}{read}"), Some(&stranger))
            .await
            .assert_problem(404, "itinerary_not_found");
    }
    for (method, write) in [
        ("PATCH", ""),
        ("DELETE", ""),
        ("POST", "/archive"),
        ("POST", "/room"),
        ("POST", "/shares/accept"),
    ] {
        app.call(
            method,
            &format!("/v1/itineraries/{t}{write}"),
            Some(&stranger),
            Some(&json!({})),
            &[],
        )
        .await
        .assert_problem(404, "itinerary_not_found");
    }
    // Editors cannot share; viewers read.
    app.post(
        &format!("/v1/itineraries/{t}/shares"),
        Some(&ed),
        &json!({"user_id": Uuid::new_v4(), "role": "viewer"}),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    assert_eq!(app.count("events").await, before);
    let seen = read(&app, &viewer, &format!("/v1/itineraries/{t}"), pos(&ok)).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.body["role"], "viewer");

    let revoked = app
        .call(
            "DELETE",
            &format!("/v1/itineraries/{t}/shares/{ed_id}"),
            Some(&owner),
            None,
            &[],
        )
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    let before = app.count("events").await;
    let write = add(
        &app,
        &ed,
        t,
        &item(
            "note",
            "sneaky",
            "2026-12-22T10:00:00",
            "2026-12-22T10:00:00",
            "Europe/London",
        ),
    )
    .await;
    assert!(
        [403, 404].contains(&write.status),
        "a revoked editor wrote: {}",
        write.body
    );
    let patch = app
        .call(
            "PATCH",
            &format!("/v1/itineraries/{t}"),
            Some(&ed),
            Some(&json!({"title": "mine now"})),
            &[],
        )
        .await;
    assert!([403, 404].contains(&patch.status), "{}", patch.body);
    assert_eq!(app.count("events").await, before, "nothing was written");
    read(&app, &ed, &format!("/v1/itineraries/{t}"), pos(&revoked))
        .await
        .assert_problem(404, "itinerary_not_found");
    let mine = read(&app, &ed, "/v1/itineraries", pos(&revoked)).await;
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 0);

    // Ownership moves to a collaborator only; the old owner stays as an editor.
    let moved = app
        .post(
            &format!("/v1/itineraries/{t}/owner"),
            Some(&owner),
            &json!({"user_id": v_id}),
            &[],
        )
        .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    let now = read(&app, &owner, &format!("/v1/itineraries/{t}"), pos(&moved)).await;
    assert_eq!(now.body["role"], "editor");
    assert_eq!(id(&now.body["owner_id"]), v_id);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upserting_the_same_booking_twice_is_idempotent_and_a_public_link_reads_without_people() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, _) = trip(&app, &alice, "Upsert").await;
    let first = add(&app, &alice, t, &flight()).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body["upsert"], "created");
    let before = app.count("events").await;
    let again = add(&app, &alice, t, &flight()).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["upsert"], "unchanged");
    assert_eq!(again.body["item_id"], first.body["item_id"]);
    assert_eq!(
        app.count("events").await,
        before,
        "an unchanged upsert appends nothing"
    );
    let mut changed = flight();
    changed["price"]["amount"] = json!(79000);
    let upd = add(&app, &alice, t, &changed).await;
    assert_eq!(upd.body["upsert"], "updated");
    let detail = read(&app, &alice, &format!("/v1/itineraries/{t}"), pos(&upd)).await;
    assert_eq!(detail.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(detail.body["items"][0]["price"]["amount"], 79000);

    // A public link: an unguessable token, read-only, no travellers.
    let r = app
        .call(
            "PATCH",
            &format!("/v1/itineraries/{t}"),
            Some(&alice),
            Some(&json!({"visibility": "public_link"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.body["link_token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 43);
    app.settle("itinerary").await;
    let public = app
        .get(&format!("/v1/public/itineraries/{token}"), None)
        .await;
    assert_eq!(public.status, 200, "{}", public.body);
    assert_eq!(public.body["items"].as_array().unwrap().len(), 1);
    assert!(public.body["link_token"].is_null());
    app.get(&format!("/v1/public/itineraries/{}", "A".repeat(43)), None)
        .await
        .assert_problem(404, "itinerary_not_found");
    let r = app
        .call(
            "PATCH",
            &format!("/v1/itineraries/{t}"),
            Some(&alice),
            Some(&json!({"visibility": "private"})),
            &[],
        )
        .await;
    assert!(r.body["link_token"].is_null());
    app.settle("itinerary").await;
    assert_eq!(
        app.get(&format!("/v1/public/itineraries/{token}"), None)
            .await
            .status,
        404
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budget_planned_vs_booked_matches_a_recount_after_random_edits() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, _) = trip(&app, &alice, "Budget").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6974_696e);
    // The test's own model: item id → (currency, amount, status).
    let mut model: BTreeMap<Uuid, (String, i64, String)> = BTreeMap::new();
    let currencies = ["GBP", "KES", "USD"];
    let statuses = ["pending", "confirmed", "cancelled"];
    let mut last = 0;
    for n in 0..40 {
        let op = if model.is_empty() {
            0
        } else {
            rng.random_range(0..6)
        };
        let pick = |rng: &mut rand::rngs::StdRng, model: &BTreeMap<Uuid, _>| {
            *model.keys().nth(rng.random_range(0..model.len())).unwrap()
        };
        let r = match op {
            0..=2 => {
                let c = currencies[rng.random_range(0..3)].to_owned();
                let a = rng.random_range(0..500_000i64);
                let s = statuses[rng.random_range(0..2)].to_owned();
                let mut body = item(
                    "activity",
                    &format!("thing {n}"),
                    "2026-12-22T10:00:00",
                    "2026-12-22T11:00:00",
                    "Europe/London",
                );
                body["price"] = json!({"amount": a, "currency": c});
                body["status"] = json!(s);
                let r = add(&app, &alice, t, &body).await;
                assert_eq!(r.status, 201, "{}", r.body);
                model.insert(id(&r.body["item_id"]), (c, a, s));
                r
            }
            3 => {
                let i = pick(&mut rng, &model);
                let a = rng.random_range(0..500_000i64);
                let s = statuses[rng.random_range(0..2)];
                let c = model[&i].0.clone();
                let r = app
                    .call(
                        "PATCH",
                        &format!("/v1/itineraries/{t}/items/{i}"),
                        Some(&alice),
                        Some(&json!({"price": {"amount": a, "currency": c}, "status": s})),
                        &[],
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                model.insert(i, (c, a, s.to_owned()));
                r
            }
            4 => {
                let i = pick(&mut rng, &model);
                let r = app
                    .post(
                        &format!("/v1/itineraries/{t}/items/{i}/cancel"),
                        Some(&alice),
                        &json!({}),
                        &[],
                    )
                    .await;
                if model[&i].2 == "cancelled" {
                    r.assert_problem(409, "already_cancelled");
                    continue;
                }
                assert_eq!(r.status, 200, "{}", r.body);
                model.get_mut(&i).unwrap().2 = "cancelled".into();
                r
            }
            _ => {
                let i = pick(&mut rng, &model);
                let r = app
                    .call(
                        "DELETE",
                        &format!("/v1/itineraries/{t}/items/{i}"),
                        Some(&alice),
                        None,
                        &[],
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                model.remove(&i);
                r
            }
        };
        last = last.max(pos(&r));
    }
    let budget = read(&app, &alice, &format!("/v1/itineraries/{t}/budget"), last).await;
    assert_eq!(budget.status, 200, "{}", budget.body);
    let planned: BTreeMap<&str, i64> = [("GBP", 250000), ("KES", 1000000)].into_iter().collect();
    for c in currencies {
        let sum = |s: &str| -> i64 {
            model
                .values()
                .filter(|(cc, _, st)| cc == c && st == s)
                .map(|(_, a, _)| a)
                .sum()
        };
        let line = budget.body["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["currency"] == c)
            .cloned()
            .unwrap_or(json!({"planned": 0, "booked": 0, "pending": 0, "remaining": 0}));
        let p = planned.get(c).copied().unwrap_or(0);
        assert_eq!(line["planned"], p, "{c}");
        assert_eq!(line["booked"], sum("confirmed"), "{c}");
        assert_eq!(line["pending"], sum("pending"), "{c}");
        assert_eq!(line["remaining"], p - sum("confirmed"), "{c}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn my_itineraries_pages_owned_and_shared_newest_first_with_an_opaque_cursor() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let (_, bob) = app.user("bob@test.local").await;
    let mut want = HashSet::new();
    for i in 0..5 {
        want.insert(trip(&app, &alice, &format!("mine {i}")).await.0);
    }
    for i in 0..2 {
        let (t, _) = trip(&app, &bob, &format!("bob's {i}")).await;
        share(&app, &bob, t, alice_id, &alice, "viewer").await;
        want.insert(t);
    }
    // An invitation waits apart until accepted.
    let (pending, _) = trip(&app, &bob, "not yet").await;
    let r = app
        .post(
            &format!("/v1/itineraries/{pending}/shares"),
            Some(&bob),
            &json!({"user_id": alice_id, "role": "editor"}),
            &[],
        )
        .await;
    app.settle("itinerary").await;
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/itineraries?limit=3&cursor={c}"),
            None => "/v1/itineraries?limit=3".to_owned(),
        };
        let page = app.get(&path, Some(&alice)).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|i| id(&i["itinerary_id"])));
        match page.body["next"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "no duplicates, nothing missing");
    assert_eq!(seen.iter().copied().collect::<HashSet<_>>(), want);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    let invited = read(&app, &alice, "/v1/itineraries?state=invited", pos(&r)).await;
    assert_eq!(invited.body["items"][0]["itinerary_id"], json!(pending));
    app.get("/v1/itineraries?cursor=%%%", Some(&alice))
        .await
        .assert_problem(400, "malformed_request");
    app.get("/v1/itineraries?limit=0", Some(&alice))
        .await
        .assert_problem(422, "invalid_input");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_items_of_the_same_traveller_are_flagged_with_both_named() {
    let app = TestApp::spawn().await;
    let (a_id, alice) = app.user("alice@test.local").await;
    let (b_id, bob) = app.user("bob@test.local").await;
    let (t, _) = trip(&app, &alice, "Clash").await;
    share(&app, &alice, t, b_id, &bob, "editor").await;
    let zone = "Europe/London";
    let mut tour = item(
        "activity",
        "Museum tour",
        "2026-12-23T09:00:00",
        "2026-12-23T12:00:00",
        zone,
    );
    tour["travellers"] = json!([a_id]);
    let mut train = item(
        "train",
        "Train to Paris",
        "2026-12-23T11:00:00",
        "2026-12-23T14:30:00",
        zone,
    );
    train["travellers"] = json!([a_id, b_id]);
    let mut football = item(
        "event",
        "Football",
        "2026-12-23T10:00:00",
        "2026-12-23T11:00:00",
        zone,
    );
    football["travellers"] = json!([b_id]);
    let hotel = item(
        "hotel",
        "Hotel",
        "2026-12-21T14:00:00",
        "2026-12-24T11:00:00",
        zone,
    );
    let mut last = 0;
    for body in [&tour, &train, &football, &hotel] {
        let r = add(&app, &alice, t, body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        last = pos(&r);
    }
    let c = read(
        &app,
        &alice,
        &format!("/v1/itineraries/{t}/conflicts"),
        last,
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.body);
    let items = c.body["items"].as_array().unwrap();
    // Tour × train (Alice, 11:00–12:00). Football ends as the train starts; the tour is Alice's only; the hotel is a stay.
    assert_eq!(items.len(), 1, "{}", c.body);
    assert_eq!(items[0]["a"]["title"], "Museum tour");
    assert_eq!(items[0]["b"]["title"], "Train to Paris");
    assert_eq!(items[0]["travellers"], json!([a_id]));
    assert_eq!(items[0]["overlap_start"], "2026-12-23T11:00:00Z");
    assert_eq!(items[0]["overlap_end"], "2026-12-23T12:00:00Z");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_itinerary_is_created_updated_archived_read_only_and_deleted() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, created) = trip(&app, &alice, "Lifecycle").await;
    assert_eq!(created.body["details"]["zone"], "Europe/London");
    assert_eq!(created.body["details"]["budget"]["GBP"], 250000);
    assert_eq!(created.header("etag"), Some("\"1\""));
    let upd = app
        .call(
            "PATCH",
            &format!("/v1/itineraries/{t}"),
            Some(&alice),
            Some(
                &json!({"title": "Lifecycle II", "region": "", "zone": "Africa/Nairobi",
                         "metadata": {"purpose": "family"}}),
            ),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(upd.status, 200, "{}", upd.body);
    let d = read(&app, &alice, &format!("/v1/itineraries/{t}"), pos(&upd)).await;
    assert_eq!(d.body["title"], "Lifecycle II");
    assert!(d.body["region"].is_null());
    assert_eq!(d.body["zone"], "Africa/Nairobi");
    assert_eq!(d.body["metadata"]["purpose"], "family");
    assert_eq!(d.body["version"], 2);
    let arch = app
        .post(
            &format!("/v1/itineraries/{t}/archive"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(arch.status, 200, "{}", arch.body);
    add(&app, &alice, t, &flight())
        .await
        .assert_problem(409, "itinerary_archived");
    let d = read(&app, &alice, &format!("/v1/itineraries/{t}"), pos(&arch)).await;
    assert_eq!(d.body["archived"], true);
    let del = app
        .call(
            "DELETE",
            &format!("/v1/itineraries/{t}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(del.status, 200, "{}", del.body);
    read(&app, &alice, &format!("/v1/itineraries/{t}"), pos(&del))
        .await
        .assert_problem(404, "itinerary_not_found");
    let mine = read(&app, &alice, "/v1/itineraries", pos(&del)).await;
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 0);
    app.call(
        "DELETE",
        &format!("/v1/itineraries/{t}"),
        Some(&alice),
        None,
        &[],
    )
    .await
    .assert_problem(404, "itinerary_not_found");
    app.stop().await;
}

/// Poll `path` until `done` holds of its body.
async fn eventually(
    app: &TestApp,
    path: &str,
    token: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..400 {
        let r = app.get(path, Some(token)).await;
        if r.status == 200 && done(&r.body) {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} never got there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trip_room_holds_the_trips_people_and_receives_changes_as_sealed_system_messages() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (b_id, bob) = app.user("bob@test.local").await;
    let (c_id, carol) = app.user("carol@test.local").await;
    let (t, _) = trip(&app, &alice, "Roomy").await;
    share(&app, &alice, t, b_id, &bob, "viewer").await;
    let opened = app
        .post(
            &format!("/v1/itineraries/{t}/room"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(opened.status, 201, "{}", opened.body);
    let room = id(&opened.body["room_id"]);
    app.post(
        &format!("/v1/itineraries/{t}/room"),
        Some(&alice),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(409, "room_exists");
    // Bob (a viewer) is a member; Carol joins when she accepts.
    share(&app, &alice, t, c_id, &carol, "editor").await;
    let f = add(&app, &carol, t, &flight()).await;
    assert_eq!(f.status, 201);
    let timeline = format!("/v1/rooms/{room}/messages");
    let body = eventually(&app, &timeline, &bob, |b| {
        b["items"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| m["body"].as_str().is_some_and(|t| t.contains("KQ 100")))
        })
    })
    .await;
    let post = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["body"].as_str().is_some_and(|t| t.contains("KQ 100")))
        .unwrap();
    assert_eq!(post["sender"], json!(Uuid::nil()));
    assert!(
        post["body"].as_str().unwrap().starts_with("T added flight"),
        "{post}"
    );
    // Sealed at rest like any message: the text is not in the event log.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'MessagePosted' AND payload::text LIKE '%KQ 100%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    // Revoking Carol removes her from the room too.
    let r = app
        .call(
            "DELETE",
            &format!("/v1/itineraries/{t}/shares/{c_id}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.settle("chat").await;
    assert_eq!(app.get(&timeline, Some(&carol)).await.status, 404);
    // A viewer cannot open rooms of other trips, a stranger learns nothing.
    let (t2, _) = trip(&app, &alice, "Other").await;
    app.post(
        &format!("/v1/itineraries/{t2}/room"),
        Some(&carol),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(404, "itinerary_not_found");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admins_add_catalogue_events_anyone_searches_by_place_and_dates_and_adds_one_as_an_item() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let concert = json!({"category": "concert", "title": "Sauti Sol", "place": "London",
        "venue": {"name": "O2 Academy Brixton"},
        "start": {"local": "2026-12-22T19:30:00", "zone": "Europe/London"},
        "end": {"local": "2026-12-22T23:00:00", "zone": "Europe/London"},
        "price": {"amount": 4500, "currency": "GBP"}});
    app.post("/v1/catalog/events", Some(&alice), &concert, &[])
        .await
        .assert_problem(403, "forbidden");
    let added = app
        .post("/v1/catalog/events", Some(&admin), &concert, &[])
        .await;
    assert_eq!(added.status, 201, "{}", added.body);
    let listing = id(&added.body["listing_id"]);
    let mut other = concert.clone();
    other["place"] = json!("Nairobi");
    other["title"] = json!("Blankets & Wine");
    let r = app
        .post("/v1/catalog/events", Some(&admin), &other, &[])
        .await;
    let found = read(
        &app,
        &alice,
        "/v1/catalog/events?place=london&from=2026-12-20&to=2026-12-28",
        pos(&r),
    )
    .await;
    assert_eq!(found.status, 200, "{}", found.body);
    let items = found.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["title"], "Sauti Sol");
    let none = app
        .get(
            "/v1/catalog/events?place=London&from=2027-01-01&to=2027-01-31",
            Some(&alice),
        )
        .await;
    assert_eq!(none.body["items"].as_array().unwrap().len(), 0);
    let (t, _) = trip(&app, &alice, "Gig").await;
    let item = app
        .post(
            &format!("/v1/itineraries/{t}/items/from-catalog"),
            Some(&alice),
            &json!({"listing_id": listing}),
            &[],
        )
        .await;
    assert_eq!(item.status, 201, "{}", item.body);
    assert_eq!(item.body["kind"], "event");
    assert_eq!(item.body["price"]["amount"], 4500);
    assert_eq!(item.body["start"]["utc"], "2026-12-22T19:30:00Z");
    app.post(
        &format!("/v1/itineraries/{t}/items/from-catalog"),
        Some(&alice),
        &json!({"listing_id": listing}),
        &[],
    )
    .await
    .assert_problem(409, "listing_already_added");
    app.post(
        &format!("/v1/itineraries/{t}/items/from-catalog"),
        Some(&alice),
        &json!({"listing_id": Uuid::new_v4()}),
        &[],
    )
    .await
    .assert_problem(404, "listing_not_found");
    app.stop().await;
}

/// What the stub provider was asked, and how often it should fail first.
#[derive(Clone, Default)]
struct Stub {
    calls: Arc<AtomicUsize>,
    fail_first: Arc<AtomicUsize>,
}

/// `GET /v2/shopping/flight-offers` as the Amadeus Self-Service API answers it.
async fn flight_offers(
    State(stub): State<Stub>,
    headers: axum::http::HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> (axum::http::StatusCode, Json<Value>) {
    stub.calls.fetch_add(1, Ordering::SeqCst);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer stub-travel") {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(
                json!({"errors": [{"status": 401, "code": 38190, "title": "Invalid access token"}]}),
            ),
        );
    }
    if stub.fail_first.load(Ordering::SeqCst) > 0 {
        stub.fail_first.fetch_sub(1, Ordering::SeqCst);
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            Json(
                json!({"errors": [{"status": 500, "code": 141, "title": "SYSTEM ERROR HAS OCCURRED"}]}),
            ),
        );
    }
    if q.get("originLocationCode").map(String::as_str) == Some("ERR") {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"errors": []})),
        );
    }
    let date = q.get("departureDate").cloned().unwrap_or_default();
    (
        axum::http::StatusCode::OK,
        Json(json!({
            "meta": {"count": 1},
            "data": [{
                "type": "flight-offer", "id": "1", "source": "GDS", "oneWay": false,
                "itineraries": [{"duration": "PT9H40M", "segments": [{
                    "departure": {"iataCode": q.get("originLocationCode"), "terminal": "1A", "at": format!("{date}T23:30:00")},
                    "arrival": {"iataCode": q.get("destinationLocationCode"), "terminal": "4", "at": "2026-12-21T06:10:00"},
                    "carrierCode": "KQ", "number": "100", "aircraft": {"code": "788"}, "duration": "PT9H40M", "numberOfStops": 0
                }]}],
                "price": {"currency": "GBP", "total": "850.00", "base": "610.00", "grandTotal": "850.00"},
                "validatingAirlineCodes": ["KQ"]
            }],
            "dictionaries": {"carriers": {"KQ": "KENYA AIRWAYS"}}
        })),
    )
}

/// `GET /v3/shopping/hotel-offers`, Amadeus style.
async fn hotel_offers(Query(q): Query<BTreeMap<String, String>>) -> Json<Value> {
    Json(json!({"data": [{"type": "hotel-offers", "available": true,
        "hotel": {"hotelId": "HLLON101", "name": "THE SAVOY", "cityCode": q.get("cityCode")},
        "offers": [{"id": "TSXOJ6LFQ2", "checkInDate": q.get("checkInDate"), "checkOutDate": q.get("checkOutDate"),
            "room": {"type": "A2K"}, "price": {"currency": "GBP", "total": "1320.50"}}]}]}))
}

async fn stub_provider() -> (String, Stub) {
    let stub = Stub::default();
    let router = axum::Router::new()
        .route(
            "/v2/shopping/flight-offers",
            axum::routing::get(flight_offers),
        )
        .route(
            "/v3/shopping/hotel-offers",
            axum::routing::get(hotel_offers),
        )
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, stub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn travel_search_reads_the_provider_wire_format_retries_and_never_invents_without_the_fallback()
 {
    let (url, stub) = stub_provider().await;
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.travel_url = Some(url.clone());
        c.travel_api_key = Some("stub-travel".into());
        c.travel_retries = 2;
        c.travel_timeout_ms = 2000;
    })
    .await;
    let (_, alice) = app.user("alice@test.local").await;
    // Two 500s, then an answer: retried within the budget of 2.
    stub.fail_first.store(2, Ordering::SeqCst);
    let r = app
        .get(
            "/v1/travel/flights?origin=nbo&destination=LHR&date=2026-12-20",
            Some(&alice),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(stub.calls.load(Ordering::SeqCst), 3);
    assert_eq!(r.body["source"], "provider");
    let offer = &r.body["offers"][0];
    assert_eq!(offer["price"], json!({"amount": 85000, "currency": "GBP"}));
    assert_eq!(offer["segments"][0]["from"], "NBO");
    assert_eq!(
        offer["segments"][0]["departure_local"],
        "2026-12-20T23:30:00"
    );
    let h = app
        .get(
            "/v1/travel/hotels?city=LON&check_in=2026-12-21&check_out=2026-12-24",
            Some(&alice),
        )
        .await;
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.body["offers"][0]["name"], "THE SAVOY");
    assert_eq!(h.body["offers"][0]["price"]["amount"], 132050);
    // A provider that keeps failing: 503, nothing made up.
    app.get(
        "/v1/travel/flights?origin=ERR&destination=LHR&date=2026-12-20",
        Some(&alice),
    )
    .await
    .assert_problem(503, "travel_search_unavailable");
    app.get(
        "/v1/travel/flights?origin=NAIROBI&destination=LHR&date=2026-12-20",
        Some(&alice),
    )
    .await
    .assert_problem(422, "invalid_input");
    app.get(
        "/v1/travel/hotels?city=LON&check_in=2026-12-24&check_out=2026-12-21",
        Some(&alice),
    )
    .await
    .assert_problem(422, "invalid_input");
    app.stop().await;

    // No provider at all: 503 unless the fallback is on, and then it says so.
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| c.travel_fallback = true).await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = app
        .get(
            "/v1/travel/flights?origin=NBO&destination=LHR&date=2026-12-20",
            Some(&alice),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["source"], "fallback");
    assert!(r.body["offers"][0]["price"].is_null());
    app.stop().await;
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    app.get(
        "/v1/travel/hotels?city=LON&check_in=2026-12-21&check_out=2026-12-24",
        Some(&alice),
    )
    .await
    .assert_problem(503, "travel_search_unavailable");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_itinerary_input_is_a_4xx_problem_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, _) = trip(&app, &alice, "Input").await;
    let before = app.count("events").await;
    let base = json!({"title": "x", "start_date": "2026-12-20", "end_date": "2026-12-28", "zone": "Europe/London"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, status, code) in [
        (with("zone", json!("Nowhere/Town")), 422, "invalid_zone"),
        (with("end_date", json!("2026-01-01")), 422, "invalid_dates"),
        (with("budget", json!({"XXX": 5})), 422, "invalid_currency"),
        (with("budget", json!({"GBP": -5})), 422, "invalid_amount"),
        (
            with("budget", json!({"GBP": 1e30})),
            400,
            "malformed_request",
        ),
        (with("title", json!("a\u{0}b")), 400, "malformed_request"),
        (with("title", json!("")), 422, "invalid_input"),
        (with("metadata", json!([1, 2])), 422, "invalid_input"),
        (with("surprise", json!(1)), 400, "malformed_request"),
        (
            with("visibility", json!("everyone")),
            400,
            "malformed_request",
        ),
    ] {
        app.post("/v1/itineraries", Some(&alice), &body, &[])
            .await
            .assert_problem(status, code);
    }
    let mut f = flight();
    f["end"]["local"] = json!("2026-12-20T19:00:00");
    add(&app, &alice, t, &f)
        .await
        .assert_problem(422, "end_before_start");
    let mut f = flight();
    f["kind"] = json!("spaceship");
    add(&app, &alice, t, &f)
        .await
        .assert_problem(400, "malformed_request");
    let mut f = flight();
    f["price"]["currency"] = json!("DOGE");
    add(&app, &alice, t, &f)
        .await
        .assert_problem(422, "invalid_currency");
    let mut f = flight();
    f["start"]["local"] = json!("2026-12-20 23:30");
    add(&app, &alice, t, &f)
        .await
        .assert_problem(400, "malformed_request");
    app.call(
        "PATCH",
        &format!("/v1/itineraries/{t}"),
        Some(&alice),
        Some(&json!({"title": "y"})),
        &[("if-match", "nope")],
    )
    .await
    .assert_problem(400, "malformed_request");
    app.get("/v1/itineraries/not-a-uuid", Some(&alice))
        .await
        .assert_problem(400, "malformed_request");
    assert_eq!(app.get("/v1/itineraries", None).await.status, 401);
    assert_eq!(app.count("events").await, before);
    app.stop().await;
}

/// The itinerary read models as text, in a stable order.
async fn dump(app: &TestApp) -> Vec<String> {
    let mut out = vec![];
    for (t, order) in [
        ("proj_itineraries", "itinerary_id"),
        ("proj_itinerary_members", "itinerary_id, user_id"),
        ("proj_itinerary_items", "itinerary_id, item_id"),
        ("proj_itinerary_listings", "listing_id"),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT x::text FROM {t} x ORDER BY {order}"
        )))
        .fetch_all(&app.pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{t} {r}")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_the_itinerary_projection_from_zero_gives_identical_read_models() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (b_id, bob) = app.user("bob@test.local").await;
    let (c_id, carol) = app.user("carol@test.local").await;
    let (t, _) = trip(&app, &alice, "Rebuild").await;
    share(&app, &alice, t, b_id, &bob, "editor").await;
    share(&app, &alice, t, c_id, &carol, "viewer").await;
    let f = add(&app, &bob, t, &flight()).await;
    let fid = id(&f.body["item_id"]);
    let h = add(
        &app,
        &alice,
        t,
        &item(
            "hotel",
            "Savoy",
            "2026-12-21T14:00:00",
            "2026-12-24T11:00:00",
            "Europe/London",
        ),
    )
    .await;
    let hid = id(&h.body["item_id"]);
    let n = add(
        &app,
        &alice,
        t,
        &item(
            "note",
            "Call mum",
            "2026-12-25T12:00:00",
            "2026-12-25T12:00:00",
            "Europe/London",
        ),
    )
    .await;
    for (method, path, token, body) in [
        (
            "PATCH",
            format!("/v1/itineraries/{t}/items/{fid}"),
            &bob,
            Some(json!({"notes": "window"})),
        ),
        (
            "POST",
            format!("/v1/itineraries/{t}/items/{hid}/cancel"),
            &alice,
            Some(json!({})),
        ),
        (
            "DELETE",
            format!("/v1/itineraries/{t}/items/{}", id(&n.body["item_id"])),
            &alice,
            None,
        ),
        (
            "PATCH",
            format!("/v1/itineraries/{t}"),
            &alice,
            Some(json!({"budget": {"GBP": 1}, "visibility": "public_link"})),
        ),
        (
            "DELETE",
            format!("/v1/itineraries/{t}/shares/{c_id}"),
            &alice,
            None,
        ),
        (
            "POST",
            format!("/v1/itineraries/{t}/owner"),
            &alice,
            Some(json!({"user_id": b_id})),
        ),
        (
            "POST",
            format!("/v1/itineraries/{t}/room"),
            &bob,
            Some(json!({})),
        ),
    ] {
        let done = app
            .call(method, &path, Some(token), body.as_ref(), &[])
            .await;
        assert!(done.status < 300, "{path}: {}", done.body);
    }
    let (gone, _) = trip(&app, &alice, "Deleted").await;
    app.call(
        "DELETE",
        &format!("/v1/itineraries/{gone}"),
        Some(&alice),
        None,
        &[],
    )
    .await;
    let (arch, _) = trip(&app, &alice, "Archived").await;
    app.post(
        &format!("/v1/itineraries/{arch}/archive"),
        Some(&alice),
        &json!({}),
        &[],
    )
    .await;
    app.post(
        "/v1/catalog/events",
        Some(&admin),
        &json!({"category": "conference", "title": "PyCon Africa", "place": "Nairobi",
        "start": {"local": "2026-12-01T09:00:00", "zone": "Africa/Nairobi"},
        "end": {"local": "2026-12-03T17:00:00", "zone": "Africa/Nairobi"}}),
        &[],
    )
    .await;
    let _ = carol;
    app.settle("itinerary").await;
    let live = dump(&app).await;
    assert!(live.len() > 6, "{live:?}");

    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM proj_checkpoints WHERE model = 'itinerary' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    for t in [
        "proj_itineraries",
        "proj_itinerary_members",
        "proj_itinerary_items",
        "proj_itinerary_listings",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {t}")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE proj_checkpoints SET position = 0 WHERE model = 'itinerary'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let runner = projections::runner::Runner {
        pool: app.pool.clone(),
        js: jetstream::new(app.nats.clone()),
        subjects: app.subjects.clone(),
    };
    let head = handlers::store::head_position(&app.pool).await.unwrap();
    runner
        .catch_up(&projections::itinerary::ItineraryProjector, head)
        .await
        .unwrap();
    assert_eq!(dump(&app).await, live);
    app.stop().await;
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// The read benchmark, measured through HTTP on this machine (ignored by
/// default; run with `--run-ignored only`): detail of a trip with 100 items,
/// "my itineraries" for a user with 10,000, and item writes per second end to end.
/// The 10,000 trips are seeded straight into the read model (the write path is
/// measured by the item writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run explicitly"]
async fn bench_detail_and_list_reads_and_item_writes() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    // Item writes: 20 trips, 100 items each, 4 writers per trip.
    let mut trips = vec![];
    for i in 0..20 {
        trips.push(trip(&app, &alice, &format!("bench {i}")).await.0);
    }
    let started = std::time::Instant::now();
    let app = Arc::new(app);
    let mut tasks = tokio::task::JoinSet::new();
    for (n, t) in trips.iter().copied().enumerate() {
        for w in 0..4 {
            let (app, token) = (app.clone(), alice.clone());
            tasks.spawn(async move {
                for k in 0..25 {
                    let h = (n * 7 + w * 3 + k) % 20;
                    let body = item(
                        "activity",
                        &format!("thing {w}-{k}"),
                        &format!("2026-12-2{}T{:02}:00:00", 1 + k % 7, h),
                        &format!("2026-12-2{}T{:02}:30:00", 1 + k % 7, h),
                        "Europe/London",
                    );
                    let r = add(&app, &token, t, &body).await;
                    assert_eq!(r.status, 201, "{}", r.body);
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "item writes: 2000 in {secs:.2} s = {:.0}/s end to end (answered)",
        2000.0 / secs
    );
    app.settle("itinerary").await;
    sqlx::query(
        "INSERT INTO proj_itineraries (itinerary_id, owner_id, title, start_date, end_date, zone, budget, visibility,
            metadata, version, created_at, updated_at, updated_position)
         SELECT gen_random_uuid(), $1, 'seeded ' || g, '2026-12-20', '2026-12-28', 'Europe/London', '{}', 'private',
            '{}', 1, now(), now(), 0 FROM generate_series(1, 10000) g",
    )
    .bind(alice_id)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO proj_itinerary_members (itinerary_id, user_id, role, state, since_position)
         SELECT itinerary_id, owner_id, 'owner', 'active', 0 FROM proj_itineraries
         ON CONFLICT DO NOTHING",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&app.pool).await.unwrap();
    let detail = format!("/v1/itineraries/{}", trips[0]);
    let mut d = vec![];
    let mut l = vec![];
    let mut me = vec![];
    for _ in 0..30 {
        app.get(&detail, Some(&alice)).await;
    }
    let mut cursor: Option<String> = None;
    for _ in 0..500 {
        let t = std::time::Instant::now();
        let r = app.get(&detail, Some(&alice)).await;
        d.push(t.elapsed());
        assert_eq!(r.body["items"].as_array().unwrap().len(), 100);
        let path = match &cursor {
            Some(c) => format!("/v1/itineraries?limit=20&cursor={c}"),
            None => "/v1/itineraries?limit=20".into(),
        };
        let t = std::time::Instant::now();
        let r = app.get(&path, Some(&alice)).await;
        l.push(t.elapsed());
        cursor = r.body["next"].as_str().map(str::to_owned);
        let t = std::time::Instant::now();
        app.get("/v1/me", Some(&alice)).await;
        me.push(t.elapsed());
    }
    eprintln!(
        "detail (100 items) p99 {:?}; list (10,020 trips, pages of 20) p99 {:?}; GET /v1/me p99 {:?} (the floor)",
        p99(d),
        p99(l),
        p99(me)
    );
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
}

/// Item adds, edits, cancels and removals decided while no projector runs
/// reach it as one catch-up batch (bulk upserts, then each trip's item list
/// rebuilt once): the detail read then lists exactly the test's own model, in
/// chronological order, with the trip's last version; `If-None-Match` with
/// that version answers 304 without a body until the trip changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_item_changes_gives_the_detail_a_recount_gives_and_304_while_unchanged() {
    let app = TestApp::spawn_with(mathia_tests::only(true, true, true, false), |_| {}).await;
    let (_, alice) = app.user("alice@test.local").await;
    let (t, _) = trip(&app, &alice, "Batch").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6261_7463);
    // item id → (start hour on the 21st, status).
    let mut model: BTreeMap<Uuid, (u32, &str)> = BTreeMap::new();
    for n in 0..60 {
        // Edits and cancels go to items not cancelled; removals to any.
        let live: Vec<Uuid> = model
            .iter()
            .filter(|(_, v)| v.1 != "cancelled")
            .map(|(k, _)| *k)
            .collect();
        let op = if live.len() < 3 {
            0
        } else {
            rng.random_range(0..5)
        };
        let pick = match op {
            2 | 3 => live[rng.random_range(0..live.len())],
            _ => *model
                .keys()
                .nth(rng.random_range(0..model.len().max(1)))
                .unwrap_or(&Uuid::nil()),
        };
        let r = match op {
            0 | 1 => {
                let h = rng.random_range(0..23);
                let body = item(
                    "activity",
                    &format!("A{n}"),
                    &format!("2026-12-21T{h:02}:00:00"),
                    &format!("2026-12-21T{h:02}:30:00"),
                    "Europe/London",
                );
                let r = add(&app, &alice, t, &body).await;
                model.insert(id(&r.body["item_id"]), (h, "pending"));
                r
            }
            2 => {
                let h = rng.random_range(0..23);
                let r = app.call("PATCH", &format!("/v1/itineraries/{t}/items/{pick}"), Some(&alice),
                    Some(&json!({"start": {"local": format!("2026-12-21T{h:02}:00:00"), "zone": "Europe/London"},
                                 "end": {"local": format!("2026-12-21T{h:02}:45:00"), "zone": "Europe/London"}})), &[]).await;
                model.get_mut(&pick).unwrap().0 = h;
                r
            }
            3 => {
                let r = app
                    .post(
                        &format!("/v1/itineraries/{t}/items/{pick}/cancel"),
                        Some(&alice),
                        &json!({}),
                        &[],
                    )
                    .await;
                model.get_mut(&pick).unwrap().1 = "cancelled";
                r
            }
            _ => {
                let r = app
                    .call(
                        "DELETE",
                        &format!("/v1/itineraries/{t}/items/{pick}"),
                        Some(&alice),
                        None,
                        &[],
                    )
                    .await;
                model.remove(&pick);
                r
            }
        };
        assert!(r.status < 300, "op {op}: {} {}", r.status, r.body);
    }
    let version: i64 = sqlx::query_scalar("SELECT max(version) FROM events WHERE stream_id = $1")
        .bind(format!("itinerary.trip.{t}"))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // Now the projector: everything above is one catch-up.
    app.start(mathia_tests::only(false, false, false, true));
    app.settle("itinerary").await;
    let r = app.get(&format!("/v1/itineraries/{t}"), Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["version"].as_i64(), r.header("etag")),
        (Some(version), Some(format!("\"{version}\"").as_str()))
    );
    let got: Vec<(Uuid, String)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (id(&i["item_id"]), i["status"].as_str().unwrap().to_owned()))
        .collect();
    // The model in true chronological order (ties by end, then id, as the read orders them).
    let ends = |i: &Value| i["end"]["utc"].as_str().unwrap().to_owned();
    let mut want: Vec<(u32, String, Uuid, String)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let k = id(&i["item_id"]);
            (model[&k].0, ends(i), k, model[&k].1.to_owned())
        })
        .collect();
    want.sort();
    assert_eq!(got.len(), model.len());
    assert_eq!(
        got,
        want.into_iter()
            .map(|(_, _, k, s)| (k, s))
            .collect::<Vec<_>>()
    );
    // 304 while unchanged; the next change gives the body again.
    let etag = format!("\"{version}\"");
    let not_modified = app
        .call(
            "GET",
            &format!("/v1/itineraries/{t}"),
            Some(&alice),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(
        (not_modified.status, not_modified.header("etag")),
        (304, Some(etag.as_str()))
    );
    let r = add(
        &app,
        &alice,
        t,
        &item(
            "note",
            "Later",
            "2026-12-22T09:00:00",
            "2026-12-22T09:00:00",
            "Europe/London",
        ),
    )
    .await;
    let changed = app
        .call(
            "GET",
            &format!("/v1/itineraries/{t}?after_position={}", pos(&r)),
            Some(&alice),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(
        (
            changed.status,
            changed.body["items"].as_array().map(Vec::len)
        ),
        (200, Some(model.len() + 1))
    );
    app.stop().await;
}
