//! Optimistic-concurrency retry: DSQL reports write conflicts as SQLSTATE `40001` (`OC000` data,
//! `OC001` schema), usually at `COMMIT`. The fix is to run the whole transaction again.
//!
//! # Which helper
//!
//! | helper | connection | body | use it for |
//! |---|---|---|---|
//! | [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction) | a fresh checkout per attempt, given back during each backoff | `\|tx\| async move { … }` with a [`PooledTx`] | **services**: retries on a conflict *and* on a connection lost before `COMMIT` (on the peer endpoint when one stops answering); honours every [`RetryPolicy`] field |
//! | [`retry_transaction_on`] | the one you pass, held throughout | `\|tx\| async move { … }` with a [`Tx`] | a connection you already hold (a session setting, a test); `Send`, works in `tokio::spawn` |
//! | [`retry_postgres_transaction_on`] | the one you pass | `async \|tx\| { … }` with a `&mut tokio_postgres::Transaction` | code written against `tokio_postgres::Transaction` (`main`, scripts, tests); not `Send` when the closure captures a reference |
//! | [`retry_statement_on`] | the one you pass | one SQL statement, its own transaction | DDL, `CREATE INDEX ASYNC` (returns its rows: the `job_id`) |
//!
//! All of them retry conflicts only (with the policy's backoff), never a `COMMIT` whose outcome
//! is unknown, and bound each attempt by [`RetryPolicy::attempt_timeout`]; only the pool's can
//! replace a connection, so only it retries a lost connection or a timed-out attempt.
//!
//! The two closure forms of the connection-bound helper:
//!
//! - [`retry_transaction_on`]: the body is a closure returning a future, `|tx| async move { … }`,
//!   that gets a [`Tx`] handle. It works everywhere, including inside `tokio::spawn`, axum
//!   handlers and `&self` methods, and needs no `Box::pin` and no type annotation when the call
//!   is the function's tail expression.
//! - [`retry_postgres_transaction_on`]: the body is an async closure, `async |tx| { … }`, that
//!   gets a `&mut tokio_postgres::Transaction`. Fine in `main`, tests and scripts; but a future
//!   that calls it with a closure capturing any reference is not `Send` to today's compiler
//!   (`implementation of Send is not general enough`), so it cannot go into `tokio::spawn`.
//!
//! ```no_run
//! use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//!
//! struct Accounts {
//!     pool: DsqlPool,
//! }
//!
//! impl Accounts {
//!     /// Moves `amount` between two accounts; a conflict re-runs the whole transaction.
//!     async fn transfer(&self, from: i64, to: i64, amount: i64) -> Result<i64, Error> {
//!         let mut conn = self.pool.get().await?;
//!         retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!             tx.execute("UPDATE account SET balance = balance - $1 WHERE id = $2", &[&amount, &from])
//!                 .await?;
//!             tx.execute("UPDATE account SET balance = balance + $1 WHERE id = $2", &[&amount, &to])
//!                 .await?;
//!             let row = tx.query_one("SELECT balance FROM account WHERE id = $1", &[&from]).await?;
//!             Ok(row.get(0))
//!         })
//!         .await
//!     }
//! }
//!
//! # async fn run(accounts: std::sync::Arc<Accounts>) {
//! // The future is Send: it can be spawned, or returned from an axum handler.
//! tokio::spawn(async move { accounts.transfer(1, 2, 10).await });
//! # }
//! ```
//!
//! # What compiles inside `tokio::spawn`
//!
//! | body | inside `tokio::spawn` / an axum handler |
//! |---|---|
//! | `retry_transaction_on(…, \|tx\| async move { … })` capturing `&self`, `&str`, `&AtomicU32`, copies | compiles |
//! | the same capturing an owned `String` or `Vec` | does not: `async move` moves it out of an `FnMut` closure. Fix: `let name = name.as_str();` (or `&vec`) before the closure, and capture the reference |
//! | `retry_postgres_transaction_on(…, async \|tx\| { … })` capturing only owned values (`async move \|tx\|`) | compiles |
//! | `retry_postgres_transaction_on(…, async \|tx\| { … })` capturing any reference (`&self`, a `&str`) | does not: `implementation of Send is not general enough`; the compiler cannot prove the async closure's future `Send` for every lifetime. Fix: use `retry_transaction_on` |
//!
//! State that must survive across attempts goes through references (`&AtomicU32`, a
//! `&Mutex<…>`): `async move` copies a captured `u32`, so `count += 1` inside the body would
//! change a copy. Better still, return values from the body.
//!
//! The rows above, as doctests. Each pair differs only in the point the row is about.
//!
//! ```no_run
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//! struct Owners { pool: DsqlPool, sql: &'static str }
//! impl Owners {
//!     async fn touch(&self, id: i64) -> Result<(), Error> {
//!         let mut conn = self.pool.get().await?;
//!         retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!             tx.execute(self.sql, &[&id]).await?;
//!             Ok(())
//!         })
//!         .await
//!     }
//! }
//! fn spawn(owners: std::sync::Arc<Owners>) {
//!     tokio::spawn(async move { owners.touch(1).await });
//! }
//! ```
//!
//! ```compile_fail
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_postgres_transaction_on};
//! struct Owners { pool: DsqlPool, sql: &'static str }
//! impl Owners {
//!     async fn touch(&self, id: i64) -> Result<(), Error> {
//!         let mut conn = self.pool.get().await?;
//!         retry_postgres_transaction_on(&mut conn, &RetryPolicy::default(), async |tx| {
//!             tx.execute(self.sql, &[&id]).await?;
//!             Ok(())
//!         })
//!         .await
//!         .map_err(|e| e.into_inner())
//!     }
//! }
//! fn spawn(owners: std::sync::Arc<Owners>) {
//!     // error: implementation of `Send` is not general enough
//!     tokio::spawn(async move { owners.touch(1).await });
//! }
//! ```
//!
//! ```no_run
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//! async fn rename(pool: &DsqlPool, id: i64, name: String) -> Result<(), Error> {
//!     let mut conn = pool.get().await?;
//!     let name = name.as_str();
//!     retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!         tx.execute("UPDATE owner SET name = $1 WHERE id = $2", &[&name, &id]).await?;
//!         Ok(())
//!     })
//!     .await
//! }
//! ```
//!
//! ```compile_fail
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//! async fn rename(pool: &DsqlPool, id: i64, name: String) -> Result<(), Error> {
//!     let mut conn = pool.get().await?;
//!     // error: cannot move out of `name`, a captured variable in an `FnMut` closure
//!     retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!         tx.execute("UPDATE owner SET name = $1 WHERE id = $2", &[&name, &id]).await?;
//!         Ok(())
//!     })
//!     .await
//! }
//! ```
//!
//! ```no_run
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_postgres_transaction_on};
//! // The async-closure form in a spawned task, when the closure owns what it captures.
//! fn spawn(pool: DsqlPool, sql: String) {
//!     tokio::spawn(async move {
//!         let mut conn = pool.get().await?;
//!         retry_postgres_transaction_on(&mut conn, &RetryPolicy::default(), async move |tx| {
//!             tx.execute(&sql, &[]).await?;
//!             Ok::<_, Error>(())
//!         })
//!         .await
//!         .map_err(|e| e.into_inner())
//!     });
//! }
//! ```
//!
//! With your own error type `E`, the body's `?` needs `From<tokio_postgres::Error>` for `E`,
//! `retry_transaction_on` needs `From<`[`Error`]`>` (for a rolled-back or unknown-outcome
//! `COMMIT`), and the helper needs to know which errors are conflicts: implement
//! [`AsOccConflict`] by looking for the database error inside (see its docs for a worked
//! example). This crate's [`Error`] and, with the `anyhow` feature, `anyhow::Error` have all of
//! it already.
//!
//! [`Error`]: crate::Error

pub(crate) mod error;
mod on_connection;
pub(crate) mod policy;
mod pooled;

pub use error::{AsOccConflict, OccConflict, RetryError, occ_conflict};
pub use on_connection::{
    AsClient, Tx, retry_postgres_transaction_on, retry_statement_on, retry_transaction_on,
};
pub use policy::RetryPolicy;
pub use pooled::PooledTx;
