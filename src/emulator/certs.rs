//! The emulator's certificate authority and the server certificate for its endpoint name,
//! generated at start, so clients can verify-full against the CA.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::EmulatorError;
use super::util::ALPN_POSTGRESQL;

/// A certificate authority: one per emulator, or one shared by a peered pair (as one Amazon
/// root serves both endpoints of a multi-Region cluster).
pub(crate) struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert: rcgen::Certificate,
}

impl Authority {
    pub(crate) fn generate() -> Result<Arc<Authority>, EmulatorError> {
        let ca_key = KeyPair::generate().map_err(failed("CA key"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed("CA"))?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tokio-postgres-dsql emulator CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = ca_params.self_signed(&ca_key).map_err(failed("CA"))?;
        Ok(Arc::new(Authority {
            issuer: Issuer::new(ca_params, ca_key),
            cert,
        }))
    }
}

/// A server certificate for one DNS name from a CA, with the CA as PEM and a rustls server
/// config.
pub(crate) struct Certificates {
    pub(crate) ca_pem: String,
    pub(crate) server_config: Arc<ServerConfig>,
}

fn failed(what: &str) -> impl FnOnce(rcgen::Error) -> EmulatorError + '_ {
    move |e| EmulatorError::caused(format!("could not generate the {what}"), e)
}

impl Certificates {
    pub(crate) fn generate(
        endpoint: &str,
        authority: &Authority,
    ) -> Result<Certificates, EmulatorError> {
        let issuer = &authority.issuer;
        let ca_cert = &authority.cert;

        let server_key = KeyPair::generate().map_err(failed("server key"))?;
        let mut server_params = CertificateParams::new(vec![endpoint.to_owned()])
            .map_err(failed("server certificate"))?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, endpoint);
        let server_cert = server_params
            .signed_by(&server_key, issuer)
            .map_err(failed("server certificate"))?;

        let provider = super::util::crypto_provider().ok_or_else(|| {
            EmulatorError::failed(
                "no rustls crypto provider (enable the `aws-lc-rs` or `ring` feature)",
            )
        })?;
        let mut server_config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth().with_single_cert(
                    vec![server_cert.der().clone(), ca_cert.der().clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
                )
            })
            .map_err(|e| {
                EmulatorError::caused("could not build the TLS server configuration", e)
            })?;
        server_config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Certificates {
            ca_pem: ca_cert.pem(),
            server_config: Arc::new(server_config),
        })
    }
}
