//! The crate as a service uses it, written from the README and rustdoc only: a repository type
//! over the pool whose `&self` methods run transfers under `retry_transaction_on`, called from
//! `tokio::spawn` and through an axum-style handler signature, with the service's own error
//! type (`thiserror`), `anyhow`, and this crate's `Error`, and no `Box::pin`, no `Ok::<_, E>`
//! and no hand-written `From`. Only names re-exported by this crate are used.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_postgres_dsql::{
    AsOccConflict, DsqlPool, Error, OccConflict, RetryPolicy, retry_transaction_on,
};

use crate::support::connector;

/// The service's own error type, with `thiserror` as services write them.
#[derive(Debug, thiserror::Error)]
enum BankError {
    #[error(transparent)]
    Dsql(#[from] Error),
    #[error(transparent)]
    Query(#[from] tokio_postgres_dsql::tokio_postgres::Error),
    #[error("account {account} has not enough money")]
    NotEnoughMoney { account: i64 },
}

impl AsOccConflict for BankError {
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self {
            BankError::Dsql(e) => e.occ_conflict(),
            BankError::Query(e) => e.occ_conflict(),
            BankError::NotEnoughMoney { .. } => None,
        }
    }
}

/// A repository over the pool, as a service would keep in its state.
struct Bank {
    pool: DsqlPool,
    policy: RetryPolicy,
    attempts: AtomicU32,
    table: &'static str,
}

impl Bank {
    async fn open(&self, id: i64, balance: i64) -> Result<(), Error> {
        let mut conn = self.pool.get().await?;
        let sql = format!("INSERT INTO {} (id, balance) VALUES ($1, $2)", self.table);
        let sql = sql.as_str();
        retry_transaction_on(&mut conn, &self.policy, |tx| async move {
            tx.execute(sql, &[&id, &balance]).await?;
            Ok(())
        })
        .await
    }

    /// Reads both balances, then writes both: concurrent transfers conflict and are retried.
    async fn transfer(&self, from: i64, to: i64, amount: i64) -> Result<i64, BankError> {
        let mut conn = self.pool.get().await?;
        retry_transaction_on(&mut conn, &self.policy, |tx| async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let select = format!("SELECT balance FROM {} WHERE id = $1", self.table);
            let update = format!("UPDATE {} SET balance = $1 WHERE id = $2", self.table);
            let balance: i64 = tx.query_one(&select, &[&from]).await?.get(0);
            if balance < amount {
                return Err(BankError::NotEnoughMoney { account: from });
            }
            let other: i64 = tx.query_one(&select, &[&to]).await?.get(0);
            tx.execute(&update, &[&(balance - amount), &from]).await?;
            tx.execute(&update, &[&(other + amount), &to]).await?;
            Ok(balance - amount)
        })
        .await
    }

    async fn balance(&self, id: i64) -> anyhow::Result<i64> {
        let mut conn = self.pool.get().await?;
        retry_transaction_on(&mut conn, &self.policy, |tx| async move {
            let sql = format!("SELECT balance FROM {} WHERE id = $1", self.table);
            Ok(tx.query_one(&sql, &[&id]).await?.get(0))
        })
        .await
    }
}

/// What axum asks of a handler: a `Clone + Send + 'static` function whose future is `Send`.
fn assert_handler<H, Fut>(handler: H) -> H
where
    H: Fn(Arc<Bank>, i64) -> Fut + Clone + Send + 'static,
    Fut: Future + Send + 'static,
{
    handler
}

/// A handler as an axum service would write one (`State(bank): State<Arc<Bank>>` unwrapped).
async fn transfer_handler(bank: Arc<Bank>, amount: i64) -> Result<String, String> {
    match bank.transfer(1, 2, amount).await {
        Ok(left) => Ok(left.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn bank(table: &'static str) -> Arc<Bank> {
    let connector = connector("admin", |b| b).await;
    let setup = connector.connect().await.unwrap();
    crate::support::each(
        &setup,
        &[
            &format!("DROP TABLE IF EXISTS {table}"),
            &format!("CREATE TABLE {table} (id bigint PRIMARY KEY, balance bigint NOT NULL)"),
        ],
    )
    .await;
    Arc::new(Bank {
        pool: connector.pool_with(|b| b.max_size(8)).await.unwrap(),
        policy: RetryPolicy::default()
            .with_max_attempts(200)
            .delays(Duration::from_millis(1), Duration::from_millis(40)),
        attempts: AtomicU32::new(0),
        table,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_used_from_eight_spawned_tasks_keeps_every_transfer() {
    let bank = bank("service_account").await;
    bank.open(1, 10_000).await.unwrap();
    bank.open(2, 0).await.unwrap();
    let handler = assert_handler(transfer_handler);
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let bank = bank.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    if task % 2 == 0 {
                        bank.transfer(1, 2, 3).await.unwrap();
                    } else {
                        handler(bank.clone(), 3).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    // 80 transfers of 3, each applied exactly once.
    assert_eq!(bank.balance(1).await.unwrap(), 10_000 - 240);
    assert_eq!(bank.balance(2).await.unwrap(), 240);
    let attempts = bank.attempts.load(Ordering::SeqCst);
    assert!(attempts >= 80, "{attempts}");
    // A refusal of the service's own is returned as is, not retried.
    let before = bank.attempts.load(Ordering::SeqCst);
    match bank.transfer(2, 1, 1_000_000).await {
        Err(BankError::NotEnoughMoney { account: 2 }) => {}
        other => panic!("expected NotEnoughMoney, got {other:?}"),
    }
    assert_eq!(bank.attempts.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn a_database_error_shows_the_servers_message() {
    let bank = bank("service_account_dup").await;
    bank.open(7, 1).await.unwrap();
    let err = bank.open(7, 1).await.unwrap_err();
    assert!(matches!(err, Error::Query { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("23505") && shown.contains("duplicate key value"),
        "{shown}"
    );
    // Through anyhow: the driver's own error for a missing row, as is.
    let err = bank.balance(404).await.unwrap_err();
    assert!(
        err.downcast_ref::<tokio_postgres_dsql::tokio_postgres::Error>()
            .is_some(),
        "{err:#}"
    );
}
