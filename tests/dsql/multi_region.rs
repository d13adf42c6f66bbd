//! The emulator's peered pair (a multi-Region cluster's two endpoints over one database) and
//! its per-endpoint network faults: down (refused) and black-holed (silent), then up again.

use std::time::Duration;

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{AccessDeniedReason, DsqlConnector, Error};

async fn admin(emulator: &DsqlEmulator, timeout: Duration) -> DsqlConnector {
    let config = emulator
        .config_for("admin")
        .connect_timeout(timeout)
        .build()
        .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peered_pair_shares_one_database_and_each_faults_alone() {
    let (east1, east2) = DsqlEmulator::start_pair().await.unwrap();
    assert_eq!(east1.region(), "us-east-1");
    assert_eq!(east2.region(), "us-east-2");
    assert_ne!(east1.endpoint(), east2.endpoint());
    let one = admin(&east1, Duration::from_secs(1)).await;
    let two = admin(&east2, Duration::from_secs(1)).await;
    assert_eq!(two.region(), "us-east-2");

    // A write through one endpoint is read through the other at once.
    let a = one.connect().await.unwrap();
    a.batch_execute(
        "DROP TABLE IF EXISTS pair_probe; CREATE TABLE pair_probe (id int PRIMARY KEY); \
         INSERT INTO pair_probe VALUES (7)",
    )
    .await
    .unwrap();
    let b = two.connect().await.unwrap();
    let row = b.query_one("SELECT id FROM pair_probe", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);

    // Each endpoint verifies tokens for its own host and Region.
    let mut wrong = two.postgres_config().clone();
    wrong.password(one.token().await.unwrap().as_str());
    let err = two.classify_connect_error(wrong.connect(two.tls()).await.err().unwrap());
    assert!(
        matches!(
            err,
            Error::AccessDenied {
                reason: AccessDeniedReason::Other,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("signed for host"), "{err}");

    // Down: refused at once, open connections cut; the peer is untouched.
    east1.set_down(true);
    let err = one.connect().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.simple_query("SELECT 1").await.is_err(), "cut");
    b.simple_query("SELECT 1").await.unwrap();
    east1.set_down(false);
    one.connect()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();

    // Black hole: a connect times out, an open connection stalls, then both recover.
    east2.set_black_hole(true);
    let err = two.connect().await.unwrap_err();
    assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.simple_query("SELECT 1"))
            .await
            .is_err(),
        "the open connection stalls"
    );
    one.connect()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    east2.set_black_hole(false);
    b.simple_query("SELECT 1").await.unwrap();
    two.connect()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
}
