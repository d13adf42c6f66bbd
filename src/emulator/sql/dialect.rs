//! One session's view of DSQL's rules: its state, and what it decides at `COMMIT`.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A prepared statement as the rules see it.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    pub(super) kind: Kind,
    pub(super) write_tag: Option<&'static str>,
    pub(super) tables: Arc<[String]>,
    /// Those it writes.
    pub(super) written: Arc<[String]>,
    /// The parameter types its `Parse` gave (0: for the server to infer).
    pub(super) parameter_types: Arc<[u32]>,
    /// The most rows it writes, when its text bounds them.
    pub(super) most_rows: Option<u64>,
    /// The table and columns its `WHERE` pins ([`rules::Pinned`]).
    pub(super) pinned: Option<Arc<rules::Pinned>>,
    /// `COPY … FROM STDIN`.
    pub(super) copy_in: bool,
    /// Asynchronous DDL run by its job's `SELECT`: the DDL's tag.
    pub(super) job: Option<&'static str>,
    /// Its text as it went upstream (for a replay at `COMMIT`).
    pub(super) text: Arc<str>,
    /// For a locking read: the statement that validates it at `COMMIT`.
    pub(super) touch: Option<Arc<str>>,
    /// It waits for table locks (DDL, `ANALYZE`).
    pub(super) waits: bool,
    /// A DDL with `IF NOT EXISTS` ([`rules::Statement::exists_ok`]).
    pub(super) exists_ok: Option<u64>,
}

pub(super) fn other() -> Prepared {
    Prepared {
        kind: Kind::Other,
        write_tag: None,
        tables: Arc::new([]),
        written: Arc::new([]),
        parameter_types: Arc::new([]),
        most_rows: None,
        pinned: None,
        copy_in: false,
        job: None,
        text: "".into(),
        touch: None,
        waits: false,
        exists_ok: None,
    }
}

/// The parameter type OIDs after a `Parse` body's query text.
pub(super) fn parameter_types(rest: &[u8]) -> Vec<u32> {
    let Some((count, mut oids)) = rest.split_at_checked(2) else {
        return Vec::new();
    };
    let count = u16::from_be_bytes([count[0], count[1]]);
    (0..count)
        .map_while(|_| {
            let (oid, tail) = oids.split_at_checked(4)?;
            oids = tail;
            Some(u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]]))
        })
        .collect()
}

/// A portal: its statement, the bytes of the values bound to it, and, for a write or a
/// locking read, its `Bind` parameters (to replay it at `COMMIT`).
#[derive(Debug, Clone)]
pub(super) struct Portal {
    pub(super) statement: String,
    pub(super) bytes: u64,
    pub(super) params: Option<Arc<[u8]>>,
}

/// The parameter values of a `Bind` body (`None` for NULL), after its portal and statement.
pub(super) fn bound_values(mut rest: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let u16_of = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    let formats = u16_of(take(2)?);
    take(2 * formats)?;
    let count = u16_of(take(2)?);
    (0..count)
        .map(|_| {
            let len = take(4)?;
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            match usize::try_from(len) {
                Ok(len) => take(len).map(Some),
                Err(_) => Some(None),
            }
        })
        .collect()
}

/// The name DSQL gives a parameter's type in its value-size refusal, from the type the
/// `Parse` declared or, failing that, the one PostgreSQL inferred for a named statement.
pub(super) fn value_refusal(statement: &str, prepared: &Prepared, index: usize) -> Refusal {
    let declared = match prepared.parameter_types.get(index) {
        Some(17) => Some("bytea"),
        Some(25) => Some("text"),
        Some(114) => Some("json"),
        Some(1042) => Some("bpchar"),
        Some(1043) => Some("varchar"),
        Some(3802) => Some("jsonb"),
        _ => None,
    };
    let mut refusal = rules::value_limit_exceeded(declared.unwrap_or("text"));
    if declared.is_none() && !statement.is_empty() {
        let prefix = rules::literal(refusal.message.trim_end_matches("text"));
        refusal.message_sql = Some(format!(
            "{prefix} || coalesce((SELECT t.typname FROM pg_prepared_statements p \
             JOIN pg_type t ON t.oid = p.parameter_types[{}]::oid WHERE p.name = {}), 'text')",
            index + 1,
            rules::literal(statement),
        ));
    }
    refusal
}

/// One session's view of DSQL's rules: the transaction it is in, what that transaction did,
/// and its prepared statements.
#[derive(Debug, Default)]
pub(crate) struct Dialect {
    pub(super) in_block: bool,
    pub(super) ddl: bool,
    pub(super) dml: bool,
    pub(super) plans: Plans,
    /// Prepared statement name → what it is.
    pub(super) statements: HashMap<String, Prepared>,
    /// Portal name → statement name.
    pub(super) portals: HashMap<String, Portal>,
    /// An extended-protocol batch being skipped to `Sync` after this refusal.
    pub(super) skipping: Option<Refusal>,
    /// The refusal of the batch being skipped has gone upstream already (at a `Flush`).
    pub(super) refusal_sent: bool,
    /// The client's extended-protocol messages since the last `Sync`, not decided yet.
    pub(super) raw: Vec<u8>,
    /// The decided messages of the current extended-protocol batch not sent yet.
    pub(super) held: Vec<u8>,
    /// What the current extended-protocol batch does.
    pub(super) batch: Batch,
    /// Query texts already read (a service sends the same few again and again), and the
    /// shapes of those whose rules read no constant (a text with literals differs each time).
    pub(super) cache: rules::ShapeCache,
    pub(super) catalog: Arc<Catalog>,
    /// This session's id in the catalog.
    pub(super) session: u64,
    /// The relations this session has used, with the latest catalog change number then.
    pub(super) touched: HashMap<String, u64>,
    /// DDL in the open transaction block, with the relations it names (none for some, such as
    /// `DROP INDEX`), recorded when it commits.
    pub(super) pending_ddl: Option<Vec<String>>,
    /// A catalog change was recorded before PostgreSQL ran it (a DDL outside a block, or the
    /// `COMMIT` of a block with DDL): it is recorded again once its answer is in, so that what
    /// a lookup read of the catalog meanwhile is stale ([`Catalog::bounds_one_row`]).
    pub(super) change_in_flight: bool,
    /// When the open transaction block began.
    pub(super) began: Option<std::time::Instant>,
    /// The bytes of the values the open transaction has written, as far as the relay sees.
    pub(super) tx_bytes: u64,
    /// The relations the open transaction block used, with the latest catalog change number
    /// when it first did.
    pub(super) block_used: HashMap<String, u64>,
    /// The tables the open block wrote (for injected conflicts).
    pub(super) block_written: std::collections::HashSet<String>,
    /// The endpoint's injected conflicts, if the session takes part.
    pub(super) injection: Option<Arc<super::Injection>>,
    /// How long a transaction block may stay open.
    pub(super) age_limit: std::time::Duration,
    /// This session among the database's (dooms, commit tickets).
    pub(super) sessions: Option<Arc<occ::Sessions>>,
    pub(super) entry: Arc<occ::Entry>,
    /// The open transaction block's number (0: none).
    pub(super) block: u64,
    /// What the open transaction replays at `COMMIT` (pending writes, locking reads).
    pub(super) replays: Vec<occ::Replay>,
    /// The replay form of the guarded write whose answer is awaited.
    pub(super) last_write: Option<occ::Replay>,
    /// The savepoint of the last guarded write, which went through, is still open upstream:
    /// it goes (`RELEASE`) with the next savepoint the relay sets in the same transaction
    /// ([`Dialect::savepoint`]), or with the block, rather than in a round trip of its own.
    pub(super) savepoint_kept: bool,
    /// Pieces of a client request the relay sends one at a time, not sent yet.
    pub(super) pieces: VecDeque<Piece>,
    /// What the reported answer the relay waits for is.
    pub(super) awaiting: Awaiting,
    /// A `COMMIT` waiting for its validation, and whether it is an intermediate piece.
    pub(super) commit: Option<(Piece, Option<bool>)>,
    /// The license of the one `COMMIT` about to go upstream: only [`Dialect::commit_point`]
    /// grants it, and the statement that commits takes it ([`Dialect::take_license`]).
    pub(super) validated: bool,
    /// The last extended-protocol batch ran `COPY … FROM STDIN`.
    pub(super) copy_batch: bool,
    /// Its `CopyDone` or `CopyFail` went through: the next `Sync` is the copy's
    /// ([`Plan::CopySync`]).
    pub(super) copy_tail: bool,
    /// The autocommit write whose answer is awaited, to run again as a committer if it meets
    /// a row an open transaction holds.
    pub(super) retry: Option<Retry>,
    /// `raw` holds a `COMMIT`'s `Execute`, which a `Flush` or the hold limit does not release:
    /// the batch waits for its `Sync` ([`Dialect::decide_raw`]).
    pub(super) commit_held: bool,
    /// Messages are being decided before their `Sync` (a `Flush`, the hold limit): they go
    /// upstream without anything the relay would put before the batch.
    pub(super) early: bool,
    /// The rest of a batch whose released part is being ended by a `Sync` of the relay's, and
    /// the client's `Sync` ([`Dialect::on_batch`]).
    pub(super) resume: Option<(Vec<u8>, Vec<u8>)>,
    /// The statement that commits about to go upstream took its license: its request's plan
    /// says so, for the [`Responder`]'s check.
    pub(super) licensed_commit: bool,
    /// The client's extended batch failed before the relay's `Sync` ended it upstream: its
    /// messages are dropped up to its own `Sync`, as PostgreSQL would skip them.
    pub(super) discard_to_sync: bool,
    /// Pieces of a split query still to come before its own `BEGIN`, in the block the relay
    /// opened for them ([`Dialect::on_query`]).
    pub(super) own_block_pieces: usize,
}

/// An autocommit write as the relay runs it again ([`Planned::retry`]): what went before it
/// (the relay's `BEGIN`), the request (with a `Close` before each named `Parse`, so that it can
/// be parsed again), and its plan.
#[derive(Debug, Clone)]
pub(super) struct Retry {
    pub(super) prefix: Option<Vec<u8>>,
    pub(super) request: Vec<u8>,
    pub(super) plan: Plan,
}

/// A piece of a client request: one statement of a multi-statement `Query` (the client's
/// text), or the messages of an extended-protocol batch up to one `Execute`, with the `Sync`
/// that ends it (the relay's, or the client's for the last piece).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Query(String),
    Batch {
        messages: Vec<u8>,
        sync: Vec<u8>,
    },
    /// A refused extended-protocol message, answered once the messages before it ran
    /// (`own_block`: in a block the relay opened, rolled back after the refusal).
    Refusal {
        refusal: Refusal,
        own_block: bool,
    },
}

/// What the reported answer the relay waits for belongs to.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Awaiting {
    pub(super) write: bool,
    pub(super) commit: bool,
    /// A piece of a split request: `Some(intermediate)`.
    pub(super) piece: Option<bool>,
    /// The piece runs in a block the relay opened.
    pub(super) own_block: bool,
    /// A statement that waited for table locks under [`WAIT_LOCK_TIMEOUT`]: the session's
    /// lock timeout goes back to [`LOCK_TIMEOUT`].
    pub(super) waits: bool,
    /// An autocommit write on its first try ([`Dialect::retry`]).
    pub(super) retry: bool,
    /// The relay's `Sync` that ends the released part of a batch ([`Dialect::resume`]).
    pub(super) resume: bool,
    /// The relay's `Sync` before the rollback of a doomed transaction, mid-batch
    /// ([`Dialect::release`]).
    pub(super) release: bool,
}

/// What a `COMMIT` that reached the sending side without its validation is answered (an
/// emulator defect: the decide-side twin of [`UNVALIDATED_COMMIT`]).
pub(crate) const UNLICENSED_COMMIT: &str = "the DSQL emulator refused to send a COMMIT that \
     did not pass its validation (an emulator defect: nothing was committed; please report it \
     with the statements sent)";

/// The most bytes of an extended-protocol batch held back before they go upstream anyway.
pub(super) const HELD_LIMIT: usize = 1 << 20;

/// The most bytes held after a `COMMIT`'s `Execute` waiting for its `Sync` (which nothing can
/// release early): past it the session is closed.
pub(super) const COMMIT_HELD_LIMIT: usize = 64 << 20;

/// What an extended-protocol batch (messages up to a `Sync`) does, as far as the relay has read.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// `Execute` messages.
    pub(super) executes: u32,
    /// Its first write.
    pub(super) write: Option<BatchWrite>,
    /// It begins or ends a transaction block.
    pub(super) transaction_statement: bool,
    /// It parses the unnamed statement.
    pub(super) parsed_unnamed: bool,
    /// It binds the unnamed statement of an earlier batch.
    pub(super) reuses_unnamed: bool,
    /// Some of it went upstream before its `Sync`.
    pub(super) released: bool,
    /// The most rows its writes can write, as far as their texts bound them.
    pub(super) bounded_rows: u64,
    /// One of its writes has no bound in its text.
    pub(super) unbounded: bool,
    /// One of its writes is bounded by a unique index its `WHERE` pins.
    pub(super) key_bounded: bool,
    /// It copies data in: its answer waits for the client (so the relay must not).
    pub(super) copy_in: bool,
    /// The tag of the asynchronous DDL it executes.
    pub(super) job: Option<&'static str>,
    /// It executes DDL.
    pub(super) ddl: bool,
    /// A DDL it executes has `IF NOT EXISTS` ([`rules::Statement::exists_ok`]).
    pub(super) exists_ok: Option<u64>,
    /// It executes a statement that waits for table locks.
    pub(super) waits: bool,
}

#[derive(Debug, Clone)]
pub(super) struct BatchWrite {
    pub(super) in_block: bool,
    pub(super) tag: Option<&'static str>,
    /// The write as the relay would replay it at `COMMIT`.
    pub(super) replay: Option<occ::Replay>,
}

/// The frontend messages in `bytes` (whole ones), as (tag, body, whole message).
pub(super) fn messages(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8], &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = bytes.get(at..at + 5)?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let whole = bytes.get(at..at + 1 + len.max(4))?;
        at += whole.len();
        Some((whole[0], &whole[5..], whole))
    })
}

/// An extended-protocol batch that runs `text` as a statement of the relay's own, through a
/// portal of its own (so that neither the client's unnamed statement and portal nor its named
/// ones change) with the `Bind` parameters `params` (formats and values, as the client sent
/// them), ending with `Sync`.
pub(super) fn statement_batch(text: &str, types: &[u32], params: &[u8]) -> Vec<u8> {
    const NAME: &str = "dsql_emulator_replay";
    // (Both closed first: a portal or statement left by an interrupted run would fail Bind.)
    let mut out = message(b'C', format!("P{NAME}\0").as_bytes());
    crate::emulator::wire::append_message(&mut out, b'C', format!("S{NAME}\0").as_bytes());
    let mut parse = format!("{NAME}\0{text}\0").into_bytes();
    parse.extend_from_slice(&(types.len() as u16).to_be_bytes());
    for oid in types {
        parse.extend_from_slice(&oid.to_be_bytes());
    }
    crate::emulator::wire::append_message(&mut out, b'P', &parse);
    let mut bind = format!("{NAME}\0{NAME}\0").into_bytes();
    bind.extend_from_slice(params);
    bind.extend_from_slice(&0u16.to_be_bytes());
    crate::emulator::wire::append_message(&mut out, b'B', &bind);
    let mut execute = format!("{NAME}\0").into_bytes();
    execute.extend_from_slice(&0u32.to_be_bytes());
    crate::emulator::wire::append_message(&mut out, b'E', &execute);
    crate::emulator::wire::append_message(&mut out, b'C', format!("P{NAME}\0").as_bytes());
    crate::emulator::wire::append_message(&mut out, b'C', format!("S{NAME}\0").as_bytes());
    crate::emulator::wire::append_message(&mut out, b'S', b"");
    out
}

/// The parameter part of a `Bind` body after its portal and statement names (formats and
/// values, without the result formats).
pub(super) fn bind_parameters(rest: &[u8]) -> Option<&[u8]> {
    let u16_at = |at: usize| -> Option<usize> {
        let b = rest.get(at..at + 2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    let mut at = 2 + 2 * u16_at(0)?;
    let count = u16_at(at)?;
    at += 2;
    for _ in 0..count {
        let len = rest.get(at..at + 4)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4 + usize::try_from(len).unwrap_or(0);
    }
    rest.get(..at)
}

impl Dialect {
    /// A session's dialect, sharing `plans` with its [`Responder`] and `catalog` with the
    /// emulator's other sessions.
    pub(crate) fn new(plans: Plans, catalog: Arc<Catalog>, age_limit: std::time::Duration) -> Self {
        let session = catalog.join();
        Dialect {
            plans,
            catalog,
            session,
            age_limit,
            ..Dialect::default()
        }
    }

    /// The session's `COMMIT`s are subject to the endpoint's injected conflicts.
    pub(crate) fn with_injection(mut self, injection: Arc<super::Injection>) -> Self {
        self.injection = Some(injection);
        self
    }

    /// Statements writing `written` went through; inside a block they count for its `COMMIT`.
    pub(super) fn note_written(&mut self, written: &[String]) {
        if self.in_block {
            self.block_written.extend(written.iter().cloned());
        }
    }

    /// The session is `entry` among the database's `sessions`: its transactions take part in
    /// commit-time conflicts with theirs (see [`occ`]).
    pub(crate) fn with_sessions(
        mut self,
        sessions: Arc<occ::Sessions>,
        entry: Arc<occ::Entry>,
    ) -> Self {
        self.sessions = Some(sessions);
        self.entry = entry;
        self
    }

    /// The open transaction has a write pending for its `COMMIT`: its later writes go after
    /// it ([`Plan::Write`]'s `defer`), or, when the relay cannot undo them alone, doom it.
    pub(super) fn pending_writes(&self) -> bool {
        self.in_block && self.replays.iter().any(|r| r.told.is_some())
    }

    /// Ends a transaction block that cannot commit: `COMMIT` fails with `refusal` and the
    /// block is rolled back, so the session is outside any transaction, as on DSQL.
    pub(super) fn fail_commit(&mut self, refusal: &Refusal, out: &mut Outgoing) {
        // Rolled back first: a validation that failed upstream left the block aborted.
        out.push(&query("ROLLBACK"), Some(Plan::Swallow));
        out.push(&raise_query(refusal), Some(Plan::Pass));
        self.plans.doomed.store(false, Ordering::SeqCst);
        self.set_transaction(Transaction::default());
        self.pending_ddl = None;
    }

    /// Why the open block's `COMMIT` fails before anything is validated, if it does: its age,
    /// a conflict it lost, a schema change that landed meanwhile, its size.
    pub(super) fn commit_refusal(&mut self) -> Option<Refusal> {
        if let Some(refusal) = self.too_old() {
            return Some(refusal);
        }
        // A schema change that doomed it is told as the schema change.
        if let Some(refusal) = self.commit_schema_check() {
            return Some(refusal);
        }
        if self.plans.doomed.load(Ordering::SeqCst) || self.entry.doomed(self.block) {
            return Some(change_conflict());
        }
        // A conflict injected on demand reads as a lost race.
        if self
            .injection
            .as_ref()
            .is_some_and(|injection| injection.at_commit(&self.block_written))
        {
            return Some(change_conflict());
        }
        (self.tx_bytes > TX_SIZE_LIMIT).then(|| size_limit_exceeded(self.tx_bytes))
    }

    /// A `COMMIT` (`piece`, a piece of a split request when `intermediate` is `Some`) in a
    /// transaction block: fails at once, or waits for its validation (`true`), or goes on as it
    /// is (`false`: validated already, or nothing to commit).
    pub(super) fn commit_point(
        &mut self,
        piece: &Piece,
        intermediate: Option<bool>,
        out: &mut Outgoing,
    ) -> bool {
        if self.validated || !self.in_block {
            // Validated already (the license stands), or nothing to commit.
            self.validated = true;
            return false;
        }
        if self.replays.is_empty() && self.plans.settled_status() == Some(b'E') {
            // A failed block's COMMIT answers ROLLBACK, as PostgreSQL's does. (With replays
            // owed it is validated all the same: a replay that finds the block failed lets the
            // COMMIT answer ROLLBACK, [`occ::validate`]; a status read too early cannot let a
            // COMMIT past its replays.)
            self.validated = true;
            return false;
        }
        if let Some(refusal) = self.commit_refusal() {
            self.fail_commit(&refusal, out);
            self.end_piece(intermediate, out);
            return true;
        }
        out.validate = Some(occ::Validation {
            replays: std::mem::take(&mut self.replays),
            block: self.block,
        });
        self.commit = Some((piece.clone(), intermediate));
        true
    }

    /// Takes the license of a statement that commits (`kind`) about to go upstream: `None`
    /// when it may go (licensed by [`Dialect::commit_point`], or not a `COMMIT` in a block),
    /// otherwise the refusal that stands in for it. A `COMMIT` no path validated would lose
    /// the transaction's pending writes: it is refused loudly (`XX000`, logged), never sent.
    pub(super) fn take_license(&mut self, kind: Kind) -> Option<Refusal> {
        let licensed = std::mem::take(&mut self.validated);
        if kind == Kind::Commit && licensed {
            self.licensed_commit = true;
        }
        if kind != Kind::Commit || licensed || !self.in_block {
            return None;
        }
        tracing::error!(
            "emulator: a COMMIT reached the relay's sending side without passing its commit \
             point; refused instead of sent"
        );
        Some(Refusal::new("XX000", UNLICENSED_COMMIT))
    }

    /// After the validation of the waiting `COMMIT`: it goes upstream, or fails with
    /// `outcome`'s refusal.
    pub(crate) fn after_validation(&mut self, outcome: Result<(), Refusal>, out: &mut Outgoing) {
        let Some((piece, intermediate)) = self.commit.take() else {
            return;
        };
        match outcome {
            Err(refusal) => {
                self.entry.committed();
                self.fail_commit(&refusal, out);
                self.end_piece(intermediate, out);
            }
            Ok(()) => {
                self.validated = true;
                self.run_piece(piece, intermediate, out);
                self.validated = false;
                // The commit ticket is held until the COMMIT's answer is in.
                out.mark_piece(intermediate.unwrap_or(false));
                self.awaiting.commit = true;
                self.awaiting.piece = intermediate;
            }
        }
    }

    /// The upstream side's answer to a reported request is in: what to do next.
    pub(crate) fn on_reply(&mut self, reply: &Reply, out: &mut Outgoing) {
        let awaited = std::mem::take(&mut self.awaiting);
        if std::mem::take(&mut self.change_in_flight) {
            // (Its relations were recorded already: this only makes earlier lookups stale.)
            self.catalog.record(self.session, &[]);
        }
        if reply.savepoint_kept && self.in_block {
            self.savepoint_kept = true;
        }
        if awaited.write {
            match self.last_write.take() {
                Some(mut replay) if reply.pending && self.in_block => {
                    // A deferred write that went through is replayed against the tag it
                    // answered.
                    if let Some(tag) = &reply.tag {
                        replay.told = Some(tag.clone());
                    }
                    self.replays.push(replay);
                }
                // A pending write the relay cannot replay must not vanish: its transaction
                // cannot commit.
                _ if reply.pending && self.in_block => {
                    self.plans.doomed.store(true, Ordering::SeqCst)
                }
                _ => {}
            }
        }
        if awaited.commit {
            self.entry.committed();
        }
        if awaited.retry {
            match self.retry.take() {
                Some(retry) if reply.pending => self.run_again(retry, out),
                _ => {}
            }
        }
        if awaited.waits {
            out.push(
                &hidden(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'")),
                Some(Plan::Swallow),
            );
        }
        if awaited.release {
            if reply.failed {
                // PostgreSQL was skipping the client's batch to its Sync: so does the relay.
                self.raw.clear();
                self.held.clear();
                self.batch = Batch::default();
                self.skipping = None;
                self.discard_to_sync = true;
            }
            self.roll_back_doomed(out);
        }
        if awaited.resume
            && let Some((raw, sync)) = self.resume.take()
        {
            self.batch = Batch::default();
            if reply.failed {
                // The released part failed: PostgreSQL would skip the rest to the client's
                // Sync, which gets the ReadyForQuery.
                out.push(&sync, Some(Plan::Pass));
                self.end_of_implicit_transaction();
            } else {
                self.on_batch(raw, sync, out);
            }
        }
        if awaited.piece == Some(true) {
            if reply.failed {
                // The request ends here, as PostgreSQL's would at its error.
                self.pieces.clear();
                self.own_block_pieces = 0;
                if awaited.own_block {
                    out.push(&query("ROLLBACK"), Some(Plan::Swallow));
                    // The client is told it is in no block: so is the relay from here (a
                    // request pipelined behind this one is decided before the ROLLBACK's
                    // answer settles the status).
                    self.plans.doomed.store(false, Ordering::SeqCst);
                    self.set_transaction(Transaction::default());
                    self.pending_ddl = None;
                }
            } else {
                self.next_piece(out);
            }
        }
    }

    /// A committer doomed this session's open transaction: roll it back upstream now (the
    /// session is idle), so that its rows are free, and open a block again, so that the
    /// client's later statements run in one until its `COMMIT` fails (`OC000`) or it rolls
    /// back.
    pub(crate) fn release(&mut self, out: &mut Outgoing) {
        // Again after each doom: a doomed transaction the client goes on with takes row
        // locks again, which a later committer may wait for.
        if !(self.in_block && self.entry.doomed(self.block)) {
            return;
        }
        // Not while an answer of the client's is awaited (a COPY waiting for its data among
        // them): the committer dooms again every few milliseconds while it waits, and a later
        // doom finds the session settled.
        if !self.plans.lock().is_empty() || self.copy_batch || self.copy_tail {
            return;
        }
        self.replays.clear();
        if self.batch.released || !self.raw.is_empty() || !self.held.is_empty() {
            // In the middle of an extended batch (part of it went upstream at a Flush, its
            // answers maybe still on their way, PostgreSQL maybe skipping to its Sync after an
            // error): a Sync of the relay's ends that part first (what answers it passes, its
            // ReadyForQuery dropped); after an error in it the rest of the client's batch is
            // skipped to its Sync, as PostgreSQL would have ([`Dialect::on_reply`]).
            out.push(&message(b'S', b""), None);
            out.push_planned(Planned {
                report: true,
                ..Planned::new(Plan::AllButReady)
            });
            self.awaiting.release = true;
            return;
        }
        self.roll_back_doomed(out);
    }

    /// The rollback of a doomed transaction and its new block, as statements of the relay's
    /// own (the client's unnamed statement stays).
    fn roll_back_doomed(&mut self, out: &mut Outgoing) {
        self.savepoint_kept = false;
        out.push(&hidden("ROLLBACK"), Some(Plan::Release));
        out.push(
            &hidden("BEGIN ISOLATION LEVEL REPEATABLE READ"),
            Some(Plan::Swallow),
        );
    }

    /// Follows the server's transaction status when every answer is in: the relay's own
    /// reading of the statements may have missed an error that ended or failed a block.
    pub(super) fn follow_server(&mut self) {
        let Some(status) = self.plans.settled_status() else {
            return;
        };
        // (Part of a batch that went upstream before its Sync has no ReadyForQuery yet: the
        // last one says nothing of it.)
        if !self.raw.is_empty()
            || !self.held.is_empty()
            || !self.pieces.is_empty()
            || self.batch.released
        {
            return;
        }
        match (status, self.in_block) {
            (b'I', true) => {
                self.set_transaction(Transaction::default());
                self.pending_ddl = None;
            }
            (b'T' | b'E', false) => self.set_transaction(Transaction {
                in_block: true,
                ..Transaction::default()
            }),
            _ => {}
        }
    }

    /// `OC001` for a statement naming `tables`, if another session changed one since this
    /// session last used it; it is told once. Either way the tables count as used now.
    pub(super) fn schema_check(&mut self, tables: &[String]) -> Option<Refusal> {
        if tables.is_empty() {
            return None;
        }
        let stale = self.catalog.stale(self.session, &self.touched, tables);
        let now = self.catalog.current();
        for table in tables {
            self.touched.insert(table.clone(), now);
            if self.in_block {
                self.block_used.entry(table.clone()).or_insert(now);
            }
        }
        stale.then(schema_conflict)
    }

    /// `OC001` for a `COMMIT` if another session changed a table this block used after it
    /// first used it (a change that landed mid-transaction); it is told once.
    pub(super) fn commit_schema_check(&mut self) -> Option<Refusal> {
        let used: Vec<String> = self.block_used.keys().cloned().collect();
        if !self.catalog.stale(self.session, &self.block_used, &used) {
            return None;
        }
        let now = self.catalog.current();
        for table in used {
            self.touched.insert(table, now);
        }
        Some(schema_conflict())
    }

    /// After statements of `kind` naming `tables` went through: DDL outside a block is
    /// committed now, inside one when the block commits.
    pub(super) fn note_catalog_change(
        &mut self,
        kinds: &[Kind],
        tables: &[String],
        committed: bool,
    ) {
        if kinds.contains(&Kind::Ddl) {
            self.pending_ddl
                .get_or_insert_with(Vec::new)
                .extend_from_slice(tables);
        }
        // (A change that names no relation still counts: what was known of the catalog, such
        // as unique indexes, is stale after it.)
        if committed && let Some(pending) = self.pending_ddl.take() {
            self.change_in_flight = true;
            let seq = self.catalog.record(self.session, &pending);
            for table in pending {
                self.touched.insert(table, seq);
            }
        }
    }
}

/// The transaction rules' state: in a block or not, and whether it has run DDL or DML.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Transaction {
    pub(super) in_block: bool,
    pub(super) ddl: bool,
    pub(super) dml: bool,
}

impl Transaction {
    pub(super) fn apply(&mut self, kind: Kind) -> Result<(), Refusal> {
        let refuse = |message: &str| Err(Refusal::new("0A000", message));
        match kind {
            Kind::Begin => {
                *self = Transaction {
                    in_block: true,
                    ..Transaction::default()
                }
            }
            Kind::Commit | Kind::Rollback => *self = Transaction::default(),
            Kind::Ddl if self.ddl => {
                return refuse("multiple ddl statements not supported in a transaction");
            }
            Kind::Ddl if self.dml => {
                return refuse("ddl and dml are not supported in the same transaction");
            }
            Kind::Ddl => self.ddl = true,
            Kind::Dml if self.ddl => {
                return refuse("ddl and dml are not supported in the same transaction");
            }
            Kind::Dml => self.dml = true,
            Kind::Other => {}
        }
        Ok(())
    }
}
