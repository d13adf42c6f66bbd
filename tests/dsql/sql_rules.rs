//! The emulator's SQL rules (`sql_rules(true)`) beyond single statements: the transaction rules
//! step by step, conflicts, limits, jobs and the server's identity. The one-statement rules of
//! `DSQL_SQL_RULES.md` are the conformance corpus's (`tests/conformance/corpus.json`, replayed
//! by `conformance.rs`).

use std::process::Command;
use std::sync::OnceLock;

use tokio_postgres::Client;
use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{DsqlConnector, Error};

use crate::support::emulator;

/// An emulator with DSQL's SQL rules in front of the shared emulator's PostgreSQL.
pub(crate) fn rules_emulator() -> &'static DsqlEmulator {
    static EMULATOR: OnceLock<DsqlEmulator> = OnceLock::new();
    EMULATOR.get_or_init(|| {
        DsqlEmulator::builder()
            .upstream_url(emulator().upstream_url("admin"))
            .credentials(emulator().credentials().clone())
            .sql_rules(true)
            .start_blocking()
            .expect("the emulator starts")
    })
}

pub(crate) async fn rules_connector() -> DsqlConnector {
    let config = rules_emulator().config_for("admin").build().unwrap();
    DsqlConnector::new(config).await.unwrap()
}

/// Prepares the objects the cases refer to, straight in PostgreSQL, once.
async fn setup() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let plain = plain().await;
        for statement in [
            "CREATE TABLE IF NOT EXISTS rules_t (id int PRIMARY KEY, v int)",
            "CREATE TABLE IF NOT EXISTS rules_pk (id int PRIMARY KEY, note text)",
            "CREATE TABLE IF NOT EXISTS rules_pk2 (a int, b int, c int, PRIMARY KEY (a, b))",
            "DROP TABLE IF EXISTS rules_a",
            "DROP TABLE IF EXISTS rules_b",
        ] {
            plain.batch_execute(statement).await.unwrap();
        }
    })
    .await;
}

/// A connection straight to the emulator's PostgreSQL (no DSQL rules, no catalog changes seen
/// by the emulator), for setup and checks.
async fn plain() -> Client {
    crate::support::upstream().await
}

/// [`plain`], after the shared [`setup`] and `statements` (a test's own tables) through it.
async fn upstream_with(statements: &[&str]) -> Client {
    setup().await;
    let plain = plain().await;
    crate::support::each(&plain, statements).await;
    plain
}

/// The SQLSTATE and message of a failed statement, or `None` if it succeeded.
fn answer(result: Result<(), tokio_postgres::Error>) -> Option<(String, String)> {
    let error = result.err()?;
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"));
    Some((db.code().code().to_owned(), db.message().to_owned()))
}

/// `psql` for the rules emulator as `admin` with `token`, over verify-full TLS.
fn psql_to_rules(token: &tokio_postgres_dsql::AuthToken) -> Command {
    crate::support::psql_on(rules_emulator(), "admin", token)
}

/// `(code, message)` of an error from this crate's helpers or a plain statement.
fn code_of(error: &tokio_postgres::Error) -> (String, String) {
    let db = error.as_db_error().expect("a server error");
    (db.code().code().to_owned(), db.message().to_owned())
}

#[tokio::test]
async fn the_transaction_rules_step_by_step() {
    setup().await;
    let client = rules_connector().await.connect().await.unwrap();
    let plain = plain().await;
    plain
        .batch_execute("DROP TABLE IF EXISTS rules_tx_a")
        .await
        .unwrap();
    plain
        .batch_execute("DROP TABLE IF EXISTS rules_tx_b")
        .await
        .unwrap();
    let aborted = (
        "25P02".to_owned(),
        "current transaction is aborted, commands ignored until end of transaction block"
            .to_owned(),
    );

    // One DDL per transaction: the second fails; the transaction is then aborted, COMMIT rolls
    // it back, and the first DDL did not happen.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("CREATE TABLE rules_tx_a (id int)")
        .await
        .unwrap();
    let err = client
        .batch_execute("CREATE TABLE rules_tx_b (id int)")
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&err),
        (
            "0A000".into(),
            "multiple ddl statements not supported in a transaction".into()
        )
    );
    assert_eq!(
        code_of(&client.batch_execute("SELECT 1").await.unwrap_err()),
        aborted
    );
    // A second unsupported statement also gets 25P02: the abort is checked first.
    assert_eq!(
        code_of(&client.batch_execute("TRUNCATE rules_t").await.unwrap_err()),
        aborted
    );
    let rows = client.simple_query("COMMIT").await.unwrap();
    assert!(
        rows.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_))),
        "COMMIT answers (with the ROLLBACK tag)"
    );
    let exists: bool = plain
        .query_one("SELECT to_regclass('rules_tx_a') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "the first DDL was rolled back");

    // DDL then DML in one transaction, through the extended protocol.
    let mut session = rules_connector().await.connect().await.unwrap();
    let tx = session.transaction().await.unwrap();
    tx.execute("CREATE TABLE rules_tx_a (id int)", &[])
        .await
        .unwrap();
    let err = tx
        .execute("INSERT INTO rules_tx_a VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&err),
        (
            "0A000".into(),
            "ddl and dml are not supported in the same transaction".into()
        )
    );
    tx.rollback().await.unwrap();

    // Each alone in its own transaction works; DML after DML too.
    session
        .batch_execute("CREATE TABLE rules_tx_a (id int)")
        .await
        .unwrap();
    let tx = session.transaction().await.unwrap();
    tx.execute("INSERT INTO rules_tx_a VALUES (1)", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO rules_tx_a VALUES (2)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = session.transaction().await.unwrap();
    tx.execute("SET CONSTRAINTS ALL DEFERRED", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // A refusal outside a block does not poison the session.
    let err = session
        .batch_execute("TRUNCATE rules_tx_a")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err).0, "0A000");
    let n: i64 = session
        .query_one("SELECT count(*) FROM rules_tx_a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // The crate's own helpers report the refusal as a query error, not retried.
    let mut conn = session;
    let result: Result<(), Error> = tokio_postgres_dsql::retry_transaction_on(
        &mut conn,
        &tokio_postgres_dsql::RetryPolicy::default(),
        |tx| async move {
            tx.execute("TRUNCATE rules_tx_a", &[]).await?;
            Ok(())
        },
    )
    .await;
    assert!(
        matches!(&result, Err(Error::Query { source, .. }) if code_of(source).0 == "0A000"),
        "{result:?}"
    );
}

#[tokio::test]
async fn the_server_reports_itself_as_dsql_does() {
    let client = rules_connector().await.connect().await.unwrap();
    let simple = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        simple(client.simple_query("SHOW server_version").await.unwrap()),
        "16.15"
    );
    let num: String = client
        .query_one("show SERVER_VERSION_NUM", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(num, "160015");
    // The same through functions, either protocol, with PostgreSQL's column names.
    for (sql, column, value) in [
        ("SELECT version()", "version", "PostgreSQL 16"),
        ("select pg_catalog.VERSION ( )", "version", "PostgreSQL 16"),
        (
            "SELECT current_setting('server_version')",
            "current_setting",
            "16.15",
        ),
        (
            "SELECT current_setting('server_version_num', true) AS num",
            "num",
            "160015",
        ),
        ("VALUES (version())", "column1", "PostgreSQL 16"),
    ] {
        let row = client.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.columns()[0].name(), column, "{sql}");
        assert_eq!(row.get::<_, String>(0), value, "{sql}");
        assert_eq!(simple(client.simple_query(sql).await.unwrap()), value);
    }
    let row = client
        .query_one(
            "SELECT 'version()' AS quoted, current_setting('TimeZone') AS zone",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "version()");
    assert_eq!(row.get::<_, String>(1), "UTC");
    assert_eq!(
        simple(
            client
                .simple_query("SHOW transaction_isolation")
                .await
                .unwrap()
        ),
        "repeatable read"
    );
    // Without the rules, the emulator reports the PostgreSQL behind it.
    let loose = crate::support::own_emulator(|b| b.sql_rules(false)).await;
    let plain = DsqlConnector::new(loose.config_for("admin").build().unwrap())
        .await
        .unwrap()
        .connect()
        .await
        .unwrap();
    let version = simple(plain.simple_query("SHOW server_version").await.unwrap());
    assert_ne!(version, "16.15");

    // The version announced at startup, as psql reads it.
    if Command::new("psql").arg("--version").output().is_err() {
        return;
    }
    let token = rules_connector().await.token().await.unwrap();
    let output = psql_to_rules(&token)
        .args(["-X", "-c", "\\echo :SERVER_VERSION_NAME"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "16.15");
}

/// Opens a transaction in each session.
async fn begin(sessions: [&Client; 2]) {
    for s in sessions {
        s.batch_execute("BEGIN").await.unwrap();
    }
}

/// Conflicts surface at COMMIT, never as a lock wait (§6): two sessions write the same row,
/// both writes answer at once, exactly one COMMIT fails with `40001 … (OC000)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_row_never_wait_and_one_commit_fails() {
    let plain = plain().await;
    plain
        .batch_execute("DROP TABLE IF EXISTS rules_occ")
        .await
        .unwrap();
    plain
        .batch_execute("CREATE TABLE rules_occ (id int PRIMARY KEY, v int NOT NULL)")
        .await
        .unwrap();
    plain
        .batch_execute("INSERT INTO rules_occ VALUES (1, 0), (2, 0)")
        .await
        .unwrap();
    let connector = rules_connector().await;
    let s0 = connector.connect().await.unwrap();
    let s1 = connector.connect().await.unwrap();
    let occ = (
        "40001".to_owned(),
        "change conflicts with another transaction (OC000)".to_owned(),
    );
    // Without the emulator's handling, the second UPDATE would wait for the first
    // transaction to end (for ever, here): a bound far above the answer time.
    let at_once = std::time::Duration::from_secs(2);

    for (first_to_commit, extended) in [(0, false), (1, false), (0, true)] {
        begin([&s0, &s1]).await;
        let mut took = Vec::new();
        for s in [&s0, &s1] {
            let started = std::time::Instant::now();
            let update = async {
                if extended {
                    s.execute("UPDATE rules_occ SET v = v + 1 WHERE id = $1", &[&1i32])
                        .await
                } else {
                    s.simple_query("UPDATE rules_occ SET v = v + 1 WHERE id = 1")
                        .await
                        .map(|_| 1)
                }
            };
            let n = tokio::time::timeout(at_once, update)
                .await
                .expect("the UPDATE answers without waiting")
                .unwrap();
            assert_eq!(n, 1);
            took.push(started.elapsed());
        }
        println!("UPDATEs answered in {took:?}");
        let (first, second) = if first_to_commit == 0 {
            (&s0, &s1)
        } else {
            (&s1, &s0)
        };
        let a = first.batch_execute("COMMIT").await;
        let b = second.batch_execute("COMMIT").await;
        let failed: Vec<_> = [a, b]
            .into_iter()
            .filter_map(|r| r.err().map(|e| code_of(&e)))
            .collect();
        assert_eq!(
            failed,
            std::slice::from_ref(&occ),
            "exactly one COMMIT fails"
        );
        // Both sessions are out of their transactions and usable.
        for s in [&s0, &s1] {
            s.batch_execute("SELECT 1").await.unwrap();
        }
    }
    let v: i32 = plain
        .query_one("SELECT v FROM rules_occ WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 3, "one increment per round");

    // Disjoint rows never conflict.
    begin([&s0, &s1]).await;
    s0.batch_execute("UPDATE rules_occ SET v = 10 WHERE id = 1")
        .await
        .unwrap();
    s1.batch_execute("UPDATE rules_occ SET v = 20 WHERE id = 2")
        .await
        .unwrap();
    s0.batch_execute("COMMIT").await.unwrap();
    s1.batch_execute("COMMIT").await.unwrap();

    // An autocommit write meeting a held row commits at once: it is a transaction of its own
    // that commits first, so the open one fails at its COMMIT.
    s0.batch_execute("BEGIN").await.unwrap();
    s0.batch_execute("UPDATE rules_occ SET v = 11 WHERE id = 1")
        .await
        .unwrap();
    tokio::time::timeout(
        at_once,
        s1.batch_execute("UPDATE rules_occ SET v = 12 WHERE id = 1"),
    )
    .await
    .expect("answers without waiting")
    .unwrap();
    assert_eq!(code_of(&s0.batch_execute("COMMIT").await.unwrap_err()), occ);

    // A write after the other transaction committed the row, on an older snapshot, loses too.
    s0.batch_execute("BEGIN").await.unwrap();
    s0.batch_execute("SELECT v FROM rules_occ WHERE id = 1")
        .await
        .unwrap();
    s1.batch_execute("UPDATE rules_occ SET v = 30 WHERE id = 1")
        .await
        .unwrap();
    s0.batch_execute("UPDATE rules_occ SET v = 40 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(code_of(&s0.batch_execute("COMMIT").await.unwrap_err()), occ);
}

/// Foreign keys: deleting a parent conflicts with inserting its child; a non-key update of
/// the parent does not (§6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_key_conflicts_follow_the_key() {
    upstream_with(&[
        "DROP TABLE IF EXISTS rules_child",
        "DROP TABLE IF EXISTS rules_parent",
        "CREATE TABLE rules_parent (id int PRIMARY KEY, name text)",
        "CREATE TABLE rules_child (id int PRIMARY KEY, parent_id int REFERENCES rules_parent (id))",
        "INSERT INTO rules_parent VALUES (1, 'a'), (2, 'b')",
    ])
    .await;
    let connector = rules_connector().await;
    let s0 = connector.connect().await.unwrap();
    let s1 = connector.connect().await.unwrap();

    // A non-key update of the parent and a child insert: both commit.
    begin([&s0, &s1]).await;
    s0.batch_execute("UPDATE rules_parent SET name = 'x' WHERE id = 1")
        .await
        .unwrap();
    s1.batch_execute("INSERT INTO rules_child VALUES (10, 1)")
        .await
        .unwrap();
    s0.batch_execute("COMMIT").await.unwrap();
    s1.batch_execute("COMMIT").await.unwrap();

    // Deleting a parent while its child is inserted: one of them fails at COMMIT.
    begin([&s0, &s1]).await;
    s1.batch_execute("INSERT INTO rules_child VALUES (11, 2)")
        .await
        .unwrap();
    let deleted = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        s0.batch_execute("DELETE FROM rules_parent WHERE id = 2"),
    )
    .await
    .expect("the DELETE answers without waiting");
    assert!(deleted.is_ok(), "{deleted:?}");
    let results = [
        s1.batch_execute("COMMIT").await,
        s0.batch_execute("COMMIT").await,
    ];
    let failed: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(code_of))
        .collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    assert_eq!(failed[0].0, "40001");
}

/// `retry_transaction_on` with 8 tasks × 25 increments of one counter through a pool on the
/// strict emulator, once with simple queries and once through the extended protocol:
/// conflicts come at COMMIT (the first committer wins), the helper retries, and the count
/// ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_on_one_counter_end_exact_with_conflicts_at_commit() {
    let plain = upstream_with(&[
        "DROP TABLE IF EXISTS rules_counter",
        "CREATE TABLE rules_counter (id int PRIMARY KEY, n int NOT NULL)",
        "INSERT INTO rules_counter VALUES (1, 0)",
    ])
    .await;
    let pool = rules_connector()
        .await
        .pool_with(|b| b.max_size(8))
        .await
        .unwrap();
    let policy = tokio_postgres_dsql::RetryPolicy::default()
        .with_max_attempts(200)
        .delays(
            std::time::Duration::from_millis(1),
            std::time::Duration::from_millis(40),
        );
    for (round, extended) in [false, true].into_iter().enumerate() {
        let conflicts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (pool, policy, conflicts) = (pool.clone(), policy.clone(), conflicts.clone());
            tasks.spawn(async move {
                for _ in 0..25 {
                    let mut conn = pool.get().await.unwrap();
                    let attempts = std::sync::atomic::AtomicU32::new(0);
                    let attempts = &attempts;
                    tokio_postgres_dsql::retry_transaction_on(
                        &mut conn,
                        &policy,
                        |tx| async move {
                            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let update = "UPDATE rules_counter SET n = n + 1 WHERE id = 1";
                            if extended {
                                tx.execute(update, &[]).await?;
                            } else {
                                tx.batch_execute(update).await?;
                            }
                            Ok::<_, Error>(())
                        },
                    )
                    .await
                    .unwrap();
                    conflicts.fetch_add(
                        attempts.load(std::sync::atomic::Ordering::SeqCst) - 1,
                        std::sync::atomic::Ordering::SeqCst,
                    );
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let n: i32 = plain
            .query_one("SELECT n FROM rules_counter WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 200 * (round as i32 + 1), "extended: {extended}");
        let conflicts = conflicts.load(std::sync::atomic::Ordering::SeqCst);
        println!("200 increments (extended: {extended}), {conflicts} conflicts retried");
        assert!(conflicts > 0, "8 writers of one row conflict");
    }
}

/// A committed catalog change makes another session's next statement on that object fail once
/// with `40001 … (OC001)`; the retry goes through (§6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_fails_the_other_sessions_next_statement_once() {
    upstream_with(&[
        "DROP TABLE IF EXISTS rules_schema",
        "DROP TABLE IF EXISTS rules_schema_other",
        "CREATE TABLE rules_schema (id int PRIMARY KEY)",
        "CREATE TABLE rules_schema_other (id int PRIMARY KEY)",
    ])
    .await;
    let connector = rules_connector().await;
    let reader = connector.connect().await.unwrap();
    let fresh = connector.connect().await.unwrap();
    let mut writer = connector.connect().await.unwrap();
    reader
        .batch_execute("SELECT * FROM rules_schema")
        .await
        .unwrap();
    writer
        .batch_execute("ALTER TABLE rules_schema ADD COLUMN note text")
        .await
        .unwrap();
    let oc001 = (
        "40001".to_owned(),
        "schema has been updated by another transaction (OC001)".to_owned(),
    );
    // A session that had not used the table has no stale schema of it.
    fresh
        .batch_execute("SELECT * FROM rules_schema")
        .await
        .unwrap();
    // Another table is not affected; the changed one fails once, then works.
    reader
        .batch_execute("SELECT * FROM rules_schema_other")
        .await
        .unwrap();
    let err = reader
        .query("SELECT id, note FROM rules_schema", &[])
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), oc001);
    reader
        .query("SELECT id, note FROM rules_schema", &[])
        .await
        .unwrap();
    // The session that made the change is not told of its own change.
    writer
        .batch_execute("INSERT INTO rules_schema (id, note) VALUES (1, 'x')")
        .await
        .unwrap();

    // In a transaction, retry_transaction_on sees the conflict and runs it again.
    writer
        .batch_execute("ALTER TABLE rules_schema ADD COLUMN note2 text")
        .await
        .unwrap();
    let mut reader = reader;
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let attempts = &attempts;
    let n: i64 = tokio_postgres_dsql::retry_transaction_on(
        &mut reader,
        &tokio_postgres_dsql::RetryPolicy::default(),
        |tx| async move {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let row = tx
                .query_one("SELECT count(note2) FROM rules_schema", &[])
                .await?;
            Ok::<_, Error>(row.get(0))
        },
    )
    .await
    .unwrap();
    assert_eq!(n, 0);
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);

    // A change that lands while a transaction that used the table is open fails its COMMIT,
    // which ends it; the next one goes through.
    reader.batch_execute("BEGIN").await.unwrap();
    reader
        .batch_execute("SELECT * FROM rules_schema")
        .await
        .unwrap();
    writer
        .batch_execute("GRANT SELECT ON rules_schema TO PUBLIC")
        .await
        .unwrap();
    let err = reader.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code_of(&err), oc001);
    reader.batch_execute("SELECT 1").await.unwrap();
    reader
        .batch_execute("BEGIN; SELECT * FROM rules_schema; COMMIT")
        .await
        .unwrap();
    drop(writer.transaction().await.unwrap());
}

/// Statements through the extended protocol with the unnamed statement (what node-postgres and
/// `query_typed` send: Parse, Bind, Describe, Execute and Sync in one go): a write in a
/// transaction block, and one whose Parse fails there.
#[tokio::test]
async fn unnamed_statements_in_a_transaction_block() {
    use tokio_postgres::types::Type;
    setup().await;
    let plain = plain().await;
    let client = rules_connector().await.connect().await.unwrap();
    plain
        .batch_execute("DELETE FROM rules_t WHERE id = 9001")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let inserted = client
        .query_typed(
            "INSERT INTO rules_t VALUES ($1, 1) RETURNING id",
            &[(&9_001i32, Type::INT4)],
        )
        .await
        .unwrap();
    assert_eq!(inserted[0].get::<_, i32>(0), 9_001);
    let updated = client
        .query_typed(
            "UPDATE rules_t SET v = $1 WHERE id = 9001",
            &[(&2i32, Type::INT4)],
        )
        .await
        .unwrap();
    assert!(updated.is_empty());
    client.batch_execute("COMMIT").await.unwrap();
    let row = plain
        .query_one("SELECT v FROM rules_t WHERE id = 9001", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);

    // A Parse that fails in a block: PostgreSQL's error at once, then 25P02 until ROLLBACK.
    client.batch_execute("BEGIN").await.unwrap();
    let failed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.query_typed(
            "INSERT INTO rules_no_such VALUES ($1)",
            &[(&1i32, Type::INT4)],
        ),
    )
    .await
    .expect("the error arrives")
    .unwrap_err();
    assert_eq!(code_of(&failed).0, "42P01");
    let aborted = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code_of(&aborted).0, "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    plain
        .batch_execute("DELETE FROM rules_t WHERE id = 9001")
        .await
        .unwrap();
}

/// DSQL's 3 000-row limit per transaction (§1, §8): the statement that crosses it fails with
/// `54000`, in autocommit and in a block, through either protocol; nothing it wrote is left.
#[tokio::test]
async fn a_transaction_writes_at_most_3000_rows() {
    let plain = upstream_with(&[
        "DROP TABLE IF EXISTS rules_rows",
        "CREATE TABLE rules_rows (v int)",
    ])
    .await;
    let client = rules_connector().await.connect().await.unwrap();
    let limit = (
        "54000".to_owned(),
        "transaction row limit exceeded".to_owned(),
    );
    let over = "INSERT INTO rules_rows SELECT generate_series(1, 3001)";
    // Autocommit, simple and extended.
    assert_eq!(
        answer(client.batch_execute(over).await),
        Some(limit.clone())
    );
    assert_eq!(
        answer(client.execute(over, &[]).await.map(|_| ())),
        Some(limit.clone())
    );
    assert_eq!(rows_in(&plain, "rules_rows").await, 0);
    // Exactly 3 000 is fine.
    let written = client
        .execute(
            "INSERT INTO rules_rows SELECT generate_series(1, 3000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(written, 3000);
    assert_eq!(rows_in(&plain, "rules_rows").await, 3000);
    // An UPDATE of 3 000 rows goes through; of 3 001 it fails and changes nothing.
    assert_eq!(
        client
            .execute("UPDATE rules_rows SET v = v + 1", &[])
            .await
            .unwrap(),
        3000
    );
    plain
        .batch_execute("INSERT INTO rules_rows VALUES (0)")
        .await
        .unwrap();
    assert_eq!(
        answer(client.batch_execute("UPDATE rules_rows SET v = -1").await),
        Some(limit.clone())
    );
    let changed = plain
        .query_one("SELECT count(*) FROM rules_rows WHERE v = -1", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(changed, 0);
    plain.batch_execute("DELETE FROM rules_rows").await.unwrap();

    // In a block the rows of all its statements count: the one that crosses fails, the block
    // is aborted (25P02), COMMIT answers ROLLBACK and nothing is left.
    for extended in [false, true] {
        client.batch_execute("BEGIN").await.unwrap();
        for _ in 0..2 {
            let sql = "INSERT INTO rules_rows SELECT generate_series(1, 1500)";
            if extended {
                assert_eq!(client.execute(sql, &[]).await.unwrap(), 1500);
            } else {
                client.batch_execute(sql).await.unwrap();
            }
        }
        let one = "INSERT INTO rules_rows VALUES (1)";
        let crossing = if extended {
            client.execute(one, &[]).await.map(|_| ())
        } else {
            client.batch_execute(one).await
        };
        assert_eq!(
            answer(crossing),
            Some(limit.clone()),
            "extended: {extended}"
        );
        let aborted = client.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(code_of(&aborted).0, "25P02");
        let commit = client.simple_query("COMMIT").await.unwrap();
        assert!(
            matches!(
                &commit[0],
                tokio_postgres::SimpleQueryMessage::CommandComplete(0)
            ),
            "{commit:?}"
        );
        assert_eq!(rows_in(&plain, "rules_rows").await, 0);
    }
    // The next transaction starts from zero.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("INSERT INTO rules_rows SELECT generate_series(1, 3000)")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows_in(&plain, "rules_rows").await, 3000);
    plain.batch_execute("DROP TABLE rules_rows").await.unwrap();
}

async fn rows_in(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// DSQL's transaction age limit (§1, §8; 300 s there, 1 s here): the first statement after it
/// fails with `54000` and aborts the block; a `COMMIT` after it fails and ends the block.
#[tokio::test]
async fn a_transaction_older_than_the_age_limit_fails() {
    let plain = upstream_with(&[
        "DROP TABLE IF EXISTS rules_aged",
        "CREATE TABLE rules_aged (v int)",
    ])
    .await;
    let emulator = DsqlEmulator::builder()
        .upstream_url(crate::support::emulator().upstream_url("admin"))
        .credentials(crate::support::emulator().credentials().clone())
        .transaction_age_limit(std::time::Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let connector = DsqlConnector::new(emulator.config_for("admin").build().unwrap())
        .await
        .unwrap();
    let client = connector.connect().await.unwrap();
    let past_the_limit = || tokio::time::sleep(std::time::Duration::from_millis(1_300));

    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("INSERT INTO rules_aged VALUES (1)")
        .await
        .unwrap();
    past_the_limit().await;
    let error = client.simple_query("SELECT 1").await.unwrap_err();
    let db = error.as_db_error().unwrap();
    assert_eq!(
        (db.code().code(), db.message()),
        ("54000", "transaction age limit of 1s exceeded")
    );
    assert_eq!(db.detail(), Some("Current transaction age 1s exceeds 1s"));
    let aborted = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code_of(&aborted).0, "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();

    // COMMIT past the limit fails, and the session is outside any transaction after it.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("INSERT INTO rules_aged VALUES (2)", &[])
        .await
        .unwrap();
    past_the_limit().await;
    let error = client.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code_of(&error).0, "54000");
    client.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(rows_in(&plain, "rules_aged").await, 0);
    // A young transaction commits as usual.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("INSERT INTO rules_aged VALUES (3)")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows_in(&plain, "rules_aged").await, 1);
    plain.batch_execute("DROP TABLE rules_aged").await.unwrap();
}

/// The `job_id` row of `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE` (§4), the job
/// in `sys.jobs`, and `sys.wait_for_job`.
#[tokio::test]
async fn asynchronous_ddl_answers_a_job_id() {
    use tokio_postgres::SimpleQueryMessage as M;
    let plain = upstream_with(&[
        "DROP TABLE IF EXISTS rules_jobs",
        "CREATE TABLE rules_jobs (id int PRIMARY KEY, v int)",
        "ALTER TABLE rules_jobs ADD CONSTRAINT rules_jobs_chk CHECK (v > 0) NOT VALID",
    ])
    .await;
    let client = rules_connector().await.connect().await.unwrap();
    // The job id of a simple query's answer: one row, `job_id`, then the DDL's own tag.
    async fn job_of(client: &Client, sql: &str) -> String {
        let messages = client.simple_query(sql).await.unwrap();
        let rows: Vec<&tokio_postgres::SimpleQueryRow> = messages
            .iter()
            .filter_map(|m| match m {
                M::Row(row) => Some(row),
                _ => None,
            })
            .collect();
        assert_eq!(rows.len(), 1, "{sql}: {messages:?}");
        assert_eq!(rows[0].columns()[0].name(), "job_id");
        let id = rows[0].get(0).unwrap().to_owned();
        assert_eq!(id.len(), 26, "{id}");
        assert!(
            id.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7')),
            "{id}"
        );
        assert!(matches!(messages.last(), Some(M::CommandComplete(0))));
        id
    }
    let named = job_of(&client, "CREATE INDEX ASYNC rules_jobs_v ON rules_jobs (v)").await;
    let unnamed = job_of(&client, "create index async on rules_jobs (id, v)").await;
    let in_block = job_of(
        &client,
        "BEGIN; CREATE UNIQUE INDEX ASYNC rules_jobs_u ON rules_jobs (v) WHERE v > 10; COMMIT",
    )
    .await;
    let validate = job_of(
        &client,
        "ALTER TABLE ASYNC rules_jobs VALIDATE CONSTRAINT rules_jobs_chk",
    )
    .await;
    assert!(
        [&unnamed, &in_block, &validate]
            .iter()
            .all(|id| **id != named)
    );
    for (id, kind, object) in [
        (&named, "INDEX_BUILD", "public.rules_jobs_v"),
        (&unnamed, "INDEX_BUILD", "public.rules_jobs_id_v_idx"),
        (&in_block, "INDEX_BUILD", "public.rules_jobs_u"),
        (&validate, "VALIDATE_CONSTRAINT", "rules_jobs_chk"),
    ] {
        let row = client
            .query_one(
                "SELECT status, job_type, object_name FROM sys.jobs WHERE job_id = $1",
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2)
            ),
            ("completed".into(), kind.into(), object.into())
        );
        client
            .batch_execute(&format!("CALL sys.wait_for_job('{id}')"))
            .await
            .unwrap();
    }
    // The indexes exist and the constraint is validated.
    let indexes: i64 = plain
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'rules_jobs'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 4);
    let validated: bool = plain
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'rules_jobs_chk'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(validated);
    // Through the extended protocol too: the row, and DSQL's tag (`CREATE INDEX`: no count,
    // where the `SELECT 1` of the statement that ran it would count 1).
    let row = client
        .query_one("CREATE INDEX ASYNC rules_jobs_x ON rules_jobs (v, id)", &[])
        .await
        .unwrap();
    let extended: String = row.get("job_id");
    assert_eq!(extended.len(), 26);
    client
        .execute("CALL sys.wait_for_job($1)", &[&extended])
        .await
        .unwrap();
    assert_eq!(
        client
            .execute(
                "CREATE INDEX ASYNC IF NOT EXISTS rules_jobs_x ON rules_jobs (v)",
                &[]
            )
            .await
            .unwrap(),
        0
    );
    plain.batch_execute("DROP TABLE rules_jobs").await.unwrap();
}

/// At most 24 indexes a table, primary key and unique constraints included (§8).
#[tokio::test]
async fn a_table_has_at_most_24_indexes() {
    setup().await;
    let plain = plain().await;
    let columns = |n: usize, unique: bool| {
        (1..=n)
            .map(|i| format!("c{i} int{}", if unique { " UNIQUE" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    crate::support::each(
        &plain,
        &[
            "DROP TABLE IF EXISTS rules_many",
            "DROP TABLE IF EXISTS rules_too_many",
            &format!(
                "CREATE TABLE rules_many (id int PRIMARY KEY, {}, x int, y int)",
                columns(22, true)
            ),
        ],
    )
    .await;
    let client = rules_connector().await.connect().await.unwrap();
    let limit = Some((
        "54000".to_owned(),
        "more than 24 indexes per table are not allowed".to_owned(),
    ));
    // 23 so far: the 24th is fine, the 25th is not, through either protocol.
    client
        .batch_execute("CREATE INDEX ASYNC rules_many_x ON rules_many (x)")
        .await
        .unwrap();
    assert_eq!(
        answer(
            client
                .batch_execute("CREATE INDEX ASYNC rules_many_y ON rules_many (y)")
                .await
        ),
        limit
    );
    assert_eq!(
        answer(
            client
                .execute("CREATE INDEX ASYNC rules_many_y ON rules_many (y)", &[])
                .await
                .map(|_| ())
        ),
        limit
    );
    // A table declared with 25 is refused and not made.
    let too_many = format!(
        "CREATE TABLE rules_too_many (id int PRIMARY KEY, {})",
        columns(24, true)
    );
    assert_eq!(answer(client.batch_execute(&too_many).await), limit);
    let made: bool = plain
        .query_one("SELECT to_regclass('rules_too_many') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!made);
    plain.batch_execute("DROP TABLE rules_many").await.unwrap();
}

/// At most 10 schemas besides `public` and `sys` (§8), on an emulator of its own (other tests
/// make schemas on the shared one).
#[tokio::test]
async fn a_cluster_has_at_most_10_schemas() {
    let emulator = DsqlEmulator::builder()
        .credentials(crate::support::emulator().credentials().clone())
        .start()
        .await
        .unwrap();
    let client = DsqlConnector::new(emulator.config_for("admin").build().unwrap())
        .await
        .unwrap()
        .connect()
        .await
        .unwrap();
    for i in 1..=10 {
        client
            .batch_execute(&format!("CREATE SCHEMA rules_s{i}"))
            .await
            .unwrap();
    }
    let error = client
        .batch_execute("CREATE SCHEMA rules_s11")
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&error),
        ("54000".into(), "more than 10 schemas not allowed".into())
    );
    client.batch_execute("DROP SCHEMA rules_s10").await.unwrap();
    client
        .batch_execute("CREATE SCHEMA rules_s11")
        .await
        .unwrap();
}

/// §8: one value at most 1 MiB; a transaction at most 10 MiB, checked at COMMIT; a protocol
/// message over 10 MiB closes the connection.
#[tokio::test]
async fn values_transactions_and_messages_have_size_limits() {
    use tokio_postgres::types::Type;
    let plain = upstream_with(&[
        "DROP TABLE IF EXISTS rules_sizes",
        "CREATE TABLE rules_sizes (id int PRIMARY KEY, t text, b bytea)",
    ])
    .await;
    let connector = rules_connector().await;
    let client = connector.connect().await.unwrap();
    const MIB: usize = 1 << 20;
    let too_big = |type_name: &str| {
        Some((
            "54000".to_owned(),
            format!("datatype limit greater than 1048576 bytes not supported for {type_name}"),
        ))
    };
    let text = "x".repeat(MIB + 1);
    let bytes = vec![7u8; MIB + 1];
    let insert_text = "INSERT INTO rules_sizes (id, t) VALUES ($1, $2)";
    assert_eq!(
        answer(
            client
                .execute(insert_text, &[&1i32, &text])
                .await
                .map(|_| ())
        ),
        too_big("text")
    );
    assert_eq!(
        answer(
            client
                .execute(
                    "INSERT INTO rules_sizes (id, b) VALUES ($1, $2)",
                    &[&1i32, &bytes]
                )
                .await
                .map(|_| ())
        ),
        too_big("bytea")
    );
    // The unnamed statement, with the type given.
    assert_eq!(
        answer(
            client
                .query_typed(
                    "INSERT INTO rules_sizes (id, b) VALUES ($1, $2)",
                    &[(&1i32, Type::INT4), (&bytes, Type::BYTEA)],
                )
                .await
                .map(|_| ())
        ),
        too_big("bytea")
    );
    // A literal in a simple query.
    assert_eq!(
        answer(
            client
                .batch_execute(&format!(
                    "INSERT INTO rules_sizes (id, t) VALUES (1, '{text}')"
                ))
                .await
        ),
        too_big("text")
    );
    // Reading a large value is fine, and so is writing exactly 1 MiB.
    client
        .query_one("SELECT repeat('x', 2 * 1048576)", &[])
        .await
        .unwrap();
    let one_mib = "x".repeat(MIB);
    client
        .execute(insert_text, &[&1i32, &one_mib])
        .await
        .unwrap();
    assert_eq!(rows_in(&plain, "rules_sizes").await, 1);

    // Ten 1 MiB values and their keys in a block, just over 10 MiB: each write answers, the
    // COMMIT fails and ends the block.
    client.batch_execute("BEGIN").await.unwrap();
    for id in 10..20 {
        client.execute(insert_text, &[&id, &one_mib]).await.unwrap();
    }
    let error = client.batch_execute("COMMIT").await.unwrap_err();
    let db = error.as_db_error().unwrap();
    assert_eq!(
        (db.code().code(), db.message()),
        ("54000", "transaction size limit 10mb exceeded")
    );
    assert_eq!(db.detail(), Some("Current transaction size 11mb > 10mb"));
    client.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(rows_in(&plain, "rules_sizes").await, 1);
    // 9 MiB commits.
    client.batch_execute("BEGIN").await.unwrap();
    for id in 10..19 {
        client.execute(insert_text, &[&id, &one_mib]).await.unwrap();
    }
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows_in(&plain, "rules_sizes").await, 10);

    // A message over 10 MiB: the connection is closed without an error message.
    let huge = format!("SELECT '{}'", "x".repeat(10 * MIB));
    let error = client.batch_execute(&huge).await.unwrap_err();
    assert!(error.as_db_error().is_none(), "{error}");
    assert!(client.is_closed());
    connector
        .connect()
        .await
        .unwrap()
        .batch_execute("SELECT 1")
        .await
        .unwrap();
    plain.batch_execute("DROP TABLE rules_sizes").await.unwrap();
}

/// `COPY … FROM STDIN` through the rules relay (psql), alone and after a write in the same
/// query, where the relay must not wait for an answer that waits for the data.
#[tokio::test]
async fn copy_from_stdin_goes_through() {
    if Command::new("psql").arg("--version").output().is_err() {
        println!("skipping: psql is not installed (CI installs it)");
        return;
    }
    let plain = upstream_with(&[
        "DROP TABLE IF EXISTS rules_copy",
        "CREATE TABLE rules_copy (v int)",
        "INSERT INTO rules_copy VALUES (1)",
    ])
    .await;
    let token = rules_connector().await.token().await.unwrap();
    let psql = |sql: &str, data: &[u8]| {
        let mut child = psql_to_rules(&token)
            .args(["-X", "-q", "-c", sql])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        // Bounded: a relay waiting on the server while the server waits on the data hangs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("psql did not finish `{sql}`: the relay waits on the COPY");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    psql("COPY rules_copy FROM STDIN", b"2\n3\n\\.\n");
    assert_eq!(rows_in(&plain, "rules_copy").await, 3);
    psql(
        "UPDATE rules_copy SET v = v + 10; COPY rules_copy FROM STDIN",
        b"4\n5\n\\.\n",
    );
    let sum: i64 = plain
        .query_one("SELECT sum(v) FROM rules_copy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 11 + 12 + 13 + 4 + 5);
}

/// The two endpoints of a multi-Region pair are one database: a schema change through one gives
/// a session on the other that had used the table `OC001`, once.
#[tokio::test]
async fn a_pairs_endpoints_see_each_others_schema_changes() {
    let (first, second) = DsqlEmulator::start_pair().await.unwrap();
    let connect = async |emulator: &DsqlEmulator| {
        DsqlConnector::new(emulator.config_for("admin").build().unwrap())
            .await
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    let (east1, east2) = (connect(&first).await, connect(&second).await);
    east1
        .batch_execute("CREATE TABLE rules_pair (id int PRIMARY KEY)")
        .await
        .unwrap();
    east2
        .batch_execute("SELECT * FROM rules_pair")
        .await
        .unwrap();
    east1
        .batch_execute("ALTER TABLE rules_pair ADD COLUMN note text")
        .await
        .unwrap();
    let error = east2
        .batch_execute("SELECT * FROM rules_pair")
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&error),
        (
            "40001".into(),
            "schema has been updated by another transaction (OC001)".into()
        )
    );
    east2
        .batch_execute("SELECT * FROM rules_pair")
        .await
        .unwrap();
}

/// The emulator prepares its PostgreSQL for the rules when it starts: an upstream that accepts
/// the connection and never answers fails the start within a bound, and says why.
#[tokio::test]
async fn an_upstream_that_never_answers_fails_the_start() {
    // A listener nobody accepts on: connections complete and then hear nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let start = DsqlEmulator::builder()
        .upstream_url(format!(
            "host=127.0.0.1 port={port} user=admin dbname=postgres"
        ))
        .start();
    let started = tokio::time::timeout(std::time::Duration::from_secs(60), start)
        .await
        .expect("the start gives up on its own");
    let error = started.expect_err("the start fails").to_string();
    assert!(
        error.contains("cannot prepare the upstream PostgreSQL") && error.contains("no answer"),
        "{error}"
    );
    drop(silent);
}

/// A transaction age limit under a second is refused, naming the option.
#[tokio::test]
async fn a_transaction_age_limit_under_a_second_is_refused() {
    let error = DsqlEmulator::builder()
        .transaction_age_limit(std::time::Duration::from_millis(500))
        .start()
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        error.contains("transaction_age_limit") && error.contains("at least 1 s"),
        "{error}"
    );
}

/// An endpoint whose ASYNC builds take `delay`, a client, table `table (id, c)` and the job of
/// its `CREATE UNIQUE INDEX ASYNC <table>_c ON <table> (c)`.
async fn unique_build(
    delay: std::time::Duration,
    table: &str,
) -> (tokio_postgres_dsql::emulator::DsqlEmulator, Client, String) {
    let emulator = tokio_postgres_dsql::emulator::SharedPostgres::global()
        .unwrap()
        .endpoint()
        .index_build_delay(delay)
        .start()
        .await
        .unwrap();
    let client = crate::support::connect_to(&emulator, "admin")
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, c int)"))
        .await
        .unwrap();
    let job: String = client
        .query_one(
            &format!("CREATE UNIQUE INDEX ASYNC {table}_c ON {table} (c)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    (emulator, client, job)
}

/// A constraint may not use an ASYNC index before its build is done (§10, and the real
/// cluster's record: `ADD CONSTRAINT … UNIQUE USING INDEX` right after the build was submitted
/// answers 55000); the index works meanwhile (an upsert on it), other `ALTER TABLE`s too, and
/// `IF NOT EXISTS` of an index that exists builds nothing (its job is done at once).
#[tokio::test]
async fn a_constraint_may_not_use_an_index_whose_build_is_not_done() {
    // Longer than the test: no statement here comes after a build is done.
    let (_emulator, client, job) =
        unique_build(std::time::Duration::from_secs(600), "rules_later").await;
    let early = client
        .batch_execute(
            "ALTER TABLE rules_later ADD CONSTRAINT rules_later_c UNIQUE USING INDEX rules_later_c",
        )
        .await
        .unwrap_err();
    let early = early.as_db_error().expect("a database error");
    assert_eq!(early.code().code(), "55000");
    assert_eq!(early.message(), "index \"rules_later_c\" is not valid");
    client
        .batch_execute("INSERT INTO rules_later VALUES (1, 7) ON CONFLICT (c) DO NOTHING")
        .await
        .unwrap();
    client
        .batch_execute("ALTER TABLE rules_later ADD COLUMN note text")
        .await
        .unwrap();
    // A foreign key to the index's columns does not hold up the referencing table's changes.
    client
        .batch_execute(
            "CREATE TABLE rules_later_child (id int PRIMARY KEY, c int REFERENCES rules_later (c))",
        )
        .await
        .unwrap();
    client
        .batch_execute("ALTER TABLE rules_later_child ADD COLUMN note text")
        .await
        .unwrap();
    let status: String = client
        .query_one("SELECT status FROM sys.jobs WHERE job_id = $1", &[&job])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "submitted");
    let again: String = client
        .query_one(
            "CREATE UNIQUE INDEX ASYNC IF NOT EXISTS rules_later_pkey ON rules_later (id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let status: String = client
        .query_one("SELECT status FROM sys.jobs WHERE job_id = $1", &[&again])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "completed", "nothing to build: done at once");
    let done: bool = client
        .query_one("CALL sys.wait_for_job($1)", &[&again])
        .await
        .unwrap()
        .get(0);
    assert!(done, "nothing to build: done at once");
}

/// Once `sys.wait_for_job` says the build is done, a constraint may use the index.
#[tokio::test]
async fn once_its_build_is_done_a_constraint_may_use_the_index() {
    let (_emulator, client, job) =
        unique_build(std::time::Duration::from_millis(500), "rules_built").await;
    let done: bool = client
        .query_one("CALL sys.wait_for_job($1)", &[&job])
        .await
        .unwrap()
        .get(0);
    assert!(done);
    client
        .batch_execute(
            "ALTER TABLE rules_built ADD CONSTRAINT rules_built_c UNIQUE USING INDEX rules_built_c",
        )
        .await
        .unwrap();
}

/// What a build or a validation meets fails its job, not its statement (§10, B and M): the
/// job is `failed` with the violation in `details`, `sys.wait_for_job` answers `f` (`t` for a
/// job that succeeded), and a unique index whose build failed stays, not valid, checking later
/// writes against the rows written since; a later `CREATE … IF NOT EXISTS` of it builds
/// nothing.
#[tokio::test]
async fn a_failed_job_is_reported_and_its_unique_index_stays_invalid_and_enforcing() {
    let emulator = crate::support::own_endpoint().await;
    let client = crate::support::connect_to(&emulator, "admin")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE rules_dup (id int PRIMARY KEY, c int)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO rules_dup VALUES (1, 5), (2, 5)")
        .await
        .unwrap();
    let job = |sql: &'static str| {
        let client = &client;
        async move {
            let id: String = client.query_one(sql, &[]).await.unwrap().get(0);
            let done: bool = client
                .query_one("CALL sys.wait_for_job($1)", &[&id])
                .await
                .unwrap()
                .get(0);
            let row = client
                .query_one(
                    "SELECT status, coalesce(details, ''), job_type FROM sys.jobs WHERE job_id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            (
                done,
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
            )
        }
    };
    let valid = || async {
        client
            .query_one(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = 'rules_dup_c'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    };

    let (done, status, details, kind) =
        job("CREATE UNIQUE INDEX ASYNC rules_dup_c ON rules_dup (c)").await;
    assert_eq!(
        (done, status.as_str(), kind.as_str()),
        (false, "failed", "INDEX_BUILD")
    );
    assert!(
        details.contains("could not create unique index"),
        "{details}"
    );
    assert!(!valid().await, "the failed build's index stays, not valid");
    client
        .batch_execute("INSERT INTO rules_dup VALUES (3, 7)")
        .await
        .unwrap();
    let duplicate = client
        .batch_execute("INSERT INTO rules_dup VALUES (4, 7)")
        .await
        .unwrap_err();
    assert_eq!(duplicate.as_db_error().unwrap().code().code(), "23505");
    let (done, status, _, _) =
        job("CREATE UNIQUE INDEX ASYNC IF NOT EXISTS rules_dup_c ON rules_dup (c)").await;
    assert_eq!((done, status.as_str()), (true, "completed"));
    assert!(
        !valid().await,
        "IF NOT EXISTS builds nothing: still not valid"
    );
    // Not made valid by a later ALTER TABLE either.
    client
        .batch_execute("ALTER TABLE rules_dup ADD COLUMN note text")
        .await
        .unwrap();
    assert!(!valid().await);

    client
        .batch_execute("ALTER TABLE rules_dup ADD CONSTRAINT rules_dup_big CHECK (c > 6) NOT VALID")
        .await
        .unwrap();
    let (done, status, details, kind) =
        job("ALTER TABLE ASYNC rules_dup VALIDATE CONSTRAINT rules_dup_big").await;
    assert_eq!(
        (done, status.as_str(), kind.as_str()),
        (false, "failed", "VALIDATE_CONSTRAINT")
    );
    assert!(details.contains("rules_dup_big"), "{details}");

    let (done, status, _, _) = job("CREATE INDEX ASYNC rules_dup_id ON rules_dup (id)").await;
    assert_eq!((done, status.as_str()), (true, "completed"));

    // The helper that keeps a failed build's index acts on nothing else.
    client
        .batch_execute("SELECT sys.dsql_emulator_keep_failed_index('rules_dup_pkey'::regclass)")
        .await
        .unwrap();
    let pkey_valid: bool = client
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'rules_dup_pkey'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(pkey_valid);
}

/// DSQL's object limits (§10, B): 1 000 tables, and 5 extended statistics a table (the
/// messages are not recorded: 54000, inferred words).
#[tokio::test]
async fn a_cluster_has_at_most_1000_tables_and_a_table_5_statistics() {
    let emulator = crate::support::own_endpoint().await;
    let client = crate::support::connect_to(&emulator, "admin")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE rules_st (a int PRIMARY KEY, b int, c int)")
        .await
        .unwrap();
    for (n, columns) in ["a, b", "a, c", "b, c", "a, b, c", "c, a, b"]
        .iter()
        .enumerate()
    {
        client
            .batch_execute(&format!(
                "CREATE STATISTICS rules_st{n} ON {columns} FROM rules_st"
            ))
            .await
            .unwrap();
    }
    let sixth = client
        .batch_execute("CREATE STATISTICS rules_st6 ON b, a FROM rules_st")
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&sixth),
        (
            "54000".into(),
            "more than 5 extended statistics per table are not allowed".into()
        )
    );
    // 999 more tables, each in its own transaction, then one too many.
    for n in 2..=1000 {
        client
            .batch_execute(&format!("CREATE TABLE rules_many{n} (id int PRIMARY KEY)"))
            .await
            .unwrap();
    }
    let too_many = client
        .batch_execute("CREATE TABLE rules_many1001 (id int PRIMARY KEY)")
        .await
        .unwrap_err();
    assert_eq!(
        code_of(&too_many),
        ("54000".into(), "more than 1000 tables not allowed".into())
    );
    client
        .batch_execute("DROP TABLE rules_many2")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE rules_many1001 (id int PRIMARY KEY)")
        .await
        .unwrap();
}

/// An autocommit write pinned by a unique index goes without the relay's wrapping transaction
/// (`EmulatorStats::key_bounded_writes`), and DSQL's 3 000-row limit still holds for every
/// write, whatever its `WHERE`: a property over random `WHERE`s, both protocols, and unique
/// indexes dropped (through the emulator) and created again, with rows that make a formerly
/// unique column match 3 001. Invariant: a write that matches over 3 000 rows fails with
/// `54000` and changes nothing; any other writes exactly the rows it matches. Seeds 1–3 run
/// here; `DSQL_PINNED_SEEDS=n` runs `n` more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_autocommit_writes_keep_the_row_limit() {
    let extra: u64 = std::env::var("DSQL_PINNED_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for seed in 1..=3 + extra {
        pinned_writes(seed).await;
    }
}

async fn pinned_writes(seed: u64) {
    const ROWS: i64 = 3001;
    let endpoint = crate::support::own_endpoint().await;
    let (plain, connection) =
        tokio_postgres::connect(&endpoint.upstream_url("admin"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let client = crate::support::connect_to(&endpoint, "admin")
        .await
        .unwrap();
    for ddl in [
        "CREATE TABLE pin (k bigint PRIMARY KEY, a bigint NOT NULL, b bigint NOT NULL, \
         c bigint NOT NULL, u bigint, v bigint NOT NULL DEFAULT 0)",
        "CREATE UNIQUE INDEX ASYNC pin_ab ON pin (a, b)",
        "CREATE UNIQUE INDEX ASYNC pin_u ON pin (u)",
    ] {
        client.batch_execute(ddl).await.unwrap();
    }
    plain
        .batch_execute(&format!(
            "INSERT INTO pin (k, a, b, c, u) SELECT k, 1, k, 7, k FROM generate_series(1, {ROWS}) k"
        ))
        .await
        .unwrap();
    // The first pinned write teaches the relay the table's unique indexes in the background;
    // once it has, a pinned write through either protocol goes without its transaction.
    let bounded = || endpoint.stats().key_bounded_writes;
    let pinned = "UPDATE pin SET v = v + 1 WHERE k = 1";
    let mut learnt = false;
    for _ in 0..200 {
        let before = bounded();
        client.batch_execute(pinned).await.unwrap();
        if bounded() > before {
            learnt = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        learnt,
        "seed {seed}: the relay never learnt pin's unique indexes"
    );
    let before = bounded();
    let one: i64 = 2;
    assert_eq!(
        client
            .execute("UPDATE pin SET v = v + 1 WHERE k = $1", &[&one])
            .await
            .unwrap(),
        1
    );
    assert_eq!(bounded(), before + 1, "seed {seed}: extended, unwrapped");
    let mut rng = fastrand::Rng::with_seed(seed);
    // Whether `pin_u` exists (else every row's `u` is 5).
    let mut u_unique = true;
    for case in 0..60 {
        if rng.u8(..10) == 0 {
            if u_unique {
                client.batch_execute("DROP INDEX pin_u").await.unwrap();
                plain.batch_execute("UPDATE pin SET u = 5").await.unwrap();
            } else {
                plain.batch_execute("UPDATE pin SET u = k").await.unwrap();
                client
                    .batch_execute("CREATE UNIQUE INDEX ASYNC pin_u ON pin (u)")
                    .await
                    .unwrap();
            }
            u_unique = !u_unique;
        }
        let x = rng.i64(1..=ROWS + 2);
        let (condition, params): (String, Vec<i64>) = match rng.u8(..15) {
            0 => (format!("k = {x}"), vec![]),
            1 => ("k = $1".into(), vec![x]),
            2 => (format!("u = {}", if rng.bool() { 5 } else { x }), vec![]),
            3 => ("u = $1".into(), vec![if rng.bool() { 5 } else { x }]),
            4 => (format!("a = 1 AND b = {x}"), vec![]),
            5 => ("b = $1 AND a = $2".into(), vec![x, 1]),
            6 => ("a = 1".into(), vec![]),
            7 => ("c = 7 AND a = 1".into(), vec![]),
            8 => (format!("c = 7 AND k = {x}"), vec![]),
            9 => (format!("pin.k = {x}"), vec![]),
            10 => (format!("k = {x} OR c = 7"), vec![]),
            11 => ("a = 1 AND b > 0".into(), vec![]),
            12 => (format!("(a = 1 AND c = 7) AND b = {x}"), vec![]),
            13 => (
                format!("u = '{}'::bigint", if rng.bool() { 5 } else { x }),
                vec![],
            ),
            _ => ("c = $1".into(), vec![7]),
        };
        let sql = format!("UPDATE pin SET v = v + 1 WHERE {condition}");
        let count =
            format!("SELECT count(*), coalesce(sum(v), 0)::bigint FROM pin WHERE {condition}");
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let before = plain.query_one(&count, &refs).await.unwrap();
        let (matched, sum_before): (i64, i64) = (before.get(0), before.get(1));
        let extended = !params.is_empty() || rng.bool();
        let outcome = if extended {
            client.execute(&sql, &refs).await.map(|n| n as i64)
        } else {
            client.batch_execute(&sql).await.map(|()| -1)
        };
        let after = plain.query_one(&count, &refs).await.unwrap();
        let sum_after: i64 = after.get(1);
        let what = format!("seed {seed} (DSQL_PINNED_SEEDS) case {case}: {sql} {params:?}");
        if matched > 3000 {
            let error = outcome.expect_err(&what);
            assert_eq!(code_of(&error).0, "54000", "{what}: {error}");
            assert_eq!(sum_after, sum_before, "{what}: nothing changed");
        } else {
            let written = outcome.unwrap_or_else(|e| panic!("{what}: {e}"));
            if extended {
                assert_eq!(written, matched, "{what}");
            }
            assert_eq!(sum_after, sum_before + matched, "{what}");
        }
    }
}
