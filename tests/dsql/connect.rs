//! Connections that must work: roles, TLS modes, hostaddr + SNI, token reuse and rotation, and
//! the server's maximum connection age.

use std::time::Duration;

use aws_credential_types::Credentials;
use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{DsqlConnector, Error, SslNegotiation};

use crate::support::{SwitchableProvider, connector, emulator, ensure_role, second_credentials};

#[tokio::test]
async fn admin_connects_and_queries_real_postgres() {
    let client = connector("admin", |b| b).await.connect().await.unwrap();
    let row = client
        .query_one("SELECT current_user::text, current_setting('application_name'), current_setting('transaction_isolation')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "admin");
    assert_eq!(
        row.get::<_, &str>(1),
        concat!("tokio-postgres-dsql/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(row.get::<_, &str>(2), "repeatable read");
}

#[tokio::test]
async fn custom_role_connects_with_its_search_path() {
    let schema = ensure_role("conn_app").await;
    let connector = connector("conn_app", |b| {
        b.search_path(schema.as_str()).application_name("svc")
    })
    .await;
    let client = connector.connect().await.unwrap();
    let row = client
        .query_one("SELECT current_user::text, current_setting('search_path'), current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "conn_app");
    assert_eq!(row.get::<_, &str>(1), schema);
    assert!(
        row.get::<_, &str>(2)
            .starts_with("svc:tokio-postgres-dsql/")
    );
    // The role can create in its schema without qualifying names.
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS conn_probe (id int PRIMARY KEY)")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT schemaname::text FROM pg_tables WHERE tablename = 'conn_probe'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), schema);
    // The token for a custom role is a DbConnect token.
    assert!(
        connector
            .token()
            .await
            .unwrap()
            .as_str()
            .contains("/?Action=DbConnect&")
    );
}

#[tokio::test]
async fn direct_tls_and_ssl_request_both_work() {
    let before = emulator().stats();
    for negotiation in [SslNegotiation::Direct, SslNegotiation::Postgres] {
        let connector = connector("admin", |b| b.ssl_negotiation(negotiation)).await;
        let client = connector.connect().await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
    }
    // Direct TLS is the default.
    let default = connector("admin", |b| b).await;
    assert_eq!(default.config().ssl_negotiation(), SslNegotiation::Direct);
    let after = emulator().stats();
    assert!(after.direct_tls > before.direct_tls);
    assert!(after.ssl_requests > before.ssl_requests);
}

#[tokio::test]
async fn hostaddr_dials_the_ip_while_sni_and_certificate_use_the_endpoint_name() {
    // The endpoint name does not resolve; only hostaddr makes the dial possible, and the
    // emulator refuses any other SNI.
    let connector = connector("admin", |b| b).await;
    assert_eq!(
        connector.config().hostaddr(),
        Some("127.0.0.1".parse().unwrap())
    );
    assert_eq!(connector.endpoint(), emulator().endpoint());
    connector.connect().await.unwrap();
}

#[tokio::test]
async fn verify_full_fails_against_another_ca() {
    let other = tokio::task::spawn_blocking(other_emulator).await.unwrap();
    let connector = connector("admin", |b| b.ssl_root_cert(other.ca_cert_path())).await;
    let err = connector.connect().await.unwrap_err();
    match &err {
        Error::Tls { host, .. } => assert_eq!(host, emulator().endpoint()),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(err.to_string().contains(emulator().endpoint()), "{err}");
    // The webpki roots do not trust the emulator either.
    let err = connector_with_webpki_roots()
        .await
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
}

/// Another emulator, whose CA did not sign the shared emulator's certificate.
fn other_emulator() -> DsqlEmulator {
    DsqlEmulator::builder()
        .upstream_url(emulator().upstream_url("admin"))
        .start_blocking()
        .unwrap()
}

async fn connector_with_webpki_roots() -> DsqlConnector {
    let e = emulator();
    let config = tokio_postgres_dsql::DsqlConfig::builder()
        .host(e.endpoint())
        .hostaddr("127.0.0.1".parse().unwrap())
        .port(e.port())
        .credentials_provider(e.credentials().clone())
        .build()
        .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

#[tokio::test]
async fn one_token_opens_many_connections() {
    let provider = SwitchableProvider::new(emulator().credentials().clone());
    let connector = connector("admin", |b| b.credentials_provider(provider.clone())).await;
    let token = connector.token().await.unwrap();
    let before = emulator().stats().accepted;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(connector.connect().await.unwrap());
    }
    for client in &clients {
        client.simple_query("SELECT 1").await.unwrap();
    }
    assert!(emulator().stats().accepted >= before + 8);
    assert_eq!(connector.token().await.unwrap(), token);
    assert_eq!(
        provider.calls(),
        1,
        "one credentials look-up for all connections"
    );
}

#[tokio::test]
async fn rotated_credentials_are_picked_up() {
    // Rejected token: the connector drops it and asks the provider again on the next connect.
    let provider = SwitchableProvider::new(Credentials::new(
        "AKIAREVOKEDKEYEXAMPL",
        "revoked",
        None,
        None,
        "test",
    ));
    let revoked = connector("admin", |b| b.credentials_provider(provider.clone())).await;
    let err = revoked.connect().await.unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    provider.set(second_credentials());
    revoked.connect().await.unwrap();
    assert!(
        revoked
            .token()
            .await
            .unwrap()
            .as_str()
            .contains("Credential=ASIASECONDKEYEXAMPLE%2F")
    );

    // At the refresh point (80 % of a 2 s token), the new credentials are used.
    let provider = SwitchableProvider::new(emulator().credentials().clone());
    let short = connector("admin", |b| {
        b.credentials_provider(provider.clone())
            .token_duration(Duration::from_secs(2))
    })
    .await;
    short.connect().await.unwrap();
    provider.set(second_credentials());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    short.connect().await.unwrap();
    assert!(
        short
            .token()
            .await
            .unwrap()
            .as_str()
            .contains("Credential=ASIASECONDKEYEXAMPLE%2F")
    );
}

#[tokio::test]
async fn the_maximum_connection_age_closes_a_plain_client() {
    let short_lived = DsqlEmulator::builder()
        .upstream_url(emulator().upstream_url("admin"))
        .credentials(emulator().credentials().clone())
        .max_connection_age(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let config = short_lived.config_for("admin").build().unwrap();
    let client = DsqlConnector::new(config)
        .await
        .unwrap()
        .connect()
        .await
        .unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || client.is_closed(), "{err}");
    assert_eq!(short_lived.stats().closed_at_max_age, 1);
}

/// Whether `client`'s connection is closed, waiting up to 10 s for the close to reach it.
async fn closed_within_10s(client: &tokio_postgres_dsql::tokio_postgres::Client) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !client.is_closed() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.is_closed()
}

/// A connect to `e` whose every read is slowed by 300 ms, returned once the emulator has
/// accepted it: its startup is then under way for a few seconds.
async fn slowed_connect(
    e: &DsqlEmulator,
    connector: DsqlConnector,
) -> tokio::task::JoinHandle<Result<tokio_postgres_dsql::tokio_postgres::Client, Error>> {
    e.set_latency(Duration::from_millis(300));
    let accepted = e.stats().connections;
    let connecting = tokio::spawn(async move { connector.connect().await });
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while e.stats().connections == accepted && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        e.stats().connections,
        accepted + 1,
        "the connect was accepted"
    );
    connecting
}

/// `drop_all_connections` closes every connection a client has seen open, one whose connect
/// has only just returned included. Before the fix, the session subscribed to the drop signal
/// (and counted itself open) only after it had sent the client its `ReadyForQuery`: a call
/// made in between, by a client quicker than the emulator's next step (a loaded machine),
/// was missed and the connection stayed open. Many rounds on a multi-thread runtime, so the
/// client's thread can overtake the session's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_all_connections_closes_a_connection_whose_connect_just_returned() {
    let e = crate::support::own_emulator(|b| b).await;
    let connector = DsqlConnector::new(e.config_for("admin").build().unwrap())
        .await
        .unwrap();
    for round in 0..150 {
        let client = connector.connect().await.unwrap();
        let open = e.open_connections();
        e.drop_all_connections();
        assert!(
            closed_within_10s(&client).await,
            "round {round}: the connection outlived drop_all_connections by 10 s"
        );
        assert_eq!(
            open, 1,
            "round {round}: the session was not counted open yet"
        );
    }
}

/// `set_down(true)` cuts a connection still in its startup: it does not go on to log in on an
/// endpoint that is down. The startup is slowed (300 ms each way) so that the call lands in
/// the middle of it. Before the fix the session, accepted before the call but subscribed to
/// the cut only once its startup was done, logged in and stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_down_cuts_a_connection_still_in_its_startup() {
    let e = crate::support::own_emulator(|b| b).await;
    // (A deadline far beyond the slowed startup: the connect must fail by the cut, not by
    // its deadline.)
    let connector = DsqlConnector::new(
        e.config_for("admin")
            .connect_deadline(Duration::from_secs(60))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let connecting = slowed_connect(&e, connector).await;
    e.set_down(true);
    match connecting.await.unwrap() {
        // The cut reached the startup (a lost connection is not retried on one endpoint).
        Err(error) => assert_eq!(
            e.stats()
                .rejected
                .get(&tokio_postgres_dsql::emulator::Rejection::Cut),
            Some(&1),
            "the connect failed because the cut reached its startup: {error}"
        ),
        // (Only if the startup was done before the call: then the cut closes it.)
        Ok(client) => assert!(
            closed_within_10s(&client).await,
            "a connection stayed open on a down endpoint"
        ),
    }
    assert_eq!(e.open_connections(), 0);
    e.set_down(false);
}

/// `set_max_connection_age` applies to connections accepted after the call: one whose startup
/// was under way keeps the age it was accepted with. Before the fix the session read the age
/// only once its startup was done, and took the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_age_set_during_a_connect_applies_only_to_later_connections() {
    let e = crate::support::own_emulator(|b| b).await;
    let connector = DsqlConnector::new(e.config_for("admin").build().unwrap())
        .await
        .unwrap();
    let connecting = slowed_connect(&e, connector).await;
    e.set_max_connection_age(Duration::from_secs(1));
    let client = connecting.await.unwrap().unwrap();
    e.set_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(e.stats().closed_at_max_age, 0);
}

/// A large result read slowly arrives whole: the emulator's relay must flush its TLS stream,
/// or the last records of a write made while the socket was full wait for a write that never
/// comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_read_slowly_arrives_whole() {
    use futures_util::TryStreamExt;
    let connector = connector("admin", |b| b).await;
    let client = connector.connect().await.unwrap();
    for _ in 0..3 {
        let rows = client
            .query_raw(
                "SELECT i, repeat('x', 1000) FROM generate_series(1, 4000) AS i",
                std::iter::empty::<i32>(),
            )
            .await
            .unwrap();
        let mut rows = std::pin::pin!(rows);
        let read = async {
            let mut n = 0;
            while let Some(_row) = rows.try_next().await.unwrap() {
                n += 1;
                if n % 400 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            n
        };
        let n = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the whole result arrives");
        assert_eq!(n, 4000);
    }
}

/// Busy polling (`DsqlEmulatorBuilder::busy_poll`): an endpoint that polls serves a client as
/// any other, polls while the client is active, goes to sleep once nothing has moved for the
/// window, and is woken by the next bytes. An endpoint without it never polls.
#[tokio::test]
async fn a_busy_polling_endpoint_serves_sleeps_and_wakes() {
    let window = Duration::from_millis(200);
    let polling = tokio_postgres_dsql::emulator::SharedPostgres::global()
        .expect("the shared PostgreSQL starts")
        .endpoint()
        .busy_poll(window)
        .start()
        .await
        .unwrap();
    let client = crate::support::connect_to(&polling, "admin").await.unwrap();
    let query = || async {
        let row = client.query_one("SELECT 41 + 1", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    };
    for _ in 0..20 {
        query().await;
    }
    client
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .unwrap();
    // (Nothing polls before bytes move; these moved within the window of each other.)
    assert!(polling.stats().busy_polls > 0, "{:?}", polling.stats());

    // Nothing moves: the turns stop growing once the window has passed.
    let bound = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let before = polling.stats().busy_polls;
        tokio::time::sleep(window + Duration::from_millis(200)).await;
        if polling.stats().busy_polls == before {
            break;
        }
        assert!(
            std::time::Instant::now() < bound,
            "still polling a minute after the last bytes: {:?}",
            polling.stats()
        );
    }
    // Bytes wake it (a query that arrived while it still polled, under load, wakes nothing:
    // try again once it sleeps), and it polls again.
    let (woken, polled) = (
        polling.stats().busy_poll_wakeups,
        polling.stats().busy_polls,
    );
    let bound = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        query().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stats = polling.stats();
        if stats.busy_poll_wakeups > woken && stats.busy_polls > polled {
            break;
        }
        assert!(
            std::time::Instant::now() < bound,
            "not woken by a query: {:?}",
            polling.stats()
        );
        tokio::time::sleep(window + Duration::from_millis(200)).await;
    }

    // No polling: without it; with it on two threads (the one that polls would not hold the
    // sockets' driver); on a connection a latency applies to.
    let shared = tokio_postgres_dsql::emulator::SharedPostgres::global().unwrap();
    let on_two_threads = shared
        .endpoint()
        .busy_poll(window)
        .threads(2)
        .start()
        .await
        .unwrap();
    let delayed = shared.endpoint().busy_poll(window).start().await.unwrap();
    delayed.set_latency(Duration::from_millis(1));
    let plain = crate::support::own_endpoint().await;
    for endpoint in [&on_two_threads, &delayed, &plain] {
        let client = crate::support::connect_to(endpoint, "admin").await.unwrap();
        for _ in 0..5 {
            client.simple_query("SELECT 1").await.unwrap();
        }
        let stats = endpoint.stats();
        assert_eq!(
            (stats.busy_polls, stats.busy_poll_wakeups),
            (0, 0),
            "{}",
            endpoint.endpoint()
        );
    }
}

/// One seeded run of [`random_connects_and_cuts_leave_nothing_a_cut_should_have_closed`]:
/// `steps` times, a few connects start at random moments while a cut (`drop_all_connections`,
/// or `set_down(true)` held a random while) lands among them. Checked: every connection whose
/// connect returned before a cut, or while the endpoint was down, is closed; and once all has
/// settled, `open_connections` counts exactly the connections still open.
async fn connects_and_cuts(seed: u64, steps: usize) -> Result<(), String> {
    use std::time::Instant;
    let mut rng = fastrand::Rng::with_seed(seed);
    let e = crate::support::own_emulator(|b| b).await;
    let connector = DsqlConnector::new(
        e.config_for("admin")
            .connect_deadline(Duration::from_secs(3))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let mut alive = Vec::new();
    for step in 0..steps {
        let tasks: Vec<_> = (0..rng.usize(1..=4))
            .map(|_| {
                let (connector, delay) = (connector.clone(), rng.u64(0..6));
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let client = connector.connect().await;
                    (client, Instant::now())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.u64(0..8))).await;
        // A connect that returned before `cut` (taken before the call), or after `down` (taken
        // once `set_down(true)` returned) and before `up` (taken before `set_down(false)`), was
        // open or starting up at the cut: it must be closed.
        let cut = Instant::now();
        let (cut_made, down) = match rng.u8(0..3) {
            0 => {
                e.drop_all_connections();
                (true, None)
            }
            1 => {
                e.set_down(true);
                let down = Instant::now();
                tokio::time::sleep(Duration::from_millis(rng.u64(0..10))).await;
                let up = Instant::now();
                e.set_down(false);
                (true, Some((down, up)))
            }
            _ => (false, None),
        };
        let mut finished = Vec::new();
        for task in tasks {
            finished.push(task.await.unwrap());
        }
        for (client, returned) in finished {
            let Ok(client) = client else { continue };
            let must_close = (cut_made && returned < cut)
                || down.is_some_and(|(down, up)| returned > down && returned < up);
            if must_close && !closed_within_10s(&client).await {
                return Err(format!(
                    "seed {seed}, step {step}: a connection that returned {} the cut is still \
                     open",
                    if returned < cut {
                        "before"
                    } else {
                        "while the endpoint was down, after"
                    }
                ));
            }
            alive.push(client);
        }
        alive.retain(|client| !client.is_closed());
    }
    // Settled: the emulator counts exactly the connections the clients still hold open.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        alive.retain(|client| !client.is_closed());
        if e.open_connections() == alive.len() || tokio::time::Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if e.open_connections() != alive.len() {
        return Err(format!(
            "seed {seed}: the emulator counts {} open connections, the clients hold {}",
            e.open_connections(),
            alive.len()
        ));
    }
    Ok(())
}

/// Random connects with cuts among them ([`connects_and_cuts`]), on fixed seeds; more with
/// `DSQL_CUTS_SEEDS=<n>` (seeds 1000…). A failure names its seed and step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_connects_and_cuts_leave_nothing_a_cut_should_have_closed() {
    let extra: u64 = std::env::var("DSQL_CUTS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for seed in [3, 20261208]
        .into_iter()
        .chain((0..extra).map(|i| 1_000 + i))
    {
        if let Err(failure) = connects_and_cuts(seed, 30).await {
            panic!("{failure}");
        }
    }
}
