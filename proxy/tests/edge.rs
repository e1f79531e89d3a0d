//! Bad input and hostile peers against the real proxy: each is answered or closed
//! cleanly, counted in the metrics, and the proxy keeps serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pimesh_test_support::backends::Backend;
use pimesh_test_support::proxy::{mesh, Proxy, ProxyOptions};
use pimesh_test_support::{free_port, Site, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

struct Node {
    _dir: tempfile::TempDir,
    proxy: Proxy,
    _web: Backend,
}

/// One proxy (node a) with a service `web` placed on it.
async fn node(site: &Site, proxy_settings: &str) -> Node {
    let dir = tempfile::tempdir().expect("temp dir");
    let web = Backend::start("web").await;
    let port = free_port();
    let config = dir.path().join("cluster.toml");
    // Low, so that many test proxies fit the open-file limit.
    let limit = if proxy_settings.contains("max_connections") {
        ""
    } else {
        "max_connections = 1000"
    };
    std::fs::write(
        &config,
        format!(
            "site = \"{}\"\n[proxy]\n{limit}\n{proxy_settings}\n[nodes.a]\naddress = \"127.0.0.1:{port}\"\n\
             [services.web]\nport = {}\nnodes = [\"a\"]\n",
            site.name, web.port
        ),
    )
    .expect("config");
    let id = site.identity_dir(dir.path(), "a", &[]);
    let proxy = Proxy::start(ProxyOptions {
        dir: dir.path(),
        name: "a",
        config: &config,
        identity: Some(&id),
        inbound_port: port,
        local_ip: "127.0.0.1",
    })
    .await;
    Node {
        _dir: dir,
        proxy,
        _web: web,
    }
}

/// Sends `bytes` on a fresh connection to `addr` and reads until the proxy closes it.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes");
    String::from_utf8_lossy(&answer).into_owned()
}

async fn wait_metric(proxy: &Proxy, line: &str, at_least: f64) {
    let deadline = Instant::now() + DEADLINE;
    while proxy.metric(line).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{line} < {at_least}:\n{}",
            proxy.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_with_400_and_431() {
    let site = Site::new("depot");
    let n = node(&site, "max_header_bytes = 16384").await;
    let answer = exchange(n.proxy.outbound, b"GET / HTTP/1.1\r\nHost web\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = exchange(n.proxy.outbound, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    wait_metric(
        &n.proxy,
        "pimesh_rejected_total{direction=\"outbound\",reason=\"malformed_http\"}",
        1.0,
    )
    .await;
    wait_metric(
        &n.proxy,
        "pimesh_rejected_total{direction=\"outbound\",reason=\"header_too_large\"}",
        1.0,
    )
    .await;
    // Still serving.
    assert_eq!(
        exchange(
            n.proxy.outbound,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        .await
        .lines()
        .next(),
        Some("HTTP/1.1 200 OK")
    );
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_at_the_header_timeout() {
    let site = Site::new("depot");
    let n = node(&site, "header_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(n.proxy.outbound).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy closed the half-sent request");
    wait_metric(
        &n.proxy,
        "pimesh_rejected_total{direction=\"outbound\",reason=\"header_timeout\"}",
        1.0,
    )
    .await;

    // A keep-alive connection that stays idle after its response is closed the same way.
    let mut idle = TcpStream::connect(n.proxy.outbound).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let len = idle.read(&mut buf).await.expect("read");
    assert!(buf[..len].starts_with(b"HTTP/1.1 200"));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle keep-alive connection was closed");
}

#[tokio::test]
async fn the_connection_limit_refuses_new_connections_and_keeps_old_ones() {
    let site = Site::new("depot");
    let n = node(&site, "max_connections = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(n.proxy.outbound).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let len = stream.read(&mut buf).await.expect("read");
        assert!(buf[..len].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    let answer = exchange(n.proxy.outbound, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert_eq!(answer, "", "the fourth connection is closed unanswered");
    wait_metric(
        &n.proxy,
        "pimesh_rejected_total{direction=\"outbound\",reason=\"connection_limit\"}",
        1.0,
    )
    .await;
    let stream = &mut held[0];
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let len = stream.read(&mut buf).await.expect("read");
    assert!(
        buf[..len].starts_with(b"HTTP/1.1 200"),
        "held connections keep working"
    );
}

#[tokio::test]
async fn idle_admin_connections_never_take_the_descriptors_of_mesh_traffic() {
    let site = Site::new("depot");
    let n = node(&site, "").await;
    let before = n.proxy.daemon.open_descriptors();
    // Connections that never send a request: the admin port holds at most 64 of them
    // open (the others wait in the listen backlog, not in the proxy's descriptors).
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(n.proxy.admin).await.expect("connect"));
    }
    let deadline = Instant::now() + DEADLINE;
    // (A descriptor or two of `before` may have been transient.)
    while n.proxy.daemon.open_descriptors() < before + 60 {
        assert!(
            Instant::now() < deadline,
            "the proxy never took the first 60: {} open, {before} before",
            n.proxy.daemon.open_descriptors()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = n.proxy.daemon.open_descriptors();
    assert!(
        held <= before + 64 + 8,
        "{held} descriptors open with 300 idle admin connections, {before} before"
    );
    // Mesh traffic is served meanwhile.
    let answer = exchange(
        n.proxy.outbound,
        b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(idle);
}

/// A TLS client that trusts any server and presents `chain`/`key`: what a stranger or a
/// node with a bad certificate would be.
async fn tls_attempt(addr: std::net::SocketAddr, chain: &str, key: &str) -> bool {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(certs, key)
        .expect("client cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("a.depot.pimesh").expect("name");
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return false;
    };
    // TLS 1.3: the server judges the client's certificate after the client finished; its
    // verdict arrives on the first read.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(DEADLINE, tls.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn the_mesh_port_refuses_plaintext_strangers_and_bad_certificates() {
    let site = Site::new("depot");
    let n = node(&site, "").await;
    let inbound = n.proxy.inbound;
    let failures = |reason: &str| {
        format!("tls_handshake_failure_total{{direction=\"inbound\",reason=\"{reason}\"}}")
    };

    let answer = exchange(inbound, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert!(!answer.contains("HTTP/1.1 200"), "{answer}");
    wait_metric(&n.proxy, &failures("not_tls"), 1.0).await;

    // A node of the same site is let in: the control case for the ones below.
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let (chain, key) = site.leaf("b", &[], now, day);
    assert!(
        tls_attempt(inbound, &chain, &key).await,
        "a site member is accepted"
    );

    let stranger = Site::new("depot");
    let (chain, key) = stranger.leaf("b", &[], now, day);
    assert!(!tls_attempt(inbound, &chain, &key).await, "another anchor");
    wait_metric(&n.proxy, &failures("unknown_ca"), 1.0).await;

    let (chain, key) = site.leaf("b", &[], now - 3 * day, day);
    assert!(!tls_attempt(inbound, &chain, &key).await, "expired");
    wait_metric(&n.proxy, &failures("expired"), 1.0).await;

    let (chain, key) = site.leaf("b", &[], now + 3 * day, day);
    assert!(!tls_attempt(inbound, &chain, &key).await, "not yet valid");
    wait_metric(&n.proxy, &failures("not_yet_valid"), 1.0).await;
}

#[tokio::test]
async fn half_open_handshakes_never_lock_a_node_of_the_site_out() {
    let site = Site::new("depot");
    let n = node(&site, "max_connections = 3").await;
    // More connections than the limit, none of which ever starts its handshake.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(TcpStream::connect(n.proxy.inbound).await.expect("connect"));
    }
    // A node of the site finishes its handshake meanwhile: the silent ones hold
    // handshake slots, not the connection limit.
    let (chain, key) = site.leaf("b", &[], SystemTime::now(), Duration::from_secs(86_400));
    assert!(
        tls_attempt(n.proxy.inbound, &chain, &key).await,
        "a site member is let in while 10 handshakes hang"
    );
    // One host cannot take the whole handshake budget either: past its share, its
    // connections are closed at once and counted.
    for _ in 0..40 {
        silent.push(TcpStream::connect(n.proxy.inbound).await.expect("connect"));
    }
    wait_metric(
        &n.proxy,
        "pimesh_rejected_total{direction=\"inbound\",reason=\"handshake_limit\"}",
        1.0,
    )
    .await;
    drop(silent);
}

#[tokio::test]
async fn a_service_allow_list_answers_others_with_403() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let m = mesh(
        &site,
        &format!(
            "[services.web]\nport = {}\nnodes = [\"b\"]\nallow = [\"spiffe://depot/node/c\"]\n",
            web.port
        ),
    )
    .await;
    let answer = exchange(
        m.a.outbound,
        b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("spiffe://depot/node/a is not allowed"),
        "{answer}"
    );
    assert!(web.seen().is_empty());
    wait_metric(
        &m.b,
        "pimesh_rejected_total{direction=\"inbound\",reason=\"unauthorized\"}",
        1.0,
    )
    .await;
}
