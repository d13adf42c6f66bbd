//! DSQL's admission refusals (rate exceeded, too many open connections, waking up) and the
//! bounds on a connect: each refusal retried with backoff inside the connect deadline, the
//! client-side rate limit, and a peer that accepts TCP and never answers. Each test uses an
//! emulator of its own, so its limits and counters touch no other test.

use std::time::Duration;

use tokio_postgres_dsql::emulator::{DsqlEmulator, Rejection};
use tokio_postgres_dsql::{DsqlConfigBuilder, DsqlConnector, Error, UnavailableReason};

use crate::support::{Relay, own_emulator, stranger};

async fn connector_for(
    emulator: &DsqlEmulator,
    tune: impl FnOnce(DsqlConfigBuilder) -> DsqlConfigBuilder,
) -> DsqlConnector {
    DsqlConnector::new(tune(emulator.config_for("admin")).build().unwrap())
        .await
        .unwrap()
}

/// Asserts `Error::Unavailable` for `reason`, with the server's code and message as its source
/// and the reason in `Display`.
fn assert_unavailable(err: &Error, reason: UnavailableReason, code: &str, message: &str) {
    match err {
        Error::Unavailable {
            reason: got,
            attempts,
            ..
        } => {
            assert_eq!(*got, reason, "{err}");
            assert!(*attempts >= 1);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(err.is_transient());
    assert_eq!(err.code().map(|c| c.code()), Some(code));
    let db = std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.as_db_error())
        .expect("the server's error is the source");
    assert_eq!(db.message(), message);
    assert!(
        err.to_string().contains(&reason.to_string()),
        "the reason is not in Display: {err}"
    );
}

#[tokio::test]
async fn rate_exceeded_is_a_typed_error_once_the_deadline_runs_out() {
    // One connection now, the next in 1 000 s.
    let e = own_emulator(|b| b.connection_rate_limit(0.001, 1)).await;
    // Long enough for a retry after the throttle's first interval (1 s).
    let connector = connector_for(&e, |b| b.connect_deadline(Duration::from_secs(3))).await;
    connector.connect().await.unwrap();
    let err = connector.connect().await.unwrap_err();
    assert_unavailable(
        &err,
        UnavailableReason::RateExceeded,
        "53400",
        "Unable to accept connection, rate exceeded.",
    );
    let Error::Unavailable { attempts, .. } = err else {
        unreachable!()
    };
    let refused = e.stats().rejected(Rejection::RateExceeded);
    assert_eq!(
        refused,
        u64::from(attempts),
        "every attempt was refused and counted"
    );
    assert!(
        attempts >= 2,
        "the refusal was retried ({attempts} attempts)"
    );
    assert_eq!(e.stats().accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sixty_connects_drains_through_a_five_per_second_limit() {
    let e = own_emulator(|b| b.connection_rate_limit(5.0, 2)).await;
    let connector = connector_for(&e, |b| b).await;
    let connects: Vec<_> = (0..60)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move { connector.connect().await })
        })
        .collect();
    let mut clients = Vec::new();
    for connect in connects {
        // Every connect succeeds: none ran out of its 30 s deadline.
        clients.push(connect.await.unwrap().expect("connect within the deadline"));
    }
    for client in &clients {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let stats = e.stats();
    assert_eq!(stats.accepted, 60);
    assert!(
        stats.rejected(Rejection::RateExceeded) > 0,
        "the limit never refused anyone: {stats:?}"
    );
    assert_eq!(
        stats.total_rejected(),
        stats.rejected(Rejection::RateExceeded)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_side_limit_below_the_clusters_avoids_every_refusal() {
    let e = own_emulator(|b| b.connection_rate_limit(5.0, 2)).await;
    let connector = connector_for(&e, |b| b.connect_rate_limit(4.0, 1)).await;
    let connects: Vec<_> = (0..20)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move { connector.connect().await })
        })
        .collect();
    for connect in connects {
        connect.await.unwrap().expect("connect");
    }
    let stats = e.stats();
    assert_eq!(stats.accepted, 20);
    assert_eq!(stats.total_rejected(), 0, "{stats:?}");
}

#[tokio::test]
async fn the_client_side_limit_fails_a_connect_that_would_wait_past_its_deadline() {
    let e = own_emulator(|b| b).await;
    let connector = connector_for(&e, |b| {
        b.connect_rate_limit(0.01, 1)
            .connect_deadline(Duration::from_secs(2))
    })
    .await;
    connector.connect().await.unwrap();
    let err = connector.connect().await.unwrap_err();
    assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains("connect_rate_limit"), "{err}");
    assert_eq!(
        e.stats().accepted,
        1,
        "the refused connect never reached the server"
    );
}

#[tokio::test]
async fn too_many_open_connections_is_retried_until_a_slot_frees() {
    let e = own_emulator(|b| b.max_open_connections(2)).await;
    let connector = connector_for(&e, |b| b.connect_deadline(Duration::from_secs(1))).await;
    let first = connector.connect().await.unwrap();
    let _second = connector.connect().await.unwrap();
    let err = connector.connect().await.unwrap_err();
    assert_unavailable(
        &err,
        UnavailableReason::TooManyConnections,
        "53300",
        "Unable to accept connection, too many open connections.",
    );
    let refused = e.stats().rejected(Rejection::TooManyConnections);
    assert!(refused >= 1);

    // With room in the deadline, the connect waits out the cap: a slot frees after 500 ms.
    let patient = connector_for(&e, |b| b).await;
    let waiting = tokio::spawn(async move { patient.connect().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(first);
    let third = waiting
        .await
        .unwrap()
        .expect("connects once a slot is free");
    third.simple_query("SELECT 1").await.unwrap();
    assert!(e.stats().rejected(Rejection::TooManyConnections) > refused);
}

#[tokio::test]
async fn a_waking_cluster_is_waited_for_within_the_deadline() {
    let e = own_emulator(|b| b).await;
    e.wake_up_after(Duration::from_secs(3));
    // A deadline shorter than the wake-up: the waking-up error.
    let impatient = connector_for(&e, |b| b.connect_deadline(Duration::from_secs(1))).await;
    let err = impatient.connect().await.unwrap_err();
    assert_unavailable(
        &err,
        UnavailableReason::WakingUp,
        "08006",
        "unable to accept connection, waking up cluster, please retry later",
    );
    // The default 30 s deadline: connects once the cluster is up.
    let patient = connector_for(&e, |b| b).await;
    let client = patient.connect().await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert!(e.stats().rejected(Rejection::WakingUp) >= 2);
    assert_eq!(e.stats().accepted, 1);
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out_the_attempt() {
    let e = own_emulator(|b| b).await;
    let black_hole = Relay::start(e.address(), false).await;
    let connector = connector_for(&e, |b| {
        b.port(black_hole.port())
            .connect_timeout(Duration::from_secs(1))
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(20), connector.connect())
        .await
        .expect("connect() is bounded")
        .unwrap_err();
    match &err {
        Error::ConnectTimeout { timeout, .. } => assert_eq!(*timeout, Duration::from_secs(1)),
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_hung_pool_connect_times_out_and_frees_its_slot() {
    let e = own_emulator(|b| b).await;
    let relay = Relay::start(e.address(), false).await;
    let connector = connector_for(&e, |b| {
        b.port(relay.port())
            .connect_timeout(Duration::from_secs(1))
            .connect_deadline(Duration::from_secs(3))
    })
    .await;
    let pool = connector
        .pool_builder()
        .max_size(1)
        .min_idle(None)
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(tokio_postgres_dsql::DsqlConnectionManager::new(
            connector.clone(),
        ));
    let err = Error::from(pool.get().await.map(|_| ()).unwrap_err());
    assert!(matches!(err, Error::PoolTimeout), "{err:?}");
    // The pool's connect tries again (a timeout is transient) until the 3 s connect deadline,
    // then gives up and gives the one slot back: past the deadline, no attempt is in flight.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = relay.accepted();
    assert!(
        attempts >= 2,
        "the timed-out attempt was retried ({attempts})"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(relay.accepted(), attempts, "a connect is still trying");
    // With the peer answering again, the next checkout connects.
    relay.set_forwarding(true);
    let conn = pool.get().await.expect("a connection");
    conn.simple_query("SELECT 1").await.unwrap();
    assert_eq!(e.stats().accepted, 1);
}

#[tokio::test]
async fn a_permanent_refusal_through_the_pool_is_tried_once() {
    let e = own_emulator(|b| b).await;
    let stranger = stranger();
    let connector = connector_for(&e, |b| b.credentials_provider(stranger)).await;
    let pool = connector
        .pool_builder()
        .max_size(1)
        .min_idle(None)
        .connection_timeout(Duration::from_secs(1))
        .build_unchecked(tokio_postgres_dsql::DsqlConnectionManager::new(
            connector.clone(),
        ));
    assert!(pool.get().await.is_err());
    // bb8 used to try it again and again until its connection timeout.
    assert_eq!(e.stats().rejected(Rejection::TokenUnknownKey), 1);
}

#[tokio::test]
async fn bad_credentials_fail_a_checkout_with_the_refusal_itself_at_once() {
    let e = own_emulator(|b| b).await;
    let stranger = stranger();
    let connector = connector_for(&e, |b| b.credentials_provider(stranger)).await;
    let hint = "The security token included in the request is invalid";
    // `pool()` opens a connection first: it fails with the refusal.
    let err = connector.pool().await.unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    assert_eq!(e.stats().rejected(Rejection::TokenUnknownKey), 1);
    // A pool that opens nothing up front: the checkout gets the refusal with its hint as soon
    // as the one attempt fails, not `PoolTimeout` after 30 s.
    let pool = connector
        .pool_with(|b| b.min_idle(None).connection_timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("the checkout returned before its timeout")
        .unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    assert_eq!(err.hint(), Some(hint));
    assert!(err.to_string().contains(hint), "{err}");
    // The refusal `pool()` met a moment ago is remembered (for a few seconds): the checkout
    // gets it without a login of its own.
    assert_eq!(
        e.stats().rejected(Rejection::TokenUnknownKey),
        1,
        "answered from memory"
    );

    // An unknown role, the same way.
    let nobody = DsqlConnector::new(e.config_for("nobody_here").build().unwrap())
        .await
        .unwrap();
    let pool = nobody.pool_with(|b| b.min_idle(None)).await.unwrap();
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, Error::UnknownRole { .. }), "{err:?}");
}

/// A client that stalls in its negotiation (here: after its startup message, at the password
/// the emulator asked for) holds an admission slot only for a bounded time: the emulator lets
/// it go (the connection ends), and the slot serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_its_negotiation_is_let_go_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emulator = own_emulator(|b| b.max_open_connections(1)).await;
    let config = std::sync::Arc::new(crate::frontend::client_tls(&emulator, true));
    let tcp = tokio::net::TcpStream::connect(emulator.address())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(emulator.endpoint().to_owned()).unwrap();
    let mut stalled = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let body = b"\x00\x03\x00\x00user\x00admin\x00database\x00postgres\x00\x00";
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    stalled.write_all(&startup).await.unwrap();
    assert_eq!(
        stalled.read_u8().await.unwrap(),
        b'R',
        "asked for the password"
    );
    // Holding the only slot: another client is refused meanwhile.
    let connector =
        connector_for(&emulator, |b| b.connect_timeout(Duration::from_millis(300))).await;
    assert!(connector.connect().await.is_err());
    // The stalled client is let go within the negotiation bound (10 s; 30 s is a hang).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the stalled negotiation was never ended");
    // Its slot is free again.
    let client = connector_for(&emulator, |b| b)
        .await
        .connect()
        .await
        .expect("the slot is free");
    client.simple_query("SELECT 1").await.unwrap();
}
