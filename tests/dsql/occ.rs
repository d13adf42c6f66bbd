//! Optimistic concurrency as DSQL decides it (`DSQL_SQL_RULES.md` §6), whatever the driver
//! sends: two writers of one row, in both commit orders, through the message sequences of
//! pgJDBC, libpq, Npgsql and node-postgres (raw frontend messages, [`crate::frontend`]): the
//! first to COMMIT commits, the other's COMMIT fails with `40001 … (OC000)`, and the row holds
//! the winner's value. Then locking reads (`FOR UPDATE`) guarding a check-then-insert,
//! concurrent DDL, and counters through the retry helpers.

use crate::frontend::{Answer, Frontend};
use crate::sql_rules::{rules_connector, rules_emulator};
use crate::support::{each, upstream};

const OC000: &str = "change conflicts with another transaction (OC000)";

/// How a driver opens a transaction, writes, and commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Simple queries: psql, node-postgres without values, `batch_execute`.
    Simple,
    /// libpq's `PQexecParams` (and node-postgres with values): each statement
    /// Parse/Bind/Describe/Execute/Sync with the unnamed statement, COMMIT too.
    Unnamed,
    /// Prepared statements (Npgsql, tokio-postgres): Parse/Describe/Sync of a named
    /// statement, then Bind/Execute/Sync; COMMIT prepared the same way.
    Named,
    /// pgJDBC with autocommit off: BEGIN goes in the same extended batch as the first
    /// statement; COMMIT through the extended protocol.
    JdbcBatchedBegin,
    /// COMMIT at the end of a multi-statement simple query.
    CommitInMultiStatement,
    /// COMMIT behind a comment (ORMs tag their statements), and its spelling END.
    CommentedCommit,
}

const SHAPES: [Shape; 6] = [
    Shape::Simple,
    Shape::Unnamed,
    Shape::Named,
    Shape::JdbcBatchedBegin,
    Shape::CommitInMultiStatement,
    Shape::CommentedCommit,
];

/// Opens a transaction and sets row 1 of `occ_matrix` to `value`; returns the write's answer.
async fn begin_and_write(f: &mut Frontend, shape: Shape, value: i32) -> Answer {
    let update = "UPDATE occ_matrix SET v = $1 WHERE id = 1";
    let value = value.to_string();
    match shape {
        Shape::Simple | Shape::CommitInMultiStatement | Shape::CommentedCommit => {
            let begin = f.simple("BEGIN").await;
            assert_eq!(begin.tags(), ["BEGIN"], "{begin:?}");
            f.simple(&format!("UPDATE occ_matrix SET v = {value} WHERE id = 1"))
                .await
        }
        Shape::Unnamed => {
            let begin = f.extended("BEGIN", &[]).await;
            assert_eq!(begin.tags(), ["BEGIN"], "{begin:?}");
            f.extended(update, &[&value]).await
        }
        Shape::Named => {
            let prepared = f
                .parse("w", update)
                .describe_statement("w")
                .sync()
                .flush_and_answer()
                .await;
            assert_eq!(prepared.error(), None, "{prepared:?}");
            let begin = f.simple("BEGIN").await;
            assert_eq!(begin.tags(), ["BEGIN"], "{begin:?}");
            f.bind("w", &[&value])
                .execute()
                .sync()
                .flush_and_answer()
                .await
        }
        Shape::JdbcBatchedBegin => {
            let answer = f
                .parse("", "BEGIN")
                .bind("", &[])
                .execute()
                .parse("", update)
                .bind("", &[&value])
                .describe_portal()
                .execute()
                .sync()
                .flush_and_answer()
                .await;
            assert_eq!(answer.tags().first().map(String::as_str), Some("BEGIN"));
            answer
        }
    }
}

/// Commits the open transaction.
async fn commit(f: &mut Frontend, shape: Shape, round: usize) -> Answer {
    match shape {
        Shape::Simple => f.simple("COMMIT").await,
        Shape::Unnamed | Shape::JdbcBatchedBegin => {
            f.parse("", "COMMIT")
                .bind("", &[])
                .execute()
                .sync()
                .flush_and_answer()
                .await
        }
        Shape::Named => {
            let prepared = f
                .parse("c", "COMMIT")
                .describe_statement("c")
                .sync()
                .flush_and_answer()
                .await;
            assert_eq!(prepared.error(), None, "{prepared:?}");
            f.bind("c", &[]).execute().sync().flush_and_answer().await
        }
        Shape::CommitInMultiStatement => f.simple("SELECT 1; COMMIT").await,
        Shape::CommentedCommit if round.is_multiple_of(2) => {
            f.simple("/* app:checkout */ COMMIT").await
        }
        Shape::CommentedCommit => f.simple("-- app\nEND").await,
    }
}

async fn row_value() -> i32 {
    upstream()
        .await
        .query_one("SELECT v FROM occ_matrix WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0)
}

/// The test matrix of issue 19: every shape, both commit orders, same-shape and mixed pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_committer_wins_whatever_the_driver_sends() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS occ_matrix",
            "CREATE TABLE occ_matrix (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO occ_matrix VALUES (1, 0), (2, 0)",
        ],
    )
    .await;
    let emulator = rules_emulator();
    let mut round = 0;
    let mut failures = Vec::new();
    for (i, &a_shape) in SHAPES.iter().enumerate() {
        for b_shape in [a_shape, SHAPES[(i + 1) % SHAPES.len()]] {
            for a_commits_first in [true, false] {
                round += 1;
                let (a_value, b_value) = (round as i32 * 10 + 1, round as i32 * 10 + 2);
                let mut a = Frontend::connect(emulator).await;
                let mut b = Frontend::connect(emulator).await;
                let wa = begin_and_write(&mut a, a_shape, a_value).await;
                let wb = begin_and_write(&mut b, b_shape, b_value).await;
                let case = format!(
                    "A {a_shape:?}, B {b_shape:?}, {} commits first",
                    if a_commits_first { "A" } else { "B" }
                );
                // Both writes answer at once with their tag; neither is told of the other.
                for (who, w) in [("A", &wa), ("B", &wb)] {
                    if w.error().is_some() || !w.tags().contains(&"UPDATE 1".to_owned()) {
                        failures.push(format!("{case}: {who}'s write answered {w:?}"));
                    }
                }
                let (first, second, winner) = if a_commits_first {
                    (&mut a, &mut b, a_value)
                } else {
                    (&mut b, &mut a, b_value)
                };
                let (first_shape, second_shape) = if a_commits_first {
                    (a_shape, b_shape)
                } else {
                    (b_shape, a_shape)
                };
                let c1 = commit(first, first_shape, round).await;
                let c2 = commit(second, second_shape, round).await;
                if c1.error().is_some() || c1.status() != b'I' {
                    failures.push(format!("{case}: the first COMMIT answered {c1:?}"));
                }
                if c2.error() != Some(("40001".into(), OC000.into())) || c2.status() != b'I' {
                    failures.push(format!("{case}: the second COMMIT answered {c2:?}"));
                }
                let v = row_value().await;
                if v != winner {
                    failures.push(format!(
                        "{case}: the row holds {v}, the winner wrote {winner}"
                    ));
                }
                // Both sessions are out of their transactions and usable.
                for f in [&mut a, &mut b] {
                    let next = f.simple("SELECT 1").await;
                    if next.error().is_some() || next.status() != b'I' {
                        failures.push(format!("{case}: the next statement answered {next:?}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {round} schedules deviate from DSQL:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Write skew guarded by a locking read (§6): 16 tasks book one room, each checking for a
/// booking after `SELECT … FOR UPDATE` of the room, then inserting one. On DSQL a row read
/// `FOR UPDATE` is validated at COMMIT like a written row, so exactly one booking commits;
/// the others fail with `OC000`. Twenty rounds, through the extended protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locking_read_guards_check_then_insert() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS occ_rooms",
            "DROP TABLE IF EXISTS occ_bookings",
            "CREATE TABLE occ_rooms (id int PRIMARY KEY, name text)",
            "CREATE TABLE occ_bookings (id uuid PRIMARY KEY, room int NOT NULL, night int NOT NULL)",
            "INSERT INTO occ_rooms VALUES (1, 'blue')",
        ],
    )
    .await;
    let connector = rules_connector().await;
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(std::sync::Arc::new(connector.connect().await.unwrap()));
    }
    for night in 0..20 {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
        let mut tasks = tokio::task::JoinSet::new();
        for client in &clients {
            let (client, barrier) = (client.clone(), barrier.clone());
            tasks.spawn(async move {
                client.batch_execute("BEGIN").await.unwrap();
                client
                    .query_one(
                        "SELECT name FROM occ_rooms WHERE id = $1 FOR UPDATE",
                        &[&1i32],
                    )
                    .await
                    .unwrap();
                let taken: i64 = client
                    .query_one(
                        "SELECT count(*) FROM occ_bookings WHERE room = $1 AND night = $2",
                        &[&1i32, &night],
                    )
                    .await
                    .unwrap()
                    .get(0);
                // Everyone has checked before anyone commits.
                barrier.wait().await;
                if taken == 0 {
                    client
                        .execute(
                            "INSERT INTO occ_bookings VALUES ($1, $2, $3)",
                            &[&uuid::Uuid::new_v4(), &1i32, &night],
                        )
                        .await
                        .unwrap();
                }
                match client.batch_execute("COMMIT").await {
                    Ok(()) => Ok(taken == 0),
                    Err(e) => Err(e
                        .as_db_error()
                        .map(|d| (d.code().code().to_owned(), d.message().to_owned()))),
                }
            });
        }
        let mut won = 0;
        while let Some(outcome) = tasks.join_next().await {
            match outcome.unwrap() {
                Ok(booked) => won += usize::from(booked),
                Err(error) => assert_eq!(
                    error,
                    Some(("40001".to_owned(), OC000.to_owned())),
                    "a loser fails with OC000"
                ),
            }
        }
        let bookings: i64 = upstream()
            .await
            .query_one(
                "SELECT count(*) FROM occ_bookings WHERE night = $1",
                &[&night],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (won, bookings),
            (1, 1),
            "night {night}: exactly one booking commits"
        );
    }
}

/// A locking read conflicts with a write of its row, in either commit order (§6), and a read
/// `FOR UPDATE` never waits for the row's writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locking_read_and_a_write_of_its_row_conflict_at_commit() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS occ_locked",
            "CREATE TABLE occ_locked (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO occ_locked VALUES (1, 0)",
        ],
    )
    .await;
    let emulator = rules_emulator();
    for reader_first in [true, false] {
        let mut reader = Frontend::connect(emulator).await;
        let mut writer = Frontend::connect(emulator).await;
        reader.simple("BEGIN").await;
        writer.simple("BEGIN").await;
        let written = writer
            .simple("UPDATE occ_locked SET v = v + 1 WHERE id = 1")
            .await;
        assert_eq!(written.tags(), ["UPDATE 1"]);
        let read = reader
            .extended("SELECT v FROM occ_locked WHERE id = $1 FOR UPDATE", &["1"])
            .await;
        assert_eq!(
            read.error(),
            None,
            "the locking read does not wait: {read:?}"
        );
        assert_eq!(read.tags(), ["SELECT 1"]);
        let (first, second) = if reader_first {
            (&mut reader, &mut writer)
        } else {
            (&mut writer, &mut reader)
        };
        let c1 = first.simple("COMMIT").await;
        let c2 = second.simple("COMMIT").await;
        assert_eq!(c1.error(), None, "reader first: {reader_first}: {c1:?}");
        assert_eq!(
            c2.error(),
            Some(("40001".into(), OC000.into())),
            "reader first: {reader_first}: {c2:?}"
        );
    }
}

/// Two services creating their schema at once: one CREATE TABLE succeeds, the other gets
/// `OC001` or succeeds as `IF NOT EXISTS` says: never PostgreSQL's catalog errors (`42710`,
/// `23505 … pg_type_typname_nsp_index`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ddl_on_one_object_ends_in_oc001() {
    let connector = rules_connector().await;
    let a = connector.connect().await.unwrap();
    let b = connector.connect().await.unwrap();
    for round in 0..10 {
        let table = format!("occ_ddl_race_{round}");
        upstream()
            .await
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await
            .unwrap();
        let ddl = format!("CREATE TABLE IF NOT EXISTS {table} (id uuid PRIMARY KEY, v text)");
        let (ra, rb) = tokio::join!(a.batch_execute(&ddl), b.batch_execute(&ddl));
        let mut succeeded = 0;
        for result in [ra, rb] {
            match result {
                Ok(()) => succeeded += 1,
                Err(e) => {
                    let db = e.as_db_error().expect("a server error");
                    assert_eq!(
                        (db.code().code(), db.message()),
                        (
                            "40001",
                            "schema has been updated by another transaction (OC001)"
                        ),
                        "round {round}"
                    );
                }
            }
        }
        assert!(succeeded >= 1, "round {round}: one CREATE TABLE succeeds");
    }
    // Without a race, an "already exists" about another object the statement creates (a
    // constraint's index) is PostgreSQL's own answer, as on DSQL: not a conflict to retry.
    let create = |table: &str| {
        format!("CREATE TABLE IF NOT EXISTS {table} (id int, CONSTRAINT occ_dup PRIMARY KEY (id))")
    };
    a.batch_execute(&create("occ_ddl_named")).await.unwrap();
    let error = a.batch_execute(&create("occ_ddl_other")).await.unwrap_err();
    let db = error.as_db_error().expect("a server error");
    assert_eq!(
        (db.code().code(), db.message()),
        ("42P07", "relation \"occ_dup\" already exists")
    );
}

/// State the relay cannot see in the statement text follows the server: an error inside a
/// multi-statement transaction leaves the block failed (not autocommit), a FunctionCall gets
/// its answer, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_transaction_state_follows_the_server() {
    let mut f = Frontend::connect(rules_emulator()).await;
    let failed = f.simple("BEGIN; SELECT 1/0; COMMIT").await;
    assert_eq!(failed.error().map(|e| e.0), Some("22012".into()));
    assert_eq!(failed.status(), b'E', "the block failed: {failed:?}");
    let next = f.simple("SELECT 1").await;
    assert_eq!(next.error().map(|e| e.0), Some("25P02".into()), "{next:?}");
    let rollback = f.simple("ROLLBACK").await;
    assert_eq!(
        (rollback.tags(), rollback.status()),
        (vec!["ROLLBACK".into()], b'I')
    );
    // A FunctionCall (libpq's PQfn, large objects): int4abs(-5), answered with its own
    // ReadyForQuery, and the next query is answered as itself.
    let oid: i32 = 1397; // int4abs
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&1u16.to_be_bytes()); // one argument format: binary
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&1u16.to_be_bytes()); // one argument
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&(-5i32).to_be_bytes());
    body.extend_from_slice(&1u16.to_be_bytes()); // binary result
    let called = f.message(b'F', &body).flush_and_answer().await;
    assert_eq!(called.shape(), "VZ", "{called:?}");
    assert_eq!(called.messages[0].body[4..], 5i32.to_be_bytes());
    let next = f.simple("SELECT 42").await;
    assert_eq!(next.values(), [Some("42".to_owned())]);
    // A transaction whose COMMIT travels with its statements still commits.
    let whole = f.simple("BEGIN; SELECT 1; COMMIT").await;
    assert_eq!(whole.tags(), ["BEGIN", "SELECT 1", "COMMIT"], "{whole:?}");
    assert_eq!(whole.status(), b'I');
}

/// Lock waits that are not a row conflict are not conflicts: a DDL waiting for the table lock
/// of an open transaction that read the table goes through (on DSQL it never waits; that
/// transaction then fails with `OC001`), and an `ANALYZE` waiting for another session's DDL
/// waits for it, neither answered `OC000`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_and_analyze_wait_for_table_locks_instead_of_failing() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS occ_ddl_wait",
            "CREATE TABLE occ_ddl_wait (id int PRIMARY KEY, v int)",
            "INSERT INTO occ_ddl_wait VALUES (1, 1)",
        ],
    )
    .await;
    let connector = rules_connector().await;
    let reader = connector.connect().await.unwrap();
    let ddl = connector.connect().await.unwrap();
    reader.batch_execute("BEGIN").await.unwrap();
    reader
        .query_one("SELECT v FROM occ_ddl_wait WHERE id = 1", &[])
        .await
        .unwrap();
    // The reader holds its table lock; the DDL is not refused for it.
    ddl.batch_execute("ALTER TABLE occ_ddl_wait ADD COLUMN w text")
        .await
        .expect("the DDL goes through");
    let commit = reader.batch_execute("COMMIT").await.unwrap_err();
    let db = commit.as_db_error().unwrap();
    assert_eq!(
        (db.code().code(), db.message()),
        (
            "40001",
            "schema has been updated by another transaction (OC001)"
        )
    );
    // The same through the extended protocol (pgJDBC's executeUpdate of DDL).
    reader.batch_execute("BEGIN").await.unwrap();
    reader
        .query_one("SELECT v FROM occ_ddl_wait WHERE id = 1", &[])
        .await
        .unwrap();
    ddl.execute("ALTER TABLE occ_ddl_wait ADD COLUMN x text", &[])
        .await
        .expect("the DDL goes through");
    assert!(reader.batch_execute("COMMIT").await.is_err());

    // ANALYZE waits for a DDL in progress in another session's block, then runs.
    ddl.batch_execute("BEGIN").await.unwrap();
    ddl.batch_execute("ALTER TABLE occ_ddl_wait ADD COLUMN y text")
        .await
        .unwrap();
    let analyze = tokio::spawn({
        let connector = connector.clone();
        async move {
            let client = connector.connect().await.unwrap();
            client.batch_execute("ANALYZE occ_ddl_wait").await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    ddl.batch_execute("COMMIT").await.unwrap();
    analyze
        .await
        .unwrap()
        .expect("ANALYZE waits for the lock instead of failing");
    // The other session's next statement on the table is told of the change, once (§6).
    let told = reader
        .batch_execute("SELECT v FROM occ_ddl_wait")
        .await
        .unwrap_err();
    assert_eq!(
        told.code(),
        Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
    );
    // The session's lock timeout is back to the relay's: a write still never waits.
    reader.batch_execute("BEGIN").await.unwrap();
    ddl.batch_execute("BEGIN").await.unwrap();
    reader
        .batch_execute("UPDATE occ_ddl_wait SET v = 2 WHERE id = 1")
        .await
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(2),
        ddl.batch_execute("UPDATE occ_ddl_wait SET v = 3 WHERE id = 1"),
    )
    .await
    .expect("the second write answers at once")
    .unwrap();
    reader.batch_execute("COMMIT").await.unwrap();
    assert!(ddl.batch_execute("COMMIT").await.is_err());
}

/// Two transactions that each hold a row the other wrote afterwards, committing at once: their
/// validations may deadlock in PostgreSQL; exactly one commits, the other gets `OC000`, and the
/// rows hold the winner's values. Ten rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossed_writers_committing_at_once_end_with_one_winner() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS occ_crossed",
            "CREATE TABLE occ_crossed (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO occ_crossed VALUES (1, 0), (2, 0)",
        ],
    )
    .await;
    let connector = rules_connector().await;
    let a = connector.connect().await.unwrap();
    let b = connector.connect().await.unwrap();
    for round in 1..=10 {
        let (va, vb) = (round * 10 + 1, round * 10 + 2);
        for (client, first, value) in [(&a, 1, va), (&b, 2, vb)] {
            client.batch_execute("BEGIN").await.unwrap();
            client
                .execute(
                    "UPDATE occ_crossed SET v = $1 WHERE id = $2",
                    &[&value, &first],
                )
                .await
                .unwrap();
        }
        for (client, second, value) in [(&a, 2, va), (&b, 1, vb)] {
            let n = client
                .execute(
                    "UPDATE occ_crossed SET v = $1 WHERE id = $2",
                    &[&value, &second],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
        let (ca, cb) = tokio::join!(a.batch_execute("COMMIT"), b.batch_execute("COMMIT"));
        let winner = match (&ca, &cb) {
            (Ok(()), Err(_)) => va,
            (Err(_), Ok(())) => vb,
            _ => panic!("round {round}: exactly one commits: {ca:?} {cb:?}"),
        };
        for e in [ca.err(), cb.err()].into_iter().flatten() {
            let db = e.as_db_error().unwrap();
            assert_eq!((db.code().code(), db.message()), ("40001", OC000));
        }
        let rows = upstream()
            .await
            .query("SELECT v FROM occ_crossed ORDER BY id", &[])
            .await
            .unwrap();
        let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(values, [winner, winner], "round {round}");
    }
}

/// An autocommit write is a transaction that commits at once: meeting a row an open
/// transaction holds, it commits first (the open one fails at its COMMIT with `OC000`),
/// whether it is an unbounded UPDATE (simple or extended, unnamed statement), or a bounded
/// upsert through a named prepared statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autocommit_write_commits_first_against_an_open_transaction() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS occ_autocommit",
            "CREATE TABLE occ_autocommit (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO occ_autocommit VALUES (1, 0)",
        ],
    )
    .await;
    let emulator = rules_emulator();
    let client = rules_connector().await.connect().await.unwrap();
    let upsert =
        "INSERT INTO occ_autocommit VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET v = excluded.v";
    for (round, shape) in ["simple", "unnamed", "named upsert", "parsed in the batch"]
        .into_iter()
        .enumerate()
    {
        let value = round as i32 + 100;
        let mut open = Frontend::connect(emulator).await;
        open.simple("BEGIN").await;
        let held = open
            .simple("UPDATE occ_autocommit SET v = -1 WHERE id = 1")
            .await;
        assert_eq!(held.tags(), ["UPDATE 1"]);
        let mut f = Frontend::connect(emulator).await;
        let answer = match shape {
            "simple" => {
                f.simple(&format!(
                    "UPDATE occ_autocommit SET v = {value} WHERE id = 1"
                ))
                .await
            }
            "unnamed" => {
                f.extended(
                    "UPDATE occ_autocommit SET v = $1 WHERE id = 1",
                    &[&value.to_string()],
                )
                .await
            }
            "parsed in the batch" => {
                let answer = f
                    .parse("up", upsert)
                    .bind("up", &[&value.to_string()])
                    .execute()
                    .sync()
                    .flush_and_answer()
                    .await;
                assert_eq!(answer.shape(), "12CZ", "{answer:?}");
                assert_eq!(answer.tags(), ["INSERT 0 1"]);
                // The statement exists once, parsed again by the relay's second run.
                let again = f
                    .bind("up", &[&value.to_string()])
                    .execute()
                    .sync()
                    .flush_and_answer()
                    .await;
                assert_eq!(again.tags(), ["INSERT 0 1"], "{again:?}");
                answer
            }
            _ => {
                let n = client
                    .execute(
                        "INSERT INTO occ_autocommit VALUES (1, $1) \
                         ON CONFLICT (id) DO UPDATE SET v = excluded.v",
                        &[&value],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1);
                f.simple("SELECT 1").await
            }
        };
        assert_eq!(answer.error(), None, "{shape}: {answer:?}");
        if shape == "simple" || shape == "unnamed" {
            assert_eq!(answer.tags(), ["UPDATE 1"], "{shape}: {answer:?}");
            assert_eq!(answer.status(), b'I');
        }
        let commit = open.simple("COMMIT").await;
        assert_eq!(
            commit.error(),
            Some(("40001".into(), OC000.into())),
            "{shape}: {commit:?}"
        );
        let v: i32 = upstream()
            .await
            .query_one("SELECT v FROM occ_autocommit WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, value, "{shape}");
        // Both sessions go on; the prepared statement works again.
        assert_eq!(
            open.simple("SELECT 2").await.values(),
            [Some("2".to_owned())]
        );
        client
            .execute(
                "INSERT INTO occ_autocommit VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET v = excluded.v",
                &[&value],
            )
            .await
            .unwrap();
    }
}
