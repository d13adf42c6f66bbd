//! Checkout + `SELECT 1` through three pools on the same emulator, with the same TLS
//! configuration and a valid token: ours, `bb8-postgres` and `deadpool-postgres` (the
//! baselines, in the same run), with 1 and 16 concurrent tasks. Each pool uses its defaults
//! (deadpool with `RecyclingMethod::Fast`) and at most 16 connections.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tokio_postgres_dsql::DsqlConnectionManager;

const MAX_SIZE: u32 = 16;

/// One checkout and one query, for any of the three pools.
trait Checkout: Clone + Send + Sync + 'static {
    fn run(&self) -> impl std::future::Future<Output = ()> + Send;
}

#[derive(Clone)]
struct Ours(bb8::Pool<DsqlConnectionManager>);

impl Checkout for Ours {
    async fn run(&self) {
        let conn = self.0.get().await.unwrap();
        conn.simple_query("SELECT 1").await.unwrap();
    }
}

type Bb8Pg = bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres_dsql::DsqlTls>>;

#[derive(Clone)]
struct Bb8Postgres(Bb8Pg);

impl Checkout for Bb8Postgres {
    async fn run(&self) {
        let conn = self.0.get().await.unwrap();
        conn.simple_query("SELECT 1").await.unwrap();
    }
}

#[derive(Clone)]
struct Deadpool(deadpool_postgres::Pool);

impl Checkout for Deadpool {
    async fn run(&self) {
        let conn = self.0.get().await.unwrap();
        conn.simple_query("SELECT 1").await.unwrap();
    }
}

/// `iters` checkouts spread over `tasks` concurrent tasks; the total time.
async fn drive(pool: impl Checkout, tasks: u64, iters: u64) -> Duration {
    let per_task = iters.div_ceil(tasks);
    let pool = Arc::new(pool);
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    pool.run().await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    start
        .elapsed()
        .mul_f64(iters as f64 / (per_task * tasks) as f64)
}

fn pools(c: &mut Criterion) {
    let rt = support::runtime();
    let emulator = support::emulator(&rt);
    let (ours, bb8_pg, deadpool) = rt.block_on(async {
        let connector = support::connector(&emulator, "admin", |b| b).await;
        let ours = connector
            .pool_builder()
            .max_size(MAX_SIZE)
            .build(DsqlConnectionManager::new(connector.clone()))
            .await
            .unwrap();
        // The baselines get the same settings, the same TLS and a valid token as password.
        let mut config = connector.postgres_config().clone();
        config.password(connector.token().await.unwrap().as_str());
        let bb8_pg = bb8::Pool::builder()
            .max_size(MAX_SIZE)
            .build(bb8_postgres::PostgresConnectionManager::new(
                config.clone(),
                connector.tls(),
            ))
            .await
            .unwrap();
        let manager = deadpool_postgres::Manager::from_config(
            config,
            connector.tls(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let deadpool = deadpool_postgres::Pool::builder(manager)
            .max_size(MAX_SIZE as usize)
            .build()
            .unwrap();
        (Ours(ours), Bb8Postgres(bb8_pg), Deadpool(deadpool))
    });

    let mut group = c.benchmark_group("checkout_select_1");
    for tasks in [1u64, 16] {
        group.bench_with_input(
            BenchmarkId::new("tokio-postgres-dsql", tasks),
            &tasks,
            |b, &tasks| {
                b.to_async(&rt)
                    .iter_custom(|iters| drive(ours.clone(), tasks, iters))
            },
        );
        group.bench_with_input(
            BenchmarkId::new("bb8-postgres", tasks),
            &tasks,
            |b, &tasks| {
                b.to_async(&rt)
                    .iter_custom(|iters| drive(bb8_pg.clone(), tasks, iters))
            },
        );
        group.bench_with_input(
            BenchmarkId::new("deadpool-postgres", tasks),
            &tasks,
            |b, &tasks| {
                b.to_async(&rt)
                    .iter_custom(|iters| drive(deadpool.clone(), tasks, iters))
            },
        );
    }
    group.finish();
}

criterion_group!(benches, pools);
criterion_main!(benches);
