//! Invoices through the HTTP API against real services: gap-free numbers
//! under concurrency (two handler instances), the year reset, totals,
//! payments as ledger transfers, void, overdue marking and recurring runs with
//! two schedulers, payment links, privacy and bad input.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{Datelike, Timelike, Utc};
use futures::future::join_all;
use mathia::Roles;
use mathia_tests::{TestApp, only};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::wallet::ledger_sum;

const SCHEDULER: Roles = Roles {
    gateway: false,
    handlers: false,
    relay: false,
    projections: false,
    scheduler: true,
};

fn draft(client: Uuid, due_in_secs: i64) -> Value {
    json!({
        "client": {"user_id": client, "name": "Bob B."},
        "currency": "KES",
        "lines": [
            {"description": "Design", "quantity": 3, "unit_price": 200},
            {"description": "Hosting", "quantity": 1, "unit_price": 400},
        ],
        "due_at": Utc::now() + chrono::Duration::seconds(due_in_secs),
        "memo": "thanks",
    })
}

async fn create(app: &TestApp, token: &str, body: &Value) -> Uuid {
    let r = app.post("/v1/invoices", Some(token), body, &[]).await;
    assert_eq!(r.status, 201, "create invoice: {}", r.body);
    r.body["invoice_id"].as_str().unwrap().parse().unwrap()
}

async fn send(app: &TestApp, token: &str, id: Uuid) -> mathia_tests::Reply {
    app.post(
        &format!("/v1/invoices/{id}/send"),
        Some(token),
        &json!({}),
        &[],
    )
    .await
}

async fn count_events(app: &TestApp, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn posted(app: &TestApp, token: &str) -> i64 {
    app.settle("wallet").await;
    let r = app.get("/v1/wallets", Some(token)).await;
    r.body["items"][0]["balance"]["posted"].as_i64().unwrap()
}

fn number(year: i32, seq: i64) -> String {
    format!("INV-{year}-{seq:05}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_sends_take_numbers_one_to_twenty_with_no_gap_while_failed_sends_take_none()
 {
    let app = TestApp::spawn().await;
    // A second handlers instance competes for the counter (optimistic concurrency across processes).
    app.start(only(false, true, false, false));
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, _) = app.user("bob@test.local").await;
    let mut ids = vec![];
    for _ in 0..25 {
        ids.push(create(&app, &alice, &draft(bob_id, 3600)).await);
    }
    app.settle("wallet").await;
    // Five of them are voided first: their sends fail, and must not burn a number.
    for id in &ids[..5] {
        let r = app
            .post(
                &format!("/v1/invoices/{id}/void"),
                Some(&alice),
                &json!({"reason": "typo"}),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    app.settle("wallet").await;
    let replies = join_all(ids.iter().map(|id| {
        let (app, alice) = (&app, alice.clone());
        async move {
            app.post(
                &format!("/v1/invoices/{id}/send"),
                Some(&alice),
                &json!({}),
                &[("idempotency-key", &format!("send-{id}"))],
            )
            .await
        }
    }))
    .await;
    let year = Utc::now().year();
    let mut numbers = BTreeSet::new();
    for (i, r) in replies.iter().enumerate() {
        if i < 5 {
            r.assert_problem(409, "invoice_void");
        } else {
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.body["status"], "sent");
            numbers.insert(r.body["number"].as_str().unwrap().to_owned());
        }
    }
    let want: BTreeSet<String> = (1..=20).map(|n| number(year, n)).collect();
    assert_eq!(
        numbers, want,
        "twenty sends, numbers 1..=20, no gap, no twin"
    );

    // A retry with the same key answers the same number; a second send is refused and takes none.
    let again = app
        .post(
            &format!("/v1/invoices/{}/send", ids[7]),
            Some(&alice),
            &json!({}),
            &[("idempotency-key", &format!("send-{}", ids[7]))],
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["number"], replies[7].body["number"]);
    send(&app, &alice, ids[7])
        .await
        .assert_problem(409, "invoice_already_sent");
    let next = create(&app, &alice, &draft(bob_id, 3600)).await;
    app.settle("wallet").await;
    let r = send(&app, &alice, next).await;
    assert_eq!(r.body["number"], number(year, 21), "{}", r.body);
    assert_eq!(count_events(&app, "InvoiceNumberAssigned").await, 21);

    // The read model agrees, and another issuer starts at 1.
    app.settle("wallet").await;
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM proj_invoices WHERE seq IS NOT NULL ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(seqs, (1..=21).collect::<Vec<i64>>());
    let (carol_id, carol) = app.user("carol@test.local").await;
    let _ = carol_id;
    let theirs = create(&app, &carol, &draft(bob_id, 3600)).await;
    app.settle("wallet").await;
    assert_eq!(
        send(&app, &carol, theirs).await.body["number"],
        number(year, 1)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn numbering_starts_again_at_one_in_a_new_year() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let (bob_id, _) = app.user("bob@test.local").await;
    let year = Utc::now().year();
    let a = create(&app, &alice, &draft(bob_id, 3600 * 24 * 800)).await;
    let b = create(&app, &alice, &draft(bob_id, 3600 * 24 * 800)).await;
    let c = create(&app, &alice, &draft(bob_id, 3600 * 24 * 800)).await;
    app.settle("wallet").await;
    assert_eq!(send(&app, &alice, a).await.body["number"], number(year, 1));
    assert_eq!(send(&app, &alice, b).await.body["number"], number(year, 2));
    // The gateway's clock cannot be moved, so the send of the new year goes on
    // the bus as the gateway would send it on 1 January (Alice's own command).
    let new_year = chrono::NaiveDate::from_ymd_opt(year + 1, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 1)
        .unwrap()
        .and_utc();
    let command_id = Uuid::now_v7();
    let envelope = handlers::bus::CommandEnvelope {
        command_id,
        correlation_id: command_id,
        actor: commands::Actor {
            user_id: Some(alice_id),
            role: commands::Role::User,
        },
        issued_at: new_year,
        request_hash: "new-year-send".into(),
        command: commands::Command::Invoice(commands::invoice::InvoiceCommand::SendInvoice {
            invoice_id: c,
            issuer: alice_id,
            at: new_year,
        }),
        expected_version: None,
    };
    let js = async_nats::jetstream::new(app.nats.clone());
    handlers::bus::publish_command(&js, &app.subjects, &envelope, "_nobody")
        .await
        .unwrap();
    let mut outcome = None;
    for _ in 0..200 {
        outcome = handlers::ledger::find(&app.pool, &[command_id])
            .await
            .unwrap()
            .remove(&command_id);
        if outcome.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let outcome = outcome.expect("the new-year send was decided");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(outcome.body["number"], number(year + 1, 1));
    // The old year's counter is untouched by it. (Sent at once after the draft,
    // without waiting for the read model: the gateway waits for it on a miss.)
    let d = create(&app, &alice, &draft(bob_id, 3600)).await;
    assert_eq!(send(&app, &alice, d).await.body["number"], number(year, 3));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_then_full_payment_marks_the_invoice_paid_and_moves_money_through_the_ledger() {
    // A fixed fee of 10 on every transfer: invoice payments pay it like any transfer.
    let app = TestApp::spawn_with(Roles::ALL, |c| c.wallet_fee_fixed = 10).await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    app.funded_wallet(&alice, &admin, 0).await;
    app.funded_wallet(&bob, &admin, 5_000).await;

    let id = create(&app, &alice, &draft(bob_id, 3600)).await;
    app.settle("wallet").await;
    let inv = app.get(&format!("/v1/invoices/{id}"), Some(&alice)).await;
    assert_eq!(inv.status, 200, "{}", inv.body);
    assert_eq!(inv.body["status"], "draft");
    assert_eq!(inv.body["number"], Value::Null);
    assert_eq!(
        inv.body["lines"][0]["amount"], 600,
        "3 × 200, by the server"
    );
    assert_eq!(inv.body["lines"][1]["amount"], 400);
    assert_eq!(inv.body["total"], 1000);
    assert_eq!(inv.body["amount_due"], 1000);
    // A draft is the issuer's alone: the client cannot see or pay it yet.
    assert_eq!(
        app.get(&format!("/v1/invoices/{id}"), Some(&bob))
            .await
            .status,
        404
    );
    assert_eq!(send(&app, &alice, id).await.status, 200);
    app.settle("wallet").await;

    let pay = |amount: i64, key: &'static str| {
        let (app, bob) = (&app, bob.clone());
        async move {
            app.post(
                &format!("/v1/invoices/{id}/payments"),
                Some(&bob),
                &json!({ "amount": amount }),
                &[("idempotency-key", key)],
            )
            .await
        }
    };
    let first = pay(300, "pay-1").await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body["status"], "sent");
    assert_eq!(first.body["amount_paid"], 300);
    assert_eq!(first.body["amount_due"], 700);
    assert_eq!(first.body["payment"]["fee"], 10);
    assert_eq!(first.body["payment"]["balance"]["posted"], 5_000 - 310);
    // The same key again: the same payment, not a second one.
    let replay = pay(300, "pay-1").await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // More than remains due is refused, and nothing moves.
    let events_before = app.count("events").await;
    pay(701, "pay-over")
        .await
        .assert_problem(422, "overpayment");
    assert_eq!(app.count("events").await, events_before);

    let last = pay(700, "pay-2").await;
    assert_eq!(last.status, 201, "{}", last.body);
    assert_eq!(last.body["status"], "paid");
    assert_eq!(last.body["amount_due"], 0);
    pay(1, "pay-3").await.assert_problem(409, "invoice_paid");
    // A key retried after the invoice moved on still gets its first answer.
    let late = pay(300, "pay-1").await;
    assert_eq!(late.status, 201, "{}", late.body);
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    assert_eq!(late.body["amount_paid"], 300);

    assert_eq!(
        posted(&app, &alice).await,
        1_000,
        "the issuer got the invoice's total"
    );
    assert_eq!(
        posted(&app, &bob).await,
        5_000 - 1_000 - 20,
        "the payer paid it and two fees"
    );
    assert_eq!(ledger_sum(&app).await, 0, "Σ over every account stays 0");
    let inv = app.get(&format!("/v1/invoices/{id}"), Some(&bob)).await;
    assert_eq!(inv.status, 200);
    assert_eq!(inv.body["status"], "paid");
    assert_eq!(inv.body["payments"].as_array().unwrap().len(), 2);
    // The client does not get the issuer's link; the ledger entries carry the number.
    assert_eq!(inv.body["payment_link"], Value::Null);
    let entries = app
        .get(
            &format!(
                "/v1/wallets/{}/entries",
                commands::wallet::user_wallet_id(bob_id, "KES".parse().unwrap())
            ),
            Some(&bob),
        )
        .await;
    assert!(
        entries.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reference"] == inv.body["number"]),
        "{}",
        entries.body
    );
    // Paying more than the wallet holds is the wallet's refusal, through the same path.
    let big = create(
        &app,
        &alice,
        &json!({"client": {"user_id": bob_id}, "currency": "KES",
                "lines": [{"description": "Big", "quantity": 1, "unit_price": 1_000_000}],
                "due_at": Utc::now() + chrono::Duration::hours(1)}),
    )
    .await;
    app.settle("wallet").await;
    send(&app, &alice, big).await;
    app.settle("wallet").await;
    app.post(
        &format!("/v1/invoices/{big}/payments"),
        Some(&bob),
        &json!({"amount": 10_000}),
        &[],
    )
    .await
    .assert_problem(422, "insufficient_funds");
    assert_eq!(ledger_sum(&app).await, 0);
    // The invoice tables are part of the wallet model: a fresh rebuild from the log gives the same rows.
    app.settle("wallet").await;
    crate::replay::assert_live_equals_a_fresh_rebuild(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_void_invoice_cannot_be_paid_and_a_stranger_gets_404_with_nothing_written() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let (_, carol) = app.user("carol@test.local").await;
    app.funded_wallet(&alice, &admin, 0).await;
    app.funded_wallet(&bob, &admin, 5_000).await;
    app.funded_wallet(&carol, &admin, 5_000).await;
    let id = create(&app, &alice, &draft(bob_id, 3600)).await;
    app.settle("wallet").await;
    assert_eq!(send(&app, &alice, id).await.status, 200);
    app.settle("wallet").await;

    // A stranger: every door is 404, and nothing reaches the log or the command ledger.
    let (events, ledger) = (app.count("events").await, app.count("command_ledger").await);
    let path = format!("/v1/invoices/{id}");
    app.get(&path, Some(&carol))
        .await
        .assert_problem(404, "invoice_not_found");
    for (p, body) in [
        (format!("{path}/payments"), json!({"amount": 100})),
        (format!("{path}/send"), json!({})),
        (format!("{path}/void"), json!({})),
    ] {
        app.post(&p, Some(&carol), &body, &[])
            .await
            .assert_problem(404, "invoice_not_found");
    }
    // The client cannot send or void what they were billed.
    app.post(&format!("{path}/void"), Some(&bob), &json!({}), &[])
        .await
        .assert_problem(404, "invoice_not_found");
    let listed = app.get("/v1/invoices?role=received", Some(&carol)).await;
    assert_eq!(listed.body["items"], json!([]));
    assert_eq!(app.count("events").await, events);
    assert_eq!(app.count("command_ledger").await, ledger);
    let bobs = app.get("/v1/invoices?role=received", Some(&bob)).await;
    assert_eq!(bobs.body["items"].as_array().unwrap().len(), 1);

    let r = app
        .post(
            &format!("{path}/void"),
            Some(&alice),
            &json!({"reason": "cancelled order"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "void");
    app.settle("wallet").await;
    app.post(
        &format!("{path}/payments"),
        Some(&bob),
        &json!({"amount": 100}),
        &[],
    )
    .await
    .assert_problem(409, "invoice_void");
    app.post(&format!("{path}/void"), Some(&alice), &json!({}), &[])
        .await
        .assert_problem(409, "invoice_void");
    assert_eq!(posted(&app, &bob).await, 5_000);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_link_shows_the_invoice_to_its_holder_and_lets_another_logged_in_user_pay() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (_, carol) = app.user("carol@test.local").await;
    app.funded_wallet(&alice, &admin, 0).await;
    app.funded_wallet(&carol, &admin, 5_000).await;
    // Billed by address: no registered client at all.
    let mut body = draft(Uuid::nil(), 3600);
    body["client"] = json!({"email": "payables@acme.example", "name": "Acme"});
    let id = create(&app, &alice, &body).await;
    app.settle("wallet").await;
    let mine = app.get(&format!("/v1/invoices/{id}"), Some(&alice)).await;
    assert_eq!(
        mine.body["payment_link"],
        Value::Null,
        "a draft has no link"
    );
    send(&app, &alice, id).await;
    app.settle("wallet").await;
    let mine = app.get(&format!("/v1/invoices/{id}"), Some(&alice)).await;
    let link = mine.body["payment_link"].as_str().unwrap().to_owned();
    assert!(
        link.starts_with("/v1/invoices/links/") && link.len() > 19 + 60,
        "{link}"
    );

    // Whoever holds it sees the invoice, without logging in.
    let seen = app.get(&link, None).await;
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(seen.body["invoice_id"], id.to_string());
    assert_eq!(seen.body["total"], 1000);
    // Paying needs a login; then any user may pay from their own wallet.
    assert_eq!(
        app.post(
            &format!("{link}/payments"),
            None,
            &json!({"amount": 400}),
            &[]
        )
        .await
        .status,
        401
    );
    let r = app
        .post(
            &format!("{link}/payments"),
            Some(&carol),
            &json!({"amount": 400}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["amount_due"], 600);
    // Without the link Carol is a stranger to this invoice.
    app.get(&format!("/v1/invoices/{id}"), Some(&carol))
        .await
        .assert_problem(404, "invoice_not_found");

    // A token changed by one character, a random one, and garbage: 404, nothing written.
    let token = link.trim_start_matches("/v1/invoices/links/").to_owned();
    let last = token.chars().last().unwrap();
    let flipped = format!(
        "{}{}",
        &token[..token.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let events = app.count("events").await;
    for bad in [
        flipped,
        "0".repeat(64),
        "nope".into(),
        format!("{}{}", id.simple(), "00".repeat(16)),
    ] {
        app.get(&format!("/v1/invoices/links/{bad}"), None)
            .await
            .assert_problem(404, "invoice_not_found");
        app.post(
            &format!("/v1/invoices/links/{bad}/payments"),
            Some(&carol),
            &json!({"amount": 1}),
            &[],
        )
        .await
        .assert_problem(404, "invoice_not_found");
    }
    assert_eq!(app.count("events").await, events);
    assert_eq!(posted(&app, &alice).await, 400);
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_invoice_input_is_a_4xx_problem_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let (bob_id, _) = app.user("bob@test.local").await;
    app.settle("wallet").await;
    let good = draft(bob_id, 3600);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let (events, ledger) = (app.count("events").await, app.count("command_ledger").await);
    let cases: Vec<(Value, u16, &str)> = vec![
        (with(&|b| b["lines"] = json!([])), 422, "invalid_input"),
        (
            with(&|b| b["lines"][0]["quantity"] = json!(0)),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["lines"][0]["unit_price"] = json!(-1)),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["lines"][0]["unit_price"] = json!(1.5)),
            400,
            "malformed_request",
        ),
        (
            with(&|b| b["lines"][0]["quantity"] = json!(1_000_001)),
            422,
            "invalid_input",
        ),
        (
            with(
                &|b| b["lines"][0] = json!({"description": "x", "quantity": 1000, "unit_price": 1_000_000_000_000_000i64}),
            ),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["lines"][0]["unit_price"] = json!(u64::MAX)),
            400,
            "malformed_request",
        ),
        (
            with(&|b| b["lines"][0]["description"] = json!("  ")),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["lines"][0]["description"] = json!("a\u{0}b")),
            400,
            "malformed_request",
        ),
        (
            with(&|b| b["currency"] = json!("XXX")),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["due_at"] = json!("2020-01-01T00:00:00Z")),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["due_at"] = json!("tomorrow")),
            400,
            "malformed_request",
        ),
        (with(&|b| b["client"] = json!({})), 422, "invalid_input"),
        (
            with(&|b| b["client"] = json!({"user_id": alice_id})),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["client"] = json!({"user_id": Uuid::now_v7()})),
            422,
            "invalid_input",
        ),
        (
            with(&|b| b["client"] = json!({"email": "not-an-address"})),
            422,
            "invalid_input",
        ),
        (with(&|b| b["total"] = json!(1)), 400, "malformed_request"),
        (
            with(&|b| b["memo"] = json!("m".repeat(1001))),
            422,
            "invalid_input",
        ),
    ];
    for (body, status, code) in &cases {
        let r = app.post("/v1/invoices", Some(&alice), body, &[]).await;
        r.assert_problem(*status, code);
    }
    let r = app.post("/v1/invoices", None, &good, &[]).await;
    assert_eq!(r.status, 401);
    // Payments and schedules refuse bad input the same way.
    let id = create(&app, &alice, &good).await;
    app.settle("wallet").await;
    let (events2, ledger2) = (app.count("events").await, app.count("command_ledger").await);
    for amount in [json!(0), json!(-5), json!("ten")] {
        let r = app
            .post(
                &format!("/v1/invoices/{id}/payments"),
                Some(&alice),
                &json!({"amount": amount}),
                &[],
            )
            .await;
        assert!(
            r.status == 400 || r.status == 404 || r.status == 422,
            "{}",
            r.body
        );
    }
    app.get("/v1/invoices/not-a-uuid", Some(&alice))
        .await
        .assert_problem(400, "malformed_request");
    app.get("/v1/invoices?role=everyone", Some(&alice))
        .await
        .assert_problem(422, "invalid_input");
    let mut sched = good.clone();
    sched.as_object_mut().unwrap().remove("due_at");
    sched["interval"] = json!("monthly");
    sched["first_run_at"] = json!("2020-01-01T00:00:00Z");
    app.post("/v1/invoices/schedules", Some(&alice), &sched, &[])
        .await
        .assert_problem(422, "invalid_input");
    sched["first_run_at"] = json!(Utc::now() + chrono::Duration::hours(1));
    sched["interval"] = json!("hourly");
    app.post("/v1/invoices/schedules", Some(&alice), &sched, &[])
        .await
        .assert_problem(400, "malformed_request");
    sched["interval"] = json!("monthly");
    sched["zone"] = json!("Mars/Olympus");
    app.post("/v1/invoices/schedules", Some(&alice), &sched, &[])
        .await
        .assert_problem(422, "invalid_input");
    assert_eq!(app.count("events").await, events2);
    assert_eq!(app.count("command_ledger").await, ledger2);
    assert_eq!(events2, events + 1, "only the good draft was written");
    assert_eq!(ledger2, ledger + 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invoice_past_its_due_time_is_marked_overdue_once_with_two_schedulers_and_stays_payable()
{
    let app = TestApp::spawn_with(
        Roles {
            scheduler: false,
            ..Roles::ALL
        },
        |c| c.scheduler_tick_ms = 50,
    )
    .await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    app.funded_wallet(&alice, &admin, 0).await;
    app.funded_wallet(&bob, &admin, 5_000).await;
    let soon = create(&app, &alice, &draft(bob_id, 2)).await;
    let later = create(&app, &alice, &draft(bob_id, 3600)).await;
    let unsent = create(&app, &alice, &draft(bob_id, 2)).await;
    app.settle("wallet").await;
    send(&app, &alice, soon).await;
    send(&app, &alice, later).await;
    app.start(SCHEDULER);
    app.start(SCHEDULER);
    let mut status = Value::Null;
    for _ in 0..200 {
        app.settle("wallet").await;
        status = app
            .get(&format!("/v1/invoices/{soon}"), Some(&alice))
            .await
            .body["status"]
            .clone();
        if status == "overdue" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "overdue");
    // Both schedulers keep looking for a while: still one mark.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.settle("wallet").await;
    assert_eq!(count_events(&app, "InvoiceOverdue").await, 1);
    let get = |id: Uuid| {
        let (app, alice) = (&app, alice.clone());
        async move { app.get(&format!("/v1/invoices/{id}"), Some(&alice)).await }
    };
    assert_eq!(get(later).await.body["status"], "sent", "not due yet");
    assert_eq!(
        get(unsent).await.body["status"],
        "draft",
        "a draft is never overdue"
    );
    // An overdue invoice is still paid in full.
    let r = app
        .post(
            &format!("/v1/invoices/{soon}/payments"),
            Some(&bob),
            &json!({"amount": 1000}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "paid");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recurring_schedule_makes_and_sends_its_next_invoice_once_with_two_schedulers() {
    let app = TestApp::spawn_with(
        Roles {
            scheduler: false,
            ..Roles::ALL
        },
        |c| c.scheduler_tick_ms = 50,
    )
    .await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    // Nairobi is UTC+3 all year: the first run two seconds from now, in its wall-clock time.
    let first = (Utc::now() + chrono::Duration::seconds(2) + chrono::Duration::hours(3))
        .naive_utc()
        .with_nanosecond(0)
        .unwrap();
    let r = app
        .post(
            "/v1/invoices/schedules",
            Some(&alice),
            &json!({
                "client": {"user_id": bob_id},
                "currency": "KES",
                "lines": [{"description": "Retainer", "quantity": 1, "unit_price": 45_000}],
                "interval": "monthly",
                "first_run_local": first,
                "zone": "Africa/Nairobi",
                "due_after_secs": 14 * 86_400,
            }),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let schedule: Uuid = r.body["schedule_id"].as_str().unwrap().parse().unwrap();
    app.start(SCHEDULER);
    app.start(SCHEDULER);
    let mut view = Value::Null;
    for _ in 0..200 {
        app.settle("wallet").await;
        view = app
            .get(&format!("/v1/invoices/schedules/{schedule}"), Some(&alice))
            .await
            .body;
        if view["runs"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(view["runs"], 1, "{view}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.settle("wallet").await;
    assert_eq!(count_events(&app, "InvoiceScheduleRan").await, 1);
    assert_eq!(count_events(&app, "InvoiceSent").await, 1);
    let list = app.get("/v1/invoices", Some(&alice)).await;
    let items = list.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", list.body);
    assert_eq!(items[0]["status"], "sent");
    assert_eq!(items[0]["number"], number(Utc::now().year(), 1));
    assert_eq!(items[0]["total"], 45_000);
    assert_eq!(items[0]["schedule_id"], schedule.to_string());
    // Billed to Bob, who sees it.
    let bobs = app.get("/v1/invoices?role=received", Some(&bob)).await;
    assert_eq!(bobs.body["items"].as_array().unwrap().len(), 1);
    // The next run is a month later, at the same wall-clock time in Nairobi.
    let next: chrono::DateTime<Utc> = view["next_run_at"].as_str().unwrap().parse().unwrap();
    let want = commands::reminder::instant(
        "Africa/Nairobi",
        first.checked_add_months(chrono::Months::new(1)).unwrap(),
    )
    .unwrap();
    assert_eq!(next, want);
    // Cancelled: no more runs.
    let r = app
        .post(
            &format!("/v1/invoices/schedules/{schedule}/cancel"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.settle("wallet").await;
    let view = app
        .get(&format!("/v1/invoices/schedules/{schedule}"), Some(&alice))
        .await
        .body;
    assert_eq!(view["status"], "cancelled");
    crate::replay::assert_live_equals_a_fresh_rebuild(&app).await;
    app.get(&format!("/v1/invoices/schedules/{schedule}"), Some(&bob))
        .await
        .assert_problem(404, "invoice_schedule_not_found");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_payments_never_pay_an_invoice_beyond_its_total() {
    let app = TestApp::spawn().await;
    app.start(only(false, true, false, false));
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    app.funded_wallet(&alice, &admin, 0).await;
    app.funded_wallet(&bob, &admin, 10_000).await;
    let id = create(&app, &alice, &draft(bob_id, 3600)).await;
    app.settle("wallet").await;
    send(&app, &alice, id).await;
    app.settle("wallet").await;
    // Ten payments of 300 race on 1,000 due: three fit, the others are overpayments.
    let replies = join_all((0..10).map(|i| {
        let (app, bob) = (&app, bob.clone());
        async move {
            app.post(
                &format!("/v1/invoices/{id}/payments"),
                Some(&bob),
                &json!({"amount": 300}),
                &[("idempotency-key", &format!("race-{i}"))],
            )
            .await
        }
    }))
    .await;
    let ok = replies.iter().filter(|r| r.status == 201).count();
    let over = replies
        .iter()
        .filter(|r| r.status == 422 && r.body["code"] == "overpayment")
        .count();
    assert_eq!(
        (ok, over),
        (3, 7),
        "{:?}",
        replies.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    app.settle("wallet").await;
    let inv = app.get(&format!("/v1/invoices/{id}"), Some(&alice)).await;
    assert_eq!(inv.body["amount_paid"], 900);
    assert_eq!(inv.body["amount_due"], 100);
    assert_eq!(inv.body["payments"].as_array().unwrap().len(), 3);
    assert_eq!(posted(&app, &alice).await, 900);
    assert_eq!(posted(&app, &bob).await, 10_000 - 900);
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}
