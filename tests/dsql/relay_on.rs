//! An endpoint relayed on the test's own runtime (`DsqlEmulatorBuilder::relay_on`): the same
//! TLS, tokens, SQL rules and faults as on the emulator's own thread, its relays are tasks of
//! the caller's runtime, and they end with the emulator (or refuse once the runtime is gone).

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres_dsql::emulator::{DsqlEmulator, EmulatorError};

use crate::history;
use crate::support::{connect_to, own_emulator, own_endpoint, own_endpoint_relayed_here};

/// Bounds a step that must end (a hang fails the test instead of stalling the suite); no
/// timing is asserted.
async fn within<T>(what: &str, step: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), step)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in 60 s"))
}

/// Waits (bounded by [`within`]) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// `SELECT 1` on `client` fails (bounded: a hang fails too): its connection is gone.
async fn fails(what: &str, client: &tokio_postgres::Client) {
    let answer = within(what, client.simple_query("SELECT 1")).await;
    assert!(answer.is_err(), "{what}: answered {answer:?}");
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Whether a TCP connection to `emulator` gets a task of this runtime: connects (no TLS yet,
/// so the session waits for the handshake), waits for the emulator to accept it, and for the
/// relay task that `relay_on` spawns here (bounded: a relay that never comes here fails).
async fn relayed_here(emulator: &DsqlEmulator, expected: bool) {
    let before = alive_tasks();
    let accepted = emulator.stats().connections;
    let socket = tokio::net::TcpStream::connect(emulator.address())
        .await
        .unwrap();
    until("the accept", || emulator.stats().connections != accepted).await;
    if expected {
        until("the relay task on this runtime", || alive_tasks() != before).await;
        assert_eq!(alive_tasks(), before + 1);
        // The relay ends at the connection's close (so no task lingers into the next count).
        drop(socket);
        until("the relay task's end", || alive_tasks() == before).await;
    } else {
        assert_eq!(alive_tasks(), before, "no task of this runtime relays");
    }
}

/// A current-thread runtime, as `#[tokio::test]` gives: the client and its relay share the
/// thread.
#[tokio::test]
async fn an_endpoint_relayed_on_the_test_runtime_serves_with_the_rules() {
    let emulator = own_endpoint_relayed_here().await;
    // Each connection's relay is a task of this runtime; on the emulator's own thread it is not.
    relayed_here(&emulator, true).await;
    relayed_here(&own_endpoint().await, false).await;

    // DSQL's rules and first-committer-wins, through the relay on this thread.
    let admin = connect_to(&emulator, "admin").await.unwrap();
    admin
        .batch_execute("CREATE TABLE relayed (k int PRIMARY KEY, v int NOT NULL)")
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO relayed VALUES (1, 0)")
        .await
        .unwrap();
    let refused = admin
        .batch_execute("CREATE TEMPORARY TABLE scratch (k int)")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{refused:?}"
    );
    let first = connect_to(&emulator, "admin").await.unwrap();
    let second = connect_to(&emulator, "admin").await.unwrap();
    for client in [&first, &second] {
        client
            .batch_execute("BEGIN; UPDATE relayed SET v = v + 1 WHERE k = 1")
            .await
            .unwrap();
    }
    first.batch_execute("COMMIT").await.unwrap();
    let lost = second.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(
        lost.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE),
        "{lost:?}"
    );
    let row = admin
        .query_one("SELECT v FROM relayed WHERE k = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1, "one commit applied");

    // Faults: the accept loop stays on the emulator's thread, so `set_down` (which waits for
    // it) does not wait on this one.
    emulator.set_down(true);
    assert!(connect_to(&emulator, "admin").await.is_err(), "down");
    emulator.set_down(false);
    within(
        "a connect after set_down(false)",
        connect_to(&emulator, "admin"),
    )
    .await
    .unwrap();
}

/// Dropping the emulator closes the connections it relays on this runtime, and nothing listens
/// any more (an emulator over a server that outlives it: no dropped database ends them).
#[tokio::test]
async fn dropping_an_endpoint_relayed_here_closes_its_connections() {
    let here = tokio::runtime::Handle::current();
    let emulator = own_emulator(|b| b.relay_on(here)).await;
    relayed_here(&emulator, true).await;
    let client = connect_to(&emulator, "admin").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let address = emulator.address();
    drop(emulator);
    fails("a query after the drop", &client).await;
    assert!(client.is_closed());
    // (The emulator's thread closes the listening socket once it runs after the drop.)
    within("the listening socket's close", async {
        while tokio::net::TcpStream::connect(address).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Faults on an endpoint relayed here: `drop_all_connections` closes its connections, and a
/// connection black-holed or behind a latency when the emulator is dropped closes too.
#[tokio::test]
async fn faults_on_an_endpoint_relayed_here() {
    let here = tokio::runtime::Handle::current();
    let emulator = own_emulator(|b| b.relay_on(here)).await;
    let client = connect_to(&emulator, "admin").await.unwrap();
    emulator.drop_all_connections();
    fails("a query after drop_all_connections", &client).await;

    emulator.set_latency(Duration::from_millis(2));
    let delayed = connect_to(&emulator, "admin").await.unwrap();
    delayed.simple_query("SELECT 1").await.unwrap();
    let held = connect_to(&emulator, "admin").await.unwrap();
    held.simple_query("SELECT 1").await.unwrap();
    emulator.set_black_hole(true);
    let stalled = tokio::spawn(async move { held.simple_query("SELECT 1").await.map(|_| ()) });
    // (The query waits in the black hole; a short wait is no assertion of time.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stalled.is_finished(), "the black hole answered");
    drop(emulator);
    fails("a delayed query after the drop", &delayed).await;
    let stalled = within("a black-holed query after the drop", stalled)
        .await
        .unwrap();
    assert!(
        stalled.is_err(),
        "a black-holed query was answered: {stalled:?}"
    );
}

/// A connection whose relay runtime shuts down while the emulator lives is no longer counted
/// as open.
#[test]
fn a_relay_cut_by_its_runtime_is_not_counted_open() {
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let relays = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = relays.handle().clone();
    driver.block_on(async {
        let emulator = own_emulator(|b| b.relay_on(handle)).await;
        let client = connect_to(&emulator, "admin").await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
        assert_eq!(emulator.open_connections(), 1);
        relays.shutdown_background();
        fails("a query after the runtime's shutdown", &client).await;
        until("the open count", || emulator.open_connections() == 0).await;
    });
}

/// A multi-thread runtime: the relays run on its workers, in parallel with each other (on the
/// emulator's own thread they never do). The randomized history checker on fixed seeds: no
/// acknowledged write lost, no phantom, every failure a `40001`, every session usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_relayed_on_the_test_runtime_lose_no_acknowledged_write() {
    let mut failures = Vec::new();
    for seed in [11, 12] {
        let endpoint = own_endpoint_relayed_here().await;
        let report = history::run(&endpoint, &history::Config::new(seed, 4, 60)).await;
        eprintln!("{report}");
        if !report.ok() {
            failures.push(report.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Once the runtime it relays on has shut down, the endpoint closes new connections at once:
/// the client gets an error, not a hang.
#[test]
fn an_endpoint_whose_runtime_is_gone_closes_connections() {
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let relays = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = relays.handle().clone();
    let emulator = driver.block_on(async {
        tokio_postgres_dsql::emulator::SharedPostgres::global()
            .unwrap()
            .endpoint()
            .relay_on(handle)
            .start()
            .await
            .unwrap()
    });
    drop(relays);
    driver.block_on(async {
        let refused = within(
            "a connect to a runtime gone",
            connect_to(&emulator, "admin"),
        )
        .await;
        assert!(refused.is_err(), "served without its runtime");
        assert!(emulator.stats().connections > 0, "{:?}", emulator.stats());
    });
}

/// `relay_on` with options it cannot honour: refused at start, naming the option.
#[tokio::test]
async fn relay_on_refuses_busy_polling_and_threads() {
    let shared = tokio_postgres_dsql::emulator::SharedPostgres::global().unwrap();
    let here = tokio::runtime::Handle::current();
    for (builder, field) in [
        (
            shared
                .endpoint()
                .relay_on(here.clone())
                .busy_poll(Duration::from_millis(1)),
            "busy_poll",
        ),
        (
            shared.endpoint().relay_on(here.clone()).threads(2),
            "threads",
        ),
    ] {
        match builder.start().await {
            Err(error @ EmulatorError::Config { .. }) => {
                assert!(error.to_string().contains(field), "{error}");
                assert!(error.to_string().contains("relay_on"), "{error}");
            }
            other => panic!("{field} with relay_on: {other:?}"),
        }
    }
    // A zero window is no polling: accepted.
    let quiet = shared
        .endpoint()
        .relay_on(here)
        .busy_poll(Duration::ZERO)
        .start()
        .await
        .unwrap();
    within("a connect", connect_to(&quiet, "admin"))
        .await
        .unwrap();
}
