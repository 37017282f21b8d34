//! TLS configurations from PEM files: the server's (its certificate chain and key, and for mutual TLS
//! the CA that client certificates must chain to), and the clients' (`quotad admin`, `quotad-bench`:
//! the CA to trust, and a certificate and key for mutual TLS). Files are read and checked once, at
//! startup, and every error names the flag and the file. The crypto provider is `ring`, the one
//! tonic's `tls-ring` builds.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::{CryptoProvider, ring},
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
        sign::CertifiedKey,
    },
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The only application protocol quotad speaks.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {reason}", path.display())]
    File { flag: &'static str, path: PathBuf, reason: String },
    #[error("{0}")]
    Flags(&'static str),
}

/// The server's TLS configuration, its files read and checked.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    mutual: bool,
}

/// Says whether TLS is mutual and nothing else: the configuration holds the private key.
impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The server's TLS from `--tls-cert`, `--tls-key` and `--tls-client-ca`: none without a
    /// certificate; the certificate and key go together, and a client CA needs both.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Self::load(cert, key, client_ca).map(Some),
            (None, None) if client_ca.is_some() => {
                Err(TlsError::Flags("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"))
            }
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Flags("--tls-cert needs --tls-key, the certificate's private key")),
            (None, Some(_)) => Err(TlsError::Flags("--tls-key needs --tls-cert, the certificate it goes with")),
        }
    }

    fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let chain = certificates("--tls-cert", cert)?;
        let private_key = private_key("--tls-key", key)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = trust_anchors("--tls-client-ca", path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| file_error("--tls-client-ca", path, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, private_key)
            .map_err(|e| key_mismatch("--tls-key", key, "--tls-cert", cert, e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self { config: Arc::new(config), mutual: client_ca.is_some() })
    }

    /// Whether clients must present a certificate from the client CA.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}

/// A client's TLS configuration, its files read and checked.
#[derive(Clone)]
pub struct ClientTls {
    config: ClientTlsConfig,
    mutual: bool,
}

/// Says whether TLS is mutual and nothing else: tonic's `Identity`, in the configuration of mutual
/// TLS, prints its private key in its `Debug`.
impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// What tonic's endpoint is given.
    pub fn config(&self) -> ClientTlsConfig {
        self.config.clone()
    }

    pub fn is_mutual(&self) -> bool {
        self.mutual
    }
}

/// A client's TLS from `--tls-ca`, `--tls-cert` and `--tls-key`: none without any; the CA is
/// required (no system roots are built in), and the certificate and key go together.
pub fn client_tls(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Option<ClientTls>, TlsError> {
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(client_identity(cert, key)?),
        (None, None) => None,
        (Some(_), None) => return Err(TlsError::Flags("--tls-cert needs --tls-key, the certificate's private key")),
        (None, Some(_)) => return Err(TlsError::Flags("--tls-key needs --tls-cert, the certificate it goes with")),
    };
    let Some(ca) = ca else {
        return match identity {
            None => Ok(None),
            Some(_) => Err(TlsError::Flags("--tls-cert needs --tls-ca, the CA that signed the server's certificate")),
        };
    };
    trust_anchors("--tls-ca", ca)?;
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
    Ok(Some(match identity {
        None => ClientTls { config, mutual: false },
        Some(identity) => ClientTls { config: config.identity(identity), mutual: true },
    }))
}

fn client_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let chain = certificates("--tls-cert", cert)?;
    CertifiedKey::from_der(chain, private_key("--tls-key", key)?, &provider())
        .map_err(|e| key_mismatch("--tls-key", key, "--tls-cert", cert, e))?;
    Ok(Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(flag, path, format!("cannot read: {e}")))
}

/// Every `CERTIFICATE` block of a PEM file, at least one, each parsed as X.509: rustls would parse
/// them only when it checks the key against them, and blame the key.
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, format!("not a PEM file: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(flag, path, "no CERTIFICATE in the PEM file"));
    }
    for certificate in &chain {
        RootCertStore::empty()
            .add(certificate.clone())
            .map_err(|e| file_error(flag, path, format!("not an X.509 certificate: {e}")))?;
    }
    Ok(chain)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| file_error(flag, path, format!("no private key in the PEM file: {e}")))
}

/// The certificates of a CA file as trust anchors, each checked to be one.
fn trust_anchors(flag: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(flag, path)? {
        roots.add(certificate).map_err(|e| file_error(flag, path, format!("not a CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn file_error(flag: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File { flag, path: path.to_owned(), reason: reason.to_string() }
}

fn key_mismatch(
    key_flag: &'static str,
    key: &Path,
    cert_flag: &str,
    cert: &Path,
    error: impl fmt::Display,
) -> TlsError {
    file_error(key_flag, key, format!("does not go with {cert_flag} {}: {error}", cert.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for localhost and its key, as PEM files in `dir`, named `name`.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn server_error(cert: Option<&Path>, key: Option<&Path>, client_ca: Option<&Path>) -> String {
        ServerTls::from_flags(cert, key, client_ca).expect_err("refused").to_string()
    }

    #[test]
    fn the_server_flags_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "server");
        assert!(ServerTls::from_flags(None, None, None).unwrap().is_none());
        assert!(!ServerTls::from_flags(Some(&cert), Some(&key), None).unwrap().unwrap().is_mutual());
        assert!(ServerTls::from_flags(Some(&cert), Some(&key), Some(&cert)).unwrap().unwrap().is_mutual());
        assert!(server_error(Some(&cert), None, None).starts_with("--tls-cert needs --tls-key"));
        assert!(server_error(None, Some(&key), None).starts_with("--tls-key needs --tls-cert"));
        assert!(server_error(None, None, Some(&cert)).starts_with("--tls-client-ca (mutual TLS) needs"));
    }

    #[test]
    fn bad_files_are_named_with_their_flag_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "server");
        let (_, other_key) = self_signed(dir.path(), "other");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let named = |error: String, flag: &str, path: &Path, reason: &str| {
            assert!(error.starts_with(&format!("{flag} {}: {reason}", path.display())), "{error}");
        };
        named(server_error(Some(&missing), Some(&key), None), "--tls-cert", &missing, "cannot read");
        named(server_error(Some(&key), Some(&key), None), "--tls-cert", &key, "no CERTIFICATE");
        named(server_error(Some(&cert), Some(&cert), None), "--tls-key", &cert, "no private key");
        named(
            server_error(Some(&cert), Some(&other_key), None),
            "--tls-key",
            &other_key,
            "does not go with --tls-cert",
        );
        named(server_error(Some(&garbage), Some(&key), None), "--tls-cert", &garbage, "not an X.509 certificate");
        named(server_error(Some(&cert), Some(&key), Some(&key)), "--tls-client-ca", &key, "no CERTIFICATE");
        named(server_error(Some(&cert), Some(&key), Some(&garbage)), "--tls-client-ca", &garbage, "not an X.509");
    }

    #[test]
    fn a_client_needs_the_ca_and_a_certificate_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "client");
        let (_, other_key) = self_signed(dir.path(), "other");
        let error = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| {
            client_tls(ca, cert, key).expect_err("refused").to_string()
        };
        assert!(client_tls(None, None, None).unwrap().is_none());
        assert!(client_tls(Some(&cert), None, None).unwrap().is_some());
        assert!(client_tls(Some(&cert), Some(&cert), Some(&key)).unwrap().is_some());
        assert!(error(None, Some(&cert), Some(&key)).contains("--tls-cert needs --tls-ca"));
        assert!(error(Some(&cert), Some(&cert), None).contains("--tls-cert needs --tls-key"));
        assert!(error(Some(&cert), None, Some(&key)).contains("--tls-key needs --tls-cert"));
        assert!(error(Some(&key), None, None).starts_with("--tls-ca"));
        assert!(error(Some(&cert), Some(&cert), Some(&other_key)).contains("does not go with --tls-cert"));
    }

    #[test]
    fn a_client_configuration_prints_no_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "client");
        let mutual = client_tls(Some(&cert), Some(&cert), Some(&key)).unwrap().unwrap();
        assert_eq!(format!("{mutual:?}"), "ClientTls { mutual: true, .. }");
        assert_eq!(
            format!("{:?}", client_tls(Some(&cert), None, None).unwrap()),
            "Some(ClientTls { mutual: false, .. })"
        );
        // What the wrapper keeps out: tonic's own `Debug` prints the key's bytes.
        let key_bytes = format!("{:?}", std::fs::read(&key).unwrap());
        assert!(format!("{:?}", mutual.config()).contains(key_bytes.trim_matches(['[', ']'])));
    }
}
