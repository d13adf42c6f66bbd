//! OCC retry against real PostgreSQL conflicts, through the emulator.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_postgres_dsql::{
    OccConflict, RetryError, RetryPolicy, retry_postgres_transaction_on, retry_transaction_on,
};

use crate::support::connector;

fn patient() -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(200)
        .delays(Duration::from_millis(1), Duration::from_millis(40))
}

#[tokio::test]
async fn concurrent_increments_on_a_pool_end_exact() {
    let connector = connector("admin", |b| b).await;
    let setup = connector.connect().await.unwrap();
    crate::support::each(
        &setup,
        &[
            "DROP TABLE IF EXISTS retry_counter",
            "CREATE TABLE retry_counter (id int PRIMARY KEY, n int NOT NULL)",
            "INSERT INTO retry_counter VALUES (1, 0)",
        ],
    )
    .await;
    let pool = connector
        .pool_builder()
        .max_size(8)
        .build(tokio_postgres_dsql::DsqlConnectionManager::new(
            connector.clone(),
        ))
        .await
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            let attempts = attempts.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let mut conn = pool.get().await.unwrap();
                    let attempts = attempts.clone();
                    // `async move`: a spawned task's closure owns what it captures.
                    retry_postgres_transaction_on(&mut conn, &patient(), async move |tx| {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        // Read, then write what was read: concurrent writers conflict.
                        let n: i32 = tx
                            .query_one("SELECT n FROM retry_counter WHERE id = 1", &[])
                            .await?
                            .get(0);
                        tx.execute("UPDATE retry_counter SET n = $1 WHERE id = 1", &[&(n + 1)])
                            .await?;
                        Ok::<_, tokio_postgres::Error>(())
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let n: i32 = setup
        .query_one("SELECT n FROM retry_counter WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 80);
    assert!(
        attempts.load(Ordering::SeqCst) > 80,
        "no conflict happened, so nothing was retried"
    );
}

/// `table (id int PRIMARY KEY, n int)` with row 1 at 0, made as `admin` through the emulator.
async fn counter_table(client: &tokio_postgres::Client, table: &str) {
    crate::support::each(
        client,
        &[
            &format!("DROP TABLE IF EXISTS {table}"),
            &format!("CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL)"),
            &format!("INSERT INTO {table} VALUES (1, 0)"),
        ],
    )
    .await;
}

/// Another session whose transaction writes row 1 of a counter table before the caller's
/// does, and commits while the caller's is still open: as on DSQL, the caller's write answers
/// at once and its COMMIT fails with `40001 … (OC000)`.
struct Rival(tokio_postgres::Client);

impl Rival {
    async fn writes_first(&self, table: &str) -> Result<(), tokio_postgres::Error> {
        self.0.batch_execute("BEGIN").await?;
        self.0
            .execute(&format!("UPDATE {table} SET n = n + 100 WHERE id = 1"), &[])
            .await?;
        Ok(())
    }

    async fn commits(&self) -> Result<(), tokio_postgres::Error> {
        self.0.batch_execute("COMMIT").await
    }
}

#[tokio::test]
async fn a_plain_client_retries_a_conflict_at_commit() {
    let connector = connector("admin", |b| b).await;
    let mut client = connector.connect().await.unwrap();
    counter_table(&client, "retry_real").await;
    let rival = Rival(connector.connect().await.unwrap());
    let mut calls = 0;
    let mut answered = Vec::new();
    retry_postgres_transaction_on(&mut client, &patient(), async |tx| {
        calls += 1;
        // The first two attempts meet a rival that commits first.
        if calls <= 2 {
            rival.writes_first("retry_real").await?;
        }
        answered.push(
            tx.execute("UPDATE retry_real SET n = n + 1 WHERE id = 1", &[])
                .await?,
        );
        if calls <= 2 {
            rival.commits().await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    })
    .await
    .unwrap();
    assert_eq!(calls, 3);
    // Every attempt's write answered; the conflicts came at COMMIT.
    assert_eq!(answered, [1, 1, 1]);
    let n: i32 = client
        .query_one("SELECT n FROM retry_real WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 201, "the rival's two writes and ours once");
}

#[tokio::test]
async fn a_non_retryable_error_is_returned_at_once() {
    let mut client = connector("admin", |b| b).await.connect().await.unwrap();
    let mut calls = 0;
    let err = retry_postgres_transaction_on(&mut client, &patient(), async |tx| {
        calls += 1;
        tx.query_one("SELECT 1 / 0", &[]).await?;
        Ok::<_, tokio_postgres::Error>(())
    })
    .await
    .unwrap_err();
    assert_eq!(calls, 1);
    match err {
        RetryError::Failed(e) => assert_eq!(e.code().unwrap().code(), "22012"),
        other => panic!("expected Failed, got {other}"),
    }
    // The connection is usable afterwards (the transaction was rolled back).
    client.simple_query("SELECT 1").await.unwrap();
}

/// A user error type: the closure's errors need not be `tokio_postgres::Error`.
#[derive(Debug)]
enum AppError {
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for AppError {
    fn from(e: tokio_postgres::Error) -> Self {
        AppError::Db(e)
    }
}

impl tokio_postgres_dsql::AsOccConflict for AppError {
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self {
            AppError::Db(e) => tokio_postgres_dsql::retry::occ_conflict(e),
        }
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Db(e) => write!(f, "database: {e}"),
        }
    }
}

#[tokio::test]
async fn exhausted_retries_name_the_attempts_and_the_last_conflict() {
    let mut client = connector("admin", |b| b).await.connect().await.unwrap();
    let policy = RetryPolicy::default()
        .with_max_attempts(3)
        .delays(Duration::from_millis(1), Duration::from_millis(5));
    let mut calls = 0;
    let err = retry_postgres_transaction_on(&mut client, &policy, async |tx| {
        calls += 1;
        tx.batch_execute(
            "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001', \
             MESSAGE = 'schema has been updated by another transaction, please retry: (OC001)'; END $$",
        )
        .await?;
        Ok::<_, AppError>(())
    })
    .await
    .unwrap_err();
    assert_eq!(calls, 3);
    let shown = err.to_string();
    assert!(shown.contains("after 3 attempts"), "{shown}");
    assert!(shown.contains("OC001"), "{shown}");
    match err {
        RetryError::Exhausted {
            attempts, conflict, ..
        } => {
            assert_eq!(attempts, 3);
            assert_eq!(conflict, OccConflict::Schema);
        }
        other => panic!("expected Exhausted, got {other}"),
    }
}

#[tokio::test]
async fn literal_dsql_sqlstates_are_conflicts() {
    let client = connector("admin", |b| b).await.connect().await.unwrap();
    for (code, expected) in [("OC000", OccConflict::Data), ("OC001", OccConflict::Schema)] {
        let err = client
            .batch_execute(&format!(
                "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = 'conflict'; END $$"
            ))
            .await
            .unwrap_err();
        assert_eq!(
            tokio_postgres_dsql::retry::occ_conflict(&err),
            Some(expected)
        );
    }
    let err = client.batch_execute("SELECT 1 / 0").await.unwrap_err();
    assert_eq!(tokio_postgres_dsql::retry::occ_conflict(&err), None);
}

#[tokio::test]
async fn a_cancelled_transaction_is_rolled_back_before_the_connection_is_reused() {
    let connector = connector("admin", |b| b).await;
    let mut client = connector.connect().await.unwrap();
    crate::support::each(
        &client,
        &[
            "DROP TABLE IF EXISTS service_cancel",
            "CREATE TABLE service_cancel (id int PRIMARY KEY)",
        ],
    )
    .await;
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        retry_transaction_on(&mut client, &RetryPolicy::default(), |tx| async move {
            tx.execute("INSERT INTO service_cancel VALUES (1)", &[])
                .await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, tokio_postgres_dsql::Error>(())
        }),
    )
    .await;
    assert!(cancelled.is_err(), "the body should still be sleeping");
    // Outside any transaction: each statement has its own transaction timestamp, and the
    // insert was rolled back.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rows = client
        .simple_query(
            "SELECT transaction_timestamp() = statement_timestamp(), \
             (SELECT count(*) FROM service_cancel)",
        )
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        row.get(0),
        Some("t"),
        "the connection is still inside the cancelled transaction"
    );
    assert_eq!(row.get(1), Some("0"), "the insert was not rolled back");
}

#[tokio::test]
async fn retry_transaction_retries_a_commit_conflict_with_anyhow_errors() {
    let connector = connector("admin", |b| b).await;
    let mut client = connector.connect().await.unwrap();
    counter_table(&client, "retry_real_anyhow").await;
    let rival = Rival(connector.connect().await.unwrap());
    let rival = &rival;
    let calls = AtomicU32::new(0);
    let calls = &calls;
    let updated: anyhow::Result<u64> =
        retry_transaction_on(&mut client, &patient(), |tx| async move {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call <= 2 {
                rival.writes_first("retry_real_anyhow").await?;
            }
            let updated = tx
                .execute("UPDATE retry_real_anyhow SET n = n + 1 WHERE id = 1", &[])
                .await?;
            if call <= 2 {
                rival.commits().await?;
            }
            Ok(updated)
        })
        .await;
    assert_eq!(updated.unwrap(), 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two conflicts at COMMIT, then success"
    );
    let n: i32 = client
        .query_one("SELECT n FROM retry_real_anyhow WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 201, "the failed attempts were rolled back");

    // Out of attempts: the last conflict comes back, and says what the server said.
    let err = retry_transaction_on(
        &mut client,
        &RetryPolicy::default()
            .with_max_attempts(2)
            .delays(Duration::ZERO, Duration::ZERO),
        |tx| async move {
            rival.writes_first("retry_real_anyhow").await?;
            tx.execute("UPDATE retry_real_anyhow SET n = n + 1 WHERE id = 1", &[])
                .await?;
            rival.commits().await?;
            Ok::<_, tokio_postgres_dsql::Error>(())
        },
    )
    .await
    .unwrap_err();
    use tokio_postgres_dsql::AsOccConflict;
    assert_eq!(err.occ_conflict(), Some(OccConflict::Data));
    assert!(err.to_string().contains("(OC000)"), "{err}");
}

#[tokio::test]
async fn statement_with_retry_reruns_a_conflicting_statement_alone() {
    let connector = connector("admin", |b| b).await;
    let mut client = connector.connect().await.unwrap();
    counter_table(&client, "statement_probe").await;
    let other = connector.connect().await.unwrap();
    // Another session's schema change makes this session's next statement on the table fail
    // once with OC001 (it had used the table before).
    let change = async |column: &str| {
        client
            .batch_execute("SELECT * FROM statement_probe")
            .await
            .unwrap();
        other
            .batch_execute(&format!(
                "ALTER TABLE statement_probe ADD COLUMN {column} text"
            ))
            .await
            .unwrap();
    };
    change("a").await;
    let insert = "INSERT INTO statement_probe (id, n) VALUES (2, 0)";
    let err = client.execute(insert, &[]).await.unwrap_err();
    let message = err.as_db_error().map(|db| db.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("schema has been updated by another transaction (OC001)")
    );
    change("b").await;
    tokio_postgres_dsql::retry_statement_on(&mut client, &patient(), insert)
        .await
        .unwrap();
    let rows: i64 = client
        .query_one("SELECT count(*) FROM statement_probe", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
    // Other errors come back at once, with the server's words.
    let err = tokio_postgres_dsql::retry_statement_on(
        &mut client,
        &patient(),
        "CREATE TABLE statement_probe (id int)",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("42P07"), "{err}");
}
