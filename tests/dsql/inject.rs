//! Conflicts on demand (`DsqlEmulator::inject_conflicts`): the `COMMIT` of a block that wrote
//! a named table fails with DSQL's `40001 … (OC000)` and rolls back, deterministically, through
//! every way a driver commits; a retry loop retries once and commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{DsqlConnector, Error, RetryPolicy};

use crate::frontend::Frontend;
use crate::support::{each, own_endpoint};

const OC000: &str = "change conflicts with another transaction (OC000)";

async fn endpoint_with_tables() -> (DsqlEmulator, DsqlConnector) {
    let emulator = own_endpoint().await;
    let connector = DsqlConnector::new(emulator.config_for("admin").build().unwrap())
        .await
        .unwrap();
    let client = connector.connect().await.unwrap();
    each(
        &client,
        &[
            "CREATE TABLE inj_orders (id int PRIMARY KEY, n int)",
            "CREATE TABLE inj_items (id int PRIMARY KEY, n int)",
            "INSERT INTO inj_orders VALUES (1, 0)",
            "INSERT INTO inj_items VALUES (1, 0)",
        ],
    )
    .await;
    (emulator, connector)
}

async fn value(connector: &DsqlConnector, table: &str) -> i32 {
    let client = connector.connect().await.unwrap();
    client
        .query_one(&format!("SELECT n FROM {table} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_loop_meets_one_injected_conflict_retries_once_and_commits() {
    let (emulator, connector) = endpoint_with_tables().await;
    let pool = connector.pool().await.unwrap();
    emulator.inject_conflicts(&["inj_orders"], 1, Some(1));
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    pool.retry_transaction(&RetryPolicy::default(), move |tx| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tx.execute("UPDATE inj_orders SET n = n + 1 WHERE id = 1", &[])
                .await?;
            Ok::<_, Error>(())
        }
    })
    .await
    .unwrap();
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "one conflict, one retry"
    );
    assert_eq!(value(&connector, "inj_orders").await, 1, "committed once");
    assert_eq!(emulator.injected_conflicts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_conflicts_fail_the_named_tables_commits_every_nth_through_each_shape() {
    let (emulator, connector) = endpoint_with_tables().await;
    // Every second COMMIT of a block that wrote inj_orders, three times.
    emulator.inject_conflicts(&["INJ_ORDERS"], 2, Some(3));
    let mut f = Frontend::connect(&emulator).await;
    let mut outcomes = Vec::new();
    for round in 0..8 {
        // The ways a driver commits, in turn.
        let answer = match round % 4 {
            // Separate simple queries (psql, node-postgres without values).
            0 => {
                f.simple("BEGIN").await;
                f.simple("UPDATE inj_orders SET n = n + 1 WHERE id = 1")
                    .await;
                f.simple("COMMIT").await
            }
            // One multi-statement query (psycopg's executescript, ORMs' batches).
            1 => {
                f.simple("BEGIN; UPDATE inj_orders SET n = n + 1 WHERE id = 1; COMMIT")
                    .await
            }
            // The extended protocol, statement by statement (libpq's PQexecParams).
            2 => {
                f.extended("BEGIN", &[]).await;
                f.extended("UPDATE inj_orders SET n = n + $1 WHERE id = 1", &["1"])
                    .await;
                f.extended("COMMIT", &[]).await
            }
            // A block that also wrote another table.
            _ => {
                f.simple("BEGIN").await;
                f.simple("UPDATE inj_items SET n = n + 1 WHERE id = 1")
                    .await;
                f.simple("UPDATE inj_orders SET n = n + 1 WHERE id = 1")
                    .await;
                f.simple("COMMIT").await
            }
        };
        outcomes.push(match answer.error() {
            None => {
                assert!(answer.tags().contains(&"COMMIT".to_owned()), "{answer:?}");
                "commit"
            }
            Some((code, message)) => {
                assert_eq!((code.as_str(), message.as_str()), ("40001", OC000));
                "OC000"
            }
        });
        // Between rounds, a block that wrote only another table, and a read-only one: never
        // injected, never counted.
        let other = f
            .simple("BEGIN; UPDATE inj_items SET n = n + 1 WHERE id = 1; COMMIT")
            .await;
        assert!(other.error().is_none(), "{other:?}");
        let read = f
            .simple("BEGIN; SELECT n FROM inj_orders WHERE id = 1; COMMIT")
            .await;
        assert!(read.error().is_none(), "{read:?}");
    }
    assert_eq!(
        outcomes,
        [
            "commit", "OC000", "commit", "OC000", "commit", "OC000", "commit", "commit"
        ],
        "every second matching COMMIT, three times"
    );
    assert_eq!(emulator.injected_conflicts(), 3);
    // Each injected conflict rolled its block back: 5 commits of inj_orders' increments.
    assert_eq!(value(&connector, "inj_orders").await, 5);
    // After a failed COMMIT the session is outside any transaction, as on DSQL.
    let after = f.simple("SELECT 1").await;
    assert!(after.error().is_none(), "{after:?}");
    // Cleared: no more.
    emulator.stop_injecting_conflicts();
    let answer = f
        .simple("BEGIN; UPDATE inj_orders SET n = n + 1 WHERE id = 1; COMMIT")
        .await;
    assert!(answer.error().is_none(), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_commits_one_block_and_opens_another_counts_each_blocks_own_writes() {
    let (emulator, connector) = endpoint_with_tables().await;
    emulator.inject_conflicts(&["inj_orders"], 1, None);
    let mut f = Frontend::connect(&emulator).await;
    f.simple("BEGIN").await;
    // The first block wrote only inj_items: its COMMIT goes through; the second wrote
    // inj_orders: its COMMIT fails.
    let answer = f
        .simple(
            "UPDATE inj_items SET n = n + 1 WHERE id = 1; COMMIT; \
             BEGIN; UPDATE inj_orders SET n = n + 1 WHERE id = 1; COMMIT",
        )
        .await;
    assert_eq!(
        answer.error(),
        Some(("40001".to_owned(), OC000.to_owned())),
        "{answer:?}"
    );
    assert_eq!(emulator.injected_conflicts(), 1);
    assert_eq!(
        value(&connector, "inj_items").await,
        1,
        "the first block committed"
    );
    assert_eq!(
        value(&connector, "inj_orders").await,
        0,
        "the second rolled back"
    );
}
