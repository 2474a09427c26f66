//! VerneMQ's API on a closed port: each failed call is counted and retried with backoff, nothing crashes, the revoked
//! device is still refused at its next connection, and the disconnect goes through once the API answers.

use std::time::Duration;

use super::crl::{REFRESH, issue, store};
use super::*;
use crate::common::brokers::free_port;
use crate::common::{flags, spawn_app};

async fn unreachable_errors(base: &str) -> f64 {
    metric(&metrics_text(base).await, r#"iotagent_vernemq_api_errors_total{reason="unreachable"}"#)
}

#[tokio::test]
async fn an_unreachable_api_is_counted_and_retried_and_the_device_still_refused() {
    let pki = tempfile::tempdir().unwrap();
    let store = store(pki.path());
    let (serial, cert) = issue(&store, "admin:d1");
    let port = free_port();
    let api_url = format!("http://127.0.0.1:{port}");
    let crl_file = pki.path().join("crl.pem").display().to_string();
    let refresh = format!("{}s", REFRESH.as_secs());
    let app = spawn_app(&flags(&[
        ("VERNEMQ_API_URL", &api_url),
        ("VERNEMQ_API_KEY", API_KEY),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("CRL_FILE", &crl_file),
        ("CRL_UPDATE_TIME", &refresh),
    ]))
    .await;
    let base = app.url("");
    let mut client = app.client().await;
    assert!(allowed(&register(&mut client, "admin:d1", "", "admin:d1", Some(&cert)).await));
    store.revoke_serial(&serial).unwrap();

    // 200 ms doubling: at least three attempts within the first few seconds, all counted.
    let retried = wait_until(REFRESH + Duration::from_secs(5), async || unreachable_errors(&base).await >= 3.0).await;
    assert!(retried, "{}", metrics_text(&base).await);
    assert!(!allowed(&register(&mut client, "admin:d1", "", "admin:d1", Some(&cert)).await), "refused meanwhile");
    assert_eq!(reqwest::get(app.url("/health/live")).await.unwrap().status(), 200);
    assert_eq!(listed(&app, "admin:d1").await.len(), 1, "kept until the disconnect is done");

    // The API comes up on that port: the pending disconnect is delivered by a later retry.
    let recorder = Recorder::start_on(port).await;
    let calls = recorder.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].assert_disconnect("", "admin:d1|admin:d1");
    assert!(wait_until(Duration::from_secs(2), async || listed(&app, "admin:d1").await.is_empty()).await);
    assert_eq!(recorder.settled(Duration::from_millis(500)).await.len(), 1, "no call after success");
}
