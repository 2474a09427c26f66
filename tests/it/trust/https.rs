//! Attack 3: only VerneMQ, with its client certificate, reaches the webhooks over HTTPS; and half-open connections
//! on the webhook port do not starve the broker's.

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::common::brokers::free_port;
use crate::common::{RawClient, TestApp, flags, pki, spawn_app};

const REGISTER: &[u8] = br#"{"peer_addr":"10.0.0.7","peer_port":40000,"mountpoint":"","client_id":"c","username":"admin:a1998e","password":null,"clean_session":true}"#;

/// A directory with a PKI of its own.
fn pki_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pki::write(dir.path());
    dir
}

async fn https_app(dir: &Path) -> (TestApp, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let app = spawn_app(&flags(&[
        ("IOTAGENT_TLS_LISTEN", &listen),
        ("IOTAGENT_TLS_CERT_FILE", &file("server.pem")),
        ("IOTAGENT_TLS_KEY_FILE", &file("server.key")),
        ("IOTAGENT_TLS_CLIENT_CA_FILE", &file("ca.pem")),
        // The test PKI's broker-like client is k2v.pem; compose's is CN vernemq (the default).
        ("IOTAGENT_TLS_CLIENT_NAMES", "k2v-bridge"),
    ]))
    .await;
    (app, port)
}

/// How long a server may take to answer or refuse before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(5);

/// One `auth_on_register` over TLS 1.2 (what VerneMQ offers by default), as `client` (`<dir>/<file>.pem`) or without
/// a certificate: `Ok` with the reply, `Err` when the server refused, that is failed the handshake or closed the
/// connection without a reply. A server that neither answers nor refuses within [`PATIENCE`] fails the test: one that
/// took a foreign client in and then hung is not refusing it.
async fn call(port: u16, ca: &Path, client: Option<(&Path, &str)>) -> Result<String, String> {
    let mut connector = SslConnector::builder(SslMethod::tls_client()).unwrap();
    connector.set_ca_file(ca.join("ca.pem")).unwrap();
    connector.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    if let Some((dir, file)) = client {
        connector.set_certificate_file(dir.join(format!("{file}.pem")), SslFiletype::PEM).unwrap();
        connector.set_private_key_file(dir.join(format!("{file}.key")), SslFiletype::PEM).unwrap();
    }
    let ssl = connector.build().configure().unwrap().into_ssl("localhost").unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("the HTTPS port listens");
    let mut stream = SslStream::new(ssl, tcp).unwrap();
    let handshake = tokio::time::timeout(PATIENCE, Pin::new(&mut stream).connect()).await;
    handshake
        .unwrap_or_else(|_| panic!("the handshake neither finished nor failed within {PATIENCE:?}"))
        .map_err(|e| format!("handshake: {e}"))?;
    let head = format!(
        "POST /vmq/auth_on_register HTTP/1.1\r\nvernemq-hook: auth_on_register\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        REGISTER.len()
    );
    // TLS 1.2 checks the client certificate inside the handshake; a write or read that fails after it is the server
    // closing (an alert or a reset), a refusal too.
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("closed: write: {e}"))?;
    stream.write_all(REGISTER).await.map_err(|e| format!("closed: write: {e}"))?;
    let mut reply = vec![0; 4096];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut reply))
        .await
        .unwrap_or_else(|_| panic!("no reply and no close within {PATIENCE:?}: the server took the client in and hung"))
        .map_err(|e| format!("closed: read: {e}"))?;
    if n == 0 {
        return Err("closed without a reply".into());
    }
    Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
}

#[tokio::test]
async fn https_webhooks_serve_only_clients_with_a_certificate_of_the_client_ca() {
    let (ours, theirs) = (pki_dir(), pki_dir());
    let (_app, port) = https_app(ours.path()).await;

    let served = call(port, ours.path(), Some((ours.path(), "k2v"))).await.expect("served with our client cert");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(served.contains(r#""result":"ok""#), "{served}");
    let none = call(port, ours.path(), None).await;
    assert!(none.is_err(), "served without a client certificate: {none:?}");
    let other = call(port, ours.path(), Some((theirs.path(), "k2v"))).await;
    assert!(other.is_err(), "served with another CA's certificate: {other:?}");
    // A device certificate from the same CA is not the broker.
    pki::issue(ours.path(), "device", "admin:a1998e");
    let device = call(port, ours.path(), Some((ours.path(), "device"))).await;
    assert!(device.is_err(), "served with a device certificate: {device:?}");
}

/// 3 000 connections that never finish their request head, on the plain port and the HTTPS port, do not stop a
/// pooled connection or a new one from being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_do_not_starve_the_broker() {
    let dir = pki_dir();
    let (app, port) = https_app(dir.path()).await;
    let mut pooled = app.client().await;
    assert_eq!(pooled.hook("auth_on_register", REGISTER).await.status, 200);
    let mut slow = Vec::new();
    for i in 0..3000 {
        let target = if i % 2 == 0 { app.addr } else { format!("127.0.0.1:{port}").parse().unwrap() };
        let mut stream = TcpStream::connect(target).await.expect("slow connection");
        // Plain: half a request head; TLS: half a ClientHello. Neither is ever finished.
        let _ = stream
            .write_all(if i % 2 == 0 { b"POST /vmq/auth_on_register HTTP/1.1\r\nHo" } else { b"\x16\x03\x01" })
            .await;
        slow.push(stream);
    }
    let started = std::time::Instant::now();
    assert_eq!(pooled.hook("auth_on_register", REGISTER).await.status, 200, "pooled connection served");
    let mut fresh = RawClient::connect(app.addr).await;
    assert_eq!(fresh.hook("auth_on_register", REGISTER).await.status, 200, "new plain connection served");
    let https = call(port, dir.path(), Some((dir.path(), "k2v"))).await.expect("new HTTPS connection served");
    assert!(https.starts_with("HTTP/1.1 200"), "{https}");
    assert!(started.elapsed() < Duration::from_secs(3), "served in {:?}", started.elapsed());
    drop(slow);
}

/// Renewed files are used without a restart (checked every second, off the accept path), and a broken one does not
/// replace the last good: a client CA file that now also holds another CA lets that CA's broker certificate in.
#[tokio::test]
async fn https_webhooks_follow_renewed_files_and_keep_the_last_good() {
    let (ours, theirs) = (pki_dir(), pki_dir());
    let (_app, port) = https_app(ours.path()).await;
    assert!(call(port, ours.path(), Some((theirs.path(), "k2v"))).await.is_err(), "their CA not trusted yet");

    let mut both = std::fs::read(ours.path().join("ca.pem")).unwrap();
    both.extend(std::fs::read(theirs.path().join("ca.pem")).unwrap());
    std::fs::write(ours.path().join("ca.pem"), both).unwrap();
    let trusted = crate::common::wait_until(Duration::from_secs(5), async || {
        call(port, ours.path(), Some((theirs.path(), "k2v"))).await.is_ok()
    })
    .await;
    assert!(trusted, "the renewed client CA file is used");

    std::fs::write(ours.path().join("server.key"), "half a key").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let served = call(port, ours.path(), Some((ours.path(), "k2v"))).await;
    assert!(served.is_ok_and(|reply| reply.starts_with("HTTP/1.1 200")), "the last good files still serve");
}
