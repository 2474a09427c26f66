//! A real CRL from the project's PKI (`pki::Store`), re-issued with a serial added: exactly that session is closed
//! within one refresh; a missing, truncated or non-CRL file keeps the last good state.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use iotagent_mqtt::pki::{Settings, Store};

use super::*;
use crate::common::{flags, spawn_app};

/// The refresh under test (`CRL_UPDATE_TIME`); the file is also looked at every second.
pub const REFRESH: Duration = Duration::from_secs(2);

/// A device certificate signed by the store: its serial (hex) and the base64 DER VerneMQ forwards as `client_cert`.
pub fn issue(store: &Store, cn: &str) -> (String, String) {
    let (_key, csr_b64) = crate::pki::key_and_csr(cn);
    let csr = base64::engine::general_purpose::STANDARD.decode(csr_b64).expect("CSR base64");
    let cert = store.sign(&csr, None).expect("signed");
    let serial = cert.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string();
    (serial, base64::engine::general_purpose::STANDARD.encode(cert.to_der().unwrap()))
}

pub fn store(dir: &Path) -> Store {
    let store = Store::new(Settings::with_defaults(dir.to_path_buf()));
    store.init().expect("pki init");
    assert!(dir.join("crl.pem").is_file(), "init writes an empty CRL");
    store
}

async fn failures(base: &str, reason: &str) -> f64 {
    metric(&metrics_text(base).await, &format!(r#"iotagent_crl_reload_failures_total{{reason="{reason}"}}"#))
}

#[tokio::test]
async fn a_serial_added_to_the_crl_closes_exactly_that_session_and_bad_files_keep_the_last_good_one() {
    let pki = tempfile::tempdir().unwrap();
    let store = store(pki.path());
    let (_, cert1) = issue(&store, "admin:d1");
    let (serial2, cert2) = issue(&store, "admin:d2");
    let crl_file = pki.path().join("crl.pem");

    let recorder = Recorder::start().await;
    let mut env = session_env(&recorder);
    env.push(("CRL_FILE", crl_file.display().to_string()));
    env.push(("CRL_UPDATE_TIME", format!("{}s", REFRESH.as_secs())));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app(&flags(&pairs)).await;
    let base = app.url("");
    let mut client = app.client().await;
    let reply1 = register(&mut client, "admin:d1", "", "admin:d1", Some(&cert1)).await;
    let reply2 = register(&mut client, "admin:d2", "", "admin:d2", Some(&cert2)).await;
    assert!(allowed(&reply1) && allowed(&reply2));
    let key2 = session_key(&reply2, "", "admin:d2");
    let listed2 = reqwest::Client::new()
        .get(app.url("/admin/sessions?device=admin:d2"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(listed2["sessions"][0]["certificate_serial"].as_str(), Some(serial2.as_str()));

    let revoked_at = Instant::now();
    store.revoke_serial(&serial2).expect("revoked; the CRL is re-issued");
    let calls = recorder.wait_for(1, REFRESH + Duration::from_secs(3)).await;
    let took = revoked_at.elapsed();
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].assert_disconnect(&key2.0, &key2.1);
    assert!(took <= REFRESH + Duration::from_secs(1), "within one refresh: {took:?}");
    assert_eq!(recorder.settled(Duration::from_millis(500)).await.len(), 1, "only that session");
    assert!(!allowed(&register(&mut client, "admin:d2", "", "admin:d2", Some(&cert2)).await));
    assert!(allowed(&register(&mut client, "admin:d1", "", "admin:d1", Some(&cert1)).await));
    let text = metrics_text(&base).await;
    assert_eq!(metric(&text, r#"iotagent_register_refused_total{reason="revoked"}"#), 1.0);

    // Faults: each is counted and the CRL in force stays the last good one.
    let good = std::fs::read(&crl_file).unwrap();
    let certificate = std::fs::read(pki.path().join("ca.crt")).unwrap();
    for (content, reason) in [
        (Some(good[..good.len() / 2].to_vec()), "invalid"),
        (Some(b"not a CRL at all".to_vec()), "invalid"),
        (Some(certificate), "invalid"),
        (None, "unreadable"),
    ] {
        let before = failures(&base, reason).await;
        match content {
            Some(bytes) => std::fs::write(&crl_file, bytes).unwrap(),
            None => std::fs::remove_file(&crl_file).unwrap(),
        }
        let counted =
            wait_until(REFRESH + Duration::from_secs(3), async || failures(&base, reason).await > before).await;
        assert!(counted, "{reason} counted");
        assert!(!allowed(&register(&mut client, "admin:d2", "", "admin:d2", Some(&cert2)).await), "{reason}");
        assert!(allowed(&register(&mut client, "admin:d1", "", "admin:d1", Some(&cert1)).await), "{reason}");
    }
    assert_eq!(recorder.calls().len(), 1, "bad files close nothing");
    assert_eq!(reqwest::get(app.url("/health/live")).await.unwrap().status(), 200);

    // A good file again: d1 revoked now, its session closed.
    let (_, _) = (store.revoke_entity("admin:d1").unwrap(), ());
    let calls = recorder.wait_for(2, REFRESH + Duration::from_secs(3)).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    calls[1].assert_disconnect("", "admin:d1|admin:d1");
}
