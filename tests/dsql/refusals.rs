//! Connections the emulator must refuse, each with the error a user would see.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_smithy_async::time::StaticTimeSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres_dsql::emulator::{DsqlEmulator, Rejection};
use tokio_postgres_dsql::{AccessDeniedReason, Action, DsqlConnector, Error, TokenSigner};

use crate::support::{HandClock, SwitchableProvider, connector, emulator, own_emulator, stranger};

/// Asserts DSQL's access-denied contract on `err`: `Error::AccessDenied` with `reason`, the
/// server's `FATAL 08006 unable to accept connection, access denied` as its source, a HINT
/// starting with `hint`, the hint in `Display`, and no token in any output.
fn assert_access_denied(
    err: &Error,
    connector: &DsqlConnector,
    reason: AccessDeniedReason,
    hint: &str,
) {
    match err {
        Error::AccessDenied {
            reason: got,
            hint: got_hint,
            endpoint,
            ..
        } => {
            assert_eq!(*got, reason, "{err}");
            assert!(got_hint.starts_with(hint), "{got_hint}");
            assert!(endpoint.contains(connector.endpoint()), "{endpoint}");
        }
        other => panic!("expected AccessDenied, got {other:?}"),
    }
    assert_eq!(err.hint().map(|h| h.starts_with(hint)), Some(true));
    assert_eq!(err.code().map(|c| c.code()), Some("08006"));
    let db = err.db_error().expect("the server's error is the source");
    assert!(std::error::Error::source(err).is_some());
    assert_eq!(db.message(), "unable to accept connection, access denied");
    assert_eq!(db.severity(), "FATAL");
    let shown = err.to_string();
    assert!(shown.starts_with("access denied by "), "{shown}");
    assert!(shown.contains(hint), "the hint is not in Display: {shown}");
    assert!(!err.is_transient());
}

/// Connects and asserts an access-denied refusal counted under `rejection` by the shared
/// emulator. Returns the error.
async fn assert_denied_by_shared_emulator(
    connector: &DsqlConnector,
    rejection: Rejection,
    reason: AccessDeniedReason,
    hint: &str,
) -> Error {
    let before = emulator().stats().rejected(rejection);
    let err = connector.connect().await.unwrap_err();
    assert_access_denied(&err, connector, reason, hint);
    let token = connector.token().await.unwrap();
    assert!(
        !format!("{err} {err:?}").contains(token.as_str()),
        "the token leaked into {err:?}"
    );
    assert!(
        emulator().stats().rejected(rejection) > before,
        "{rejection:?} not counted"
    );
    err
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
    let connector = DsqlConnector::new(config).await.unwrap();
    let err = connector.connect().await.unwrap_err();
    assert_access_denied(
        &err,
        &connector,
        AccessDeniedReason::Other,
        "Credential should be scoped to a valid region, not 'eu-west-1'",
    );
    assert_eq!(e.stats().rejected(Rejection::TokenRegion), 1);
}

#[tokio::test]
async fn wrong_action_for_the_role() {
    // The connector always picks the right action; sign the wrong one by hand and check what
    // the server sends, field by field.
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
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(db.code().code(), "08006");
    assert_eq!(db.message(), "unable to accept connection, access denied");
    assert_eq!(
        db.hint(),
        Some("Wrong user to action mapping. user: admin, action: DbConnect")
    );
    assert_eq!(e.stats().rejected(Rejection::TokenAction), before + 1);
    // Classified as the connector would.
    let err = connector.classify_connect_error(err);
    assert_access_denied(
        &err,
        &connector,
        AccessDeniedReason::WrongAction,
        "Wrong user to action mapping. user: admin, action: DbConnect",
    );
    assert!(err.to_string().contains("DbConnectAdmin tokens"), "{err}");
}

#[tokio::test]
async fn an_identity_without_the_iam_permission_is_not_authorized() {
    let e = own_emulator(|b| b).await;
    let provider = SwitchableProvider::new(e.credentials().clone());
    let config = e
        .config_for("admin")
        .credentials_provider(provider.clone())
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    connector.connect().await.unwrap();
    e.revoke_access(e.credentials().access_key_id(), true);
    let err = connector.connect().await.unwrap_err();
    assert_access_denied(
        &err,
        &connector,
        AccessDeniedReason::NotAuthorized,
        &format!(
            "User: arn:aws:iam::000000000000:user/{} is not authorized to perform: \
             dsql:DbConnectAdmin",
            e.credentials().access_key_id()
        ),
    );
    assert!(err.to_string().contains("AWS IAM GRANT"), "{err}");
    assert_eq!(
        e.stats().rejected(Rejection::NotAuthorized),
        1,
        "not retried"
    );
    // Granted again: for a few seconds the refusal is answered from memory, without a login
    // (a fleet under a permanent denial must not spend the cluster's connect budget on it)...
    let calls = provider.calls();
    e.revoke_access(e.credentials().access_key_id(), false);
    let again = connector.connect().await.unwrap_err();
    assert!(matches!(again, Error::AccessDenied { .. }), "{again:?}");
    assert_eq!(e.stats().rejected(Rejection::NotAuthorized), 1, "no login");
    // ... then the refused token is gone: the next connect asks the provider again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    connector.connect().await.unwrap();
    assert_eq!(provider.calls(), calls + 1);
}

#[tokio::test]
async fn a_persisting_expired_signature_is_retried_once_then_says_check_the_clock() {
    // The connector's clock is an hour behind: every token it signs is expired for the server.
    let e = own_emulator(|b| b).await;
    let provider = SwitchableProvider::new(e.credentials().clone());
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let config = e
        .config_for("admin")
        .credentials_provider(provider.clone())
        .time_source(StaticTimeSource::new(an_hour_ago))
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    assert_eq!(provider.calls(), 1);
    let err = connector.connect().await.unwrap_err();
    assert_access_denied(
        &err,
        &connector,
        AccessDeniedReason::SignatureExpired,
        "Signature expired",
    );
    assert!(err.to_string().contains("check this host's clock"), "{err}");
    // Two attempts, the second with a freshly signed token.
    assert_eq!(e.stats().rejected(Rejection::TokenExpired), 2);
    assert_eq!(e.stats().accepted, 0);
    assert_eq!(provider.calls(), 2, "one re-sign, not more");
}

#[tokio::test]
async fn one_expired_signature_is_cured_by_one_fresh_token() {
    // The cached token was signed 1 000 s ago (900 s life): the client still thinks it fresh
    // (its clock says 500 s), the server says expired. One re-sign fixes it.
    let e = own_emulator(|b| b).await;
    let provider = SwitchableProvider::new(e.credentials().clone());
    let clock = HandClock::at(SystemTime::now() - Duration::from_secs(1000));
    let config = e
        .config_for("admin")
        .credentials_provider(provider.clone())
        .time_source(clock.clone())
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    let stale = connector.token().await.unwrap();
    clock.advance(Duration::from_secs(500));
    assert_eq!(connector.token().await.unwrap(), stale);
    let client = connector.connect().await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(e.stats().rejected(Rejection::TokenExpired), 1);
    assert_eq!(e.stats().accepted, 1);
    assert_eq!(provider.calls(), 2, "exactly one extra token signed");
    assert_ne!(connector.token().await.unwrap(), stale);
}

#[tokio::test]
async fn token_from_the_future() {
    let later = SystemTime::now() + Duration::from_secs(3600);
    let connector = connector("admin", |b| b.time_source(StaticTimeSource::new(later))).await;
    assert_denied_by_shared_emulator(
        &connector,
        Rejection::TokenNotYetValid,
        AccessDeniedReason::Other,
        "Signature not yet current",
    )
    .await;
}

#[tokio::test]
async fn unknown_access_key() {
    let stranger = stranger();
    let connector = connector("admin", |b| b.credentials_provider(stranger)).await;
    assert_denied_by_shared_emulator(
        &connector,
        Rejection::TokenUnknownKey,
        AccessDeniedReason::Other,
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
    assert_denied_by_shared_emulator(
        &connector,
        Rejection::TokenSignature,
        AccessDeniedReason::Other,
        "The request signature we calculated does not match the signature you provided",
    )
    .await;
}

#[tokio::test]
async fn session_credentials_that_expired_after_signing_are_refused_at_connect() {
    // Session credentials valid for another 60 s by the emulator's clock sign a 900 s token;
    // two minutes later the token has not expired, but its credentials have.
    let now = SystemTime::now();
    let session = Credentials::new(
        "ASIASESSIONKEYEXAMPL",
        "session-secret",
        Some("session-token".into()),
        Some(now + Duration::from_secs(60)),
        "test",
    );
    let clock = HandClock::at(now);
    let e = own_emulator(|b| b.credentials(session.clone()).time_source(clock.clone())).await;
    let token = TokenSigner::new(e.endpoint(), e.region()).sign(
        &session,
        Action::DbConnectAdmin,
        Duration::from_secs(900),
        now,
    );
    let connector = DsqlConnector::new(e.config_for("admin").build().unwrap())
        .await
        .unwrap();
    let mut config = connector.postgres_config().clone();
    config.password(token.as_str());
    let _accepted = config.connect(connector.tls()).await.unwrap();
    clock.advance(Duration::from_secs(120));
    let Err(err) = config.connect(connector.tls()).await else {
        panic!("a token signed with expired session credentials was accepted");
    };
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "08006");
    assert_eq!(
        db.hint(),
        Some("The security token included in the request is expired")
    );
    assert_eq!(e.stats().rejected(Rejection::TokenExpired), 1);
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
    let mut config = crate::frontend::client_tls(e, alpn);
    config.enable_sni = sni;
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
async fn an_unknown_role_is_its_own_error_and_counter() {
    let e = own_emulator(|b| b).await;
    let connector = DsqlConnector::new(e.config_for("no_such_role").build().unwrap())
        .await
        .unwrap();
    let token = connector.token().await.unwrap();
    let err = connector.connect().await.unwrap_err();
    match &err {
        Error::UnknownRole { role, .. } => assert_eq!(role, "no_such_role"),
        other => panic!("expected UnknownRole, got {other:?}"),
    }
    assert!(
        err.to_string().contains("`no_such_role` does not exist"),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(
        e.stats().rejected(Rejection::UnknownRole),
        1,
        "{:?}",
        e.stats()
    );
    assert_eq!(e.stats().accepted, 0);
    // The token was fine: it is kept.
    assert_eq!(connector.token().await.unwrap(), token);
}

#[tokio::test]
async fn the_emulators_clock_decides_token_expiry() {
    let clock = HandClock::at(SystemTime::now());
    let e = own_emulator(|b| b.time_source(clock.clone())).await;
    // The connector signs with the system clock; the emulator checks with the hand clock.
    let config = e.config_for("admin").build().unwrap().into_builder();
    let config = config
        .time_source(aws_smithy_async::time::SystemTimeSource::new())
        .build()
        .unwrap();
    let connector = DsqlConnector::new(config).await.unwrap();
    connector.connect().await.unwrap();
    clock.advance(Duration::from_secs(901));
    let err = connector.connect().await.unwrap_err();
    assert_access_denied(
        &err,
        &connector,
        AccessDeniedReason::SignatureExpired,
        "Signature expired",
    );
    // The first refusal, then the one retry with a fresh (but still too old) token.
    assert_eq!(e.stats().rejected(Rejection::TokenExpired), 2);
}
