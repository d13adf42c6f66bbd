//! Protocol robustness of the rules relay, through the message sequences drivers send: COPY
//! through the extended protocol (libpq, tokio-postgres `copy_in` and `BinaryCopyInWriter`),
//! a refusal in the middle of a long batch (pgJDBC's `executeBatch`), a `Flush` that waits for
//! an error before `Sync`, pipelined batches. Every answer must be the right one, and nothing
//! may hang (each read is bounded).

use crate::frontend::Frontend;
use crate::sql_rules::{rules_connector, rules_emulator};
use crate::support::{each, upstream};

async fn count(table: &str) -> i64 {
    upstream()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Sends `text`, a query that ends in `COPY … FROM STDIN`, and reads its answer up to the
/// `CopyInResponse`: the command tags before it (no error may come).
async fn copy_started(f: &mut Frontend, text: &str) -> Vec<String> {
    f.query(text).send().await;
    let mut tags = Vec::new();
    loop {
        let m = f.read().await;
        assert_ne!(m.tag, b'E', "{m:?}");
        if m.tag == b'G' {
            return tags;
        }
        if m.tag == b'C' {
            tags.push(m.tag_text());
        }
    }
}

/// Extended-protocol COPY sends a Sync the server ignores in copy mode and another after
/// CopyDone: one ReadyForQuery for two Syncs. Text (libpq's shape, raw) and binary
/// (tokio-postgres), then 100 more statements on the same connection, each answered as
/// itself, writes in transaction blocks among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_then_every_answer_is_the_right_one() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS proto_copy",
            "CREATE TABLE proto_copy (id int PRIMARY KEY, v text)",
        ],
    )
    .await;
    // libpq's PQexecParams("COPY … FROM STDIN"), PQputCopyData, PQputCopyEnd.
    let mut f = Frontend::connect(rules_emulator()).await;
    f.parse("", "COPY proto_copy FROM STDIN")
        .bind("", &[])
        .describe_portal()
        .execute()
        .sync()
        .send()
        .await;
    let mut started = Vec::new();
    loop {
        let m = f.read().await;
        let copy_in = m.tag == b'G';
        started.push(m);
        if copy_in {
            break;
        }
    }
    f.message(b'd', b"1\tone\n2\ttwo\n")
        .message(b'c', b"")
        .sync()
        .send()
        .await;
    let done = f.answer().await;
    assert_eq!(done.tags(), ["COPY 2"], "{done:?}");
    assert_eq!(done.status(), b'I');
    for i in 0..50 {
        let answer = f.extended("SELECT $1::int + 1", &[&i.to_string()]).await;
        assert_eq!(answer.values(), [Some((i + 1).to_string())], "{answer:?}");
        if i % 10 == 0 {
            let begin = f.simple("BEGIN").await;
            let write = f
                .extended(
                    "UPDATE proto_copy SET v = $1 WHERE id = 1",
                    &[&i.to_string()],
                )
                .await;
            let commit = f.simple("COMMIT").await;
            assert_eq!(
                (begin.tags(), write.tags(), commit.tags(), commit.status()),
                (
                    vec!["BEGIN".into()],
                    vec!["UPDATE 1".into()],
                    vec!["COMMIT".into()],
                    b'I'
                )
            );
        }
    }
    // A COPY that fails at its Execute: both Syncs are answered.
    f.parse("", "COPY no_such_table FROM STDIN")
        .bind("", &[])
        .execute()
        .sync()
        .send()
        .await;
    let failed = f.answer().await;
    assert_eq!(
        failed.error().map(|e| e.0),
        Some("42P01".into()),
        "{failed:?}"
    );
    let tail = f.message(b'c', b"").sync().flush_and_answer().await;
    assert_eq!(tail.shape(), "Z", "{tail:?}");
    assert_eq!(f.simple("SELECT 7").await.values(), [Some("7".to_owned())]);

    // tokio-postgres: binary COPY, then 50 statements.
    let client = rules_connector().await.connect().await.unwrap();
    let sink = client
        .copy_in("COPY proto_copy (id, v) FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[
            tokio_postgres::types::Type::INT4,
            tokio_postgres::types::Type::TEXT,
        ],
    );
    tokio::pin!(writer);
    for id in 10..20i32 {
        writer.as_mut().write(&[&id, &"b"]).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), 10);
    for i in 0..50i32 {
        let row = tokio::time::timeout(
            crate::frontend::ANSWER_BOUND,
            client.query_one("SELECT $1::int * 2", &[&i]),
        )
        .await
        .expect("no hang")
        .unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
        if i % 10 == 0 {
            client.batch_execute("BEGIN").await.unwrap();
            let n = client
                .execute(
                    "UPDATE proto_copy SET v = 'x' WHERE id = $1",
                    &[&(10 + i / 10)],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
            client.batch_execute("COMMIT").await.unwrap();
        }
    }
    assert_eq!(count("proto_copy").await, 12);
}

/// pgJDBC's `executeBatch`: 16 statements as Parse/Bind/Execute in one batch (50 messages),
/// the eighth refused by DSQL: the first seven are answered, then the refusal, then one
/// ReadyForQuery; in autocommit nothing of the batch is left (its implicit transaction), in
/// a block the block is failed. And an upstream error before the refusal ends the batch there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_the_middle_of_a_batch_answers_and_does_not_hang() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS proto_batch",
            "CREATE TABLE proto_batch (id int PRIMARY KEY)",
        ],
    )
    .await;
    let batch = |f: &mut Frontend, start: i32, duplicate_at: Option<usize>| {
        for i in 0..16usize {
            if i == 7 {
                f.parse("", "TRUNCATE proto_batch");
            } else {
                f.parse("", "INSERT INTO proto_batch VALUES ($1)");
            }
            let id = match duplicate_at {
                Some(at) if i == at => start.to_string(),
                _ => (start + i as i32).to_string(),
            };
            if i == 7 {
                f.bind("", &[]);
            } else {
                f.bind("", &[&id]);
            }
            f.execute();
        }
        f.describe_statement("").sync();
    };
    let truncate = (
        "0A000".to_owned(),
        "unsupported statement: Truncate".to_owned(),
    );
    let mut f = Frontend::connect(rules_emulator()).await;
    // Autocommit.
    batch(&mut f, 100, None);
    let answer = f.flush_and_answer().await;
    assert_eq!(answer.tags().len(), 7, "{answer:?}");
    assert_eq!(answer.error(), Some(truncate.clone()));
    assert_eq!(answer.status(), b'I', "{answer:?}");
    assert_eq!(
        count("proto_batch").await,
        0,
        "the batch's implicit transaction rolled back"
    );
    // An upstream error (a duplicate key at the fourth) ends it before the refusal.
    batch(&mut f, 200, Some(3));
    let answer = f.flush_and_answer().await;
    assert_eq!(
        answer.error().map(|e| e.0),
        Some("23505".into()),
        "{answer:?}"
    );
    assert_eq!(
        (answer.tags().len(), answer.status()),
        (3, b'I'),
        "{answer:?}"
    );
    assert_eq!(count("proto_batch").await, 0);
    // In a block.
    assert_eq!(f.simple("BEGIN").await.status(), b'T');
    batch(&mut f, 300, None);
    let answer = f.flush_and_answer().await;
    assert_eq!(answer.tags().len(), 7, "{answer:?}");
    assert_eq!(answer.error(), Some(truncate));
    assert_eq!(answer.status(), b'E', "{answer:?}");
    let rollback = f.simple("ROLLBACK").await;
    assert_eq!(
        (rollback.tags(), rollback.status()),
        (vec!["ROLLBACK".into()], b'I')
    );
    assert_eq!(count("proto_batch").await, 0);
    // The session goes on.
    assert_eq!(f.simple("SELECT 1").await.values(), [Some("1".to_owned())]);
}

/// A client that sends Parse/Describe/Flush and waits gets its error before any Sync (as
/// PostgreSQL sends errors at once); its Sync then gets the ReadyForQuery. Pipelined batches
/// (three Syncs in one write) get three answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_and_pipelined_batches() {
    let mut f = Frontend::connect(rules_emulator()).await;
    f.parse("p", "TRUNCATE anything")
        .describe_statement("p")
        .flush_message()
        .send()
        .await;
    let error = f.read().await;
    assert_eq!(error.tag, b'E', "{error:?}");
    assert_eq!(error.field(b'C').as_deref(), Some("0A000"));
    let ready = f.sync().flush_and_answer().await;
    assert_eq!((ready.shape(), ready.status()), ("Z".to_owned(), b'I'));

    for i in 0..3 {
        f.parse("", "SELECT $1::int")
            .bind("", &[&i.to_string()])
            .execute()
            .sync();
    }
    f.send().await;
    for i in 0..3 {
        let answer = f.answer().await;
        assert_eq!(answer.values(), [Some(i.to_string())], "{answer:?}");
    }

    // A COMMIT pipelined with what follows it: validated first, answered in order.
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS proto_pipelined",
            "CREATE TABLE proto_pipelined (id int PRIMARY KEY, v int)",
            "INSERT INTO proto_pipelined VALUES (1, 0)",
        ],
    )
    .await;
    f.simple("BEGIN").await;
    f.simple("UPDATE proto_pipelined SET v = 1 WHERE id = 1")
        .await;
    f.query("COMMIT").query("SELECT 5").send().await;
    let commit = f.answer().await;
    let next = f.answer().await;
    assert_eq!(
        (commit.tags(), commit.status()),
        (vec!["COMMIT".into()], b'I')
    );
    assert_eq!(next.values(), [Some("5".to_owned())], "{next:?}");
    f.simple("BEGIN").await;
    f.parse("", "UPDATE proto_pipelined SET v = 2 WHERE id = 1")
        .bind("", &[])
        .execute()
        .sync()
        .parse("", "COMMIT")
        .bind("", &[])
        .execute()
        .sync()
        .parse("", "SELECT 6")
        .bind("", &[])
        .execute()
        .sync()
        .send()
        .await;
    let write = f.answer().await;
    let commit = f.answer().await;
    let next = f.answer().await;
    assert_eq!(write.tags(), ["UPDATE 1"]);
    assert_eq!(
        (commit.tags(), commit.status()),
        (vec!["COMMIT".into()], b'I')
    );
    assert_eq!(next.values(), [Some("6".to_owned())], "{next:?}");
}

/// Blocks that end and begin again inside one request, and many guarded writes in one block:
/// the savepoint the relay keeps after a write that went through must end with its block
/// (`ROLLBACK; BEGIN; COPY …` runs whole), and a statement pipelined behind a failed one
/// before a `BEGIN` (which ran in a block the relay opened and rolled back) is an autocommit
/// statement. Either mistake would send a savepoint statement PostgreSQL refuses and close
/// the session. Then 60 writes in one block, simple and extended alternating, all land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_ended_inside_one_request_and_many_writes_in_one_block() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS proto_reopen",
            "CREATE TABLE proto_reopen (id int PRIMARY KEY, v int)",
            "INSERT INTO proto_reopen SELECT g, 0 FROM generate_series(1, 60) g",
        ],
    )
    .await;
    let mut f = Frontend::connect(rules_emulator()).await;
    f.simple("BEGIN").await;
    let write = f.simple("UPDATE proto_reopen SET v = 1 WHERE id = 1").await;
    assert_eq!(write.tags(), ["UPDATE 1"], "{write:?}");
    let tags = copy_started(&mut f, "ROLLBACK; BEGIN; COPY proto_reopen FROM STDIN").await;
    assert_eq!(tags, ["ROLLBACK", "BEGIN"]);
    f.message(b'd', b"61\t61\n").message(b'c', b"").send().await;
    let copied = f.answer().await;
    assert_eq!(
        (copied.tags(), copied.status()),
        (vec!["COPY 1".into()], b'T')
    );
    let write = f.simple("UPDATE proto_reopen SET v = 2 WHERE id = 2").await;
    assert_eq!(write.tags(), ["UPDATE 1"], "{write:?}");
    let commit = f.simple("COMMIT").await;
    assert_eq!(
        (commit.tags(), commit.status()),
        (vec!["COMMIT".into()], b'I')
    );

    // A failed statement before a BEGIN, with a write pipelined behind the request.
    f.query("SELECT 1/0; BEGIN; UPDATE proto_reopen SET v = 3 WHERE id = 3")
        .query("UPDATE proto_reopen SET v = 4 WHERE id = 4")
        .send()
        .await;
    let failed = f.answer().await;
    assert_eq!(
        (failed.error().map(|e| e.0), failed.status()),
        (Some("22012".into()), b'I'),
        "{failed:?}"
    );
    let write = f.answer().await;
    assert_eq!(
        (write.tags(), write.status()),
        (vec!["UPDATE 1".into()], b'I')
    );

    f.simple("BEGIN").await;
    for id in 1..=60 {
        let text = format!("UPDATE proto_reopen SET v = v + 10 WHERE id = {id}");
        let write = if id % 2 == 0 {
            f.simple(&text).await
        } else {
            f.extended(&text, &[]).await
        };
        assert_eq!(write.tags(), ["UPDATE 1"], "write {id}: {write:?}");
    }
    let commit = f.simple("COMMIT").await;
    assert_eq!(
        (commit.tags(), commit.status()),
        (vec!["COMMIT".into()], b'I')
    );
    let sum: i64 = upstream()
        .await
        .query_one("SELECT sum(v)::int8 FROM proto_reopen WHERE id <= 60", &[])
        .await
        .unwrap()
        .get(0);
    // 60 × 10, the 2 and the 4 (the 1 and the 3 were rolled back).
    assert_eq!(sum, 606);
    assert_eq!(count("proto_reopen").await, 61);
}

/// A block whose write is pending (it met a row another open transaction holds), rolled back
/// and begun again inside one query that runs whole (`ROLLBACK; BEGIN; COPY …`): the new block
/// commits what it did, and nothing of the rolled-back write (no replay of it, no conflict
/// for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_rolled_back_inside_one_query_is_gone() {
    each(
        &upstream().await,
        &[
            "DROP TABLE IF EXISTS proto_pending",
            "CREATE TABLE proto_pending (id int PRIMARY KEY, v int)",
            "INSERT INTO proto_pending VALUES (1, 0)",
        ],
    )
    .await;
    let mut holder = Frontend::connect(rules_emulator()).await;
    let mut f = Frontend::connect(rules_emulator()).await;
    holder.simple("BEGIN").await;
    let held = holder
        .simple("UPDATE proto_pending SET v = 1 WHERE id = 1")
        .await;
    assert_eq!(held.tags(), ["UPDATE 1"], "{held:?}");
    f.simple("BEGIN").await;
    let pending = f
        .simple("UPDATE proto_pending SET v = 2 WHERE id = 1")
        .await;
    assert_eq!(pending.tags(), ["UPDATE 1"], "{pending:?}");
    copy_started(&mut f, "ROLLBACK; BEGIN; COPY proto_pending FROM STDIN").await;
    f.message(b'd', b"2\t20\n").message(b'c', b"").send().await;
    assert_eq!(f.answer().await.tags(), ["COPY 1"]);
    let commit = f.simple("COMMIT").await;
    assert_eq!(
        (commit.tags(), commit.error()),
        (vec!["COMMIT".into()], None),
        "{commit:?}"
    );
    let rolled_back = holder.simple("ROLLBACK").await;
    assert_eq!(rolled_back.tags(), ["ROLLBACK"]);
    let rows = upstream()
        .await
        .query("SELECT id, v FROM proto_pending ORDER BY id", &[])
        .await
        .unwrap();
    let rows: Vec<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [(1, 0), (2, 20)]);

    // The same with DDL in the query that begins again (its answer is a DDL's).
    each(
        &upstream().await,
        &["DROP TABLE IF EXISTS proto_pending_new"],
    )
    .await;
    holder.simple("BEGIN").await;
    holder
        .simple("UPDATE proto_pending SET v = 3 WHERE id = 1")
        .await;
    f.simple("BEGIN").await;
    let pending = f
        .simple("UPDATE proto_pending SET v = 4 WHERE id = 1")
        .await;
    assert_eq!(pending.tags(), ["UPDATE 1"], "{pending:?}");
    copy_started(
        &mut f,
        "ROLLBACK; BEGIN; CREATE TABLE proto_pending_new (id int); \
         COPY proto_pending_new FROM STDIN",
    )
    .await;
    f.message(b'd', b"7\n").message(b'c', b"").send().await;
    assert_eq!(f.answer().await.tags(), ["COPY 1"]);
    let commit = f.simple("COMMIT").await;
    assert_eq!(
        (commit.tags(), commit.error()),
        (vec!["COMMIT".into()], None),
        "{commit:?}"
    );
    holder.simple("ROLLBACK").await;
    assert_eq!(count("proto_pending_new").await, 1);
    let v: i32 = upstream()
        .await
        .query_one("SELECT v FROM proto_pending WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 0);
}
