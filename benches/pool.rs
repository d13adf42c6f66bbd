//! Checkout + `SELECT 1` through three pools on the same emulator, with the same TLS
//! configuration and a valid token: ours, `bb8-postgres` and `deadpool-postgres` (the
//! baselines, in the same run), with 1 and 16 concurrent tasks. Each pool uses its defaults
//! (deadpool with `RecyclingMethod::Fast`) and at most 16 connections.
//!
//! All of them go through the emulator as users get it (DSQL's SQL rules on). `relay_select_1`:
//! the same checkout + `SELECT 1` through our pool, against that message-aware relay (every
//! message framed, every query read by PostgreSQL's parser, cached per session) and against the
//! byte relay of an emulator with `sql_rules(false)`, in front of one PostgreSQL.
//! `relay_autocommit_insert` / `relay_autocommit_update`: the same for a checkout + an
//! autocommit write: a one-row `INSERT … VALUES` (its text bounds its rows, so the rules relay
//! sends it as it is), and an `UPDATE` of one row by its primary key (the rules relay sends it
//! as it is too once it knows the key: one row at most).
//! `relay_transaction_update`: `BEGIN`, the `UPDATE`, `COMMIT` (three queries): the guarded
//! write (a savepoint before it, let go with the block's next one or its end) and the `COMMIT`
//! through its commit point.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tokio_postgres_dsql::{DsqlDeadpool, DsqlPool};

const MAX_SIZE: u32 = 16;
/// Alternating rounds per comparison (each about 100 ms per pool).
const ROUNDS: usize = 41;

/// One checkout and one query, for any of the three pools.
trait Checkout: Clone + Send + Sync + 'static {
    fn run(&self) -> impl std::future::Future<Output = ()> + Send;
}

#[derive(Clone)]
struct Ours(DsqlPool);

impl Checkout for Ours {
    async fn run(&self) {
        let conn = self.0.get().await.unwrap();
        conn.simple_query("SELECT 1").await.unwrap();
    }
}

/// Checkout + writes, one simple query each (where `Ours` reads).
#[derive(Clone)]
struct OursWrite(DsqlPool, &'static [&'static str]);

impl Checkout for OursWrite {
    async fn run(&self) {
        let conn = self.0.get().await.unwrap();
        for statement in self.1 {
            conn.simple_query(statement).await.unwrap();
        }
    }
}

const INSERT: &str = "INSERT INTO bench_relay_writes VALUES (1, 0)";
const UPDATE: &str = "UPDATE bench_relay_counter SET n = n + 1 WHERE id = 0";

#[derive(Clone)]
struct OursDeadpool(DsqlDeadpool);

impl Checkout for OursDeadpool {
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
    let (ours, ours_deadpool, bb8_pg, deadpool) = rt.block_on(async {
        let connector = support::connector(&emulator, "admin", |b| b).await;
        let ours = connector.pool_with(|b| b.max_size(MAX_SIZE)).await.unwrap();
        let ours_deadpool = connector
            .deadpool_builder(tokio_postgres_dsql::DsqlDeadpoolManager::new(
                tokio_postgres_dsql::DsqlConnectionManager::new(connector.clone()),
            ))
            .max_size(MAX_SIZE as usize)
            .build()
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
        (
            Ours(ours),
            OursDeadpool(ours_deadpool),
            Bb8Postgres(bb8_pg),
            Deadpool(deadpool),
        )
    });

    // The same pool against an emulator without DSQL's SQL rules (a byte relay), over the same
    // PostgreSQL.
    let bytes = tokio_postgres_dsql::emulator::DsqlEmulator::builder()
        .upstream_url(emulator.upstream_url("admin"))
        .credentials(emulator.credentials().clone())
        .sql_rules(false)
        .start_blocking()
        .unwrap();
    let ours_bytes = rt.block_on(async {
        let connector = support::connector(&bytes, "admin", |b| b).await;
        Ours(connector.pool_with(|b| b.max_size(MAX_SIZE)).await.unwrap())
    });
    rt.block_on(async {
        let conn = ours_bytes.0.get().await.unwrap();
        for statement in [
            "DROP TABLE IF EXISTS bench_relay_writes",
            "CREATE TABLE bench_relay_writes (id int, n int)",
            "DROP TABLE IF EXISTS bench_relay_counter",
            "CREATE TABLE bench_relay_counter (id int PRIMARY KEY, n int)",
            "INSERT INTO bench_relay_counter VALUES (0, 0)",
        ] {
            conn.batch_execute(statement).await.unwrap();
        }
    });
    let writes: [(&str, &'static [&'static str]); 3] = [
        ("autocommit_insert", &[INSERT]),
        ("autocommit_update", &[UPDATE]),
        ("transaction_update", &["BEGIN", UPDATE, "COMMIT"]),
    ];
    let writes = writes.map(|(name, statements)| {
        (
            name,
            OursWrite(ours.0.clone(), statements),
            OursWrite(ours_bytes.0.clone(), statements),
        )
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
            BenchmarkId::new("tokio-postgres-dsql-deadpool", tasks),
            &tasks,
            |b, &tasks| {
                b.to_async(&rt)
                    .iter_custom(|iters| drive(ours_deadpool.clone(), tasks, iters))
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

    let mut group = c.benchmark_group("relay_select_1");
    group.bench_function("byte relay", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| drive(ours_bytes.clone(), 1, iters))
    });
    group.bench_function("message-aware relay (SQL rules)", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| drive(ours.clone(), 1, iters))
    });
    group.finish();
    for (name, rules, bytes) in &writes {
        let mut group = c.benchmark_group(format!("relay_{name}"));
        group.bench_function("byte relay", |b| {
            b.to_async(&rt)
                .iter_custom(|iters| drive(bytes.clone(), 1, iters))
        });
        group.bench_function("message-aware relay (SQL rules)", |b| {
            b.to_async(&rt)
                .iter_custom(|iters| drive(rules.clone(), 1, iters))
        });
        group.finish();
    }
    if !std::env::args().any(|a| a == "--test") {
        // The byte relay as `ours`: the ratio is the rules relay's time over the byte relay's.
        let ratio = rt.block_on(alternating_ratio(&ours_bytes, &ours, 1, ROUNDS));
        println!(
            "relay_select_1: the message-aware relay (SQL rules) costs {:+.1} % per checkout + \
             SELECT 1 against the byte relay (median of {ROUNDS} alternating ~100 ms rounds)",
            (ratio - 1.0) * 100.0
        );
        for (name, rules, bytes) in &writes {
            let ratio = rt.block_on(alternating_ratio(bytes, rules, 1, ROUNDS));
            println!(
                "relay_{name}: the message-aware relay (SQL rules) costs {:+.1} % per checkout + \
                 {} against the byte relay (median of {ROUNDS} alternating ~100 ms rounds)",
                (ratio - 1.0) * 100.0,
                rules.1.join("; "),
            );
        }
    }

    // Criterion measures one pool after the other; on a shared machine the ratio between two
    // such measurements swings. Alternate ours and deadpool in ~100 ms rounds instead and
    // report the median of the per-round ratios.
    if !std::env::args().any(|a| a == "--test") {
        for tasks in [1u64, 16] {
            let ratio = rt.block_on(alternating_ratio(&ours, &deadpool, tasks, ROUNDS));
            println!(
                "checkout_select_1/{tasks} task(s): tokio-postgres-dsql (bb8) at {ratio:.3}x \
                 deadpool-postgres's speed (median of {ROUNDS} alternating ~100 ms rounds)"
            );
            let ratio = rt.block_on(alternating_ratio(&ours_deadpool, &deadpool, tasks, ROUNDS));
            println!(
                "checkout_select_1/{tasks} task(s): tokio-postgres-dsql (deadpool) at \
                 {ratio:.3}x deadpool-postgres's speed (median of {ROUNDS} alternating ~100 ms rounds)"
            );
        }
    }
}

/// The median, over `rounds` alternating rounds of about 100 ms each, of `theirs`' time per
/// checkout divided by `ours`' (above 1: ours is faster).
async fn alternating_ratio(
    ours: &impl Checkout,
    theirs: &impl Checkout,
    tasks: u64,
    rounds: usize,
) -> f64 {
    // Size a round from a short calibration run.
    let probe = drive(ours.clone(), tasks, 200).await;
    let iters =
        ((Duration::from_millis(100).as_secs_f64() / probe.as_secs_f64()) * 200.0).max(50.0) as u64;
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let a = drive(ours.clone(), tasks, iters).await;
        let b = drive(theirs.clone(), tasks, iters).await;
        ratios.push(b.as_secs_f64() / a.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

criterion_group!(benches, pools);
criterion_main!(benches);
