//! TLS to PostgreSQL over rustls (ring), with libpq's `sslmode` meanings:
//!
//! | `ssl_mode` | TLS | the server's certificate is checked |
//! | --- | --- | --- |
//! | `disable` | never | no |
//! | `prefer` | when the server offers it | against `ssl_root_cert` if set, else not at all |
//! | `require` | always | against `ssl_root_cert` if set, else not at all |
//! | `verify-ca` | always | chain to `ssl_root_cert` |
//! | `verify-full` | always | chain to `ssl_root_cert` and the host name |
//!
//! `prefer` and `require` without a root certificate encrypt but cannot
//! tell the server from an impostor, exactly as libpq; the handshake's
//! signatures are still verified.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::SslMode;

/// Reads the CA certificates of a PEM file.
///
/// # Errors
/// The file cannot be read or holds no certificate.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{} holds no usable certificate", path.display()));
    }
    Ok(roots)
}

/// The TLS connector of every session, built once from the config (the
/// session's `ssl_mode` decides whether TLS is negotiated at all).
#[derive(Clone)]
pub struct Connector(pub MakeRustlsConnect);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

/// Builds the connector for `ssl_mode` and the CA file at `root_cert`.
///
/// # Errors
/// The root certificate file cannot be used.
pub fn connector(ssl_mode: SslMode, root_cert: Option<&Path>) -> Result<Connector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let roots = match root_cert {
        Some(path) => Some(Arc::new(read_roots(path)?)),
        None => None,
    };
    let check = match (ssl_mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => Check::ChainAndName(webpki(roots, &provider)?),
        (SslMode::VerifyCa | SslMode::Prefer | SslMode::Require, Some(roots)) => {
            Check::Chain(webpki(roots, &provider)?)
        }
        // verify-* without a root file is refused by the config.
        (_, None) | (SslMode::Disable, Some(_)) => Check::Nothing,
    };
    let verifier = Arc::new(Verifier { check, algorithms });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Connector(MakeRustlsConnect::new(config)))
}

fn webpki(
    roots: Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("TLS set-up: {e}"))
}

/// What is checked of the server's certificate.
#[derive(Debug)]
enum Check {
    /// `verify-full`: the chain leads to a trusted root and names the host.
    ChainAndName(Arc<WebPkiServerVerifier>),
    /// `verify-ca` (and `prefer`/`require` with a root file): the chain only.
    Chain(Arc<WebPkiServerVerifier>),
    /// `prefer`/`require` without a root file: nothing, as libpq; the
    /// connection is encrypted but not authenticated.
    Nothing,
}

/// The certificate check of one `ssl_mode`; the handshake's signatures are
/// verified in every mode.
#[derive(Debug)]
struct Verifier {
    check: Check,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match &self.check {
            Check::ChainAndName(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            Check::Chain(webpki) => match webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
            Check::Nothing => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
