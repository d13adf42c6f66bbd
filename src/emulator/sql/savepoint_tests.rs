//! Unit tests of the savepoint the relay puts before a guarded write in a transaction block.

use super::tests::{bind, dialect, execute, guard, parse, q, replied, responder_for, send, sync};
use super::*;

/// A guarded write that went through keeps its savepoint until the next one (no round trip of
/// its own: a block of many writes nests one savepoint at most); one after a pending write is
/// undone and replayed at COMMIT against the tag it answered (statement order).
#[test]
fn a_guarded_write_keeps_its_savepoint_and_a_deferred_one_is_replayed() {
    let went_through = || {
        let mut stream = super::message(b'C', b"SAVEPOINT\0");
        stream.extend_from_slice(&super::message(b'Z', b"T"));
        stream.extend_from_slice(&super::message(b'C', b"UPDATE 2\0"));
        stream.extend_from_slice(&super::message(b'Z', b"T"));
        stream
    };
    let (mut responder, mut rx) = responder_for(&[Plan::Swallow, guard("UPDATE 1")]);
    let mut out = Vec::new();
    responder.feed(&went_through(), &mut out);
    let reply = rx.try_recv().unwrap();
    assert!(!reply.pending && reply.savepoint_kept, "{reply:?}");
    assert!(reply.requests.is_empty(), "{reply:?}");
    let deferred = Plan::Write {
        guard: Some("UPDATE 1"),
        autocommit: false,
        oversize: None,
        defer: true,
    };
    let (mut responder, mut rx) = responder_for(&[Plan::Swallow, deferred]);
    let mut out = Vec::new();
    responder.feed(&went_through(), &mut out);
    // The client has its real answer.
    assert!(String::from_utf8_lossy(&out).contains("UPDATE 2"));
    let reply = rx.try_recv().unwrap();
    assert!(reply.pending && !reply.savepoint_kept, "{reply:?}");
    assert_eq!(reply.tag.as_deref(), Some("UPDATE 2"));
    assert_eq!(
        reply.requests,
        [(
            query("ROLLBACK TO SAVEPOINT dsql_emulator_occ; RELEASE SAVEPOINT dsql_emulator_occ"),
            Plan::Swallow
        )]
    );
    assert_eq!(responder.owed, 1);
}

/// The savepoint a guarded write left open goes with the next savepoint of its block (one
/// `Query`, so one savepoint at most is open), never into another block: a `COMMIT`, a
/// `ROLLBACK` or the rollback of a doomed block ends it, and a write there sets a plain one.
#[test]
fn a_kept_savepoint_goes_with_the_next_one_and_never_outlives_its_block() {
    let kept = |d: &mut Dialect| {
        replied(
            d,
            Reply {
                savepoint_kept: true,
                ..Reply::default()
            },
        )
    };
    let write = |d: &mut Dialect| {
        let (text, plans) = send(d, &q("UPDATE t SET v = v + 1 WHERE id = 1"));
        assert_eq!(plans, [Plan::Swallow, guard("UPDATE 1")], "{text}");
        let releases = text.contains("RELEASE SAVEPOINT dsql_emulator_occ; SAVEPOINT");
        assert!(releases || !text.contains("RELEASE"), "{text}");
        releases
    };
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    assert!(!write(&mut d), "the block's first savepoint");
    kept(&mut d);
    assert!(write(&mut d), "the second lets the first go");
    // The second is undone (`ROLLBACK TO` and `RELEASE`, no reply saying it was kept): the
    // first went with it, so nothing is open.
    replied(&mut d, Reply::default());
    assert!(!write(&mut d), "nothing open after an undo");
    kept(&mut d);
    send(&mut d, &q("SELECT 1"));
    assert!(write(&mut d), "a read in between changes nothing");
    for end in ["COMMIT", "ROLLBACK"] {
        kept(&mut d);
        let mut out = Outgoing::default();
        let whole = q(end);
        d.on_message(b'Q', &whole[5..], &whole, &mut out);
        if out.validate.is_some() {
            out.clear();
            d.after_validation(Ok(()), &mut out);
        }
        assert!(!d.in_block, "{end}");
        send(&mut d, &q("BEGIN"));
        assert!(!write(&mut d), "the block after a {end}");
    }
    // Doomed: the relay rolls the block back upstream and opens another.
    kept(&mut d);
    d.plans.lock().clear();
    d.entry.doom_for_test(d.block);
    let mut out = Outgoing::default();
    d.release(&mut out);
    assert!(String::from_utf8_lossy(&out.bytes).contains("ROLLBACK"));
    assert!(!write(&mut d), "the block the relay opened after a doom");
    // Extended: the same prefix before the batch.
    kept(&mut d);
    send(&mut d, &parse("", "DELETE FROM t WHERE id = $1"));
    send(&mut d, &bind(""));
    send(&mut d, &execute());
    let (text, plans) = send(&mut d, &sync());
    assert!(
        text.as_bytes().starts_with(&q(
            "RELEASE SAVEPOINT dsql_emulator_occ; SAVEPOINT dsql_emulator_occ"
        )),
        "{text}"
    );
    assert_eq!(plans, [Plan::Swallow, guard("DELETE 1")]);
}

/// A query the relay runs whole that ends the block and opens another (`COPY … FROM STDIN`
/// keeps it from going one statement at a time) ends the kept savepoint with its block: the
/// next block's write sets a plain one (a `RELEASE` there would fail, and close the session).
/// Found by review.
#[test]
fn a_whole_query_that_ends_the_block_ends_its_kept_savepoint() {
    let mut d = dialect();
    send(&mut d, &q("BEGIN"));
    send(&mut d, &q("UPDATE t SET v = v + 1 WHERE id = 1"));
    replied(
        &mut d,
        Reply {
            savepoint_kept: true,
            ..Reply::default()
        },
    );
    for whole in [
        "ROLLBACK; BEGIN; COPY t (id, v) FROM STDIN",
        "ROLLBACK; START TRANSACTION; COPY t (id, v) FROM STDIN",
    ] {
        let (text, _) = send(&mut d, &q(whole));
        assert!(text.contains("COPY"), "{text}");
        assert!(d.in_block, "{whole}");
        send(&mut d, &message(b'c', b""));
        let (text, plans) = send(&mut d, &q("UPDATE t SET v = 0 WHERE id = 2"));
        assert_eq!(plans, [Plan::Swallow, guard("UPDATE 1")], "{text}");
        assert!(!text.contains("RELEASE"), "after {whole}: {text}");
        replied(
            &mut d,
            Reply {
                savepoint_kept: true,
                ..Reply::default()
            },
        );
    }
}
