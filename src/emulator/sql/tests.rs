use super::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(super) fn q(text: &str) -> Vec<u8> {
    query(text)
}

pub(super) fn dialect() -> Dialect {
    Dialect::new(Plans::default(), Arc::default(), TRANSACTION_AGE_LIMIT)
}

/// Runs one whole client message through `d`: what goes upstream, as text, and the plans.
pub(super) fn send(d: &mut Dialect, whole: &[u8]) -> (String, Vec<Plan>) {
    let mut out = Outgoing::default();
    d.on_message(whole[0], &whole[5..], whole, &mut out);
    let plans = out.plans.iter().map(|p| p.plan).collect();
    (String::from_utf8_lossy(&out.bytes).into_owned(), plans)
}

#[test]
fn one_ddl_per_transaction_and_no_ddl_with_dml() {
    let mut d = dialect();
    assert_eq!(send(&mut d, &q("BEGIN")).1, [Plan::Pass]);
    let (text, _) = send(&mut d, &q("CREATE TABLE a (id int)"));
    assert!(text.contains("CREATE TABLE a"));
    let (text, _) = send(&mut d, &q("CREATE TABLE b (id int)"));
    assert!(
        text.contains("multiple ddl statements not supported"),
        "{text}"
    );
    send(&mut d, &q("ROLLBACK"));
    // Autocommit: each query is its own transaction; a write that could cross the row
    // limit runs in one the relay opens, one whose text bounds its rows does not.
    send(&mut d, &q("CREATE TABLE a (id int)"));
    let (text, plans) = send(&mut d, &q("INSERT INTO a SELECT generate_series(1, 9)"));
    assert!(
        text.contains("BEGIN") && text.contains("INSERT INTO a"),
        "{text}"
    );
    assert_eq!(plans, [Plan::Swallow, autocommit()]);
    let (text, plans) = send(&mut d, &q("INSERT INTO a VALUES (1), (2)"));
    assert!(!text.contains("BEGIN"), "{text}");
    assert_eq!(plans, [Plan::Pass]);
    // A batch is one transaction.
    let (text, _) = send(
        &mut d,
        &q("CREATE TABLE c (id int); INSERT INTO c VALUES (1)"),
    );
    assert!(text.contains("ddl and dml are not supported"), "{text}");
    let (text, _) = send(
        &mut d,
        &q("DROP TABLE IF EXISTS c; CREATE TABLE c (id int)"),
    );
    assert!(text.contains("multiple ddl"), "{text}");
}

#[test]
fn a_write_in_a_transaction_goes_after_a_savepoint_and_a_doomed_commit_fails() {
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    let (text, plans) = send(&mut d, &q("UPDATE t SET v = 1 WHERE id = 1"));
    assert!(text.starts_with("Q"), "{text}");
    assert!(text.contains("SAVEPOINT dsql_emulator_occ") && text.contains("UPDATE t"));
    assert_eq!(plans, [Plan::Swallow, guard("UPDATE 1")]);
    // Reads are not guarded.
    assert_eq!(send(&mut d, &q("SELECT 1")).1, [Plan::Pass]);
    // The responder found the write lost: COMMIT raises OC000 and ends the transaction.
    d.plans.doomed.store(true, Ordering::SeqCst);
    let (text, plans) = send(&mut d, &q("COMMIT"));
    assert!(
        text.contains("ERRCODE = '40001'") && text.contains("(OC000)"),
        "{text}"
    );
    assert!(text.contains("ROLLBACK"));
    assert_eq!(plans, [Plan::Swallow, Plan::Pass]);
    assert!(!d.in_block);
    // The next transaction starts clean; its COMMIT waits for its validation, then goes
    // (and the relay waits for its answer, holding its commit ticket).
    send(&mut d, &q("BEGIN"));
    let mut out = Outgoing::default();
    let commit = q("COMMIT");
    d.on_message(b'Q', &commit[5..], &commit, &mut out);
    assert!(out.bytes.is_empty());
    assert_eq!(out.validate.as_ref().map(|v| v.replays.len()), Some(0));
    out.clear();
    d.after_validation(Ok(()), &mut out);
    assert_eq!(out.bytes, commit);
    assert!(out.gate && out.plans[0].report && out.plans[0].plan == Plan::Pass);
    assert!(!d.in_block);
}

#[test]
fn every_commit_in_a_block_is_validated_whatever_its_shape() {
    let mut d = dialect();
    for round in 0..3 {
        send(&mut d, &q("BEGIN"));
        let mut out = Outgoing::default();
        for m in [parse("", "COMMIT"), bind(""), execute(), sync()] {
            d.on_message(m[0], &m[5..], &m, &mut out);
        }
        assert!(
            out.validate.is_some(),
            "round {round}: extended COMMIT validated"
        );
        out.clear();
        d.after_validation(Ok(()), &mut out);
        assert!(out.bytes.ends_with(&sync()) && out.gate);
        assert!(!d.in_block);
        send(&mut d, &q("BEGIN"));
        let mut out = Outgoing::default();
        let commit = q("/* tag */ END");
        d.on_message(b'Q', &commit[5..], &commit, &mut out);
        assert!(
            out.validate.is_some(),
            "round {round}: commented END validated"
        );
        out.clear();
        d.after_validation(Ok(()), &mut out);
    }
    // Outside a block a COMMIT has nothing to validate.
    let (text, plans) = send(&mut d, &q("COMMIT"));
    assert!(text.contains("COMMIT") && plans == [Plan::Pass]);
}

pub(super) fn guard(tag: &'static str) -> Plan {
    Plan::Write {
        guard: Some(tag),
        autocommit: false,
        oversize: None,
        defer: false,
    }
}

pub(super) fn autocommit() -> Plan {
    Plan::Write {
        guard: None,
        autocommit: true,
        oversize: None,
        defer: false,
    }
}

pub(super) fn parse(name: &str, text: &str) -> Vec<u8> {
    let mut body = format!("{name}\0{text}\0").into_bytes();
    body.extend_from_slice(&[0, 0]);
    message(b'P', &body)
}

pub(super) fn bind(statement: &str) -> Vec<u8> {
    message(b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes())
}

pub(super) fn execute() -> Vec<u8> {
    message(b'E', b"\0\0\0\0\0")
}

pub(super) fn sync() -> Vec<u8> {
    message(b'S', b"")
}

fn flush() -> Vec<u8> {
    message(b'H', b"")
}

#[test]
fn an_extended_batch_is_skipped_to_sync_and_sync_raises() {
    let mut d = dialect();
    assert_eq!(send(&mut d, &parse("s1", "TRUNCATE t")).0, "");
    assert_eq!(send(&mut d, &message(b'D', b"Ss1\0")).0, "");
    let (text, plans) = send(&mut d, &sync());
    assert!(text.contains("ERRCODE = '0A000', MESSAGE = E'unsupported statement: Truncate'"));
    assert_eq!(plans, [Plan::Pass]);
    // The next batch runs normally, held to its Sync.
    let select = parse("s1", "SELECT 1");
    assert_eq!(send(&mut d, &select).0, "");
    send(&mut d, &bind("s1"));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    let mut expected = select.clone();
    expected.extend_from_slice(&bind("s1"));
    expected.extend_from_slice(&execute());
    expected.extend_from_slice(&sync());
    assert_eq!(text.as_bytes(), expected.as_slice());
    assert_eq!(plans, [Plan::Pass]);
    // A Flush sends what is held on at once.
    send(&mut d, &parse("s2", "SELECT 2"));
    let (text, _) = send(&mut d, &message(b'H', b""));
    assert!(text.contains("SELECT 2"), "{text}");
    send(&mut d, &sync());
    // ASYNC DDL goes as the SELECT that runs it and answers its job, with its own tag.
    send(&mut d, &parse("s3", "CREATE INDEX ASYNC i ON t (v)"));
    let (text, _) = send(&mut d, &sync());
    let expected = parse(
        "s3",
        "SELECT sys.dsql_emulator_ddl_job($dsql_emulator_ddl$CREATE INDEX  i ON t \
         (v)$dsql_emulator_ddl$, 'INDEX_BUILD', E'\"t\"', E'i', NULL) AS job_id",
    );
    // (Compared as text: its length is not UTF-8.)
    assert!(
        text.starts_with(&*String::from_utf8_lossy(&expected)),
        "{text}"
    );
    send(&mut d, &bind("s3"));
    send(&mut d, &execute());
    let (_, plans) = send(&mut d, &sync());
    // (After the lock timeout a DDL waits under.)
    assert_eq!(
        plans,
        [
            Plan::Swallow,
            Plan::Job {
                tag: "CREATE INDEX",
                described: true
            }
        ]
    );
}

#[test]
fn what_the_relay_adds_for_a_write_goes_before_the_whole_batch() {
    let mut d = dialect();
    // Autocommit: the batch (unnamed statement and all) runs in a transaction of its own.
    send(&mut d, &parse("", "UPDATE t SET v = $1"));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    let begin = query("BEGIN");
    assert!(text.as_bytes().starts_with(&begin), "{text}");
    assert!(text.as_bytes()[begin.len()..].starts_with(&parse("", "UPDATE t SET v = $1")));
    assert_eq!(plans, [Plan::Swallow, autocommit()]);
    // Unless its text bounds its rows within the limit.
    send(&mut d, &parse("", "INSERT INTO t VALUES ($1)"));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(
        text.as_bytes()
            .starts_with(&parse("", "INSERT INTO t VALUES ($1)"))
    );
    assert_eq!(plans, [Plan::Pass]);
    // In a transaction the savepoint goes before the Parse.
    send(&mut d, &q("BEGIN"));
    send(&mut d, &parse("", "DELETE FROM t WHERE id = $1"));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(
        text.as_bytes()
            .starts_with(&q("SAVEPOINT dsql_emulator_occ")),
        "{text}"
    );
    assert_eq!(plans, [Plan::Swallow, guard("DELETE 1")]);
    // Binding the unnamed statement of an earlier batch: nothing can go before it.
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(text.as_bytes().starts_with(&bind("")), "{text}");
    assert_eq!(
        plans,
        [Plan::Write {
            guard: None,
            autocommit: false,
            oversize: None,
            defer: false,
        }]
    );
    // A named statement bound in a later batch gets its savepoint.
    send(&mut d, &parse("w", "UPDATE t SET v = 1"));
    send(&mut d, &sync());
    send(&mut d, &bind("w"));
    send(&mut d, &execute());
    let mut out = Outgoing::default();
    let whole = sync();
    d.on_message(b'S', b"", &whole, &mut out);
    assert!(out.gate);
    let plans: Vec<Plan> = out.plans.iter().map(|p| p.plan).collect();
    assert_eq!(plans, [Plan::Swallow, guard("UPDATE 1")]);
}

fn error(code: &str, extra: &[u8]) -> Vec<u8> {
    let mut body = format!("SERROR\0C{code}\0Mnope\0").into_bytes();
    body.extend_from_slice(extra);
    body.push(0);
    message(b'E', &body)
}

fn responder_with(plans: &[Planned]) -> (Responder, tokio::sync::mpsc::Receiver<Reply>) {
    let shared = Plans::default();
    for planned in plans {
        shared.push(*planned);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    (Responder::new(shared, tx), rx)
}

pub(super) fn responder_for(plans: &[Plan]) -> (Responder, tokio::sync::mpsc::Receiver<Reply>) {
    let shared = Plans::default();
    for plan in plans {
        shared.push(Planned::new(*plan));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (Responder::new(shared, tx), rx)
}

#[test]
fn the_refusal_context_is_taken_out_across_any_split() {
    let mut stream = message(b'C', b"SELECT 1\0");
    stream.extend_from_slice(&error("0A000", RAISE_CONTEXT));
    stream.extend_from_slice(&message(b'Z', b"I"));
    let mut expected = message(b'C', b"SELECT 1\0");
    expected.extend_from_slice(&error("0A000", b""));
    expected.extend_from_slice(&message(b'Z', b"I"));
    for split in 0..stream.len() {
        let (mut responder, _rx) = responder_for(&[Plan::Pass]);
        let mut out = Vec::new();
        responder.feed(&stream[..split], &mut out);
        responder.feed(&stream[split..], &mut out);
        assert_eq!(out, expected, "split at {split}");
    }
}

#[test]
fn a_lost_write_is_told_its_tag_and_rolled_back_to_its_savepoint() {
    // SAVEPOINT's answer (swallowed), then the write's: it timed out on a row an open
    // transaction holds, so it is pending (replayed at COMMIT), not lost.
    let answer = |code: &str, message: &str| {
        let mut stream = super::message(b'C', b"SAVEPOINT\0");
        stream.extend_from_slice(&super::message(b'Z', b"T"));
        stream.extend_from_slice(&super::message(b'2', b""));
        let body = format!("SERROR\0C{code}\0M{message}\0\0");
        stream.extend_from_slice(&super::message(b'E', body.as_bytes()));
        stream.extend_from_slice(&super::message(b'Z', b"E"));
        stream
    };
    let mut expected = message(b'2', b"");
    expected.extend_from_slice(&message(b'C', b"UPDATE 1\0"));
    expected.extend_from_slice(&message(b'Z', b"T"));
    let rollback = vec![(
        query("ROLLBACK TO SAVEPOINT dsql_emulator_occ; RELEASE SAVEPOINT dsql_emulator_occ"),
        Plan::Swallow,
    )];
    let (mut responder, mut rx) = responder_for(&[Plan::Swallow, guard("UPDATE 1")]);
    let mut out = Vec::new();
    responder.feed(
        &answer("55P03", "canceling statement due to lock timeout"),
        &mut out,
    );
    assert_eq!(out, expected);
    assert!(!responder.plans.doomed.load(Ordering::SeqCst));
    let reply = rx.try_recv().unwrap();
    assert!(reply.pending && !reply.failed, "{reply:?}");
    assert_eq!(reply.requests, rollback);
    assert!(responder.plans.lock().is_empty());

    // Against a row a transaction changed and committed since: lost for good.
    let (mut responder, mut rx) = responder_for(&[Plan::Swallow, guard("UPDATE 1")]);
    let mut out = Vec::new();
    let serialization = "could not serialize access due to concurrent update";
    responder.feed(&answer("40001", serialization), &mut out);
    assert_eq!(out, expected);
    assert!(responder.plans.doomed.load(Ordering::SeqCst));
    let reply = rx.try_recv().unwrap();
    assert!(!reply.pending, "{reply:?}");
    assert_eq!(reply.requests, rollback);

    // Another error is the client's own: passed on, nothing doomed.
    let (mut responder, mut rx) = responder_for(&[guard("UPDATE 1")]);
    let mut stream = error("23505", b"");
    stream.extend_from_slice(&message(b'Z', b"E"));
    let mut out = Vec::new();
    responder.feed(&stream, &mut out);
    assert_eq!(out, stream);
    // Nothing to send, but the upstream side is told to read on.
    let reply = rx.try_recv().unwrap();
    assert!(reply.requests.is_empty() && reply.failed);
    assert_eq!(responder.plans.settled_status(), Some(b'E'));
    assert!(!responder.plans.doomed.load(Ordering::SeqCst));

    // Elsewhere PostgreSQL's own lock timeout and deadlock reach the client as DSQL's
    // conflict.
    for code in ["55P03", "40P01"] {
        let (mut responder, _rx) = responder_for(&[Plan::Pass]);
        let mut out = Vec::new();
        responder.feed(&error(code, b""), &mut out);
        assert!(
            String::from_utf8_lossy(&out)
                .contains("C40001\0Mchange conflicts with another transaction (OC000)"),
            "{out:?}"
        );
    }

    // A doomed COMMIT: the ROLLBACK's answer dropped, then the error and its
    // ReadyForQuery.
    let (mut responder, _rx) = responder_for(&[Plan::Swallow, Plan::Pass]);
    let mut stream = message(b'C', b"ROLLBACK\0");
    stream.extend_from_slice(&message(b'Z', b"I"));
    stream.extend_from_slice(&error("40001", RAISE_CONTEXT));
    stream.extend_from_slice(&message(b'Z', b"I"));
    let mut out = Vec::new();
    responder.feed(&stream, &mut out);
    let mut expected = error("40001", b"");
    expected.extend_from_slice(&message(b'Z', b"I"));
    assert_eq!(out, expected);
}

#[test]
fn an_answer_no_plan_accounts_for_closes_the_session_with_a_fatal() {
    // A ReadyForQuery with no request awaiting it: every later answer would go to the
    // wrong request.
    let (mut responder, _rx) = responder_for(&[]);
    let mut out = Vec::new();
    assert!(!responder.feed(&message(b'Z', b"I"), &mut out));
    let text = String::from_utf8_lossy(&out);
    assert!(out.starts_with(b"E") && text.contains("SFATAL"), "{text}");
    assert!(text.contains("lost track of this session"), "{text}");
    // The relay's own statement failing (not in an aborted block): its picture is wrong.
    let (mut responder, _rx) = responder_for(&[Plan::Swallow]);
    let mut out = Vec::new();
    let mut stream = error("3B001", b"");
    stream.extend_from_slice(&message(b'Z', b"E"));
    assert!(!responder.feed(&stream, &mut out));
    assert!(String::from_utf8_lossy(&out).contains("relay's own statement failed"));
    // In an aborted block, its statements fail as the client's do: not a mismatch.
    let (mut responder, _rx) = responder_for(&[Plan::Swallow]);
    let mut out = Vec::new();
    let mut stream = error("25P02", b"");
    stream.extend_from_slice(&message(b'Z', b"E"));
    assert!(responder.feed(&stream, &mut out));
    assert!(out.is_empty());
}

/// The answer-side invariant, provoked on purpose: a `COMMIT` tag from the server for a
/// transaction that still owes a pending write (or lost a conflict) never reaches the client;
/// it becomes `XX000`, whatever plan it came under. Once the pending write is replayed, the
/// same `COMMIT` passes.
#[test]
fn a_commit_that_skipped_its_replays_is_never_acknowledged() {
    let pending = |responder: &mut Responder| {
        // SAVEPOINT's answer, then the guarded write meets a held row: pending.
        let mut stream = super::message(b'C', b"SAVEPOINT\0");
        stream.extend_from_slice(&super::message(b'Z', b"T"));
        stream.extend_from_slice(&error("55P03", b""));
        stream.extend_from_slice(&super::message(b'Z', b"E"));
        let mut out = Vec::new();
        assert!(responder.feed(&stream, &mut out));
        // The relay's ROLLBACK TO SAVEPOINT.
        let mut out = Vec::new();
        let mut stream = super::message(b'C', b"ROLLBACK\0");
        stream.extend_from_slice(&super::message(b'C', b"RELEASE\0"));
        stream.extend_from_slice(&super::message(b'Z', b"T"));
        assert!(responder.feed(&stream, &mut out));
        assert!(out.is_empty(), "{out:?}");
    };
    let commit = || {
        let mut stream = super::message(b'C', b"COMMIT\0");
        stream.extend_from_slice(&super::message(b'Z', b"I"));
        stream
    };
    // A COMMIT let through without its replay (as a bypass would): refused loudly.
    let (mut responder, _rx) =
        responder_for(&[Plan::Swallow, guard("UPDATE 1"), Plan::Swallow, Plan::Pass]);
    pending(&mut responder);
    let mut out = Vec::new();
    assert!(responder.feed(&commit(), &mut out));
    let text = String::from_utf8_lossy(&out);
    assert!(out.starts_with(b"E"), "{text}");
    assert!(text.contains("CXX000") && text.contains("refused to acknowledge a COMMIT"));
    assert!(!text.contains("CCOMMIT"), "{text}");
    assert!(out.ends_with(&super::message(b'Z', b"I")), "{text}");
    // The next transaction owes nothing: its COMMIT passes.
    let (mut responder, _rx) = responder_for(&[Plan::Pass]);
    let mut out = Vec::new();
    assert!(responder.feed(&commit(), &mut out));
    assert_eq!(out, commit());

    // Validated: the replay answered its tag, then the COMMIT (its request licensed by the
    // commit point) passes.
    let (mut responder, _rx) = responder_with(&[
        Planned::new(Plan::Swallow),
        Planned::new(guard("UPDATE 1")),
        Planned::new(Plan::Swallow),
        Planned::new(Plan::Swallow),
        Planned::new(Plan::Replay { owed: true }),
        Planned {
            commit: true,
            ..Planned::new(Plan::Pass)
        },
    ]);
    pending(&mut responder);
    let mut stream = super::message(b'C', b"SET\0");
    stream.extend_from_slice(&super::message(b'Z', b"T"));
    stream.extend_from_slice(&super::message(b'C', b"UPDATE 1\0"));
    stream.extend_from_slice(&super::message(b'Z', b"T"));
    let mut out = Vec::new();
    assert!(responder.feed(&stream, &mut out));
    assert!(out.is_empty());
    let mut out = Vec::new();
    assert!(responder.feed(&commit(), &mut out));
    assert_eq!(out, commit());

    // In a block, a COMMIT whose request did not pass the commit point is refused even with
    // nothing owed; outside one (a no-op COMMIT) it passes.
    let begun = || {
        let mut stream = super::message(b'C', b"BEGIN\0");
        stream.extend_from_slice(&super::message(b'Z', b"T"));
        stream
    };
    let (mut responder, _rx) = responder_for(&[Plan::Pass, Plan::Pass]);
    let mut out = Vec::new();
    assert!(responder.feed(&begun(), &mut out));
    let mut out = Vec::new();
    assert!(responder.feed(&commit(), &mut out));
    assert!(String::from_utf8_lossy(&out).contains("CXX000"));
    let (mut responder, _rx) = responder_for(&[Plan::Pass]);
    let mut out = Vec::new();
    assert!(responder.feed(&commit(), &mut out));
    assert_eq!(out, commit());

    // A transaction a committer doomed (the relay's Sync, its rollback, a new block): no
    // COMMIT of it passes, licensed or not.
    let (mut responder, _rx) = responder_with(&[
        Planned::new(Plan::Pass),
        Planned::new(Plan::AllButReady),
        Planned::new(Plan::Release),
        Planned::new(Plan::Swallow),
        Planned {
            commit: true,
            ..Planned::new(Plan::Pass)
        },
    ]);
    let mut out = Vec::new();
    assert!(responder.feed(&begun(), &mut out));
    let mut stream = super::message(b'Z', b"T");
    stream.extend_from_slice(&super::message(b'C', b"ROLLBACK\0"));
    stream.extend_from_slice(&super::message(b'Z', b"I"));
    stream.extend_from_slice(&super::message(b'C', b"BEGIN\0"));
    stream.extend_from_slice(&super::message(b'Z', b"T"));
    let mut out = Vec::new();
    assert!(responder.feed(&stream, &mut out));
    assert!(out.is_empty(), "{out:?}");
    let mut out = Vec::new();
    assert!(responder.feed(&commit(), &mut out));
    assert!(String::from_utf8_lossy(&out).contains("CXX000"));
}

/// The decide-side twin, provoked on purpose: a `COMMIT` in a block that reaches the sending
/// side without passing its commit point (here its messages are fed past `on_message`) is
/// refused with `XX000`, not sent; through the commit point it is licensed and goes.
#[test]
fn a_commit_that_skipped_its_commit_point_is_never_sent() {
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    let mut out = Outgoing::default();
    for whole in [parse("", "COMMIT"), bind(""), execute()] {
        d.on_extended(whole[0], &whole[5..], &whole, &mut out);
    }
    let refusal = d.skipping.clone().expect("refused");
    assert_eq!(refusal.code, "XX000");
    assert!(refusal.message.contains("did not pass its validation"));
    let mut out = Outgoing::default();
    let m = sync();
    d.on_message(m[0], &m[5..], &m, &mut out);
    // What went before the refused Execute runs; the Execute never goes; the refusal answers.
    assert!(!messages(&out.bytes).any(|(tag, _, _)| tag == b'E'));
    assert!(
        matches!(d.pieces.front(), Some(Piece::Refusal { refusal, .. }) if refusal.code == "XX000")
    );
    // The same COMMIT through on_message: held for its validation, then licensed and sent.
    send(&mut d, &q("ROLLBACK"));
    send(&mut d, &q("BEGIN"));
    let mut out = Outgoing::default();
    for m in [parse("", "COMMIT"), bind(""), execute(), flush(), sync()] {
        d.on_message(m[0], &m[5..], &m, &mut out);
    }
    // (The Flush released nothing: the batch executes a COMMIT.)
    assert!(!String::from_utf8_lossy(&out.bytes).contains("COMMIT"));
    assert!(out.validate.is_some());
    out.clear();
    d.after_validation(Ok(()), &mut out);
    let text = String::from_utf8_lossy(&out.bytes);
    assert!(text.contains("COMMIT") && !text.contains("XX000"), "{text}");
    assert!(!d.validated, "the license is used once");
}

/// An autocommit `UPDATE` or `DELETE` whose `WHERE` pins a unique index's columns writes one
/// row at most: it goes without the relay's wrapping transaction (no second round trip), once
/// the index is known, and until the next catalog change.
#[test]
fn an_autocommit_write_pinned_by_a_unique_key_goes_unwrapped() {
    let mut d = dialect();
    let wrapped = |d: &mut Dialect, sql: &str| {
        let (text, plans) = send(d, &q(sql));
        match plans.as_slice() {
            [Plan::Swallow, plan] if *plan == autocommit() && text.contains("BEGIN") => true,
            [Plan::Pass] if !text.contains("BEGIN") => false,
            _ => panic!("{sql}: {text:?} {plans:?}"),
        }
    };
    // Not known yet (no upstream to ask here): wrapped.
    assert!(wrapped(&mut d, "UPDATE t SET v = v + 1 WHERE k = 1"));
    d.catalog.learn(
        None,
        "t",
        vec![vec!["k".into()], vec!["a".into(), "b".into()]],
    );
    d.catalog.learn(Some("app"), "t", vec![vec!["u".into()]]);
    for sql in [
        "UPDATE t SET v = v + 1 WHERE k = 1",
        "UPDATE t SET v = v + 1 WHERE 1 = k",
        "UPDATE t SET v = 2 WHERE k = '7' AND v > 3",
        "UPDATE t SET v = 2 WHERE t.k = 1",
        "UPDATE t AS x SET v = 2 WHERE x.k = 5 RETURNING v",
        "DELETE FROM t WHERE (k = 1 AND v = 2) AND w < 3",
        "DELETE FROM t WHERE b = 2 AND a = 1",
        "UPDATE app.t SET v = 1 WHERE u = 9",
        "UPDATE ONLY t SET v = 1 WHERE k = 9",
    ] {
        assert!(!wrapped(&mut d, sql), "{sql}");
    }
    for sql in [
        "UPDATE t SET v = 1 WHERE k > 1",
        // A cast may compare the key with a coarser equality (`bpchar`, `float8`).
        "UPDATE t SET v = 1 WHERE k = 'a'::char",
        "UPDATE t SET v = 1 WHERE k = 0.1::float8",
        "UPDATE t SET v = 1 WHERE k = 1 OR k = 2",
        "UPDATE t SET v = 1 WHERE k = v",
        "UPDATE t SET v = 1 WHERE k = NULL",
        "UPDATE t SET v = 1 WHERE k = (SELECT 1)",
        "UPDATE t SET v = 1 WHERE a = 1",
        "UPDATE t SET v = 1 WHERE NOT (k = 1)",
        "UPDATE t SET v = 1 WHERE s.k = 1",
        "UPDATE t AS x SET v = 1 WHERE t.k = 1",
        "UPDATE t SET v = 1 FROM s WHERE t.k = 1",
        "DELETE FROM t USING s WHERE t.k = 1",
        "WITH s AS (SELECT 1) UPDATE t SET v = 1 WHERE k = 1",
        "UPDATE other SET v = 1 WHERE k = 1",
        "UPDATE app.t SET v = 1 WHERE k = 1",
        "UPDATE public.t SET v = 1 WHERE k = 1",
        "UPDATE t SET v = 1",
    ] {
        assert!(wrapped(&mut d, sql), "{sql}");
    }
    // A catalog change (any: a `DROP INDEX` names no table) makes what was known stale.
    d.catalog.record(0, &["elsewhere".to_owned()]);
    assert!(wrapped(&mut d, "UPDATE t SET v = v + 1 WHERE k = 1"));
    // The extended protocol: the bound is decided at `Execute`.
    d.catalog.learn(None, "t", vec![vec!["k".into()]]);
    send(&mut d, &parse("", "UPDATE t SET v = $1 WHERE k = $2"));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(!text.contains("BEGIN"), "{text:?}");
    assert_eq!(plans, [Plan::Pass]);
    // A parameter declared `float8` (oid 701): the key may be compared as one.
    let mut body = b"\0UPDATE t SET v = 1 WHERE k = $1\0".to_vec();
    body.extend_from_slice(&[0, 1, 0, 0, 2, 189]);
    send(&mut d, &message(b'P', &body));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(text.contains("BEGIN"), "{text:?}");
    assert_eq!(plans, [Plan::Swallow, autocommit()]);
    // Not pinned: its own transaction.
    send(&mut d, &parse("", "UPDATE t SET v = $1 WHERE v = $2"));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(text.contains("BEGIN"), "{text:?}");
    assert_eq!(plans, [Plan::Swallow, autocommit()]);
}

/// A catalog change is recorded before PostgreSQL runs it, and again once its answer is in:
/// what a lookup read of the catalog while the DDL ran (the indexes before it) is then stale.
/// A DDL that names no relation (`DROP INDEX`) counts.
#[test]
fn what_a_lookup_read_while_a_ddl_ran_is_stale_after_its_answer() {
    let mut d = dialect();
    let unwrapped = |d: &mut Dialect| {
        let (text, plans) = send(d, &q("UPDATE t SET v = 1 WHERE u = 5"));
        plans == [Plan::Pass] && !text.contains("BEGIN")
    };
    d.catalog.learn(None, "t", vec![vec!["u".into()]]);
    assert!(unwrapped(&mut d));
    let before = d.catalog.current();
    let (text, _) = send(&mut d, &q("DROP INDEX t_u"));
    assert!(text.contains("DROP INDEX t_u"), "{text}");
    assert!(
        d.catalog.current() > before,
        "DROP INDEX counts as a change"
    );
    // A lookup that read the catalog before the DROP ran, answered after it was recorded.
    d.catalog.learn(None, "t", vec![vec!["u".into()]]);
    assert!(unwrapped(&mut d));
    // The DROP's answer.
    let mut out = Outgoing::default();
    d.on_reply(&Reply::default(), &mut out);
    assert!(!unwrapped(&mut d), "stale once the DDL's answer is in");
    // The same for a block's DDL, at its COMMIT.
    d.catalog.learn(None, "t", vec![vec!["u".into()]]);
    send(&mut d, &q("BEGIN"));
    send(&mut d, &q("CREATE INDEX ASYNC t_v ON t (v)"));
    d.on_reply(&Reply::default(), &mut out);
    d.catalog.learn(None, "t", vec![vec!["u".into()]]);
    let at_commit = d.catalog.current();
    let commit = q("COMMIT");
    d.on_message(b'Q', &commit[5..], &commit, &mut out);
    assert!(out.validate.is_some());
    out.clear();
    d.after_validation(Ok(()), &mut out);
    assert_eq!(out.bytes, commit);
    assert!(d.catalog.current() > at_commit, "recorded at COMMIT");
    d.catalog.learn(None, "t", vec![vec!["u".into()]]);
    d.on_reply(&Reply::default(), &mut out);
    assert!(!unwrapped(&mut d), "stale once the COMMIT's answer is in");
}

/// The answer `d` awaited is in, as `reply`.
pub(super) fn replied(d: &mut Dialect, reply: Reply) {
    d.on_reply(&reply, &mut Outgoing::default());
}
