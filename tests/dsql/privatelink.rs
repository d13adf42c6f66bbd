//! `sslmode=require`, the PrivateLink case: the host dialled is a VPC endpoint no certificate
//! names, so the certificate is checked against DSQL's names for the cluster instead. A server
//! on the path with a certificate a trusted CA issued for another name must never see the
//! token, which is a bearer credential: the handshake fails before the startup message.
//!
//! The server here is a plain rustls endpoint over real TCP (not the emulator, whose
//! certificate always names its endpoint), with certificates from a test CA the client trusts.
//! It records what a client sent: a completed handshake, a startup message, a password.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio_postgres_dsql::rustls;
use tokio_postgres_dsql::{Credentials, DsqlConfig, DsqlConnector, Error, SslMode, SslNegotiation};

const CLUSTER: &str = "abcdefghijklmnopqrstuvwxyz";
const VPC_ENDPOINT: &str = "vpce-0123-abcd.dsql-fnh4.us-east-1.vpce.amazonaws.com";

/// What the server saw, over every connection.
#[derive(Debug, Default)]
struct Seen {
    handshakes: u32,
    startups: u32,
    passwords: Vec<String>,
}

/// A test CA (its PEM written to a file the client trusts) and a signer for leaf certificates.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem_file: std::path::PathBuf,
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pem_file);
    }
}

impl TestCa {
    fn new(tag: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a CA the client trusts");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let pem_file = std::env::temp_dir().join(format!(
            "dsql-privatelink-ca-{}-{tag}.pem",
            std::process::id()
        ));
        std::fs::write(&pem_file, cert.pem()).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            pem_file,
        }
    }

    /// A server that presents a certificate for `names`; returns its port and what it saw.
    fn serve(&self, names: &[&str]) -> (u16, Arc<Mutex<Seen>>) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let recorded = seen.clone();
        // Lives until the test binary exits (blocked in accept).
        std::thread::spawn(move || {
            for socket in listener.incoming() {
                let Ok(mut socket) = socket else { return };
                socket
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut tls = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut handshake_ok = true;
                while tls.is_handshaking() {
                    if tls.complete_io(&mut socket).is_err() {
                        handshake_ok = false;
                        break;
                    }
                }
                if !handshake_ok {
                    continue;
                }
                recorded.lock().unwrap().handshakes += 1;
                let mut stream = rustls::StreamOwned::new(tls, socket);
                // The startup message: length, then the rest.
                let mut len = [0u8; 4];
                if stream.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
                if stream.read_exact(&mut body).is_err() {
                    continue;
                }
                recorded.lock().unwrap().startups += 1;
                // AuthenticationCleartextPassword, as DSQL asks.
                let _ = stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                let _ = stream.flush();
                let mut header = [0u8; 5];
                if stream.read_exact(&mut header).is_err() || header[0] != b'p' {
                    continue;
                }
                let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
                let mut password = vec![0u8; len.saturating_sub(4)];
                if stream.read_exact(&mut password).is_ok() {
                    let text = String::from_utf8_lossy(&password)
                        .trim_end_matches('\0')
                        .to_owned();
                    recorded.lock().unwrap().passwords.push(text);
                }
                // Then hang up, as if done with it.
            }
        });
        (port, seen)
    }
}

/// A connector that dials the VPC endpoint at `port` with `sslmode=require`, trusting `ca`.
async fn privatelink_connector(ca: &TestCa, port: u16) -> DsqlConnector {
    let config = DsqlConfig::builder()
        .host(VPC_ENDPOINT)
        .region("us-east-1")
        .hostaddr("127.0.0.1".parse().unwrap())
        .port(port)
        .user("app")
        .amzn_cluster_id(CLUSTER)
        .ssl_mode(SslMode::Require)
        .ssl_negotiation(SslNegotiation::Direct)
        .ssl_root_cert(&ca.pem_file)
        .credentials_provider(Credentials::from_keys(
            "AKIDPRIVATELINKTEST",
            "privatelink-test-secret",
            None,
        ))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

/// The error and its sources, as one line.
fn chain(error: &Error) -> String {
    let mut shown = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        shown.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    shown
}

#[tokio::test]
async fn require_refuses_a_trusted_certificate_for_another_name_before_sending_the_token() {
    let ca = TestCa::new("evil");
    let (port, seen) = ca.serve(&["evil.example"]);
    let connector = privatelink_connector(&ca, port).await;
    let err = connector.connect().await.unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    let shown = chain(&err);
    assert!(
        shown.contains("evil.example")
            && shown.contains(&format!("{CLUSTER}.dsql.us-east-1.on.aws"))
            && shown.contains("dsql-<suffix>"),
        "the error names the certificate's name and the expected ones: {shown}"
    );
    // Let the server finish with the connection, then: no handshake completed, nothing sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.handshakes, 0, "{seen:?}");
    assert_eq!(seen.startups, 0, "{seen:?}");
    assert!(
        seen.passwords.is_empty(),
        "the token reached the server: {seen:?}"
    );
    assert!(!shown.contains("X-Amz-Signature"), "{shown}");
}

#[tokio::test]
async fn require_accepts_dsqls_names_for_the_cluster_and_sends_the_token() {
    // The PrivateLink private DNS form as a wildcard, and the public endpoint name: each is
    // accepted, and the token (signed for the cluster's endpoint) is what the server receives.
    for names in [
        &["*.dsql-fnh4.us-east-1.on.aws"][..],
        &[&*format!("{CLUSTER}.dsql.us-east-1.on.aws")],
    ] {
        let ca = TestCa::new("dsql");
        let (port, seen) = ca.serve(names);
        let connector = privatelink_connector(&ca, port).await;
        // The server hangs up after the password: the connect fails, after the handshake.
        let err = connector.connect().await.unwrap_err();
        assert!(!matches!(err, Error::Tls { .. }), "{names:?}: {err:?}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.handshakes, 1, "{names:?}: {seen:?}");
        assert_eq!(seen.startups, 1, "{names:?}: {seen:?}");
        assert_eq!(seen.passwords.len(), 1, "{names:?}: {seen:?}");
        assert!(
            seen.passwords[0].starts_with(&format!(
                "{CLUSTER}.dsql.us-east-1.on.aws/?Action=DbConnect&"
            )),
            "{names:?}: the token is signed for the cluster's endpoint"
        );
    }
}

#[tokio::test]
async fn require_refuses_another_clusters_or_regions_dsql_name() {
    for names in [
        &["zyxwvutsrqponmlkjihgfedcba.dsql.us-east-1.on.aws"][..],
        &["*.dsql.us-west-2.on.aws"],
        &["*.dsql-fnh4.eu-west-1.on.aws"],
    ] {
        let ca = TestCa::new("other");
        let (port, seen) = ca.serve(names);
        let connector = privatelink_connector(&ca, port).await;
        let err = connector.connect().await.unwrap_err();
        assert!(matches!(err, Error::Tls { .. }), "{names:?}: {err:?}");
        assert!(chain(&err).contains(names[0]), "{}", chain(&err));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = seen.lock().unwrap();
        assert!(
            seen.handshakes == 0 && seen.startups == 0 && seen.passwords.is_empty(),
            "{names:?}: {seen:?}"
        );
    }
}
