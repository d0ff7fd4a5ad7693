//! Invariants 3 and 4 at the store level: the global position never lets a
//! reader skip an event, and stale appends cannot both commit.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use events::wallet::{AccountKind, WalletEvent};
use events::{Event, StreamId};
use handlers::store::{self, PendingEvent, StoreError};
use mathia_tests::{drop_database, fresh_database};
use sqlx::PgPool;
use uuid::Uuid;

fn opened(stream: &StreamId, version: i64) -> PendingEvent {
    PendingEvent {
        event_id: Uuid::now_v7(),
        stream_id: stream.clone(),
        version,
        event: Event::Wallet(WalletEvent::AccountOpened {
            account_id: Uuid::new_v4(),
            owner_id: None,
            currency: "KES".into(),
            kind: AccountKind::User,
            floor: Some(0),
        }),
        occurred_at: Utc::now(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
        actor: None,
    }
}

/// 32 appenders commit single-event transactions that linger a random time
/// after appending (so commits interleave as badly as they can), while a reader
/// tails the log by "max position seen". The reader must see every position,
/// contiguously, in order: a skipped position would show as a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tailing_reader_never_skips_a_position_under_concurrent_appends() {
    let (url, name) = fresh_database().await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    const WRITERS: usize = 32;
    const EACH: usize = 40;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let pool = pool.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen: Vec<i64> = vec![];
            let mut last = 0i64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let mut conn = pool.acquire().await.unwrap();
                let batch = store::read_range(&mut conn, last, i64::MAX, 1000, None)
                    .await
                    .unwrap();
                for e in &batch {
                    assert_eq!(
                        e.position,
                        last + 1,
                        "the reader skipped from {last} to {}",
                        e.position
                    );
                    last = e.position;
                    seen.push(e.position);
                }
                if finished && batch.is_empty() {
                    return seen;
                }
            }
        })
    };
    let mut writers = vec![];
    for w in 0..WRITERS {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let stream = StreamId::new("wallet", "account", &format!("w{w}-{i}")).unwrap();
                let mut tx = pool.begin().await.unwrap();
                store::append(&mut tx, &[opened(&stream, 1)]).await.unwrap();
                tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 2000)).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), WRITERS * EACH);
    assert_eq!(seen, (1..=(WRITERS * EACH) as i64).collect::<Vec<_>>());
    pool.close().await;
    drop_database(&name).await;
}

/// Two appends decided on the same version: exactly one commits, the other is a Conflict.
#[tokio::test]
async fn two_appends_on_the_same_stale_version_cannot_both_commit() {
    let (url, name) = fresh_database().await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    let stream = StreamId::new("wallet", "account", "contested").unwrap();
    let mut results = vec![];
    let mut tasks = vec![];
    for _ in 0..8 {
        let pool = pool.clone();
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            match store::append(&mut tx, &[opened(&stream, 1)]).await {
                Ok(_) => tx.commit().await.map_err(StoreError::from_db),
                Err(e) => Err(e),
            }
        }));
    }
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict { .. })))
        .count();
    assert_eq!((ok, conflicts), (1, 7), "{results:?}");
    let events = store::read_stream(&pool, &stream).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1]
    );
    // Positions stay gapless: the losers gave theirs back when they rolled back.
    assert_eq!(store::head_position(&pool).await.unwrap(), 1);
    let ids: HashSet<_> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 1);
    pool.close().await;
    drop_database(&name).await;
}

/// `mathia events` filters: by stream, type, request and position; `show` by position or id.
#[tokio::test]
async fn the_log_can_be_filtered_by_stream_type_request_and_position() {
    let (url, name) = fresh_database().await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    let a = StreamId::new("wallet", "account", "a").unwrap();
    let b = StreamId::new("wallet", "account", "b").unwrap();
    let mut first = opened(&a, 1);
    let request = first.correlation_id;
    let mut second = opened(&b, 1);
    second.correlation_id = request;
    let third = opened(&StreamId::new("wallet", "account", "c").unwrap(), 1);
    first.occurred_at = Utc::now() - chrono::Duration::hours(1);
    let mut tx = pool.begin().await.unwrap();
    store::append(&mut tx, &[first.clone(), second, third])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let all = store::EventFilter {
        limit: 100,
        ..Default::default()
    };
    let positions =
        |v: Vec<events::EventEnvelope>| v.iter().map(|e| e.position).collect::<Vec<_>>();
    assert_eq!(
        positions(store::query_events(&pool, &all).await.unwrap()),
        vec![1, 2, 3]
    );
    let by_stream = store::EventFilter {
        stream_id: Some(b.to_string()),
        ..all.clone()
    };
    assert_eq!(
        positions(store::query_events(&pool, &by_stream).await.unwrap()),
        vec![2]
    );
    let by_request = store::EventFilter {
        correlation_id: Some(request),
        ..all.clone()
    };
    assert_eq!(
        positions(store::query_events(&pool, &by_request).await.unwrap()),
        vec![1, 2]
    );
    let by_type = store::EventFilter {
        event_type: Some("Credited".into()),
        ..all.clone()
    };
    assert!(
        store::query_events(&pool, &by_type)
            .await
            .unwrap()
            .is_empty()
    );
    let recent = store::EventFilter {
        since: Some(Utc::now() - chrono::Duration::minutes(5)),
        after: 2,
        ..all.clone()
    };
    assert_eq!(
        positions(store::query_events(&pool, &recent).await.unwrap()),
        vec![3]
    );
    let shown = store::find_event(&pool, "1").await.unwrap().unwrap();
    assert_eq!(shown.event_id, first.event_id);
    let by_id = store::find_event(&pool, &first.event_id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_id.position, 1);
    assert!(
        store::find_event(&pool, "nonsense")
            .await
            .unwrap()
            .is_none()
    );
    pool.close().await;
    drop_database(&name).await;
}
