//! The bb8 pool through the emulator: recycling before the server's cut, and recovery from
//! dropped connections, refused connections and an upstream restart. Counts and outcomes are
//! asserted, never durations.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{DsqlConnectionManager, DsqlConnector, Error};

use crate::support;

/// An emulator of its own (so its faults touch no other test), relaying to the shared
/// PostgreSQL.
async fn own_emulator(max_age: Duration) -> DsqlEmulator {
    support::own_emulator(|b| b.max_connection_age(max_age)).await
}

async fn pool_for(
    emulator: &DsqlEmulator,
    max_lifetime: Duration,
    tune: impl FnOnce(bb8::Builder<DsqlConnectionManager>) -> bb8::Builder<DsqlConnectionManager>,
) -> bb8::Pool<DsqlConnectionManager> {
    let config = emulator
        .config_for("admin")
        .max_lifetime(max_lifetime)
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    tune(connector.pool_builder())
        .build(DsqlConnectionManager::new(connector))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_replaced_before_the_servers_cut() {
    let emulator = own_emulator(Duration::from_secs(3)).await;
    let pool = pool_for(&emulator, Duration::from_secs(2), |b| b.max_size(4)).await;
    let errors = Arc::new(AtomicU64::new(0));
    let queries = Arc::new(AtomicU64::new(0));
    let oldest_ms = Arc::new(AtomicU64::new(0));
    let past_deadline = Arc::new(AtomicU64::new(0));
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (pool, errors, queries, oldest_ms, past_deadline) = (
                pool.clone(),
                errors.clone(),
                queries.clone(),
                oldest_ms.clone(),
                past_deadline.clone(),
            );
            tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    // Judged at the moment the checkout began: the pool's own check comes
                    // later, so a connection past its deadline then was handed out past it
                    // (and the time the test takes to look does not count, however loaded the
                    // machine is).
                    let asked = tokio::time::Instant::now();
                    match pool.get().await {
                        Ok(conn) => {
                            let age = asked.saturating_duration_since(conn.opened_at());
                            oldest_ms.fetch_max(age.as_millis() as u64, Ordering::SeqCst);
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
                    // Idle gaps, so connections sit in the pool across their deadlines.
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
    assert!(queries.load(Ordering::SeqCst) > 200);
    // Nothing was handed out past its own (jittered) deadline or past 2 s, and the server never
    // had to cut.
    assert_eq!(past_deadline.load(Ordering::SeqCst), 0);
    assert!(oldest_ms.load(Ordering::SeqCst) < 2000);
    assert_eq!(stats.closed_at_max_age, 0, "{stats:?}");
    // Over 15 s with 2 s lifetimes, every slot was replaced several times.
    assert!(stats.accepted >= 4 * 5, "{stats:?}");
}

/// Runs `workers` tasks doing checkout + query; after `warmup`, applies `fault`, then lets the
/// load run for `settle`. Returns each task's failures and its successes after the fault.
async fn load_through(
    pool: &bb8::Pool<DsqlConnectionManager>,
    workers: usize,
    warmup: Duration,
    fault: impl std::future::Future<Output = ()>,
    settle: Duration,
) -> Vec<(u64, u64)> {
    let (after, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (pool, after, stop) = (pool.clone(), after.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut failures, mut later_successes) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    let outcome = match pool.get().await {
                        Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
                        Err(_) => false,
                    };
                    if !outcome {
                        failures += 1;
                    } else if after.load(Ordering::SeqCst) {
                        later_successes += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (failures, later_successes)
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    fault.await;
    after.store(true, Ordering::SeqCst);
    tokio::time::sleep(settle).await;
    stop.store(true, Ordering::SeqCst);
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_fail_at_most_once_then_load_continues() {
    let emulator = own_emulator(Duration::from_secs(3600)).await;
    let pool = pool_for(&emulator, Duration::from_secs(3000), |b| b.max_size(4)).await;
    let results = load_through(
        &pool,
        4,
        Duration::from_millis(500),
        async { emulator.drop_all_connections() },
        Duration::from_millis(1500),
    )
    .await;
    assert!(emulator.stats().dropped > 0);
    for (failures, later_successes) in results {
        assert!(failures <= 1, "a task failed {failures} times");
        assert!(later_successes > 0, "a task never recovered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_give_a_timeout_error_then_recover() {
    let emulator = own_emulator(Duration::from_secs(3600)).await;
    let pool = pool_for(&emulator, Duration::from_secs(3000), |b| {
        b.max_size(2)
            .min_idle(None)
            .connection_timeout(Duration::from_millis(500))
    })
    .await;
    pool.get()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    emulator.refuse_new_connections(true);
    emulator.drop_all_connections();
    // (The close reaches the pooled connection asynchronously, later on a loaded machine: a
    // checkout before it may still take the connection; bounded, not a fixed sleep.)
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match pool.get().await {
            Err(err) => break Error::from(err),
            Ok(conn) => {
                drop(conn);
                assert!(
                    tokio::time::Instant::now() < until,
                    "the dropped connection was never seen closed"
                );
            }
        }
    };
    assert!(matches!(err, Error::PoolTimeout), "{err:?}");
    assert!(
        err.to_string()
            .contains("timed out waiting for a DSQL connection"),
        "{err}"
    );
    assert!(
        emulator
            .stats()
            .rejected(tokio_postgres_dsql::emulator::Rejection::Refused)
            > 0
    );
    emulator.refuse_new_connections(false);
    // The pool's own connects retry refused ones with backoff (up to 2 s apart), so a checkout
    // with this short timeout may still time out once or twice after the lift; the caller's
    // next attempts get a connection, with nothing done by hand.
    let recovered = async {
        loop {
            if let Ok(conn) = pool.get().await {
                break conn;
            }
        }
    };
    let conn = tokio::time::timeout(Duration::from_secs(15), recovered)
        .await
        .expect("the pool recovers by itself");
    conn.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_recovers_from_an_upstream_restart_by_itself() {
    // A private PostgreSQL, so restarting it touches no other test.
    let emulator = DsqlEmulator::start().await.unwrap();
    let pool = pool_for(&emulator, Duration::from_secs(3000), |b| b.max_size(3)).await;
    let results = load_through(
        &pool,
        3,
        Duration::from_millis(300),
        async { emulator.restart_upstream().await.unwrap() },
        // The pool's connects back off (full jitter, up to 2 s) while the server is down.
        Duration::from_millis(3000),
    )
    .await;
    for (failures, later_successes) in results {
        assert!(
            later_successes > 0,
            "a task never recovered ({failures} failures)"
        );
    }
    // And a fresh checkout works, with no manual intervention.
    pool.get()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
}
