//! Per-test endpoints over one PostgreSQL (`SharedPostgres`): fast to start, and isolated from
//! each other in data, conflicts, faults and counters.

use std::time::{Duration, Instant};

use tokio_postgres_dsql::emulator::{DsqlEmulator, SharedPostgres};
use tokio_postgres_dsql::tokio_postgres::Client;
use tokio_postgres_dsql::{DsqlConnector, Error};

async fn admin(emulator: &DsqlEmulator) -> Client {
    crate::support::connect_to(emulator, "admin")
        .await
        .expect("admin connects")
}

fn sqlstate(error: &tokio_postgres_dsql::tokio_postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_endpoints_over_one_postgres_each_with_its_own_data() {
    let postgres = SharedPostgres::global().expect("the shared PostgreSQL starts");
    // The first endpoint may pay for the template's first copy; the 50 are timed after it.
    drop(postgres.endpoint().start().await.unwrap());
    let started = Instant::now();
    let mut endpoints = Vec::new();
    for _ in 0..50 {
        endpoints.push(
            postgres
                .endpoint()
                .start()
                .await
                .expect("an endpoint starts"),
        );
    }
    let elapsed = started.elapsed();
    eprintln!(
        "50 endpoints over one PostgreSQL started in {elapsed:?} ({:?} each)",
        elapsed / 50
    );
    // Every endpoint has its own `postgres`: the same table name, different rows.
    for (n, endpoint) in endpoints.iter().enumerate().step_by(10) {
        let client = admin(endpoint).await;
        client
            .batch_execute("CREATE TABLE per_test (id int PRIMARY KEY)")
            .await
            .unwrap();
        client
            .execute("INSERT INTO per_test VALUES ($1)", &[&(n as i32)])
            .await
            .unwrap();
        let rows: Vec<i32> = client
            .query("SELECT id FROM per_test", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, vec![n as i32], "endpoint {n} sees only its own rows");
        let database: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            database, "postgres",
            "DSQL's one database, whatever holds the data"
        );
        assert!(
            endpoint.upstream_url("admin").contains("dbname=dsql_"),
            "a database of its own upstream"
        );
    }
    // Distinct names, ports and token hosts.
    let mut names: Vec<&str> = endpoints.iter().map(|e| e.endpoint()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_endpoints_see_neither_each_others_faults_nor_counters_nor_ddl() {
    let postgres = SharedPostgres::global().expect("the shared PostgreSQL starts");
    let (a, b) = tokio::join!(postgres.endpoint().start(), postgres.endpoint().start());
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ca, cb) = (admin(&a).await, admin(&b).await);
    for client in [&ca, &cb] {
        client
            .batch_execute("CREATE TABLE shared_name (id int PRIMARY KEY, v int)")
            .await
            .unwrap();
        client
            .batch_execute("INSERT INTO shared_name VALUES (1, 0)")
            .await
            .unwrap();
    }
    // B reads the table; then A changes a table of the same name: B's session has no OC001.
    cb.batch_execute("BEGIN; SELECT * FROM shared_name")
        .await
        .unwrap();
    ca.batch_execute("ALTER TABLE shared_name ADD COLUMN w text")
        .await
        .unwrap();
    cb.batch_execute("UPDATE shared_name SET v = 1 WHERE id = 1; COMMIT")
        .await
        .expect("no schema conflict from another endpoint's DDL");

    // A fault armed on A cuts only A's COMMIT.
    a.cut_next_commit();
    cb.batch_execute("BEGIN; UPDATE shared_name SET v = 2 WHERE id = 1; COMMIT")
        .await
        .expect("B's COMMIT is not cut");
    ca.batch_execute("BEGIN; UPDATE shared_name SET v = 2 WHERE id = 1")
        .await
        .unwrap();
    let cut = ca.batch_execute("COMMIT").await.unwrap_err();
    assert!(cut.is_closed() || sqlstate(&cut).is_empty(), "{cut}");
    assert_eq!(a.stats().cut_at_commit, 1);
    assert_eq!(b.stats().cut_at_commit, 0);

    // Writers of the "same" row on two endpoints are writers of different rows.
    let ca = admin(&a).await;
    ca.batch_execute("BEGIN; UPDATE shared_name SET v = 3 WHERE id = 1")
        .await
        .unwrap();
    cb.batch_execute("BEGIN; UPDATE shared_name SET v = 3 WHERE id = 1")
        .await
        .unwrap();
    ca.batch_execute("COMMIT").await.unwrap();
    cb.batch_execute("COMMIT")
        .await
        .expect("no OC000 from another endpoint's write");

    // Admission is per endpoint: B refusing new connections leaves A open.
    b.refuse_new_connections(true);
    admin(&a).await;
    let refused = DsqlConnector::new(b.config_for("admin").build().unwrap())
        .await
        .unwrap()
        .connect()
        .await;
    assert!(matches!(refused, Err(Error::Connect { .. }) | Err(_)));
    assert_eq!(a.stats().total_rejected(), 0);
    assert!(b.stats().total_rejected() >= 1);
    assert_eq!(a.stats().accepted, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_database_goes_with_it() {
    let postgres = SharedPostgres::global().expect("the shared PostgreSQL starts");
    let endpoint = postgres.endpoint().start().await.unwrap();
    admin(&endpoint).await;
    let upstream = endpoint.upstream_url("admin");
    let database = upstream
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("the endpoint's database")
        .to_owned();
    assert!(database.starts_with("dsql_"), "{database}");
    drop(endpoint);
    let (upstream, connection) = tokio_postgres_dsql::tokio_postgres::connect(
        &postgres.upstream_url("admin"),
        tokio_postgres_dsql::tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = upstream
            .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .unwrap();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{database} was not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
