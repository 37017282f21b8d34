//! TLS and mutual TLS through a real server with certificates made at test time (a CA, a server
//! certificate for 127.0.0.1 and localhost, client certificates from that CA and from another): quota,
//! admin, health and reflection calls over TLS; plaintext clients, clients that do not trust the CA,
//! and under mutual TLS clients without a certificate or with one from another CA, refused; a peer
//! that never handshakes, or never sends the HTTP/2 preface after TLS, closed; the `--tls-*` flags of
//! the binary, its exit code 64 for bad ones, and `quotad admin` over mutual TLS.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use common::*;
use quotad::{
    clock::ManualClock,
    config::{AuthConfig, Config, Settings},
    proto::{GetBalanceRequest, quota_admin_client::QuotaAdminClient, quota_client::QuotaClient},
    server::ServeError,
    transport::tls::ServerTls,
};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::ring,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// A certificate and its key, as PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// Certificates made for one test, in a directory of their own.
struct Pki {
    dir: TempDir,
    ca: PathBuf,
    server: Pem,
    client: Pem,
    other_ca: PathBuf,
    client_of_other_ca: Pem,
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn issue(issuer: &Issuer<'static, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let pem = |name: &str, (cert, key): (String, String)| Pem {
            cert: write(&format!("{name}.pem"), &cert),
            key: write(&format!("{name}.key"), &key),
        };
        let (ca_pem, ca) = new_ca("quotad test CA");
        let (other_ca_pem, other_ca) = new_ca("another CA");
        let server = pem("server", issue(&ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth));
        let client = pem("client", issue(&ca, &["agent-runtime"], ExtendedKeyUsagePurpose::ClientAuth));
        let client_of_other_ca = pem("stranger", issue(&other_ca, &["stranger"], ExtendedKeyUsagePurpose::ClientAuth));
        let (ca, other_ca) = (write("ca.pem", &ca_pem), write("other-ca.pem", &other_ca_pem));
        Self { dir, ca, server, client, other_ca, client_of_other_ca }
    }

    fn server_tls(&self, mutual: bool) -> ServerTls {
        let client_ca = mutual.then_some(self.ca.as_path());
        ServerTls::from_flags(Some(&self.server.cert), Some(&self.server.key), client_ca).unwrap().unwrap()
    }

    /// A client that trusts `ca`, with `identity` for mutual TLS.
    fn client(&self, ca: &Path, identity: Option<&Pem>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
        match identity {
            None => config,
            Some(pem) => {
                config.identity(Identity::from_pem(std::fs::read(&pem.cert).unwrap(), std::fs::read(&pem.key).unwrap()))
            }
        }
    }
}

/// A quotad served in-process with `tls`; stops when dropped.
struct TlsServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _task: JoinHandle<Result<(), ServeError>>,
}

async fn serve(tls: ServerTls, change: impl FnOnce(&mut Config)) -> TlsServer {
    let mut config = Config::from_settings("127.0.0.1:0".parse().unwrap(), Settings::default()).unwrap();
    // These tests are about the transport; authentication is tested in tests/auth.rs.
    config.auth = AuthConfig::off();
    config.tls = Some(tls);
    change(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(quotad::server::run(listener, config, Arc::new(ManualClock::new(START_MS)), async {
        let _ = stopped.await;
    }));
    TlsServer { addr, _stop: stop, _task: task }
}

/// A channel to `https://<host>:<port>`, or the transport's refusal.
async fn connect_tls(host: &str, addr: SocketAddr, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("https://{host}:{}", addr.port())).unwrap().tls_config(tls)?;
    bounded("a TLS connection", endpoint.connect()).await
}

async fn balance_of_nowhere(channel: Channel) -> Result<tonic::Response<quotad::proto::Balance>, tonic::Status> {
    bounded("a call", QuotaClient::new(channel).get_balance(GetBalanceRequest { environment_id: "nowhere".into() }))
        .await
}

/// Asserts that a client is refused: its connection fails, or (TLS 1.3 checks a client certificate
/// after the client's side of the handshake is done) its first call fails with a transport error, not
/// a status the server answered.
async fn assert_refused(connected: Result<Channel, tonic::transport::Error>, who: &str) {
    let Ok(channel) = connected else { return };
    let status = balance_of_nowhere(channel).await.expect_err(who);
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{who}: {status:?}");
    assert!(std::error::Error::source(&status).is_some(), "{who}: not a transport error: {status:?}");
}

#[tokio::test]
async fn quota_admin_health_and_reflection_calls_work_over_tls() {
    // Proves that a client trusting the CA calls every service over TLS, at the IP address and at the
    // host name of the server's certificate: an admin purchase, a reservation, a health check and a
    // reflection listing.
    let pki = Pki::new();
    let server = serve(pki.server_tls(false), |_| {}).await;
    for host in ["127.0.0.1", "localhost"] {
        let channel = connect_tls(host, server.addr, pki.client(&pki.ca, None)).await.expect("a TLS connection");
        let tenant = format!("tenant-{}", host.len());
        let purchase =
            quotad::proto::PurchaseCapacityRequest { tenant_id: tenant.clone(), packs: 1, ..Default::default() };
        QuotaAdminClient::new(channel.clone()).purchase_capacity(purchase).await.expect("an admin call");
        let allocate = allocate_request(&tenant, &format!("{tenant}-env"), 10, false);
        QuotaAdminClient::new(channel.clone()).allocate_capacity(allocate).await.unwrap();
        let reserved = QuotaClient::new(channel.clone())
            .check_and_reserve(reserve_request(&format!("{tenant}-env"), 1))
            .await
            .expect("a quota call")
            .into_inner();
        assert_eq!(reserved.reserved_milli, milli(1));

        let mut health = HealthClient::new(channel.clone());
        let checked = health.check(HealthCheckRequest { service: "quota.v1.Quota".into() }).await;
        assert_eq!(checked.expect("a health check").into_inner().status(), ServingStatus::Serving);

        let list = ServerReflectionRequest {
            message_request: Some(MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut reflection = ServerReflectionClient::new(channel);
        let mut answers = reflection.server_reflection_info(tokio_stream::once(list)).await.unwrap().into_inner();
        let answer = bounded("reflection", answers.message()).await.unwrap().expect("an answer");
        let Some(MessageResponse::ListServicesResponse(services)) = answer.message_response else {
            panic!("not a service list: {answer:?}")
        };
        assert!(services.service.iter().any(|s| s.name == "quota.v1.Quota"), "{services:?}");
    }
}

#[tokio::test]
async fn plaintext_clients_and_clients_that_do_not_trust_the_ca_are_refused() {
    // Proves that a TLS server refuses a plaintext HTTP/2 client and a client that trusts another CA,
    // and goes on serving a client that trusts its CA.
    let pki = Pki::new();
    let server = serve(pki.server_tls(false), |_| {}).await;
    let plaintext = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    assert_refused(bounded("a plaintext connection", plaintext.connect()).await, "a plaintext client").await;
    let untrusting = connect_tls("localhost", server.addr, pki.client(&pki.other_ca, None)).await;
    assert!(untrusting.is_err(), "a client that trusts another CA connected");

    let channel = connect_tls("localhost", server.addr, pki.client(&pki.ca, None)).await.unwrap();
    expect_code(balance_of_nowhere(channel).await, Code::NotFound);
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    // Proves mutual TLS: a client with a certificate from the client CA is served; a client without a
    // certificate, and one whose certificate comes from another CA, are refused.
    let pki = Pki::new();
    let server = serve(pki.server_tls(true), |_| {}).await;
    let trusted = connect_tls("localhost", server.addr, pki.client(&pki.ca, Some(&pki.client))).await.unwrap();
    expect_code(balance_of_nowhere(trusted.clone()).await, Code::NotFound);

    let anonymous = connect_tls("localhost", server.addr, pki.client(&pki.ca, None)).await;
    assert_refused(anonymous, "a client without a certificate").await;
    let stranger = connect_tls("localhost", server.addr, pki.client(&pki.ca, Some(&pki.client_of_other_ca))).await;
    assert_refused(stranger, "a client with a certificate from another CA").await;

    expect_code(balance_of_nowhere(trusted).await, Code::NotFound);
}

/// A TLS connection to `addr` that trusts `ca` and offers ALPN `h2`, with no HTTP/2 spoken on it yet.
async fn tls_handshake(addr: SocketAddr, ca: &Path) -> TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    bounded("a TLS handshake", TlsConnector::from(Arc::new(config)).connect(name, tcp)).await.expect("TLS")
}

#[tokio::test]
async fn a_peer_that_never_handshakes_is_closed() {
    // Proves the handshake deadline under TLS: a TCP connection that sends no ClientHello, and one that
    // completes TLS but never sends the HTTP/2 preface, are both closed by the server; a client that
    // handshakes is then served.
    let pki = Pki::new();
    let server = serve(pki.server_tls(false), |c| c.transport.handshake_timeout = Duration::from_millis(200)).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut silent_after_tls = tls_handshake(server.addr, &pki.ca).await;
    let read = bounded("the close of a silent connection", silent.read(&mut [0; 64])).await;
    assert!(matches!(read, Ok(0) | Err(_)), "the server sent something: {read:?}");
    let read = bounded("the close of a connection without a preface", silent_after_tls.read(&mut [0; 64])).await;
    assert!(matches!(read, Ok(0) | Err(_)), "the server spoke HTTP/2 before the preface: {read:?}");

    let channel = connect_tls("localhost", server.addr, pki.client(&pki.ca, None)).await.unwrap();
    expect_code(balance_of_nowhere(channel).await, Code::NotFound);
}

// The real binary.

/// `quotad` with an in-memory log on an ephemeral port, the `--tls-*` flags given as `env`.
fn quotad_with(pki: &Pki, env: &[(&str, &Path)]) -> tokio::process::Command {
    let mut command = quotad_binary();
    command.args(["--listen", "127.0.0.1:0", "--durability", "none", "--data-dir"]);
    command.arg(pki.dir.path().join("data")).envs(env.iter().map(|(k, v)| (k, v.as_os_str())));
    command
}

#[tokio::test]
async fn bad_tls_flags_exit_64_naming_the_flag_and_the_file() {
    // Proves that the binary refuses to start, with exit code 64 and a reason naming the flag (and the
    // file), for: a certificate without its key, a key without its certificate, a client CA without
    // them, a file that cannot be read, a file that is not PEM, a key of another certificate, and a
    // client CA file without a certificate.
    let pki = Pki::new();
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = pki.dir.path().join("missing.pem");
    let (cert, key) = (pki.server.cert.as_path(), pki.server.key.as_path());
    type Env<'a> = &'a [(&'a str, &'a Path)];
    let cases: [(Env, &str, Option<&Path>); 7] = [
        (&[("QUOTAD_TLS_CERT", cert)], "--tls-cert needs --tls-key", None),
        (&[("QUOTAD_TLS_KEY", key)], "--tls-key needs --tls-cert", None),
        (&[("QUOTAD_TLS_CLIENT_CA", &pki.ca)], "--tls-client-ca", None),
        (&[("QUOTAD_TLS_CERT", &missing), ("QUOTAD_TLS_KEY", key)], "--tls-cert", Some(&missing)),
        (&[("QUOTAD_TLS_CERT", &garbage), ("QUOTAD_TLS_KEY", key)], "--tls-cert", Some(&garbage)),
        (&[("QUOTAD_TLS_CERT", cert), ("QUOTAD_TLS_KEY", &pki.client.key)], "--tls-key", Some(&pki.client.key)),
        (
            &[("QUOTAD_TLS_CERT", cert), ("QUOTAD_TLS_KEY", key), ("QUOTAD_TLS_CLIENT_CA", key)],
            "--tls-client-ca",
            Some(key),
        ),
    ];
    for (env, flag, file) in cases {
        let output = bounded("quotad with bad TLS flags", quotad_with(&pki, env).output()).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(flag), "{env:?}: {stderr}");
        if let Some(file) = file {
            assert!(stderr.contains(&file.display().to_string()), "{env:?}: {stderr}");
        }
    }
}

#[tokio::test]
async fn the_binary_serves_mutual_tls_from_its_flags_and_quotad_admin_calls_it() {
    // Proves the flags end to end: quotad started with QUOTAD_TLS_CERT, QUOTAD_TLS_KEY and
    // QUOTAD_TLS_CLIENT_CA logs `tls=mutual`, and `quotad admin` with --tls-ca, --tls-cert and
    // --tls-key buys capacity and reads the tenant back over mutual TLS; without its certificate it is
    // refused.
    let pki = Pki::new();
    let env = [
        ("QUOTAD_TLS_CERT", &*pki.server.cert),
        ("QUOTAD_TLS_KEY", &*pki.server.key),
        ("QUOTAD_TLS_CLIENT_CA", &*pki.ca),
    ];
    let mut daemon = quotad_with(&pki, &env).spawn().expect("start quotad");
    let mut lines = BufReader::new(daemon.stderr.take().unwrap()).lines();
    let listening = bounded("the listening line", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("quotad exited before listening");
            if line.contains("listening") {
                return line;
            }
        }
    })
    .await;
    assert!(listening.contains("tls=mutual"), "{listening}");
    let port =
        listening.rsplit_once("127.0.0.1:").and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next());
    let server = format!("https://localhost:{}", port.expect("an address"));

    let tls = |with_certificate: bool| {
        let mut args = vec!["--server".to_owned(), server.clone(), "--tls-ca".into(), pki.ca.display().to_string()];
        if with_certificate {
            args.extend(["--tls-cert".into(), pki.client.cert.display().to_string()]);
            args.extend(["--tls-key".into(), pki.client.key.display().to_string()]);
        }
        args
    };
    let admin = |args: Vec<String>| async move {
        let mut command = quotad_binary();
        command.arg("admin").args(args).stdout(Stdio::piped());
        bounded("quotad admin", command.output()).await.unwrap()
    };
    let mut purchase = tls(true);
    purchase.extend(["purchase", "--tenant", "acme", "--packs", "2"].map(String::from));
    let bought = admin(purchase).await;
    assert_eq!(bought.status.code(), Some(0), "{}", String::from_utf8_lossy(&bought.stderr));
    let mut tenant = tls(true);
    tenant.extend(["tenant", "acme", "--format", "json"].map(String::from));
    let read = admin(tenant.clone()).await;
    assert_eq!(read.status.code(), Some(0), "{}", String::from_utf8_lossy(&read.stderr));
    let record: serde_json::Value = serde_json::from_slice(&read.stdout).expect("a JSON record");
    assert_eq!(record["purchased_milli"], 50_000_000, "{record}");

    let mut anonymous = tls(false);
    anonymous.extend(["tenant", "acme"].map(String::from));
    let refused = admin(anonymous).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("UNAVAILABLE: lost https://") && stderr.contains("--tls-cert"), "{stderr}");
}
