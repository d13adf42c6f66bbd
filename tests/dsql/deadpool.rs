//! The deadpool manager (feature `deadpool`) under the bb8 pool's tests: recycling before a
//! short server age cut with no errors, recovery after every connection is dropped, and
//! refusals and silent peers returned as errors, not hangs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres_dsql::emulator::{DsqlEmulator, Rejection};
use tokio_postgres_dsql::{
    DsqlConfigBuilder, DsqlConnector, DsqlDeadpool, Error, RetryPolicy, retry_transaction_on,
};

use crate::support::{Relay, own_emulator, stranger};

async fn deadpool_for(
    emulator: &DsqlEmulator,
    tune: impl FnOnce(DsqlConfigBuilder) -> DsqlConfigBuilder,
) -> DsqlDeadpool {
    let config = tune(emulator.config_for("admin")).build().unwrap();
    DsqlConnector::new(config)
        .await
        .unwrap()
        .deadpool()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_replaced_before_the_servers_cut() {
    let emulator = own_emulator(|b| b.max_connection_age(Duration::from_secs(3))).await;
    let pool = deadpool_for(&emulator, |b| b.max_lifetime(Duration::from_secs(2))).await;
    let (errors, queries, past_deadline) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (pool, errors, queries, past_deadline) = (
                pool.clone(),
                errors.clone(),
                queries.clone(),
                past_deadline.clone(),
            );
            tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    // (Past its deadline before the checkout was asked for: the pool's check,
                    // which runs after this, must have refused it. A time taken after the
                    // checkout could pass a deadline the check met, on a slow machine.)
                    let asked = tokio::time::Instant::now();
                    match pool.get().await {
                        Ok(conn) => {
                            if asked >= conn.recycle_at() {
                                past_deadline.fetch_add(1, Ordering::SeqCst);
                            }
                            match conn.simple_query("SELECT 1").await {
                                Ok(_) => queries.fetch_add(1, Ordering::SeqCst),
                                Err(_) => errors.fetch_add(1, Ordering::SeqCst),
                            };
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..150))).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = emulator.stats();
    assert_eq!(errors.load(Ordering::SeqCst), 0);
    assert!(queries.load(Ordering::SeqCst) > 100);
    assert_eq!(past_deadline.load(Ordering::SeqCst), 0);
    assert_eq!(stats.closed_at_max_age, 0, "{stats:?}");
    assert!(stats.accepted >= 6, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_every_connection_is_dropped_each_task_fails_at_most_once() {
    let emulator = own_emulator(|b| b).await;
    let pool = deadpool_for(&emulator, |b| b).await;
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (pool, dropped) = (pool.clone(), dropped.clone());
            tokio::spawn(async move {
                let (mut failures, mut later_successes) = (0, 0);
                let until = tokio::time::Instant::now() + Duration::from_secs(3);
                while tokio::time::Instant::now() < until {
                    let ok = match pool.get().await {
                        Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
                        Err(_) => false,
                    };
                    if !ok {
                        failures += 1;
                    } else if dropped.load(Ordering::SeqCst) {
                        later_successes += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (failures, later_successes)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    emulator.drop_all_connections();
    dropped.store(true, Ordering::SeqCst);
    for task in tasks {
        let (failures, later_successes) = task.await.unwrap();
        assert!(failures <= 1, "a task failed {failures} times");
        assert!(later_successes > 0, "a task never recovered");
    }
    assert!(emulator.stats().dropped > 0);
}

#[tokio::test]
async fn a_refusal_comes_back_from_get_at_once_and_a_silent_peer_is_bounded() {
    let emulator = own_emulator(|b| b).await;
    let stranger = stranger();
    let pool = deadpool_for(&emulator, |b| b.credentials_provider(stranger)).await;
    let err = Error::from(pool.get().await.map(|_| ()).unwrap_err());
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    assert_eq!(
        emulator.stats().rejected(Rejection::TokenUnknownKey),
        1,
        "one attempt"
    );

    let relay = Relay::start(emulator.address(), false).await;
    let pool = deadpool_for(&emulator, |b| {
        b.port(relay.port())
            .connect_timeout(Duration::from_secs(1))
            .connect_deadline(Duration::from_secs(2))
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(20), pool.get())
        .await
        .expect("bounded")
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(Error::from(err), Error::ConnectTimeout { .. }),
        "a silent peer times out"
    );
    relay.set_forwarding(true);
    let mut conn = pool.get().await.expect("the slot was freed");
    // The transaction helpers take a deadpool connection as they are.
    let one: i32 = retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
        Ok::<_, Error>(tx.query_one("SELECT 1", &[]).await?.get(0))
    })
    .await
    .unwrap();
    assert_eq!(one, 1);
}

#[tokio::test]
async fn a_dirty_connection_is_cleaned_at_checkout() {
    let emulator = own_emulator(|b| b).await;
    let config = emulator.config_for("admin").build().unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    let pool = connector
        .deadpool_builder(tokio_postgres_dsql::DsqlDeadpoolManager::new(
            tokio_postgres_dsql::DsqlConnectionManager::new(connector.clone()),
        ))
        .max_size(1)
        .build()
        .unwrap();
    let pid: i32 = {
        let conn = pool.get().await.unwrap();
        conn.batch_execute("BEGIN").await.unwrap();
        conn.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "the same connection");
    let rows = conn
        .simple_query("SELECT transaction_timestamp() = statement_timestamp()")
        .await
        .unwrap();
    let outside = rows.iter().any(|m| {
        matches!(m, tokio_postgres_dsql::tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t"))
    });
    assert!(
        outside,
        "the connection is still inside the old transaction"
    );
}
