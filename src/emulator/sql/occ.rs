//! Commit-time conflicts across the sessions of one database, as DSQL decides them: the first
//! transaction to commit wins (`DSQL_SQL_RULES.md` §6).
//!
//! PostgreSQL decides the other way round: a write waits for the row lock an open transaction
//! holds, so the first *writer* wins. The relay keeps PostgreSQL's row versions and locks as
//! they are and changes who waits:
//!
//! - A write that meets a row an open transaction holds (a lock timeout) is undone alone (to
//!   the savepoint the relay put before it), the client told its tag, and the write kept as
//!   *pending* ([`Replay`]); so is a `SELECT … FOR UPDATE`, which goes upstream without its
//!   locking clause (it never waits) and is replayed as a statement that locks and writes its
//!   rows (`sys.dsql_emulator_touch`); a `SELECT … FOR KEY SHARE` likewise, replayed as a
//!   statement that takes its key-share locks again, writing nothing (so that only a delete or
//!   a key change conflicts with it: one still open is doomed, one committed since fails it).
//! - At `COMMIT`, whatever the protocol shape, the session takes a commit ticket and replays
//!   its pending statements ([`validate`]) under a lock timeout long enough to wait. While a
//!   replay waits, the emulator's monitor connection asks PostgreSQL who blocks it
//!   (`pg_blocking_pids`), and each blocker that is an open transaction of one of the
//!   emulator's sessions, not already committing ahead of this one, is *doomed*: its session
//!   rolls its transaction back upstream as soon as it is idle (keeping a transaction block
//!   open for the client, [`Dialect::release`](super::Dialect::release)), which frees the
//!   rows, and its `COMMIT` will answer `40001 … (OC000)`. It is rolled back again at each
//!   later doom: a client that goes on in its doomed transaction takes row locks again. A replay that fails (the rows were
//!   changed by a transaction that committed first: PostgreSQL's serialization failure) or
//!   answers another tag than the client was told fails the `COMMIT` with `OC000`.
//! - A transaction that committed first leaves its rows changed (a `FOR UPDATE` read's rows
//!   are written unchanged), so a later committer's write or locking read of them fails at
//!   its own `COMMIT`: nothing a client was told committed is lost. A key-share read leaves no
//!   such trace: a delete of its key that meets the reader's lock while the reader commits is
//!   kept pending and then commits too (a conflict DSQL would report, missed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::rules::Refusal;
use super::{Plan, Planned, Plans, Reply};

/// How long a replay at `COMMIT` waits for a row lock (the holder is doomed meanwhile; one
/// that is not the emulator's, or commits ahead, keeps it).
pub(crate) const REPLAY_LOCK_TIMEOUT: &str = "5s";

/// The longest a replay's answer is awaited before the session is given up.
const REPLAY_BOUND: Duration = Duration::from_secs(60);

/// How often a waiting replay asks who blocks it.
const POLL: Duration = Duration::from_millis(2);

/// A statement replayed at `COMMIT`: the request (a `Query`, or an extended-protocol batch
/// ending with `Sync`) and the command tag the client was told, when it was told one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replay {
    pub(crate) request: Vec<u8>,
    pub(crate) told: Option<String>,
}

/// What a `COMMIT` must validate before it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Validation {
    pub(crate) replays: Vec<Replay>,
    /// The transaction block being committed ([`Entry`]'s numbering).
    pub(crate) block: u64,
}

/// One session, as the other sessions of its database see it.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    /// Its upstream backend's process id.
    pid: AtomicI32,
    /// Its open transaction block's number (0: none).
    block: AtomicU64,
    /// The block a committer doomed.
    doomed: AtomicU64,
    /// Its commit ticket while it validates and commits (0: none): a committer that took a
    /// later ticket does not doom it.
    committing: AtomicU64,
    /// Told when a committer dooms it: it rolls back upstream when idle.
    pub(crate) release: Notify,
}

impl Entry {
    /// Records that the session opened transaction block `block`.
    pub(crate) fn begin(&self, block: u64) {
        self.block.store(block, Ordering::SeqCst);
    }

    /// Records that the session's block ended.
    pub(crate) fn end(&self) {
        self.block.store(0, Ordering::SeqCst);
    }

    /// Whether a committer doomed block `block`.
    pub(crate) fn doomed(&self, block: u64) -> bool {
        block != 0 && self.doomed.load(Ordering::SeqCst) == block
    }

    /// Dooms block `block` as a committer would (for tests of what the session does then).
    #[cfg(test)]
    pub(crate) fn doom_for_test(&self, block: u64) {
        self.doomed.store(block, Ordering::SeqCst);
    }

    /// The session's `COMMIT` is done (committed or failed).
    pub(crate) fn committed(&self) {
        self.committing.store(0, Ordering::SeqCst);
    }
}

/// The sessions of one database (shared by the two endpoints of a pair), and the monitor
/// connection that asks PostgreSQL who blocks whom.
#[derive(Debug)]
pub(crate) struct Sessions {
    entries: Mutex<HashMap<i32, Arc<Entry>>>,
    tickets: AtomicU64,
    blocks: AtomicU64,
    /// How to reach the upstream as its superuser.
    url: String,
    monitor: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// The connection that looks up tables' unique indexes ([`Sessions::unique_keys`]): apart
    /// from the monitor, which conflicts must not wait behind.
    catalog_reader: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// A session's membership, removed from [`Sessions`] when dropped.
pub(crate) struct Member {
    sessions: Arc<Sessions>,
    pub(crate) entry: Arc<Entry>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let pid = self.entry.pid.load(Ordering::SeqCst);
        let mut entries = self.sessions.lock();
        if entries
            .get(&pid)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            entries.remove(&pid);
        }
    }
}

impl Sessions {
    /// The sessions of the database behind `url` (a superuser's connection string).
    pub(crate) fn new(url: String) -> Sessions {
        Sessions {
            entries: Mutex::default(),
            tickets: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            url,
            monitor: tokio::sync::Mutex::new(None),
            catalog_reader: tokio::sync::Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the session whose upstream backend is `pid`.
    pub(crate) fn join(self: &Arc<Self>, pid: i32) -> Member {
        let entry = Arc::new(Entry::default());
        entry.pid.store(pid, Ordering::SeqCst);
        self.lock().insert(pid, entry.clone());
        Member {
            sessions: self.clone(),
            entry,
        }
    }

    /// A commit ticket for `entry`'s session, which holds it until [`Entry::committed`].
    fn commit_ticket(&self, entry: &Entry) -> u64 {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        entry.committing.store(ticket, Ordering::SeqCst);
        ticket
    }

    /// A new transaction block's number (unique in the database).
    pub(crate) fn next_block(&self) -> u64 {
        self.blocks.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Dooms the open transaction of the session whose backend is `pid`, for the committer
    /// holding `ticket`, unless it is committing ahead of it or has no open block.
    fn doom(&self, pid: i32, ticket: u64) {
        let Some(entry) = self.lock().get(&pid).cloned() else {
            return;
        };
        let committing = entry.committing.load(Ordering::SeqCst);
        if committing != 0 && committing < ticket {
            return;
        }
        let block = entry.block.load(Ordering::SeqCst);
        if block == 0 {
            return;
        }
        entry.doomed.store(block, Ordering::SeqCst);
        entry.release.notify_one();
        tracing::debug!(pid, "emulator: a committer doomed an open transaction");
    }

    /// The superuser connection in `slot`, connected first if it is not (within 5 s; `what`
    /// names it in the warning when it cannot be).
    async fn connected<'a>(
        &self,
        slot: &'a mut Option<tokio_postgres::Client>,
        what: &str,
    ) -> Option<&'a tokio_postgres::Client> {
        if slot.is_none() {
            let connect = tokio_postgres::connect(&self.url, tokio_postgres::NoTls);
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok((client, connection))) => {
                    tokio::spawn(connection);
                    *slot = Some(client);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "emulator: {what} cannot connect");
                    return None;
                }
                Err(_) => {
                    tracing::warn!("emulator: {what} cannot connect (timeout)");
                    return None;
                }
            }
        }
        slot.as_ref()
    }

    /// The columns of each unique index of `table` (in `schema`, or the only relation of that
    /// name in the database: a name another schema also uses gets none, whatever the
    /// session's `search_path`) that bounds the rows a `WHERE` setting them equal can match:
    /// valid, not partial, on columns only, of a plain table with no child tables and no rules
    /// (an `INSTEAD` rule writes elsewhere). `None` when
    /// the upstream cannot be asked.
    pub(crate) async fn unique_keys(
        &self,
        schema: Option<&str>,
        table: &str,
    ) -> Option<Vec<Vec<String>>> {
        const QUERY: &str = "\
            WITH named AS ( \
                SELECT c.oid, c.relkind, c.relhassubclass, c.relhasrules FROM pg_class c \
                JOIN pg_namespace n ON n.oid = c.relnamespace \
                WHERE c.relname = $1 AND ($2::text IS NULL OR n.nspname = $2)) \
            SELECT array_agg(a.attname::text ORDER BY a.attname) \
            FROM named t JOIN pg_index i ON i.indrelid = t.oid \
            JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (i.indkey) \
            WHERE (SELECT count(*) FROM named) = 1 AND t.relkind = 'r' \
                AND NOT t.relhassubclass AND NOT t.relhasrules AND i.indisunique \
                AND i.indisvalid \
                AND i.indisready AND i.indislive AND i.indpred IS NULL \
                AND i.indexprs IS NULL AND NOT (0 = ANY (i.indkey::int2[])) \
            GROUP BY i.indexrelid";
        let mut reader = self.catalog_reader.lock().await;
        let client = self.connected(&mut reader, "the catalog reader").await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&table, &schema];
        let asked = client.query(QUERY, &params);
        match tokio::time::timeout(Duration::from_secs(5), asked).await {
            Ok(Ok(rows)) => Some(
                rows.iter()
                    .filter_map(|row| row.try_get::<_, Vec<String>>(0).ok())
                    .collect(),
            ),
            Ok(Err(error)) => {
                tracing::warn!(%error, "emulator: the catalog reader's lookup failed");
                *reader = None;
                None
            }
            Err(_) => {
                *reader = None;
                None
            }
        }
    }

    /// The backends that block `pid` now (none when the monitor cannot ask).
    async fn blockers(&self, pid: i32) -> Vec<i32> {
        let mut monitor = self.monitor.lock().await;
        let Some(client) = self.connected(&mut monitor, "the conflict monitor").await else {
            return Vec::new();
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&pid];
        let asked = client.query_one("SELECT pg_blocking_pids($1)", &params);
        match tokio::time::timeout(Duration::from_secs(5), asked).await {
            Ok(Ok(row)) => row.get(0),
            _ => {
                *monitor = None;
                Vec::new()
            }
        }
    }
}

/// Why a validation could not run to its end: the relay lost its upstream or its answers.
#[derive(Debug)]
pub(crate) struct Lost(pub(crate) &'static str);

/// Validates a `COMMIT` (see the module docs): `Ok(Err(refusal))` when it must fail with
/// `refusal` (`OC000`), `Err` when the session can go on no more.
pub(crate) async fn validate<W: AsyncWrite + Unpin>(
    validation: Validation,
    sessions: &Sessions,
    entry: &Entry,
    plans: &Plans,
    upstream: &mut W,
    replies: &mut tokio::sync::mpsc::Receiver<Reply>,
) -> Result<Result<(), Refusal>, Lost> {
    let ticket = sessions.commit_ticket(entry);
    let conflict = || Ok(Err(super::change_conflict()));
    if entry.doomed(validation.block) {
        return conflict();
    }
    if validation.replays.is_empty() {
        return Ok(Ok(()));
    }
    let pid = entry.pid.load(Ordering::SeqCst);
    let mut send = super::query(&format!("SET LOCAL lock_timeout = '{REPLAY_LOCK_TIMEOUT}'"));
    plans.push(Planned::new(Plan::Swallow));
    for replay in validation.replays {
        plans.push(Planned::new(Plan::Replay {
            owed: replay.told.is_some(),
        }));
        send.extend_from_slice(&replay.request);
        upstream
            .write_all(&send)
            .await
            .map_err(|_| Lost("upstream closed"))?;
        upstream
            .flush()
            .await
            .map_err(|_| Lost("upstream closed"))?;
        send.clear();
        let reply = reply_dooming(sessions, pid, ticket, replies).await?;
        if reply.error.as_deref() == Some("25P02") {
            // The block had failed before its COMMIT (an error the client was told): nothing
            // of it can commit, and its COMMIT answers ROLLBACK, as on DSQL.
            return Ok(Ok(()));
        }
        let told_otherwise = replay.told.is_some() && reply.tag != replay.told;
        if reply.error.is_some() || told_otherwise {
            // (Tags and SQLSTATEs only: the replayed request carries the client's values.)
            tracing::debug!(
                tag = ?reply.tag,
                error = ?reply.error,
                told = ?replay.told,
                "emulator: a replay at COMMIT failed"
            );
            return conflict();
        }
    }
    Ok(Ok(()))
}

/// The reply to a request that commits on its own (DDL), dooming the open transactions whose
/// locks it waits for; the session's commit ticket is given back then.
pub(crate) async fn committed_reply(
    sessions: &Sessions,
    entry: &Entry,
    replies: &mut tokio::sync::mpsc::Receiver<Reply>,
) -> Result<Reply, Lost> {
    let ticket = sessions.commit_ticket(entry);
    let pid = entry.pid.load(Ordering::SeqCst);
    let reply = reply_dooming(sessions, pid, ticket, replies).await;
    entry.committed();
    reply
}

/// Waits for the next reply while dooming, every [`POLL`], the open transactions that block
/// backend `pid` (for the committer holding `ticket`); bounded by [`REPLAY_BOUND`].
async fn reply_dooming(
    sessions: &Sessions,
    pid: i32,
    ticket: u64,
    replies: &mut tokio::sync::mpsc::Receiver<Reply>,
) -> Result<Reply, Lost> {
    let answer = async {
        loop {
            tokio::select! {
                biased;
                reply = replies.recv() => return reply,
                () = tokio::time::sleep(POLL) => {
                    for blocker in sessions.blockers(pid).await {
                        sessions.doom(blocker, ticket);
                    }
                }
            }
        }
    };
    tokio::time::timeout(REPLAY_BOUND, answer)
        .await
        .map_err(|_| Lost("no answer while waiting for a lock"))?
        .ok_or(Lost("the server side ended"))
}
