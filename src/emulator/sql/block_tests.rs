//! Unit tests of transaction blocks that end or begin inside one client request.

use super::tests::{autocommit, dialect, q, replied, responder_for, send};
use super::*;

/// A query whose statements before its `BEGIN` run in a block the relay opens: when one of them
/// fails, the relay rolls that block back and the client is told it is in none, and so is the
/// relay at once: a write the client pipelined behind it is an autocommit write, not one to
/// guard with a savepoint (which would reach an idle server, fail, and close the session).
/// Found by review.
#[test]
fn a_failed_piece_of_the_relay_s_own_block_leaves_the_session_outside_any_block() {
    let mut d = dialect();
    let (text, _) = send(
        &mut d,
        &q("SELECT 1/0; BEGIN; UPDATE t SET v = 1 WHERE id = 1"),
    );
    assert!(
        text.contains("BEGIN ISOLATION LEVEL REPEATABLE READ"),
        "{text}"
    );
    assert!(d.in_block);
    let mut out = Outgoing::default();
    d.on_reply(
        &Reply {
            failed: true,
            ..Reply::default()
        },
        &mut out,
    );
    assert!(String::from_utf8_lossy(&out.bytes).contains("ROLLBACK"));
    assert!(!d.in_block);
    let (text, plans) = send(&mut d, &q("UPDATE t SET v = 2 WHERE id = 2"));
    assert!(!text.contains("SAVEPOINT"), "{text}");
    assert_eq!(plans, [Plan::Swallow, autocommit()], "{text}");
}

/// A query run whole that rolls its block back and opens another (`ROLLBACK; BEGIN; COPY …`,
/// which cannot go one statement at a time) starts the new block clean: the rolled-back
/// block's pending write is not replayed at the new block's `COMMIT` (that would commit a
/// write the client rolled back). Found by review.
#[test]
fn a_block_rolled_back_and_begun_again_in_one_query_carries_nothing_over() {
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    send(&mut d, &q("UPDATE t SET v = 1 WHERE id = 1"));
    // It met a held row: undone, told its tag, pending for COMMIT.
    replied(
        &mut d,
        Reply {
            pending: true,
            ..Reply::default()
        },
    );
    assert_eq!(d.replays.len(), 1);
    let (text, _) = send(&mut d, &q("ROLLBACK; BEGIN; COPY t (id, v) FROM STDIN"));
    assert!(text.contains("COPY"), "{text}");
    assert!(d.in_block);
    send(&mut d, &message(b'c', b""));
    let mut out = Outgoing::default();
    let commit = q("COMMIT");
    d.on_message(b'Q', &commit[5..], &commit, &mut out);
    assert_eq!(
        out.validate.as_ref().map(|v| v.replays.len()),
        Some(0),
        "{:?}",
        String::from_utf8_lossy(&out.bytes)
    );
}

/// The commit ledger starts clean when the client's own `ROLLBACK` and a `BEGIN` come in one
/// answer (`ROLLBACK; BEGIN; COPY …`): the new block owes nothing, and its `COMMIT` is
/// passed on. The relay's own rollbacks (a doomed block's, followed by its `BEGIN`) keep what
/// the ledger knows. Found by review.
#[test]
fn the_ledger_starts_clean_after_a_client_s_rollback_and_begin_in_one_answer() {
    let tags = |tags: &[&str], status: &[u8]| {
        let mut stream = Vec::new();
        for tag in tags {
            stream.extend_from_slice(&message(b'C', format!("{tag}\0").as_bytes()));
        }
        stream.extend_from_slice(&message(b'Z', status));
        stream
    };
    let (mut responder, _rx) = responder_for(&[Plan::Pass]);
    responder.owed = 1;
    responder.lost_block = true;
    responder.answer_in_block = true;
    let mut out = Vec::new();
    responder.feed(&tags(&["ROLLBACK", "BEGIN"], b"T"), &mut out);
    assert_eq!((responder.owed, responder.lost_block), (0, false));
    // The relay's rollback of a doomed block, then its BEGIN: still lost.
    let (mut responder, _rx) = responder_for(&[Plan::Release, Plan::Swallow]);
    responder.answer_in_block = true;
    let mut out = Vec::new();
    responder.feed(&tags(&["ROLLBACK"], b"I"), &mut out);
    responder.feed(&tags(&["BEGIN"], b"T"), &mut out);
    assert!(responder.lost_block);
    // An undo to the savepoint (its tag is ROLLBACK) keeps what is owed.
    let (mut responder, _rx) = responder_for(&[Plan::Swallow]);
    responder.owed = 1;
    responder.answer_in_block = true;
    responder.feed(&tags(&["ROLLBACK", "RELEASE"], b"T"), &mut out);
    assert_eq!(responder.owed, 1);
}

/// What a query that begins its block again records for the new block stays recorded: its
/// DDL (a catalog change at the new block's `COMMIT`), the tables it used (for `OC001` at
/// `COMMIT`) and its locking reads (validated at `COMMIT`). Found by review.
#[test]
fn a_query_that_begins_its_block_again_keeps_what_it_did_in_the_new_one() {
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    // The old block: DDL of its own, and doomed by a committer.
    send(&mut d, &q("CREATE TABLE old_one (id int)"));
    assert!(d.pending_ddl.is_some());
    d.plans
        .doomed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (text, _) = send(
        &mut d,
        &q("ROLLBACK; BEGIN; CREATE TABLE restarted (id int); COPY restarted FROM STDIN"),
    );
    assert!(text.contains("CREATE TABLE restarted"), "{text}");
    assert!(d.in_block);
    assert_eq!(
        d.pending_ddl.as_deref(),
        Some(&["restarted".to_owned()][..])
    );
    assert!(!d.plans.doomed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(d.block_used.contains_key("restarted"), "{:?}", d.block_used);
    send(&mut d, &message(b'c', b""));
    send(&mut d, &q("ROLLBACK"));
    send(&mut d, &q("BEGIN"));
    send(
        &mut d,
        &q("ROLLBACK; BEGIN; SELECT * FROM t WHERE id = 1 FOR UPDATE; COPY t FROM STDIN"),
    );
    assert_eq!(
        d.replays.len(),
        1,
        "the locking read is validated at COMMIT"
    );
}

/// The ledger's reset after a client's `ROLLBACK` and `BEGIN` in one answer holds whatever the
/// plan of the request they answer: DDL (`Plan::Ddl`), none (messages released at a `Flush`
/// travel without one). Found by review.
#[test]
fn the_ledger_starts_clean_whatever_the_client_request_s_plan() {
    let tags = |tags: &[&str]| {
        let mut stream = Vec::new();
        for tag in tags {
            stream.extend_from_slice(&message(b'C', format!("{tag}\0").as_bytes()));
        }
        stream
    };
    for plans in [&[Plan::Ddl { exists_ok: None }][..], &[]] {
        let (mut responder, _rx) = responder_for(plans);
        responder.owed = 1;
        responder.lost_block = true;
        responder.answer_in_block = true;
        let mut out = Vec::new();
        responder.feed(&tags(&["ROLLBACK", "BEGIN", "CREATE TABLE"]), &mut out);
        assert_eq!(
            (responder.owed, responder.lost_block),
            (0, false),
            "{plans:?}"
        );
    }
}

/// A query run whole in a block that commits and begins again is refused (its `COMMIT` did
/// not pass the commit point) before anything of it is recorded: the block it would have
/// ended, with its pending write, is still the session's. Found by review.
#[test]
fn a_refused_query_that_would_begin_its_block_again_leaves_the_block_as_it_was() {
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    send(&mut d, &q("UPDATE t SET v = 1 WHERE id = 1"));
    replied(
        &mut d,
        Reply {
            pending: true,
            ..Reply::default()
        },
    );
    let began = d.began;
    let (text, _) = send(&mut d, &q("COMMIT; BEGIN; COPY t FROM STDIN"));
    assert!(text.contains("XX000"), "{text}");
    assert_eq!(d.replays.len(), 1, "the pending write is still owed");
    assert_eq!(d.began, began);
}
