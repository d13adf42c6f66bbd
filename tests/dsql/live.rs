//! The live lane: connector, pool, retry and refusal checks that hold on DSQL itself. Each runs
//! against an emulator endpoint of its own, and again against a real cluster when
//! `DSQL_TEST_CLUSTER_ENDPOINT` names one (credentials from the default AWS chain, `AWS_REGION`
//! if the name has none; the cluster checks create tables named `live_*`, as admin). Without
//! it, the cluster half of each test says it was skipped. Faults (cut commits, black holes,
//! refusal storms) only an emulator can make stay in the other modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_postgres_dsql::emulator::{DsqlEmulator, SharedPostgres};
use tokio_postgres_dsql::{DsqlConfig, DsqlConfigBuilder, DsqlConnector, Error, RetryPolicy};

use crate::support::stranger;

/// Where a check runs: an emulator endpoint, or the cluster in `DSQL_TEST_CLUSTER_ENDPOINT`.
struct Target {
    name: &'static str,
    emulator: Option<DsqlEmulator>,
    cluster: Option<String>,
}

impl Target {
    async fn emulator() -> Target {
        let emulator = SharedPostgres::global()
            .expect("the shared PostgreSQL starts")
            .endpoint()
            .start()
            .await
            .expect("an endpoint starts");
        Target {
            name: "emulator",
            emulator: Some(emulator),
            cluster: None,
        }
    }

    /// The cluster to check against, or `None` (having said why).
    fn cluster(test: &str) -> Option<Target> {
        match std::env::var("DSQL_TEST_CLUSTER_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => Some(Target {
                name: "cluster",
                emulator: None,
                cluster: Some(endpoint),
            }),
            _ => {
                println!("{test}: skipped on a real cluster (set DSQL_TEST_CLUSTER_ENDPOINT)");
                None
            }
        }
    }

    /// A configuration builder for `user` on this target.
    fn config(&self, user: &str) -> DsqlConfigBuilder {
        match (&self.emulator, &self.cluster) {
            (Some(emulator), _) => emulator.config_for(user),
            (None, Some(endpoint)) => {
                let builder = DsqlConfig::builder().host(endpoint).user(user);
                match std::env::var("AWS_REGION") {
                    Ok(region) if !region.is_empty() => builder.region(region),
                    _ => builder,
                }
            }
            (None, None) => unreachable!("a target is an emulator or a cluster"),
        }
    }

    async fn connector(&self, user: &str) -> DsqlConnector {
        DsqlConnector::new(self.config(user).build().expect("a valid configuration"))
            .await
            .expect("a connector")
    }
}

/// Runs `check` on an emulator endpoint, then on the cluster if one is configured.
macro_rules! live {
    ($name:ident, $check:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $check(&Target::emulator().await).await;
            if let Some(cluster) = Target::cluster(stringify!($name)) {
                $check(&cluster).await;
            }
        }
    };
}

live!(connects_and_reports_dsql_s_identity, check_identity);
live!(
    the_pool_hands_out_working_connections_and_reuses_them,
    check_pool
);
live!(
    concurrent_increments_through_retry_transaction_all_land,
    check_retry
);
live!(refusals_are_classified_as_dsql_sends_them, check_refusals);

async fn check_identity(target: &Target) {
    let connector = target.connector("admin").await;
    let client = connector.connect().await.expect("admin connects");
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("16."), "{}: {version}", target.name);
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(database, "postgres", "{}", target.name);
    let isolation: String = client
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(isolation, "repeatable read", "{}", target.name);
    // The token is cached: the second connect signs nothing new.
    let first = connector.token().await.unwrap();
    let second = connector.token().await.unwrap();
    assert_eq!(first.as_str(), second.as_str(), "{}", target.name);
}

async fn check_pool(target: &Target) {
    let connector = target.connector("admin").await;
    let pool = connector
        .pool_with(|b| b.max_size(4))
        .await
        .expect("a pool");
    let mut pids = Vec::new();
    for _ in 0..3 {
        let conn = pool.get().await.expect("a connection");
        let one: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        pids.push(
            conn.query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
        );
    }
    // One at a time, connections are handed back out: three checkouts use at most two
    // (the one in use, and the warm one `min_idle` opens meanwhile, whenever that lands).
    pids.sort_unstable();
    pids.dedup();
    assert!(pids.len() <= 2, "{}: {pids:?}", target.name);
}

async fn check_retry(target: &Target) {
    let connector = target.connector("admin").await;
    let admin = connector.connect().await.unwrap();
    let table = format!("live_counter_{:08x}", fastrand::u32(..));
    admin
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY, n int)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, 0)"))
        .await
        .unwrap();
    let pool = Arc::new(connector.pool_with(|b| b.max_size(4)).await.unwrap());
    let attempts = Arc::new(AtomicUsize::new(0));
    let policy = RetryPolicy::default().with_max_attempts(50);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (pool, attempts, table, policy) = (
                pool.clone(),
                attempts.clone(),
                table.clone(),
                policy.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..3 {
                    pool.retry_transaction(&policy, |tx| {
                        let (attempts, table) = (attempts.clone(), table.clone());
                        async move {
                            attempts.fetch_add(1, Ordering::SeqCst);
                            let n: i32 = tx
                                .query_one(&format!("SELECT n FROM {table} WHERE id = 1"), &[])
                                .await?
                                .get(0);
                            tx.execute(
                                &format!("UPDATE {table} SET n = $1 WHERE id = 1"),
                                &[&(n + 1)],
                            )
                            .await?;
                            Ok::<_, Error>(())
                        }
                    })
                    .await
                    .expect("the increment lands");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let n: i32 = admin
        .query_one(&format!("SELECT n FROM {table} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 12, "{}: every increment landed once", target.name);
    eprintln!(
        "{}: 12 increments took {} attempts",
        target.name,
        attempts.load(Ordering::SeqCst)
    );
    let _ = admin.batch_execute(&format!("DROP TABLE {table}")).await;
}

async fn check_refusals(target: &Target) {
    // A role that does not exist.
    let unknown = target
        .connector("live_no_such_role")
        .await
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(
            unknown,
            Error::UnknownRole { .. } | Error::AccessDenied { .. }
        ),
        "{}: {unknown:?}",
        target.name
    );
    // A token from an access key no one knows.
    let stranger = refused(target.config("admin").credentials_provider(stranger())).await;
    let Error::AccessDenied { .. } = &stranger else {
        panic!("{}: {stranger:?}", target.name);
    };
    let db = stranger.db_error().expect("the server's refusal");
    assert_eq!(db.code().code(), "08006");
    assert_eq!(db.message(), "unable to accept connection, access denied");
    // A startup parameter DSQL does not take.
    let parameter = refused(target.config("admin").option("statement_timeout", "5s")).await;
    assert!(
        parameter
            .to_string()
            .contains("setting configuration parameter \"statement_timeout\" not supported"),
        "{}: {parameter}",
        target.name
    );
}

/// The error connecting with `config` gives (it must fail).
async fn refused(config: DsqlConfigBuilder) -> Error {
    DsqlConnector::new(config.build().expect("a valid configuration"))
        .await
        .expect("a connector")
        .connect()
        .await
        .expect_err("the connection is refused")
}
