//! Connections the emulator must refuse, each with the error a user would see.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_smithy_async::time::StaticTimeSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres_dsql::emulator::{DsqlEmulator, Rejection};
use tokio_postgres_dsql::{Action, DsqlConnector, Error, TokenSigner};

use crate::support::{connector, emulator};

/// Asserts a `TokenRejected` error whose server message contains `expected`, and that the
/// emulator counted one more refusal for `reason`.
async fn assert_token_rejected(connector: &DsqlConnector, reason: Rejection, expected: &str) {
    let before = emulator().stats().rejected(reason);
    let err = connector.connect().await.unwrap_err();
    match &err {
        Error::TokenRejected {
            message, endpoint, ..
        } => {
            assert!(message.contains(expected), "{message}");
            assert!(endpoint.contains(emulator().endpoint()), "{endpoint}");
        }
        other => panic!("expected TokenRejected, got {other:?}"),
    }
    assert!(err.to_string().starts_with("token rejected by "), "{err}");
    let token = connector.token().await.unwrap();
    assert!(
        !format!("{err} {err:?}").contains(token.as_str()),
        "the token leaked into {err:?}"
    );
    assert!(
        emulator().stats().rejected(reason) > before,
        "{reason:?} not counted"
    );
}

#[tokio::test]
async fn wrong_region() {
    // An endpoint name without a region, so the configuration cannot catch the mismatch.
    let e = DsqlEmulator::builder()
        .endpoint("cluster.emulator.internal")
        .region("us-east-1")
        .upstream_url(emulator().upstream_url("admin"))
        .start()
        .await
        .unwrap();
    let config = e.config_for("admin").region("eu-west-1").build().unwrap();
    let err = DsqlConnector::new(config)
        .await
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    match &err {
        Error::TokenRejected { message, .. } => assert!(
            message.contains("Credential should be scoped to a valid region, not 'eu-west-1'"),
            "{message}"
        ),
        other => panic!("expected TokenRejected, got {other:?}"),
    }
    assert_eq!(e.stats().rejected(Rejection::TokenRegion), 1);
}

#[tokio::test]
async fn wrong_action_for_the_role() {
    // The connector always picks the right action; sign the wrong one by hand.
    let e = emulator();
    let connector = connector("admin", |b| b).await;
    let token = TokenSigner::new(e.endpoint(), e.region()).sign(
        e.credentials(),
        Action::DbConnect,
        Duration::from_secs(900),
        SystemTime::now(),
    );
    let mut config = connector.postgres_config().clone();
    config.password(token.as_str());
    let before = e.stats().rejected(Rejection::TokenAction);
    let Err(err) = config.connect(connector.tls()).await else {
        panic!("a DbConnect token for admin was accepted");
    };
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.message(),
        "Wrong user to action mapping. user: admin, action: DbConnect"
    );
    assert_eq!(db.code().code(), "28000");
    assert_eq!(e.stats().rejected(Rejection::TokenAction), before + 1);
}

#[tokio::test]
async fn expired_token() {
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let connector = connector("admin", |b| {
        b.time_source(StaticTimeSource::new(an_hour_ago))
    })
    .await;
    assert_token_rejected(&connector, Rejection::TokenExpired, "Signature expired").await;
}

#[tokio::test]
async fn token_from_the_future() {
    let later = SystemTime::now() + Duration::from_secs(3600);
    let connector = connector("admin", |b| b.time_source(StaticTimeSource::new(later))).await;
    assert_token_rejected(
        &connector,
        Rejection::TokenNotYetValid,
        "Signature not yet current",
    )
    .await;
}

#[tokio::test]
async fn unknown_access_key() {
    let stranger = Credentials::new("AKIAUNKNOWNKEYEXAMPL", "whatever", None, None, "test");
    let connector = connector("admin", |b| b.credentials_provider(stranger)).await;
    assert_token_rejected(
        &connector,
        Rejection::TokenUnknownKey,
        "The security token included in the request is invalid",
    )
    .await;
}

#[tokio::test]
async fn tampered_signature() {
    // The right access key with the wrong secret: the signature does not match.
    let forged = Credentials::new(
        emulator().credentials().access_key_id(),
        "not-the-secret",
        None,
        None,
        "test",
    );
    let connector = connector("admin", |b| b.credentials_provider(forged)).await;
    assert_token_rejected(
        &connector,
        Rejection::TokenSignature,
        "The request signature we calculated does not match the signature you provided",
    )
    .await;
}

#[tokio::test]
async fn unsupported_startup_parameter() {
    let connector = connector("admin", |b| b.option("statement_timeout", "5s")).await;
    let before = emulator().stats().rejected(Rejection::UnsupportedParameter);
    let err = connector.connect().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    let db = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.as_db_error())
        .expect("the server's error is the source");
    assert_eq!(
        db.message(),
        "setting configuration parameter \"statement_timeout\" not supported"
    );
    assert!(emulator().stats().rejected(Rejection::UnsupportedParameter) > before);
}

#[tokio::test]
async fn plaintext_is_refused() {
    let e = emulator();
    let config = format!(
        "host=127.0.0.1 port={} user=admin dbname=postgres password=x sslmode=disable",
        e.port()
    );
    let before = e.stats().rejected(Rejection::Plaintext);
    let Err(err) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await else {
        panic!("a plaintext connection was accepted");
    };
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.message(),
        "unable to accept connection, SSL/TLS is required"
    );
    assert_eq!(e.stats().rejected(Rejection::Plaintext), before + 1);
}

/// A raw rustls client over direct TLS, with or without SNI and ALPN; returns the first message
/// the server sends after the handshake (for these refusals, an ErrorResponse).
async fn raw_tls_first_message(sni: bool, alpn: bool) -> (u8, String) {
    let e = emulator();
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_slice(e.ca_cert_pem().as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.enable_sni = sni;
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let tcp = tokio::net::TcpStream::connect(e.address()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(e.endpoint().to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(&startup_message()).await.unwrap();
    let tag = tls.read_u8().await.unwrap();
    let len = tls.read_u32().await.unwrap();
    let mut body = vec![0; len as usize - 4];
    tls.read_exact(&mut body).await.unwrap();
    let message = body
        .split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    (tag, message)
}

fn startup_message() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\x00admin\x00database\x00postgres\x00\x00";
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(body);
    message
}

#[tokio::test]
async fn missing_sni_is_refused() {
    let before = emulator().stats().rejected(Rejection::NoSni);
    let (tag, message) = raw_tls_first_message(false, true).await;
    assert_eq!(tag, b'E');
    assert_eq!(message, "unable to accept connection, sni was not received");
    assert_eq!(emulator().stats().rejected(Rejection::NoSni), before + 1);
}

#[tokio::test]
async fn direct_tls_without_alpn_is_refused() {
    let before = emulator().stats().rejected(Rejection::NoAlpn);
    let (tag, message) = raw_tls_first_message(true, false).await;
    assert_eq!(tag, b'E');
    assert!(message.contains("without ALPN"), "{message}");
    assert_eq!(emulator().stats().rejected(Rejection::NoAlpn), before + 1);
    // With SNI and ALPN the same client gets the password request.
    let (tag, _) = raw_tls_first_message(true, true).await;
    assert_eq!(tag, b'R');
}

#[tokio::test]
async fn unknown_role_is_refused_by_postgres() {
    let connector = connector("no_such_role", |b| b).await;
    let err = connector.connect().await.unwrap_err();
    assert!(err.to_string().contains("no_such_role"), "{err}");
}

/// A clock the test moves by hand.
#[derive(Debug, Clone)]
struct HandClock(Arc<std::sync::Mutex<SystemTime>>);

impl aws_smithy_async::time::TimeSource for HandClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

#[tokio::test]
async fn the_emulators_clock_decides_token_expiry() {
    let clock = HandClock(Arc::new(std::sync::Mutex::new(SystemTime::now())));
    let e = DsqlEmulator::builder()
        .upstream_url(emulator().upstream_url("admin"))
        .time_source(clock.clone())
        .start()
        .await
        .unwrap();
    // The connector signs with the system clock; the emulator checks with the hand clock.
    let config = e.config_for("admin").build().unwrap().into_builder();
    let config = config
        .time_source(aws_smithy_async::time::SystemTimeSource::new())
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    connector.connect().await.unwrap();
    *clock.0.lock().unwrap() += Duration::from_secs(901);
    let err = connector.connect().await.unwrap_err();
    match &err {
        Error::TokenRejected { message, .. } => {
            assert!(message.starts_with("Signature expired"), "{message}")
        }
        other => panic!("expected TokenRejected, got {other:?}"),
    }
    assert_eq!(e.stats().rejected(Rejection::TokenExpired), 1);
}
