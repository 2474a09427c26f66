//! The seed's client block, step by step, then Mosquitto (mutual TLS, `use_identity_as_username`, the service's CRL)
//! accepts the certificate, and refuses it after revocation.

use std::path::Path;
use std::process::Command;

use reqwest::Method;
use serde_json::{Value, json};

use super::{CA_NAME, PkiService, key_and_csr};
use crate::common::brokers::{Mosquitto, binary, free_port};

fn tls_listener(pki: &Path, port: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {d}/ca.crt\ncertfile {d}/server.crt\n\
         keyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\ncrlfile {d}/crl.pem\n",
        d = pki.display()
    )
}

/// The API as the seed's client calls it: the bearer token on every request, and JSON headers on the calls its
/// script sends them with.
struct Api<'a> {
    http: reqwest::Client,
    url: &'a str,
    bearer: String,
}

impl Api<'_> {
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).header("Authorization", &self.bearer)
    }

    fn json_request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request(method, path).header("Content-Type", "application/json").header("Accept", "application/json")
    }
}

/// Sends `request` and reads its JSON reply.
async fn json_reply(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// `mosquitto_pub … --cert client.crt --key client.key --cafile root.crt`; whether it published.
fn publish(dir: &Path, port: u16) -> (bool, String) {
    let output = Command::new(binary("mosquitto_pub"))
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-t",
            "admin:a1998e/attrs",
            "-m",
            r#"{"attr_example": 10 }"#,
        ])
        .args(["-q", "1", "--cert"])
        .arg(dir.join("client.crt"))
        .arg("--key")
        .arg(dir.join("client.key"))
        .arg("--cafile")
        .arg(dir.join("root.crt"))
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).to_string())
}

#[tokio::test]
async fn seed_walkthrough_then_mosquitto_accepts_and_after_revocation_refuses() {
    let pki = tempfile::tempdir().unwrap();
    let client = tempfile::tempdir().unwrap();
    let service = PkiService::start(pki.path(), &[]).await;
    let api =
        Api { http: reqwest::Client::new(), url: &service.url, bearer: format!("Bearer {}", service.jwt().await) };
    let user = api
        .json_request(Method::POST, "/user")
        .body(json!({ "username": "admin:a1998e" }).to_string())
        .send()
        .await
        .unwrap();
    assert!(user.status().is_success(), "{}", user.status());

    let (key, csr_content) = key_and_csr("admin:a1998e");
    std::fs::write(client.path().join("client.key"), key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let signed = json_reply(
        api.json_request(Method::POST, "/sign/admin:a1998e/pkcs10")
            .body(json!({ "certificate": csr_content, "passwd": "dojot" }).to_string()),
    )
    .await;
    let crt_entity = signed["status"]["data"].as_str().unwrap_or_else(|| panic!("{signed}"));
    // `(echo BEGIN; echo ${CRT}; echo END)`: one long base64 line between the armour lines.
    let client_crt = format!("-----BEGIN CERTIFICATE-----\n{crt_entity}\n-----END CERTIFICATE-----\n");
    std::fs::write(client.path().join("client.crt"), &client_crt).unwrap();

    let root = json_reply(api.json_request(Method::GET, &format!("/ca/{CA_NAME}"))).await;
    let crt_root = root["certificate"].as_str().unwrap();
    std::fs::write(
        client.path().join("root.crt"),
        format!("-----BEGIN CERTIFICATE-----\n{crt_root}\n-----END CERTIFICATE-----\n"),
    )
    .unwrap();

    // The certificate: the CSR's key and CN, clientAuth, signed by the CA.
    let cert = openssl::x509::X509::from_pem(client_crt.as_bytes()).unwrap();
    let ca = openssl::x509::X509::from_pem(&std::fs::read(client.path().join("root.crt")).unwrap()).unwrap();
    assert!(cert.verify(&ca.public_key().unwrap()).unwrap());
    assert!(cert.public_key().unwrap().public_eq(&key));
    assert!(String::from_utf8_lossy(&cert.to_text().unwrap()).contains("TLS Web Client Authentication"));

    let port = free_port();
    let mut broker = Mosquitto::start_with(&[], &tls_listener(pki.path(), port));
    let (ok, stderr) = publish(client.path(), port);
    assert!(ok, "mosquitto_pub with the signed certificate: {stderr}");

    let revoked = json_reply(api.request(Method::POST, "/revoke/admin:a1998e")).await;
    let serial = cert.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string();
    assert_eq!(revoked["revoked"], json!([serial]));
    let crl = json_reply(api.request(Method::GET, &format!("/ca/{CA_NAME}/crl"))).await;
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD.decode(crl["CRL"].as_str().unwrap()).unwrap();
    let crl = openssl::x509::X509Crl::from_der(&der).unwrap();
    assert!(crl.verify(&ca.public_key().unwrap()).unwrap());
    let listed: Vec<String> = crl
        .get_revoked()
        .unwrap()
        .iter()
        .map(|r| r.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, vec![serial]);

    // Mosquitto reads its crlfile at start.
    broker.restart();
    let (ok, _) = publish(client.path(), port);
    assert!(!ok, "a revoked certificate was accepted");
}
