//! DSQL's SQL dialect in front of PostgreSQL (`DsqlEmulatorBuilder::sql_rules`).
//!
//! ## Approach
//!
//! The relay reads the client's PostgreSQL v3 messages (not bytes) and follows the server:
//! the transaction state it works with is corrected from each `ReadyForQuery`'s status once
//! every answer is in, and each plan it makes for an answer is checked against that answer (a
//! `ReadyForQuery` no request accounts for, or a statement of the relay's own that fails, closes
//! the session with a `FATAL` that says so, [`Responder`]). Each `Query` and each `Parse` is
//! read with PostgreSQL's own parser (`pg_query`) and checked against DSQL's rules (`rules.rs`:
//! statements and types DSQL refuses, sequence and identity caches, index and `ALTER TABLE`
//! forms, isolation levels, `SET` and `set_config`, savepoints, SQL-level `PREPARE`);
//! `Execute` and every statement of a `Query` are checked against the transaction rules (one
//! DDL per transaction, no DDL with DML). Statements are classified from the parse tree:
//! `BEGIN`, `COMMIT` (`END`, commented) and `ROLLBACK` are distinct kinds wherever they stand.
//! DSQL's `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE` are recognised with
//! PostgreSQL's scanner and sent on without `ASYNC`. The messages of an extended-protocol
//! batch are held until its `Sync` (or a `Flush`), so that whatever the relay puts before a
//! write (a savepoint, a `BEGIN`) goes before the whole batch: a simple `Query` in the middle
//! of a batch would drop its unnamed statement, and be ignored after an error in it. A batch
//! or a multi-statement `Query` that opens, ends or writes in a transaction block goes one
//! statement at a time ([`Piece`]): each piece's `ReadyForQuery` is dropped unless an error
//! ends the request there, so the client sees one answer, as it would from PostgreSQL.
//!
//! A refusal is answered **by PostgreSQL**, which keeps the protocol and the transaction in
//! step: the refused `Query` is replaced by a `DO` block that raises DSQL's SQLSTATE and
//! message; for the extended protocol the refused `Parse` or `Execute` and everything after it
//! up to `Sync` are dropped (as PostgreSQL skips to `Sync` after an error) and the `Sync` is
//! replaced by that `DO` block. The client sees DSQL's `ErrorResponse` and a `ReadyForQuery`
//! with the right status; inside a transaction block the raise aborts the transaction, so
//! every later statement gets `25P02` until `ROLLBACK`, and `COMMIT` answers `ROLLBACK`, as on
//! DSQL. The `CONTEXT` line PL/pgSQL adds to the error is taken out on the way back.
//!
//! ## Commit-time optimistic concurrency
//!
//! DSQL never makes a writer wait, and the first transaction to commit wins: both writers of
//! a row get their `UPDATE 1` at once, and the later to commit fails at `COMMIT` with
//! `40001 change conflicts with another transaction (OC000)`. How the relay gets that out of
//! PostgreSQL, which makes the second writer wait on the row lock, is in [`occ`]: a write in
//! a block goes after a savepoint with a 10 ms lock timeout ([`LOCK_TIMEOUT`]); one that meets
//! a row an open transaction holds is undone to its savepoint, told its tag and kept pending;
//! one that meets a row changed since its snapshot has lost ([`Plan::Write`]'s `guard`).
//! The savepoint of a write that went through stays open (no round trip of its own to let it
//! go): the next write's savepoint lets it go first, in the same `Query` (`RELEASE SAVEPOINT
//! …; SAVEPOINT …`), and the block's end ends it ([`Dialect::savepoint`]), so one stays open
//! at most.
//!
//! **One commit point.** Every statement that can end a transaction block reaches PostgreSQL
//! only through [`Dialect::commit_point`]: the checks that need no server (a lost conflict,
//! `OC001`, size, age), then [`occ::validate`] (replays, dooming the blockers), then the
//! `COMMIT` goes and the relay waits for its answer; a failed `COMMIT` is a `ROLLBACK`
//! followed by the `DO` refusal. The shapes reach it so: a lone `Query`; a multi-statement
//! `Query` or an extended batch that opens, ends or writes in a block goes one statement at a
//! time ([`Piece`]), and each piece that commits passes it; a batch is decided at its `Sync`.
//! A `Flush` or the hold limit ([`HELD_LIMIT`]) never releases a batch that executes a
//! `COMMIT`: the whole batch waits for its `Sync` (a `Query` or `FunctionCall` after such an
//! `Execute` without a `Sync` closes the session instead); when part of the batch went
//! upstream at an earlier `Flush`, a `Sync` of the relay's (its `ReadyForQuery` hidden) ends
//! that part first, so that validation runs between whole batches, and after an error in it
//! the rest is skipped to the client's `Sync`, as PostgreSQL would. Two guards make a bypass
//! loud instead of silent: the commit point grants a license that the statement that commits
//! takes on its way upstream ([`Dialect::take_license`]): a `COMMIT` without one is refused
//! with `XX000` and never sent; and the [`Responder`] keeps a ledger from the answers alone
//! (pending writes not yet replayed, a lost conflict): a `COMMIT` tag for a transaction that
//! still owes one becomes `XX000` ([`UNVALIDATED_COMMIT`]), logged. Two-phase commit
//! (`PREPARE TRANSACTION`, `COMMIT PREPARED`) is refused, as DSQL has none.
//!
//! **Pending writes keep statement order.** Once a transaction has a pending write, each later
//! write the relay guards goes through (so that its client gets its real tag) and is then
//! undone to its savepoint and replayed at `COMMIT` after the pending ones, in statement order
//! ([`Plan::Write`]'s `defer`): `SET v = 5` (pending) then `SET v = v + 10` commit 15, as on
//! DSQL. The alternative, trying the pending writes before the next write goes through, would
//! have to wait for the holder or fail the transaction then, where DSQL neither waits nor
//! fails before `COMMIT`. A later write the relay cannot undo alone (`RETURNING`, a writable
//! `WITH`, a batch flushed before its `Sync`, `COPY`) goes as it is and dooms the transaction:
//! its `COMMIT` fails with `OC000`. (A write the relay cannot see, inside a SQL function a
//! `SELECT` calls, is neither guarded nor deferred.) An autocommit write that meets a held
//! row runs again as the first committer ([`Planned::retry`]). `SELECT … FOR UPDATE` goes
//! without its locking clause and is validated at `COMMIT` by a statement that locks its rows
//! and writes them unchanged (`rules::locking_read`). DDL and `ANALYZE` wait for table locks
//! ([`WAIT_LOCK_TIMEOUT`]), a DDL dooming the open transactions it waits for; a DDL's answer
//! that shows a concurrent change of the same object becomes `OC001` ([`Plan::Ddl`]).
//! Elsewhere PostgreSQL's own lock timeouts, serialization failures and deadlocks reach the
//! client as DSQL's `OC000`.
//!
//! `OC001`: [`Catalog`] records each committed catalog change (DDL, `GRANT`, `REVOKE`; outside
//! a block when sent, inside one at its `COMMIT`) with the relations it names (`pg_query`'s
//! table list, without schema); a session that had used one of them gets the `DO` refusal
//! `40001 schema has been updated by another transaction (OC001)` on its next statement naming
//! it, once, or at `COMMIT` when the change landed while its transaction was open.
//!
//! ## Transaction limits
//!
//! - Rows (3 000): each request that writes ([`Plan::Write`]) is answered before the relay
//!   sends anything more upstream; the [`Responder`] adds up the row counts of the
//!   transaction's command tags. A write outside a transaction block runs in a transaction the
//!   relay opens (a pipelined `BEGIN`) and ends once its answer is in: `COMMIT`, or
//!   `ROLLBACK` when it crossed the limit; not one whose text bounds its rows within the limit
//!   (`INSERT … VALUES`), nor an `UPDATE` or `DELETE` of one table whose `WHERE` sets the
//!   columns of one of its unique indexes equal to constants or parameters (`rules::Pinned`:
//!   one row at most; the relay learns a table's unique indexes in the background after its
//!   first such write, and again after each catalog change, [`Catalog::bounds_one_row`]), nor
//!   a request with `COPY … FROM STDIN`, whose answer waits for the client's data (the relay
//!   must not wait for it). Inside a block the statement that crosses
//!   it is answered `54000 transaction row limit exceeded` by a `DO` refusal, which aborts the
//!   block.
//! - Age (300 s, [`TRANSACTION_AGE_LIMIT`], or the builder's): the first statement after it
//!   gets `54000 transaction age limit of 300s exceeded` with DSQL's DETAIL and aborts the
//!   block; a `COMMIT` then fails and ends it.
//! - Size: 1 MiB a value (refused at the statement, named by the parameter's type), 10 MiB a
//!   transaction (its `COMMIT` fails, [`TX_SIZE_LIMIT`]), and a message over
//!   [`MESSAGE_LIMIT`] closes the connection.
//!
//! ## Known deviations
//!
//! - Conflicts (see [`occ`] for how they are decided): a pending write's change is not
//!   visible to its own transaction before `COMMIT`, nor are the transaction's later writes
//!   (deferred behind it: a deferred write is told what it answered without them, and a
//!   replay that answers otherwise fails the `COMMIT` with `OC000`; the history checker,
//!   `tests/dsql/history.rs`, counts reads that miss an own write apart); an extended batch
//!   that executes a `COMMIT` is answered from its `Sync` on (a `Flush` releases nothing of
//!   it); a write flushed before its `Sync` gets no savepoint (one that meets a held row fails
//!   with `OC000` at the statement); a doomed transaction's later statements
//!   run on a fresh snapshot without its earlier writes (its `COMMIT` fails either way); a
//!   pending write is told a one-row tag and its `COMMIT` fails if the replay answers another;
//!   a write with `RETURNING`, a locking read over a subquery or a set operation, and several
//!   writes in one autocommit request that meet a held row get `OC000` at the statement;
//!   `FOR KEY SHARE` is validated by taking its lock again, unwritten; only transactions of the emulator's own
//!   sessions are doomed; a read that waits for a running DDL's lock gets `OC000` after
//!   10 ms. A DDL that PostgreSQL then refuses still counts as a schema change, and a DDL in a
//!   block that dooms others and then rolls back doomed them for nothing. Relation names are
//!   compared without their schema.
//! - After a write in a block, the block's later statements run inside the relay's savepoint
//!   (a subtransaction): `pg_export_snapshot()` then fails, as it does in any subtransaction.
//!   A query that rolls its block back and opens another while it runs whole (`ROLLBACK;
//!   BEGIN; COPY …`) starts the new block clean; the tables, DDL and locking reads of the
//!   whole query, those before its `ROLLBACK` too, count for the new block (a spurious
//!   `OC001` elsewhere at worst).
//! - Catalog-dependent rules (24 indexes a table, 10 schemas, no primary-key column drop) are
//!   checked by event triggers in the upstream (`bootstrap.sql`), after PostgreSQL has run the
//!   statement, which then fails and is undone; they act in sessions the relay opened with the
//!   rules on ([`RULES_PARAMETER`]). `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE`
//!   run synchronously, inside `SELECT sys.dsql_emulator_ddl_job(…) AS job_id` (one statement,
//!   so either protocol gets the `job_id` row); that `SELECT`'s tag is replaced by the DDL's
//!   ([`Plan::Job`]).
//! - Sizes: a value over 1 MiB is found among a write's bound values and the string constants
//!   of its text; the 10 MiB of a transaction are the bytes of its writes' texts and bound
//!   values (data PostgreSQL makes itself and index entries are not counted).
//! - Row limit: rows of a write's `RETURNING` reach the client before the `54000`; a query
//!   text that opens and commits its own block (`BEGIN; INSERT …; COMMIT` in one `Query`) is
//!   counted but not stopped; writes inside a `WITH`, and `COPY`, are not counted. An
//!   autocommit write whose text does not bound its rows (nor a unique index, above) costs one
//!   more round trip to PostgreSQL (its `COMMIT`), and pipelined requests behind a write wait
//!   for its answer. A batch that binds the unnamed statement of an earlier batch, or was
//!   flushed before its `Sync`, gets no savepoint and, in autocommit, no row limit. What the
//!   relay knows of unique indexes is kept until a catalog change through the emulator: one
//!   dropped by a connection straight to the upstream, or by a DDL whose change the relay
//!   recorded before PostgreSQL ran it while a lookup was reading the catalog, may still bound
//!   an `UPDATE` that then writes over 3 000 rows without the `54000`. A table name that
//!   several schemas use gets no bound unless the statement names its schema.
//! - Memory: each server message is held whole while the relay reads it (a very large row
//!   sits in memory until it is passed on).
//! - A query that opens its block after other statements (`UPDATE …; BEGIN; …`) runs in a
//!   block the relay opens before them, so its own `BEGIN` is answered with PostgreSQL's
//!   `WARNING there is already a transaction in progress` besides its tag.
//! - A doomed transaction is rolled back upstream only while the session has no answer
//!   outstanding (a later doom finds it settled); in the middle of an extended batch the
//!   relay ends the batch's released part with a `Sync` of its own first, so the client's
//!   portals of that batch are gone (the transaction cannot commit either way).
//! - The transaction rules follow the statements the relay has seen, as it reads them: a
//!   client pipelining statements across a failed one may see a rule applied to a statement
//!   PostgreSQL then skips.
//! - Rules apply when a statement is parsed (`Parse`) and, for the transaction rules, when it
//!   is executed; DSQL may apply some later (at `Bind`).

#[cfg(test)]
mod block_tests;
mod bootstrap;
mod catalog;
mod dialect;
mod extended;
mod inject;
mod messages;
pub(crate) mod occ;
mod plan;
mod responder;
pub(crate) mod rules;
#[cfg(test)]
mod savepoint_tests;
mod simple;
#[cfg(test)]
mod tests;

pub(crate) use bootstrap::*;
pub(crate) use catalog::*;
pub(crate) use dialect::*;
pub(crate) use inject::Injection;
pub(crate) use messages::*;
pub(crate) use plan::*;
pub(crate) use responder::*;

use rules::{Classified, Kind, Refusal, Statement};
