//! What the pool and the transaction helpers guarantee beyond the happy path: a stuck
//! connection is dropped at checkout, a dirty one is cleaned, a rolled-back `COMMIT` is an
//! error, and a `COMMIT` cut short is reported as of unknown outcome and never re-run.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::tokio_postgres::SimpleQueryMessage;
use tokio_postgres_dsql::{
    DsqlConnectionManager, DsqlConnector, DsqlPool, Error, RetryError, RetryPolicy,
    retry_postgres_transaction_on, retry_transaction_on,
};

use crate::support::{Relay, own_emulator};

/// The first column of the first row of a simple query.
async fn scalar(client: &tokio_postgres_dsql::tokio_postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

async fn pool_on(emulator: &DsqlEmulator, port: u16, max_size: u32) -> DsqlPool {
    let connector = DsqlConnector::new(emulator.config_for("admin").port(port).build().unwrap())
        .await
        .unwrap();
    let manager = DsqlConnectionManager::new(connector.clone())
        .ping_after_idle(Duration::from_millis(100))
        .ping_timeout(Duration::from_millis(500));
    let pool = connector
        .pool_builder()
        .max_size(max_size)
        .min_idle(None)
        .build(manager.clone())
        .await
        .unwrap();
    DsqlPool::new(pool, &manager)
}

#[tokio::test]
async fn a_stuck_connection_is_dropped_at_checkout_and_never_handed_out_again() {
    let e = own_emulator(|b| b).await;
    let relay = Relay::start(e.address(), true).await;
    let pool = pool_on(&e, relay.port(), 2).await;
    let stuck_pid = scalar(&pool.get().await.unwrap(), "SELECT pg_backend_pid()").await;
    // Idle past the ping threshold, then the path to it goes silent without closing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.freeze_existing();
    for _ in 0..5 {
        let conn = pool
            .get()
            .await
            .expect("a fresh connection, not the stuck one");
        let pid = scalar(&conn, "SELECT pg_backend_pid()").await;
        assert_ne!(pid, stuck_pid);
    }
    assert_eq!(e.stats().accepted, 2, "one stuck connection, one fresh one");
}

#[tokio::test]
async fn a_connection_returned_inside_a_transaction_or_with_changed_settings_comes_back_clean() {
    let e = own_emulator(|b| b).await;
    let pool = pool_on(&e, e.port(), 1).await;
    let (pid, timezone) = {
        let conn = pool.get().await.unwrap();
        let pid = scalar(&conn, "SELECT pg_backend_pid()").await;
        let timezone = scalar(&conn, "SHOW TimeZone").await;
        // A raw BEGIN, then the connection goes back to the pool.
        conn.batch_execute("BEGIN").await.unwrap();
        (pid, timezone)
    };
    {
        let conn = pool.get().await.unwrap();
        assert_eq!(
            scalar(&conn, "SELECT pg_backend_pid()").await,
            pid,
            "same connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            scalar(
                &conn,
                "SELECT transaction_timestamp() = statement_timestamp()"
            )
            .await,
            "t",
            "still inside the old transaction"
        );
        // A failed transaction, and a changed setting.
        conn.batch_execute("BEGIN").await.unwrap();
        assert!(conn.batch_execute("SELECT 1/0").await.is_err());
    }
    {
        let conn = pool.get().await.unwrap();
        assert_eq!(
            scalar(&conn, "SELECT pg_backend_pid()").await,
            pid,
            "same connection"
        );
        assert_eq!(
            scalar(&conn, "SELECT 1").await,
            "1",
            "the failed transaction is gone"
        );
        let other = if timezone == "UTC" {
            "Europe/Paris"
        } else {
            "UTC"
        };
        conn.batch_execute(&format!("SET TimeZone = '{other}'"))
            .await
            .unwrap();
    }
    let conn = pool.get().await.unwrap();
    assert_eq!(
        scalar(&conn, "SELECT pg_backend_pid()").await,
        pid,
        "same connection"
    );
    assert_eq!(
        scalar(&conn, "SHOW TimeZone").await,
        timezone,
        "RESET ALL ran"
    );
}

async fn probe_table(emulator: &DsqlEmulator, table: &str) -> DsqlConnector {
    let connector = DsqlConnector::new(emulator.config_for("admin").build().unwrap())
        .await
        .unwrap();
    crate::support::each(
        &connector.connect().await.unwrap(),
        &[
            &format!("DROP TABLE IF EXISTS {table}"),
            &format!("CREATE TABLE {table} (id int PRIMARY KEY)"),
        ],
    )
    .await;
    connector
}

async fn count(connector: &DsqlConnector, table: &str) -> String {
    let client = connector.connect().await.unwrap();
    scalar(&client, &format!("SELECT count(*) FROM {table}")).await
}

#[tokio::test]
async fn a_body_that_swallows_an_error_gets_an_error_not_ok() {
    let e = own_emulator(|b| b).await;
    let connector = probe_table(&e, "hygiene_swallow").await;
    let mut client = connector.connect().await.unwrap();
    let err = retry_postgres_transaction_on(&mut client, &RetryPolicy::default(), async |tx| {
        tx.execute("INSERT INTO hygiene_swallow VALUES (1)", &[])
            .await?;
        let _ = tx.execute("SELECT 1/0", &[]).await; // swallowed
        Ok::<_, tokio_postgres_dsql::tokio_postgres::Error>(())
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::RolledBack(_)), "{err}");
    assert!(err.to_string().contains("25P02"), "{err}");

    let err = retry_transaction_on(&mut client, &RetryPolicy::default(), |tx| async move {
        tx.execute("INSERT INTO hygiene_swallow VALUES (2)", &[])
            .await?;
        let _ = tx.execute("SELECT 1/0", &[]).await;
        Ok::<_, Error>(())
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::TransactionRolledBack { .. }),
        "{err:?}"
    );
    assert_eq!(count(&connector, "hygiene_swallow").await, "0");
    // And a body that does not swallow anything still commits.
    retry_transaction_on(&mut client, &RetryPolicy::default(), |tx| async move {
        tx.execute("INSERT INTO hygiene_swallow VALUES (3)", &[])
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(count(&connector, "hygiene_swallow").await, "1");
}

#[tokio::test]
async fn a_commit_cut_short_is_of_unknown_outcome_and_not_retried() {
    let e = own_emulator(|b| b).await;
    let connector = probe_table(&e, "hygiene_cut").await;

    let mut client = connector.connect().await.unwrap();
    let attempts = AtomicU32::new(0);
    let attempts = &attempts;
    e.cut_next_commit();
    let err = retry_transaction_on(&mut client, &RetryPolicy::default(), |tx| async move {
        attempts.fetch_add(1, Ordering::SeqCst);
        tx.execute("INSERT INTO hygiene_cut VALUES (1)", &[])
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::CommitOutcomeUnknown { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("may or may not have been committed"),
        "{err}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "never re-run");
    assert_eq!(e.stats().cut_at_commit, 1);

    let mut client = connector.connect().await.unwrap();
    e.cut_next_commit();
    let mut calls = 0;
    let err = retry_postgres_transaction_on(&mut client, &RetryPolicy::default(), async |tx| {
        calls += 1;
        tx.execute("INSERT INTO hygiene_cut VALUES (2)", &[])
            .await?;
        Ok::<_, tokio_postgres_dsql::tokio_postgres::Error>(())
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::OutcomeUnknown(_)), "{err}");
    assert_eq!(calls, 1, "never re-run");
    // The emulator never forwarded either COMMIT.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(&connector, "hygiene_cut").await, "0");
}
