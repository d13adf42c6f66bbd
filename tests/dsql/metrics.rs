//! Every metric in the observability guide's table moves when its event happens (feature `metrics`), seen
//! through `metrics-util`'s debugging recorder. Metrics about connections carry the endpoint,
//! and each check uses an emulator of its own, so other tests running at the same time cannot
//! move them; the transaction metrics have no endpoint and are checked for at least the moves
//! this test causes.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio_postgres_dsql::{
    DsqlConnectionManager, DsqlConnector, DsqlPool, Error, RetryPolicy, retry_transaction_on,
};

use crate::support::{Relay, conflicting_table, own_emulator, stranger};

/// The recorder, installed once, and what it has recorded so far (snapshots drain it).
struct Recorded {
    snapshotter: Snapshotter,
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    samples: HashMap<String, usize>,
}

fn recorded() -> &'static Mutex<Recorded> {
    static RECORDED: OnceLock<Mutex<Recorded>> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other metrics recorder in the test binary");
        Mutex::new(Recorded {
            snapshotter,
            counters: HashMap::new(),
            gauges: HashMap::new(),
            samples: HashMap::new(),
        })
    })
}

/// `name{label=value,…}` with the labels sorted.
fn key_of(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// Takes a snapshot into the running totals.
fn update() {
    let mut recorded = recorded().lock().unwrap();
    for (key, _, _, value) in recorded.snapshotter.snapshot().into_vec() {
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let name = key_of(key.key().name(), &labels);
        match value {
            DebugValue::Counter(n) => *recorded.counters.entry(name).or_default() += n,
            DebugValue::Gauge(v) => {
                recorded.gauges.insert(name, v.into_inner());
            }
            DebugValue::Histogram(values) => {
                *recorded.samples.entry(name).or_default() += values.len()
            }
        }
    }
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    update();
    let recorded = recorded().lock().unwrap();
    recorded
        .counters
        .get(&key_of(name, labels))
        .copied()
        .unwrap_or(0)
}

fn samples(name: &str, labels: &[(&str, &str)]) -> usize {
    update();
    let recorded = recorded().lock().unwrap();
    recorded
        .samples
        .get(&key_of(name, labels))
        .copied()
        .unwrap_or(0)
}

/// Every counter whose key starts with `prefix`, for a failed assertion's message.
fn counters_named(prefix: &str) -> String {
    update();
    let recorded = recorded().lock().unwrap();
    let mut found: Vec<String> = recorded
        .counters
        .iter()
        .filter(|(key, _)| key.starts_with(prefix))
        .map(|(key, n)| format!("{key} = {n}"))
        .collect();
    found.sort();
    found.join("; ")
}

/// The gauge's value as last set before the latest snapshot.
fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    update();
    let recorded = recorded().lock().unwrap();
    recorded.gauges.get(&key_of(name, labels)).copied()
}

/// A checkout, tried again until one succeeds (at most 15 s).
async fn eventually(pool: &DsqlPool) -> tokio_postgres_dsql::DsqlPooledConnection<'_> {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(conn) = pool.get().await {
                break conn;
            }
        }
    })
    .await
    .expect("a connection")
}

#[derive(Debug)]
struct FailingProvider;

impl ProvideCredentials for FailingProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(CredentialsError::not_loaded("no credentials here")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_moves_with_its_event() {
    update(); // installs the recorder before anything below runs
    let e = own_emulator(|b| b).await;
    let endpoint = e.endpoint().to_owned();
    let ep = [("endpoint", endpoint.as_str())];
    let relay = Relay::start(e.address(), true).await;
    let connector = DsqlConnector::new(e.config_for("admin").port(relay.port()).build().unwrap())
        .await
        .unwrap();
    assert!(counter("dsql_tokens_signed_total", &ep) >= 1);

    let manager = DsqlConnectionManager::new(connector.clone())
        .ping_after_idle(Duration::from_millis(100))
        .ping_timeout(Duration::from_millis(500));
    let pool = DsqlPool::new(
        connector
            .pool_builder()
            .max_size(2)
            .min_idle(None)
            .build(manager.clone())
            .await
            .unwrap(),
        &manager,
    );
    {
        let conn = pool.get().await.unwrap();
        conn.simple_query("SELECT 1").await.unwrap();
        assert_eq!(
            gauge("dsql_pool_connections", &[ep[0], ("state", "in_use")]),
            Some(1.0)
        );
    }
    assert_eq!(
        gauge("dsql_pool_connections", &[ep[0], ("state", "idle")]),
        Some(1.0)
    );
    assert_eq!(counter("dsql_connections_opened_total", &ep), 1);
    assert_eq!(samples("dsql_connect_duration_seconds", &ep), 1);
    assert!(samples("dsql_pool_checkout_wait_seconds", &ep) >= 1);

    // A silent connection fails its ping; a closed one is discarded at checkout.
    let closed = |reason| {
        counter(
            "dsql_pool_connections_closed_total",
            &[ep[0], ("reason", reason)],
        )
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.freeze_existing();
    drop(pool.get().await.unwrap());
    assert_eq!(closed("ping_failed"), 1);
    assert_eq!(counter("dsql_connections_opened_total", &ep), 2);

    // A closed connection is discarded at checkout, or when it comes back if it closed while
    // out. A pool that never pings: with a ping, a connection whose close had not reached its
    // client yet (later on a loaded machine) would fail the ping and be counted `ping_failed`.
    let calm_manager =
        DsqlConnectionManager::new(connector.clone()).ping_after_idle(Duration::from_secs(3600));
    let calm = DsqlPool::new(
        connector
            .pool_builder()
            .max_size(1)
            .min_idle(None)
            .build(calm_manager.clone())
            .await
            .unwrap(),
        &calm_manager,
    );
    drop(calm.get().await.unwrap());
    assert_eq!(counter("dsql_connections_opened_total", &ep), 3);
    let open = e.open_connections() as u64;
    e.drop_all_connections();
    // (The close reaches the pool's connection asynchronously: a checkout before it sees the
    // connection still open and takes it; it is discarded when it comes back, or at the next
    // checkout. Bounded, not a fixed sleep.)
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while e.stats().dropped < open && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(calm.get().await.unwrap());
        if closed("closed") >= 1 || tokio::time::Instant::now() >= until {
            break;
        }
    }
    let why = || counters_named("dsql_pool_connections_closed_total");
    assert_eq!(closed("closed"), 1, "{}", why());
    assert_eq!(closed("ping_failed"), 1, "{}", why());
    // The closed one was discarded either at a checkout (which then opened another) or on
    // its way back (the next checkout opens another): one more checkout settles both.
    drop(calm.get().await.unwrap());
    assert_eq!(counter("dsql_connections_opened_total", &ep), 4);

    // A checkout that times out in the middle of a ping: the connection is dropped when bb8
    // puts it back, never queued again.
    let impatient_manager = DsqlConnectionManager::new(connector.clone())
        .ping_after_idle(Duration::from_millis(100))
        .ping_timeout(Duration::from_secs(5));
    let impatient = DsqlPool::new(
        connector
            .pool_builder()
            .max_size(1)
            .min_idle(None)
            .connection_timeout(Duration::from_millis(300))
            .build(impatient_manager.clone())
            .await
            .unwrap(),
        &impatient_manager,
    );
    // A checkout waits only 300 ms: on a busy machine a connect can take longer, so the first
    // and the last checkout try again (the pool's connect goes on in the background).
    drop(eventually(&impatient).await);
    // (A checkout in there whose task waited past its 300 ms may already have cut a check.)
    let broken = closed("broken");
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.freeze_existing();
    assert!(matches!(impatient.get().await, Err(Error::PoolTimeout)));
    assert_eq!(closed("broken"), broken + 1);
    assert_eq!(
        impatient.state().connections,
        0,
        "the connection whose check was cut short is dropped, not queued again"
    );
    eventually(&impatient)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();

    // Past the recycle deadline.
    let short = DsqlConnector::new(
        e.config_for("admin")
            .max_lifetime(Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let manager = DsqlConnectionManager::new(short.clone()).jitter(Duration::ZERO);
    let short_pool = DsqlPool::new(
        short
            .pool_builder()
            .min_idle(None)
            .build(manager.clone())
            .await
            .unwrap(),
        &manager,
    );
    drop(short_pool.get().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    drop(short_pool.get().await.unwrap());
    assert_eq!(closed("recycle_deadline"), 1);

    // Connect errors by reason, and credentials that cannot be fetched.
    let stranger = stranger();
    let denied = DsqlConnector::new(
        e.config_for("admin")
            .credentials_provider(stranger)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(denied.connect().await.is_err());
    assert_eq!(
        counter(
            "dsql_connect_errors_total",
            &[ep[0], ("reason", "access_denied")]
        ),
        1
    );
    assert!(
        DsqlConnector::new(
            e.config_for("admin")
                .credentials_provider(FailingProvider)
                .build()
                .unwrap()
        )
        .await
        .is_err()
    );
    assert_eq!(counter("dsql_credentials_fetch_errors_total", &ep), 1);

    // Transactions: conflicts and retries, exhausted retries, an unknown outcome.
    let conflicts = counter("dsql_transaction_conflicts_total", &[("code", "OC000")]);
    let retries = counter("dsql_transaction_retries_total", &[]);
    let exhausted = counter("dsql_transaction_retries_exhausted_total", &[]);
    let unknown = counter("dsql_transaction_outcome_unknown_total", &[]);
    let mut client = connector.connect().await.unwrap();
    conflicting_table(&client, "metrics_probe", 3, "OC000", true).await;
    let insert = async |client: &mut tokio_postgres_dsql::tokio_postgres::Client,
                        policy: &RetryPolicy| {
        retry_transaction_on(client, policy, |tx| async move {
            tx.execute("INSERT INTO metrics_probe VALUES (1)", &[])
                .await?;
            Ok::<_, Error>(())
        })
        .await
    };
    let fast = RetryPolicy::default()
        .with_max_attempts(5)
        .delays(Duration::ZERO, Duration::ZERO);
    // Conflicts 1 and 2 are retried, conflict 3 exhausts a one-attempt policy.
    insert(
        &mut client,
        &RetryPolicy::default()
            .with_max_attempts(3)
            .delays(Duration::ZERO, Duration::ZERO),
    )
    .await
    .unwrap_err();
    insert(&mut client, &fast).await.unwrap();
    assert!(counter("dsql_transaction_conflicts_total", &[("code", "OC000")]) >= conflicts + 3);
    assert!(counter("dsql_transaction_retries_total", &[]) >= retries + 2);
    assert!(counter("dsql_transaction_retries_exhausted_total", &[]) > exhausted);
    e.cut_next_commit();
    let mut direct = DsqlConnector::new(e.config_for("admin").build().unwrap())
        .await
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        insert(&mut direct, &fast).await,
        Err(Error::CommitOutcomeUnknown { .. })
    ));
    assert!(counter("dsql_transaction_outcome_unknown_total", &[]) > unknown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_failback_are_counted_per_endpoint() {
    recorded();
    let (east1, east2) = tokio_postgres_dsql::emulator::DsqlEmulator::start_pair()
        .await
        .unwrap();
    let config = east1
        .config_with_peer(&east2, "admin")
        // (A down endpoint refuses at once; a probe's login on a loaded machine needs time.)
        .connect_timeout(Duration::from_secs(5))
        .failback_probe_interval(Duration::from_millis(100))
        // One failure down, one probe up: each transition is counted once.
        .failover(
            tokio_postgres_dsql::FailoverPolicy::default()
                .down_after(1, Duration::from_secs(10))
                .down_for(Duration::ZERO, Duration::ZERO)
                .up_after(1),
        )
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    let preferred = [("endpoint", east1.endpoint())];
    let peer = [("endpoint", east2.endpoint())];
    connector.connect().await.unwrap();
    assert_eq!(counter("dsql_endpoint_failovers_total", &preferred), 0);
    assert_eq!(gauge("dsql_endpoint_up", &preferred), None);

    east1.set_down(true);
    connector.connect().await.unwrap();
    assert_eq!(counter("dsql_endpoint_failovers_total", &preferred), 1);
    assert_eq!(gauge("dsql_endpoint_up", &preferred), Some(0.0));
    assert_eq!(counter("dsql_connections_opened_total", &peer), 1);
    assert_eq!(
        counter(
            "dsql_connect_errors_total",
            &[("endpoint", east1.endpoint()), ("reason", "io")]
        ),
        0,
        "the connect succeeded on the peer: no error to count"
    );

    east1.set_down(false);
    // The probe brings the endpoint back; the gauge is set just after the state flips.
    tokio::time::timeout(Duration::from_secs(30), async {
        while gauge("dsql_endpoint_up", &preferred) != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the endpoint is counted up again");
    assert!(connector.endpoint_health()[0].up);
    assert_eq!(counter("dsql_endpoint_failbacks_total", &preferred), 1);
    assert_eq!(counter("dsql_endpoint_failovers_total", &peer), 0);
}
