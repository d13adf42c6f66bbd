//! No shape lets a `COMMIT` past its validation (issue 27): the two-session reproductions a
//! psycopg user met (a whole transaction in one simple query; libpq's pipeline mode with a
//! `Flush` before the `Sync`), in both commit orders; a `COMMIT` whose `Execute` is followed by
//! more than the relay's hold limit before its `Sync`; and a pending write followed by a later
//! write of the same row, which must not be undone by the replay. Raw frontend messages
//! ([`crate::frontend`]) on an endpoint of the test's own.

use crate::frontend::{Answer, Frontend};
use crate::history;
use tokio_postgres_dsql::emulator::DsqlEmulator;

const OC000: &str = "change conflicts with another transaction (OC000)";

async fn table(endpoint: &DsqlEmulator, value: i32) -> Frontend {
    let mut admin = Frontend::connect(endpoint).await;
    for statement in [
        "DROP TABLE IF EXISTS cp".to_owned(),
        "CREATE TABLE cp (k int PRIMARY KEY, v int NOT NULL)".to_owned(),
        format!("INSERT INTO cp VALUES (0, {value})"),
    ] {
        let answer = admin.simple(&statement).await;
        assert_eq!(answer.error(), None, "{statement}: {answer:?}");
    }
    admin
}

async fn value(admin: &mut Frontend) -> i32 {
    let answer = admin.simple("SELECT v FROM cp WHERE k = 0").await;
    answer.values()[0].as_deref().unwrap().parse().unwrap()
}

const INCREMENT: &str = "UPDATE cp SET v = v + 1 WHERE k = 0";

/// How the batched session sends its transaction.
#[derive(Debug, Clone, Copy)]
enum Batched {
    /// `BEGIN; UPDATE …; COMMIT` as one simple query (`psql -c`).
    MultiStatement,
    /// Parse/Bind/Execute(UPDATE), Parse/Bind/Execute(COMMIT), Flush, Sync (psycopg's
    /// `with conn.pipeline()` over libpq's pipeline mode).
    Pipeline,
}

/// The batched session's whole transaction (its BEGIN included).
fn send_whole(f: &mut Frontend, shape: Batched) {
    match shape {
        Batched::MultiStatement => {
            f.query(&format!("BEGIN; {INCREMENT}; COMMIT"));
        }
        Batched::Pipeline => {
            f.parse("", "BEGIN").bind("", &[]).execute();
            f.parse("", INCREMENT).bind("", &[]).execute();
            f.parse("", "COMMIT").bind("", &[]).execute();
            f.flush_message().sync();
        }
    }
}

/// Exactly one of the two COMMITs succeeded, the other failed with `OC000`.
fn one_winner(case: &str, first: &Answer, second: &Answer) {
    let ok =
        |a: &Answer| a.error().is_none() && a.tags().last().map(String::as_str) == Some("COMMIT");
    let lost = |a: &Answer| a.error() == Some(("40001".into(), OC000.into()));
    assert!(
        ok(first) && lost(second),
        "{case}: the first to commit wins, the second fails with OC000:\nfirst: {first:?}\nsecond: {second:?}"
    );
    assert_eq!((first.status(), second.status()), (b'I', b'I'), "{case}");
}

/// The reproductions, both shapes, both commit orders: exactly one COMMIT succeeds,
/// the other gets `40001 … (OC000)`, the row holds one increment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_transaction_in_one_request_commits_only_as_the_first_committer() {
    let endpoint = crate::support::own_endpoint().await;
    for shape in [Batched::MultiStatement, Batched::Pipeline] {
        // The batched session commits first, against a transaction left open before it.
        let mut admin = table(&endpoint, 0).await;
        let mut open = Frontend::connect(&endpoint).await;
        let mut batched = Frontend::connect(&endpoint).await;
        assert_eq!(open.simple("BEGIN").await.error(), None);
        assert_eq!(open.simple(INCREMENT).await.tags(), ["UPDATE 1"]);
        send_whole(&mut batched, shape);
        let whole = batched.flush_and_answer().await;
        let last = open.simple("COMMIT").await;
        one_winner(&format!("{shape:?}, batched commits first"), &whole, &last);
        assert_eq!(
            value(&mut admin).await,
            1,
            "{shape:?}, batched commits first"
        );

        // The batched session opens first (its BEGIN and write in one request, left open) and
        // commits second, after the other session's whole transaction.
        let mut admin = table(&endpoint, 0).await;
        let mut open = Frontend::connect(&endpoint).await;
        let mut batched = Frontend::connect(&endpoint).await;
        match shape {
            Batched::MultiStatement => {
                let answer = batched.simple(&format!("BEGIN; {INCREMENT}")).await;
                assert_eq!(answer.tags(), ["BEGIN", "UPDATE 1"], "{answer:?}");
            }
            Batched::Pipeline => {
                batched.parse("", "BEGIN").bind("", &[]).execute();
                batched.parse("", INCREMENT).bind("", &[]).execute();
                let answer = batched.sync().flush_and_answer().await;
                assert_eq!(answer.tags(), ["BEGIN", "UPDATE 1"], "{answer:?}");
            }
        }
        let first = open.simple(&format!("BEGIN; {INCREMENT}; COMMIT")).await;
        let second = match shape {
            Batched::MultiStatement => batched.simple("SELECT 1; COMMIT").await,
            Batched::Pipeline => {
                batched.parse("", "COMMIT").bind("", &[]).execute();
                batched.flush_message().sync().flush_and_answer().await
            }
        };
        one_winner(
            &format!("{shape:?}, batched commits second"),
            &first,
            &second,
        );
        assert_eq!(
            value(&mut admin).await,
            1,
            "{shape:?}, batched commits second"
        );
    }
}

/// Finding 1: a `COMMIT`'s `Execute` followed by a `Flush` (or by more than the relay's hold
/// limit) before its `Sync` is validated like any other: the session whose write is pending
/// commits first, and the transaction that held the row fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_flushed_or_held_past_the_limit_is_still_validated() {
    let endpoint = crate::support::own_endpoint().await;
    for over_limit in [false, true] {
        let case = if over_limit { "hold limit" } else { "Flush" };
        let mut admin = table(&endpoint, 0).await;
        let mut holder = Frontend::connect(&endpoint).await;
        let mut writer = Frontend::connect(&endpoint).await;
        assert_eq!(holder.simple("BEGIN").await.error(), None);
        assert_eq!(holder.simple(INCREMENT).await.tags(), ["UPDATE 1"]);
        assert_eq!(writer.simple("BEGIN").await.error(), None);
        // Meets the held row: pending, told its tag.
        let pending = writer.extended(INCREMENT, &[]).await;
        assert_eq!(pending.tags(), ["UPDATE 1"], "{case}: {pending:?}");
        writer.parse("", "COMMIT").bind("", &[]).execute();
        if over_limit {
            // 1.5 MiB of statements after the COMMIT's Execute, before the Sync.
            let big = "x".repeat(512 * 1024);
            for _ in 0..3 {
                writer.parse("", &format!("SELECT length('{big}')"));
            }
        } else {
            writer.flush_message();
        }
        let commit = writer.sync().flush_and_answer().await;
        let holder_commit = holder.simple("COMMIT").await;
        one_winner(case, &commit, &holder_commit);
        assert_eq!(value(&mut admin).await, 1, "{case}");
    }
}

/// Finding 2: a pending write followed by a later write of the same row in the same
/// transaction: both are applied in statement order at COMMIT (`SET v = 5` then
/// `SET v = v + 10`: 15), the later one is not overwritten by the replay of the earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_keeps_its_place_before_later_writes() {
    let endpoint = crate::support::own_endpoint().await;
    for extended in [false, true] {
        let mut admin = table(&endpoint, 0).await;
        let mut holder = Frontend::connect(&endpoint).await;
        let mut writer = Frontend::connect(&endpoint).await;
        let run = |f: &mut Frontend, text: &str| {
            if extended {
                f.parse("", text).bind("", &[]).execute().sync();
            } else {
                f.query(text);
            }
        };
        holder.simple("BEGIN").await;
        assert_eq!(
            holder
                .simple("UPDATE cp SET v = 100 WHERE k = 0")
                .await
                .tags(),
            ["UPDATE 1"]
        );
        writer.simple("BEGIN").await;
        run(&mut writer, "UPDATE cp SET v = 5 WHERE k = 0");
        assert_eq!(writer.flush_and_answer().await.tags(), ["UPDATE 1"]);
        assert_eq!(holder.simple("ROLLBACK").await.tags(), ["ROLLBACK"]);
        run(&mut writer, "UPDATE cp SET v = v + 10 WHERE k = 0");
        assert_eq!(writer.flush_and_answer().await.tags(), ["UPDATE 1"]);
        let commit = writer.simple("COMMIT").await;
        assert_eq!(commit.error(), None, "{commit:?}");
        assert_eq!(
            value(&mut admin).await,
            15,
            "extended: {extended}: the writes apply in statement order"
        );
    }
}

/// The seeds `cargo test` runs: 5 × 4 sessions × 60 transactions, across every shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_lose_no_acknowledged_write() {
    let mut failures = Vec::new();
    for seed in [1, 2, 3, 4, 5] {
        let endpoint = crate::support::own_endpoint().await;
        let report = history::run(&endpoint, &history::Config::new(seed, 4, 60)).await;
        eprintln!("{report}");
        for shape in history::SHAPES {
            assert!(
                report.by_shape.contains_key(&shape),
                "{shape:?} unused: {report}"
            );
        }
        if !report.ok() {
            failures.push(report.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A query that opens its block after other statements (`UPDATE …; BEGIN; …; COMMIT`): as in
/// PostgreSQL, the statements before the `BEGIN` belong to the block, so they commit with it,
/// and are undone with it when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_before_a_begin_in_one_query_belong_to_its_block() {
    let endpoint = crate::support::own_endpoint().await;
    let mut admin = table(&endpoint, 0).await;
    let mut f = Frontend::connect(&endpoint).await;
    let failed = f
        .simple(&format!("{INCREMENT}; BEGIN; SELECT 1 / 0; COMMIT"))
        .await;
    assert_eq!(
        failed.error().map(|e| e.0),
        Some("22012".to_owned()),
        "{failed:?}"
    );
    assert_eq!(failed.status(), b'E', "{failed:?}");
    assert_eq!(f.simple("ROLLBACK").await.status(), b'I');
    assert_eq!(value(&mut admin).await, 0, "undone with its block");
    let done = f
        .simple(&format!("{INCREMENT}; BEGIN; {INCREMENT}; COMMIT"))
        .await;
    assert_eq!(done.error(), None, "{done:?}");
    assert_eq!(done.tags(), ["UPDATE 1", "BEGIN", "UPDATE 1", "COMMIT"]);
    assert_eq!(done.status(), b'I');
    assert_eq!(value(&mut admin).await, 2, "committed with its block");
    // A failure before the BEGIN: the relay's block is rolled back, the client is in none.
    let early = f
        .simple(&format!("SELECT 1 / 0; BEGIN; {INCREMENT}; COMMIT"))
        .await;
    assert_eq!(early.error().map(|e| e.0), Some("22012".to_owned()));
    assert_eq!(early.status(), b'I', "{early:?}");
    assert_eq!(value(&mut admin).await, 2);
    assert_eq!(f.simple("SELECT 1").await.status(), b'I');
}
