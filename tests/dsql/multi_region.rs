//! The emulator's peered pair (a multi-Region cluster's two endpoints over one database) and
//! its per-endpoint network faults: down (refused) and black-holed (silent), then up again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{
    AccessDeniedReason, DsqlConfigBuilder, DsqlConnector, Error, FailoverPolicy, RetryPolicy,
};

async fn admin(emulator: &DsqlEmulator, timeout: Duration) -> DsqlConnector {
    let config = emulator
        .config_for("admin")
        .connect_timeout(timeout)
        .build()
        .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peered_pair_shares_one_database_and_each_faults_alone() {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    assert_eq!(east1.region(), "us-east-1");
    assert_eq!(east2.region(), "us-east-2");
    assert_ne!(east1.endpoint(), east2.endpoint());
    let one = admin(&east1, Duration::from_secs(1)).await;
    let two = admin(&east2, Duration::from_secs(1)).await;
    assert_eq!(two.region(), "us-east-2");

    // A write through one endpoint is read through the other at once.
    let a = one.connect().await.unwrap();
    crate::support::each(
        &a,
        &[
            "DROP TABLE IF EXISTS pair_probe",
            "CREATE TABLE pair_probe (id int PRIMARY KEY)",
            "INSERT INTO pair_probe VALUES (7)",
        ],
    )
    .await;
    let b = two.connect().await.unwrap();
    let row = b.query_one("SELECT id FROM pair_probe", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);

    // Each endpoint verifies tokens for its own host and Region.
    let mut wrong = two.postgres_config().clone();
    wrong.password(one.token().await.unwrap().as_str());
    let err = two.classify_connect_error(wrong.connect(two.tls()).await.err().unwrap());
    assert!(
        matches!(
            err,
            Error::AccessDenied {
                reason: AccessDeniedReason::Other,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("signed for host"), "{err}");

    // Down: refused at once, open connections cut; the peer is untouched.
    east1.set_down(true);
    let err = one.connect().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.simple_query("SELECT 1").await.is_err(), "cut");
    b.simple_query("SELECT 1").await.unwrap();
    east1.set_down(false);
    one.connect()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();

    // Black hole: a connect times out, an open connection stalls, then both recover.
    east2.set_black_hole(true);
    let err = two.connect().await.unwrap_err();
    assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.simple_query("SELECT 1"))
            .await
            .is_err(),
        "the open connection stalls"
    );
    one.connect()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    east2.set_black_hole(false);
    b.simple_query("SELECT 1").await.unwrap();
    two.connect()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

/// A failover policy that flips at once (one failure down, one probe up, failback within
/// 200 ms), for tests of what happens at each transition; the defaults' hysteresis is
/// `fleet.rs`'s subject.
fn quick() -> FailoverPolicy {
    FailoverPolicy::default()
        .down_after(1, Duration::from_secs(10))
        .down_for(Duration::ZERO, Duration::ZERO)
        .up_after(1)
        .failback_window(Duration::from_millis(200))
}

/// A connector over both endpoints of `pair`, the first preferred.
async fn over_pair(
    (first, second): (&DsqlEmulator, &DsqlEmulator),
    tune: impl FnOnce(DsqlConfigBuilder) -> DsqlConfigBuilder,
) -> DsqlConnector {
    let config = tune(first.config_with_peer(second, "admin"))
        .build()
        .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_serves_while_the_preferred_endpoint_is_down_and_sees_no_login_otherwise() {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    let connector = over_pair((&east1, &east2), |b| {
        b.connect_timeout(Duration::from_millis(500))
            .failback_probe_interval(Duration::from_millis(200))
            .failover(quick())
    })
    .await;
    assert_eq!(connector.endpoint(), east1.endpoint());
    assert_eq!(connector.config().endpoints().len(), 2);

    // Both up: every connection goes to the preferred endpoint; the peer sees no login.
    for _ in 0..3 {
        connector.connect().await.unwrap();
    }
    assert_eq!(east1.stats().accepted, 3);
    assert_eq!(
        east2.stats().connections,
        0,
        "the peer was not even dialled"
    );
    assert_eq!(connector.serving_endpoint(), east1.endpoint());

    // Down from here on: the connect fails over within the same call, to a peer that checks
    // tokens for its own host and Region.
    east1.set_down(true);
    let client = connector.connect().await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(east2.stats().accepted, 1);
    assert_eq!(east2.stats().total_rejected(), 0);
    let health = connector.endpoint_health();
    assert!(!health[0].up && health[1].up, "{health:?}");
    assert_eq!(connector.serving_endpoint(), east2.endpoint());
    let token = connector
        .token_for(east2.endpoint())
        .await
        .unwrap()
        .unwrap();
    assert!(
        token
            .as_str()
            .starts_with(&format!("{}/?Action=DbConnectAdmin&", east2.endpoint()))
    );
    assert!(
        token
            .as_str()
            .contains("%2Fus-east-2%2Fdsql%2Faws4_request"),
        "scoped to us-east-2"
    );
    assert!(
        connector
            .token_for("elsewhere.dsql.us-west-2.on.aws")
            .await
            .is_none()
    );

    // A pool opened now works through the peer and says so.
    let pool = connector.pool().await.unwrap();
    let conn = pool.get().await.unwrap();
    assert_eq!(
        (conn.endpoint(), conn.region()),
        (east2.endpoint(), "us-east-2")
    );
    conn.simple_query("SELECT 1").await.unwrap();
    drop(conn);

    // Recovery: the background probe brings new connections back, and the pool follows.
    east1.set_down(false);
    let back = async {
        loop {
            let conn = pool.get().await.unwrap();
            if conn.endpoint() == east1.endpoint() {
                return conn.region().to_owned();
            }
            drop(conn);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let region = tokio::time::timeout(Duration::from_secs(10), back)
        .await
        .expect("the pool returns to the preferred endpoint");
    assert_eq!(region, "us-east-1");
    assert!(connector.endpoint_health().iter().all(|e| e.up));
    let client = connector.connect().await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let peer_logins = east2.stats().accepted;
    connector.connect().await.unwrap();
    assert_eq!(
        east2.stats().accepted,
        peer_logins,
        "no login on the peer once back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_preferred_endpoint_costs_three_timeouts_then_is_skipped() {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    east1.set_black_hole(true);
    let connector = over_pair((&east1, &east2), |b| {
        b.connect_timeout(Duration::from_millis(300))
            .failback_probe_interval(Duration::from_secs(3600))
    })
    .await;
    // Each connect that meets the silence tries the peer at once; the endpoint is marked down
    // for everyone at the third failure in a row (the default policy).
    for n in 1..=3 {
        connector.connect().await.unwrap();
        assert_eq!(east1.stats().connections, n, "one attempt timed out");
        assert_eq!(connector.endpoint_health()[0].up, n < 3);
    }
    for _ in 0..5 {
        connector.connect().await.unwrap();
    }
    // Marked down: later connects go straight to the peer (the probe is an hour away).
    assert_eq!(east1.stats().connections, 3);
    assert_eq!(east2.stats().accepted, 8);
    // Access denied on the peer does not mark it down: it would fail the same way anywhere.
    east2.revoke_access(east2.credentials().access_key_id(), true);
    let err = connector.connect().await.unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    assert!(connector.endpoint_health()[1].up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_on_the_pool_is_an_unknown_outcome_and_not_retried() {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    let connector = over_pair((&east1, &east2), |b| b).await;
    let setup = connector.connect().await.unwrap();
    crate::support::each(
        &setup,
        &[
            "DROP TABLE IF EXISTS pair_cut",
            "CREATE TABLE pair_cut (id int NOT NULL)",
        ],
    )
    .await;
    let pool = connector.pool().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    east1.cut_next_commit();
    let result: Result<(), Error> = pool
        .retry_transaction(&RetryPolicy::default(), |tx| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.execute("INSERT INTO pair_cut VALUES (1)", &[]).await?;
                Ok(())
            }
        })
        .await;
    assert!(
        matches!(result, Err(Error::CommitOutcomeUnknown { .. })),
        "{result:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not re-run");
    assert_eq!(east1.stats().cut_at_commit, 1);

    // A connection lost before COMMIT is retried on a fresh one: nothing was committed.
    let runs = Arc::new(AtomicU32::new(0));
    let result: Result<i64, Error> = pool
        .retry_transaction(&RetryPolicy::default(), |tx| {
            let runs = runs.clone();
            let east1 = &east1;
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    // (Until the endpoint has closed the session, bounded: a fixed sleep can
                    // be too short on a loaded machine.)
                    let dropped = east1.stats().dropped + east1.open_connections() as u64;
                    east1.drop_all_connections();
                    let until = tokio::time::Instant::now() + Duration::from_secs(10);
                    while east1.stats().dropped < dropped && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                tx.execute("INSERT INTO pair_cut VALUES (2)", &[]).await?;
                Ok(tx
                    .query_one("SELECT count(*) FROM pair_cut", &[])
                    .await?
                    .get(0))
            }
        })
        .await;
    assert_eq!(result.unwrap(), 1, "the cut attempt left nothing behind");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// How one transaction of the load test ended.
#[derive(Debug)]
struct Outcome {
    id: String,
    started: Duration,
    finished: Duration,
    /// `Ok(endpoint)`, or whether the outcome is unknown.
    result: Result<String, bool>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_the_pool_fails_over_and_back_and_loses_nothing() {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    let connector = over_pair((&east1, &east2), |b| {
        b.connect_timeout(Duration::from_millis(300)).failover(
            FailoverPolicy::default()
                .down_after(2, Duration::from_secs(10))
                .down_for(Duration::from_millis(500), Duration::from_secs(5))
                .up_after(2)
                .failback_window(Duration::from_secs(1)),
        )
    })
    .await;
    crate::support::each(
        &connector.connect().await.unwrap(),
        &[
            "DROP TABLE IF EXISTS failover_ledger",
            "CREATE TABLE failover_ledger (id text NOT NULL, endpoint text NOT NULL)",
        ],
    )
    .await;
    let pool = connector
        .pool_with(|b| b.max_size(8).connection_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    let policy = RetryPolicy::default()
        .with_max_attempts(20)
        .delays(Duration::from_millis(5), Duration::from_millis(100))
        .with_attempt_timeout(Duration::from_millis(300));
    let t0 = tokio::time::Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::<Outcome>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let (pool, policy, stop, outcomes) =
            (pool.clone(), policy.clone(), stop.clone(), outcomes.clone());
        tasks.spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let id = format!("{task}-{seq}");
                let started = t0.elapsed();
                let result = pool
                    .retry_transaction(&policy, |tx| {
                        let id = id.clone();
                        async move {
                            tx.execute(
                                "INSERT INTO failover_ledger (id, endpoint) VALUES ($1, $2)",
                                &[&id, &tx.endpoint()],
                            )
                            .await?;
                            Ok::<_, Error>(tx.endpoint().to_owned())
                        }
                    })
                    .await
                    .map_err(|e| matches!(e, Error::CommitOutcomeUnknown { .. }));
                outcomes.lock().unwrap().push(Outcome {
                    id,
                    started,
                    finished: t0.elapsed(),
                    result,
                });
            }
        });
    }
    // Committed on `endpoint`, started at or after `since`.
    let committed_on = |endpoint: &str, since: Duration| {
        outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.started >= since && o.result.as_deref() == Ok(endpoint))
            .map(|o| o.finished)
            .min()
    };
    let wait_for_traffic_on = |endpoint: String, since: Duration| {
        let committed_on = &committed_on;
        async move {
            loop {
                if let Some(at) = committed_on(&endpoint, since) {
                    return at;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    let mut report = Vec::new();
    for fault in ["down", "black hole"] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let failed_at = t0.elapsed();
        match fault {
            "down" => east1.set_down(true),
            _ => east1.set_black_hole(true),
        }
        let on_peer = tokio::time::timeout(
            Duration::from_secs(10),
            wait_for_traffic_on(east2.endpoint().to_owned(), failed_at),
        )
        .await
        .expect("transactions commit on the peer");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let recovered_at = t0.elapsed();
        match fault {
            "down" => east1.set_down(false),
            _ => east1.set_black_hole(false),
        }
        // Back once a transaction started after recovery commits on the preferred endpoint and
        // none started later commits on the peer.
        let back = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let on_preferred = {
                    let outcomes = outcomes.lock().unwrap();
                    let last_on_peer = outcomes
                        .iter()
                        .filter(|o| o.result.as_deref() == Ok(east2.endpoint()))
                        .map(|o| o.started)
                        .max()
                        .unwrap_or_default();
                    outcomes
                        .iter()
                        .filter(|o| {
                            o.started > last_on_peer.max(recovered_at)
                                && o.result.as_deref() == Ok(east1.endpoint())
                        })
                        .count()
                };
                if on_preferred >= 40 {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("traffic returns to the preferred endpoint");
        report.push((fault, on_peer - failed_at, back - recovered_at));
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }

    // Every transaction committed once or returned an error; an unknown outcome may have gone
    // either way; nothing was applied twice.
    let check = connector.connect().await.unwrap();
    let rows = check
        .query("SELECT id, count(*) FROM failover_ledger GROUP BY id", &[])
        .await
        .unwrap();
    let applied: std::collections::HashMap<String, i64> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let outcomes = outcomes.lock().unwrap();
    let (mut committed, mut failed, mut unknown) = (0, 0, 0);
    for outcome in outcomes.iter() {
        let times = applied.get(&outcome.id).copied().unwrap_or(0);
        match &outcome.result {
            Ok(_) => {
                committed += 1;
                assert_eq!(times, 1, "{outcome:?}");
            }
            Err(true) => {
                unknown += 1;
                assert!(times <= 1, "{outcome:?}");
            }
            Err(false) => {
                failed += 1;
                assert_eq!(times, 0, "{outcome:?}");
            }
        }
    }
    assert!(applied.values().all(|n| *n == 1), "nothing applied twice");
    let unknown_applied = applied.len() - committed;
    assert!(unknown_applied <= unknown);
    eprintln!(
        "{} transactions: {committed} committed, {failed} failed, {unknown} unknown outcome; \
         (fault, first commit on the peer after it, back on the preferred after recovery): \
         {report:?}",
        outcomes.len()
    );
    for (fault, to_peer, back) in report {
        assert!(
            to_peer <= Duration::from_secs(2),
            "{fault}: on the peer after {to_peer:?}"
        );
        assert!(
            back <= Duration::from_secs(10),
            "{fault}: back after {back:?}"
        );
    }
    assert!(committed > 100, "{committed}");
}

/// A pair whose first endpoint keeps waking up (`latency` each way to it), and a connector
/// with `deadline` whose first connect has failed, as it must, with DSQL's waking-up refusal.
async fn waking_first(
    deadline: Duration,
    latency: Duration,
) -> (DsqlEmulator, DsqlEmulator, DsqlConnector) {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    let connector = over_pair((&east1, &east2), |b| {
        b.connect_deadline(deadline)
            .failback_probe_interval(Duration::from_secs(3600))
            .failover(quick())
    })
    .await;
    east1.set_latency(latency);
    east1.wake_up_after(Duration::from_secs(60));
    // Waking up is retried on the same endpoint until the deadline: not a network failure.
    let err = connector.connect().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                reason: tokio_postgres_dsql::UnavailableReason::WakingUp,
                ..
            }
        ),
        "{err:?}"
    );
    (east1, east2, connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_still_waking_up_at_the_deadline_is_marked_down() {
    let (_east1, east2, connector) = waking_first(Duration::from_secs(1), Duration::ZERO).await;
    assert_eq!(east2.stats().connections, 0);
    // Still waking after the whole deadline: down, and the next connect goes to the peer.
    assert!(!connector.endpoint_health()[0].up);
    let client = connector.connect().await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(east2.stats().accepted, 1);
}

/// The deadline may also come in the middle of an attempt that follows a waking-up refusal:
/// still one failure of the endpoint, marked down as when the deadline comes during a backoff.
/// With 100 ms each way and a 2 s deadline, the deadline cuts an attempt in about two runs of
/// three (else it comes during a backoff): either way the endpoint must be marked down.
#[tokio::test]
async fn an_endpoint_still_waking_up_when_the_deadline_cuts_an_attempt_is_marked_down() {
    let (_east1, _east2, connector) =
        waking_first(Duration::from_secs(2), Duration::from_millis(100)).await;
    assert!(!connector.endpoint_health()[0].up);
}
