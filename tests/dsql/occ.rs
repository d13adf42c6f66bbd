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
        Shape::CommentedCommit if round % 2 == 0 => f.simple("/* app:checkout */ COMMIT").await,
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
