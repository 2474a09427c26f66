//! The PKI HTTP API with the seed's client steps, Mosquitto as the TLS broker using what the service writes, and
//! the API's refusals.

mod refusals;
mod walkthrough;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use iotagent_mqtt::{Config, Listeners};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::{flags, wait_until};

pub const CA_NAME: &str = "IOTmidCA";

/// A service with only the PKI API on (no Kafka, no MQTT), its store in `dir`.
pub struct PkiService {
    pub url: String,
    pub shutdown: CancellationToken,
}

impl Drop for PkiService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl PkiService {
    pub async fn start(dir: &Path, extra: &[(&str, &str)]) -> Self {
        let dir = dir.to_str().expect("utf-8 dir");
        let mut pairs = vec![
            ("PKI_LISTEN", "127.0.0.1:0"),
            ("PKI_DIR", dir),
            ("PKI_USERS", "admin:admin"),
            ("PKI_SERVER_NAMES", "localhost 127.0.0.1"),
        ];
        pairs.extend_from_slice(extra);
        let mut argv = vec!["iotagent-mqtt".to_string(), "--listen".into(), "127.0.0.1:0".into()];
        argv.extend(flags(&pairs));
        let config = Config::from_env_and_args(argv).unwrap_or_else(|e| panic!("test config: {e}"));
        let listeners = Listeners::bind(&config).await.expect("bind");
        let addr: SocketAddr = listeners.pki.as_ref().expect("PKI listener").local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(iotagent_mqtt::run(config, listeners, shutdown.clone()));
        let url = format!("http://{addr}");
        let up = wait_until(Duration::from_secs(20), async || {
            reqwest::Client::new().post(format!("{url}/auth")).body("{}").send().await.is_ok()
        })
        .await;
        assert!(up, "PKI API up at {url}");
        Self { url, shutdown }
    }

    /// `POST /auth` as the seed's client does; the token.
    pub async fn jwt(&self) -> String {
        let response = reqwest::Client::new()
            .post(format!("{}/auth", self.url))
            .header("Content-Type", "application/json")
            .body(json!({ "username": "admin", "passwd": "admin" }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["jwt"].as_str().expect("jwt").to_string()
    }
}

/// How many certificates the CA issued (the index), to check that refused requests signed nothing.
pub fn issued(dir: &Path) -> usize {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("ca/index.json")).unwrap()).unwrap();
    index["certificates"].as_array().unwrap().len()
}

/// An RSA key and a CSR for `cn` with the extensions the seed's `openssl req` line adds; the CSR's base64 body
/// without armour (`sed '1,1d;$ d' | tr -d '\r\n'`).
pub fn key_and_csr(cn: &str) -> (openssl::pkey::PKey<openssl::pkey::Private>, String) {
    use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, cn).unwrap();
    let mut req = openssl::x509::X509ReqBuilder::new().unwrap();
    req.set_subject_name(&name.build()).unwrap();
    req.set_pubkey(&key).unwrap();
    let mut extensions = openssl::stack::Stack::new().unwrap();
    let san = SubjectAlternativeName::new().dns("localhost").build(&req.x509v3_context(None)).unwrap();
    extensions.push(san).unwrap();
    extensions.push(KeyUsage::new().digital_signature().non_repudiation().key_encipherment().build().unwrap()).unwrap();
    extensions.push(BasicConstraints::new().build().unwrap()).unwrap();
    req.add_extensions(&extensions).unwrap();
    req.sign(&key, openssl::hash::MessageDigest::sha256()).unwrap();
    let pem = String::from_utf8(req.build().to_pem().unwrap()).unwrap();
    let lines: Vec<&str> = pem.lines().collect();
    (key, lines[1..lines.len() - 1].concat())
}
