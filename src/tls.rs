//! TLS to PostgreSQL over rustls (ring), with libpq's `sslmode` meanings.
//! The config reads the root certificates when it is loaded (so a bad file
//! is a config error naming its key) and holds them with the mode; `db`
//! builds each session's [`Connector`] from the two.
//!
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The libpq `sslmode` words the seed's `ssl_mode` key takes (see the
/// table above for what each checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, plain TCP otherwise.
    Prefer,
    /// TLS always.
    Require,
    /// TLS, and the certificate chains to `ssl_root_cert`.
    VerifyCa,
    /// TLS, the certificate chains to `ssl_root_cert` and names the host.
    VerifyFull,
}

/// The CA certificates of a PEM file, read once, ready to check a server's
/// certificate chain against.
#[derive(Clone)]
pub struct Roots {
    path: PathBuf,
    count: usize,
    chain: Arc<WebPkiServerVerifier>,
}

impl Roots {
    /// Reads the CA certificates of the PEM file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, holds no usable certificate, or the
    /// verifier cannot be built from it.
    pub fn read(path: &Path) -> Result<Self, String> {
        let roots = read_roots(path)?;
        let count = roots.len();
        let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        Ok(Self {
            path: path.to_owned(),
            count,
            chain,
        })
    }
}

impl std::fmt::Debug for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Roots({}, {} certificates)",
            self.path.display(),
            self.count
        )
    }
}

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

/// The TLS connector of a session (the session's `ssl_mode` decides whether
/// TLS is negotiated at all).
#[derive(Clone)]
pub struct Connector(pub MakeRustlsConnect);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

/// The connector for `ssl_mode` and the CA certificates `roots`.
pub fn connector(ssl_mode: SslMode, roots: Option<&Roots>) -> Connector {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let check = match (ssl_mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => Check::ChainAndName(roots.chain.clone()),
        (SslMode::VerifyCa | SslMode::Prefer | SslMode::Require, Some(roots)) => {
            Check::Chain(roots.chain.clone())
        }
        // verify-* without a root file is refused by the config.
        (_, None) | (SslMode::Disable, Some(_)) => Check::Nothing,
    };
    let verifier = Arc::new(Verifier { check, algorithms });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring's provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Connector(MakeRustlsConnect::new(config))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
