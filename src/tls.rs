//! TLS for DSQL connections: one rustls [`ClientConfig`] per connector, and the
//! `tokio-postgres` glue ([`DsqlTls`]) that uses it.
//!
//! - Roots: webpki's Mozilla set by default (it has Amazon Root CA 1), a PEM file, or the
//!   operating system's store.
//! - SNI is always the DSQL host name, also when dialling `hostaddr`: DSQL routes by SNI.
//! - ALPN `postgresql` is always offered; it is what makes direct TLS (no SSLRequest) work.
//! - [`SslMode::Require`], which the configuration allows only for PrivateLink VPC endpoints
//!   (with the cluster id), does not check the certificate against the host dialled (a VPC
//!   endpoint's name or address, which no certificate names) but against **DSQL's names for
//!   that cluster in its Region**: `<cluster-id>.dsql.<region>.on.aws` and the PrivateLink
//!   private DNS form `<cluster-id>.dsql-<suffix>.<region>.on.aws` (or a wildcard certificate
//!   for either). The chain must lead to a trusted root as always. A trusted certificate for
//!   any other name (a host on the path with a free certificate for its own domain) is refused
//!   before anything is sent, so the token, a bearer credential, never reaches it. libpq's
//!   `require` checks nothing.
//! - The crypto provider is the process default if the application installed one
//!   ([`CryptoProvider::install_default`]); otherwise the one this crate's `aws-lc-rs` or `ring`
//!   feature selects, used for this config only and never installed globally.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::Error;
use crate::config::{RootCerts, SslMode};
use crate::session::{BackendScanner, SessionWatch};

/// The ALPN protocol name PostgreSQL uses for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The crypto provider: the application's default if installed, else the crate feature's.
pub(crate) fn crypto_provider() -> Option<Arc<CryptoProvider>> {
    if let Some(provider) = CryptoProvider::get_default() {
        return Some(provider.clone());
    }
    #[cfg(feature = "aws-lc-rs")]
    {
        Some(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
    }
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    {
        Some(Arc::new(rustls::crypto::ring::default_provider()))
    }
    #[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
    {
        None
    }
}

/// Builds the client configuration for `host` (named in errors). With [`SslMode::Require`],
/// `cluster` is the PrivateLink case's cluster id and Region, whose DSQL names the certificate
/// must carry (see the module docs).
pub(crate) fn client_config(
    host: &str,
    roots: &RootCerts,
    mode: SslMode,
    cluster: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, Error> {
    let setup_error = |reason: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| {
        Error::TlsConfig {
            host: host.to_owned(),
            reason,
            source,
        }
    };
    let provider = crypto_provider().ok_or_else(|| {
        setup_error(
            "no rustls crypto provider: enable this crate's `aws-lc-rs` or `ring` feature, or \
             call rustls::crypto::CryptoProvider::install_default"
                .into(),
            None,
        )
    })?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            setup_error(
                "the crypto provider supports no TLS version".into(),
                Some(Box::new(e)),
            )
        })?;
    let mut config = match mode {
        SslMode::VerifyFull => builder
            .with_root_certificates(
                root_store(roots).map_err(|(reason, source)| setup_error(reason, source))?,
            )
            .with_no_client_auth(),
        SslMode::Require => {
            let Some((cluster_id, region)) = cluster else {
                return Err(setup_error(
                    "sslmode=require needs the cluster id (amzn_cluster_id) and its Region: \
                     they name the certificate accepted"
                        .into(),
                    None,
                ));
            };
            let roots =
                root_store(roots).map_err(|(reason, source)| setup_error(reason, source))?;
            let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| setup_error("no usable root certificate".into(), Some(Box::new(e))))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(DsqlNames {
                    chain,
                    cluster_id: cluster_id.to_ascii_lowercase(),
                    region: region.to_ascii_lowercase(),
                }))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

type SetupFailure = (String, Option<Box<dyn std::error::Error + Send + Sync>>);

fn root_store(roots: &RootCerts) -> Result<RootCertStore, SetupFailure> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::WebPki => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err((
                    "sslrootcert=system: no usable CA certificate in the operating system's store"
                        .into(),
                    found
                        .errors
                        .into_iter()
                        .next()
                        .map(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                ));
            }
        }
        RootCerts::File(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    (
                        format!("sslrootcert: cannot read PEM certificates from {shown}"),
                        Some(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                    )
                })?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err((format!("sslrootcert: no CA certificate in {shown}"), None));
            }
        }
    }
    Ok(store)
}

/// The PrivateLink case: the certificate must be valid now, chain to a trusted root, and name
/// the cluster as DSQL does in its Region (`<id>.dsql.<region>.on.aws` or
/// `<id>.dsql-<suffix>.<region>.on.aws`, a wildcard for either included), whatever host was
/// dialled (the VPC endpoint). Handshake signatures are verified as usual.
#[derive(Debug)]
struct DsqlNames {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    cluster_id: String,
    region: String,
}

impl DsqlNames {
    /// The cluster's public endpoint name, the one its tokens are signed for.
    fn endpoint(&self) -> String {
        format!("{}.dsql.{}.on.aws", self.cluster_id, self.region)
    }

    /// The name to check the certificate against for `presented`, one of its names, when that
    /// is one of DSQL's names for this cluster (a wildcard stands for the cluster id).
    fn dsql_name_for(&self, presented: &str) -> Option<String> {
        let presented = presented.to_ascii_lowercase();
        let (first, rest) = presented.split_once('.')?;
        if first != "*" && first != self.cluster_id {
            return None;
        }
        let service = rest.strip_suffix(&format!(".{}.on.aws", self.region))?;
        let is_dsql = service == "dsql"
            || service.strip_prefix("dsql-").is_some_and(|suffix| {
                !suffix.is_empty()
                    && suffix
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        is_dsql.then(|| format!("{}.{rest}", self.cluster_id))
    }
}

/// A certificate `sslmode=require` refused for its names. (rustls shows it with `Debug`, so
/// `Debug` is the message too.)
struct NotDsqlsName {
    presented: Vec<String>,
    expected: String,
}

impl std::fmt::Display for NotDsqlsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let presented = match self.presented.is_empty() {
            true => "no DNS name".to_owned(),
            false => self.presented.join(", "),
        };
        write!(
            f,
            "the server's certificate names {presented}; sslmode=require accepts only DSQL's \
             names for the cluster: {}, or {} (a wildcard for either included)",
            self.expected,
            self.expected.replacen(".dsql.", ".dsql-<suffix>.", 1)
        )
    }
}

impl std::fmt::Debug for NotDsqlsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for NotDsqlsName {}

impl ServerCertVerifier for DsqlNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = self.endpoint();
        let check = |name: &str| -> Result<ServerCertVerified, rustls::Error> {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| rustls::Error::General(format!("{name}: {e}")))?;
            self.chain
                .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
        };
        let presented = match check(&expected) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { presented, .. },
            )) => presented,
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)) => {
                Vec::new()
            }
            other => return other,
        };
        // Not the public name: one of the certificate's own names may be the cluster's
        // PrivateLink name (checked again as that name, chain and all). webpki presents each
        // name as its `Debug` form: `DnsName("host")`, `IpAddress(…)`, ….
        let names: Vec<String> = presented
            .iter()
            .map(|name| {
                name.strip_prefix("DnsName(\"")
                    .and_then(|rest| rest.strip_suffix("\")"))
                    .unwrap_or(name)
                    .to_owned()
            })
            .collect();
        for name in &names {
            if let Some(dsql_name) = self.dsql_name_for(name) {
                return check(&dsql_name);
            }
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotDsqlsName {
                presented: names,
                expected,
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// `tokio-postgres`'s TLS hook for DSQL: hand it to `tokio_postgres::Config::connect`, or to
/// other pools (`bb8-postgres`, `deadpool-postgres`) to reach DSQL with the same settings.
///
/// The domain `tokio-postgres` passes (the configured host, also when `hostaddr` is dialled)
/// becomes the SNI name and the name the certificate is checked against.
#[derive(Clone)]
pub struct DsqlTls {
    config: Arc<ClientConfig>,
    /// Set on the per-connection copy the connector makes: where the stream reports the
    /// session's state.
    watch: Option<Arc<SessionWatch>>,
}

impl std::fmt::Debug for DsqlTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlTls").finish_non_exhaustive()
    }
}

impl DsqlTls {
    /// Wraps a rustls configuration. It should offer ALPN `postgresql` for direct TLS.
    pub fn new(config: Arc<ClientConfig>) -> Self {
        DsqlTls {
            config,
            watch: None,
        }
    }

    /// A copy for one connection whose stream reports the session's state to the returned
    /// watch.
    pub(crate) fn watched(&self) -> (DsqlTls, Arc<SessionWatch>) {
        let watch = Arc::new(SessionWatch::default());
        (
            DsqlTls {
                config: self.config.clone(),
                watch: Some(watch.clone()),
            },
            watch,
        )
    }

    /// The rustls configuration shared by every connection made with this value.
    pub fn client_config(&self) -> &Arc<ClientConfig> {
        &self.config
    }
}

impl<S> MakeTlsConnect<S> for DsqlTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = DsqlTlsStream<S>;
    type TlsConnect = DsqlTlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<DsqlTlsConnect, Self::Error> {
        Ok(DsqlTlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain)?.to_owned(),
            watch: self.watch.clone(),
        })
    }
}

/// One pending TLS handshake (see [`DsqlTls`]).
pub struct DsqlTlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    watch: Option<Arc<SessionWatch>>,
}

impl<S> TlsConnect<S> for DsqlTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = DsqlTlsStream<S>;
    type Error = io::Error;
    type Future = DsqlTlsHandshake<S>;

    fn connect(self, stream: S) -> DsqlTlsHandshake<S> {
        DsqlTlsHandshake {
            handshake: tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream),
            watch: self.watch,
        }
    }
}

/// The TLS handshake future (see [`DsqlTls`]).
pub struct DsqlTlsHandshake<S> {
    handshake: tokio_rustls::Connect<S>,
    watch: Option<Arc<SessionWatch>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for DsqlTlsHandshake<S> {
    type Output = io::Result<DsqlTlsStream<S>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        Pin::new(&mut this.handshake)
            .poll(cx)
            .map_ok(|stream| DsqlTlsStream(stream, this.watch.take().map(BackendScanner::new)))
    }
}

/// A TLS stream to DSQL (see [`DsqlTls`]).
pub struct DsqlTlsStream<S>(tokio_rustls::client::TlsStream<S>, Option<BackendScanner>);

impl<S> DsqlTlsStream<S> {
    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.0.get_ref().1.alpn_protocol()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for DsqlTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.0).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(scanner)) = (&polled, &mut this.1) {
            scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for DsqlTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for DsqlTlsStream<S> {
    /// DSQL authenticates with a cleartext token over TLS, never SCRAM, so no channel binding.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn require_accepts_only_dsqls_names_for_the_cluster_from_a_trusted_chain() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let authority = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            (Issuer::new(params, key), cert)
        };
        let (issuer, ca) = authority("the cluster's CA");
        let (stranger_issuer, _) = authority("someone else's CA");
        let leaf = |names: &[&str], issuer: &Issuer<'_, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&key, issuer)
                .unwrap()
        };
        let provider = crypto_provider().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let verifier = DsqlNames {
            chain: rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap(),
            cluster_id: "abcdefghijklmnopqrstuvwxyz".into(),
            region: "us-east-1".into(),
        };
        let vpce =
            ServerName::try_from("vpce-0123-abcd.dsql-fnh4.us-east-1.vpce.amazonaws.com").unwrap();
        let check = |cert: &rcgen::Certificate| {
            verifier.verify_server_cert(cert.der(), &[], &vpce, &[], UnixTime::now())
        };
        // DSQL's names for the cluster, from the trusted CA: accepted.
        for names in [
            &["abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"][..],
            &["*.dsql.us-east-1.on.aws"],
            &["abcdefghijklmnopqrstuvwxyz.dsql-fnh4.us-east-1.on.aws"],
            &["*.dsql-fnh4.us-east-1.on.aws"],
            &["other.example", "*.dsql-fnh4.us-east-1.on.aws"],
        ] {
            assert!(check(&leaf(names, &issuer)).is_ok(), "{names:?}");
        }
        // A trusted certificate for any other name: refused, naming both sides.
        for names in [
            &["evil.example"][..],
            &["*.example"],
            &["zyxwvutsrqponmlkjihgfedcba.dsql.us-east-1.on.aws"],
            &["abcdefghijklmnopqrstuvwxyz.dsql.us-west-2.on.aws"],
            &["*.dsql.us-west-2.on.aws"],
            &["abcdefghijklmnopqrstuvwxyz.rds.us-east-1.on.aws"],
            &["abcdefghijklmnopqrstuvwxyz.dsql-.us-east-1.on.aws"],
            &["abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws.evil.example"],
            &["vpce-0123-abcd.dsql-fnh4.us-east-1.vpce.amazonaws.com"],
        ] {
            let err = check(&leaf(names, &issuer)).unwrap_err();
            let shown = err.to_string();
            assert!(
                shown.contains(names[0])
                    && shown.contains("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")
                    && shown.contains("dsql-<suffix>"),
                "{names:?}: {shown}"
            );
        }
        // Names in upper case are the same names.
        assert!(
            check(&leaf(
                &["ABCDEFGHIJKLMNOPQRSTUVWXYZ.DSQL-FNH4.US-EAST-1.ON.AWS"],
                &issuer
            ))
            .is_ok()
        );
        // DSQL's name, trusted, but expired: refused as expired.
        let expired = {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(vec!["*.dsql-fnh4.us-east-1.on.aws".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            params.signed_by(&key, &issuer).unwrap()
        };
        let err = check(&expired).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );
        // DSQL's name from a CA no root vouches for: refused.
        let err = check(&leaf(
            &["abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"],
            &stranger_issuer,
        ))
        .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        let err = check(&leaf(&["*.dsql-fnh4.us-east-1.on.aws"], &stranger_issuer)).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
    }

    use super::*;

    #[test]
    fn default_config_offers_alpn_and_webpki_roots() {
        let config = client_config(
            "x.dsql.us-east-1.on.aws",
            &RootCerts::WebPki,
            SslMode::VerifyFull,
            None,
        )
        .unwrap();
        assert_eq!(config.alpn_protocols, vec![b"postgresql".to_vec()]);
    }

    #[test]
    fn missing_ca_file_names_the_file_and_host() {
        let err = client_config(
            "x.dsql.us-east-1.on.aws",
            &RootCerts::File("/nonexistent/ca.pem".into()),
            SslMode::VerifyFull,
            None,
        )
        .unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("/nonexistent/ca.pem"), "{shown}");
        assert!(shown.contains("x.dsql.us-east-1.on.aws"), "{shown}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("dsql-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = client_config(
            "h.example",
            &RootCerts::File(path),
            SslMode::VerifyFull,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no CA certificate"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
