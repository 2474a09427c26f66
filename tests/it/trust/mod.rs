//! Issue 9's attacks, each tried as an attacker would: one tenant, device or network neighbour acting as another.
//! Every test here failed on the code before the issue.

mod https;
mod kafka;
mod logs;

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{RawClient, flags, pki, spawn_app, wait_until};

fn register(username: &str, client_id: &str, client_cert: Option<&str>) -> Vec<u8> {
    let mut body = json!({"peer_addr": "10.0.0.7", "peer_port": 40000, "mountpoint": "", "client_id": client_id,
                          "username": username, "password": null, "clean_session": true});
    if let Some(cert) = client_cert {
        body["client_cert"] = Value::String(cert.into());
    }
    body.to_string().into_bytes()
}

async fn decision(client: &mut RawClient, body: &[u8]) -> Value {
    let reply = client.hook("auth_on_register", body).await;
    assert_eq!(reply.status, 200, "{:?}", String::from_utf8_lossy(&reply.body));
    reply.json()["result"].clone()
}

fn denied(result: &Value) -> bool {
    result == &json!({"error": "not_allowed"})
}

/// Attack 2: a certificate the device CA signed with CN `k2v-bridge` is not the service; the service's own
/// certificate (MQTT_CERT_FILE) is, and so is its renewal once the file changes.
#[tokio::test]
async fn only_the_services_own_certificate_is_the_service() {
    let dir = tempfile::tempdir().unwrap();
    pki::write(dir.path());
    pki::issue(dir.path(), "forged", "k2v-bridge");
    let cert_file = dir.path().join("k2v.pem");
    let app = spawn_app(&flags(&[("MQTT_CERT_FILE", cert_file.to_str().unwrap())])).await;
    let mut client = app.client().await;

    let forged = pki::forwarded(dir.path(), "forged");
    assert!(denied(&decision(&mut client, &register("k2v-bridge", "x-k2v", Some(&forged))).await));
    let own = pki::forwarded(dir.path(), "k2v");
    assert_eq!(decision(&mut client, &register("k2v-bridge", "x-k2v", Some(&own))).await, "ok");

    // The PKI renews the certificate in place: the new one is accepted without a restart, the previous one too
    // (a client still connected with it reconnects with it).
    pki::issue(dir.path(), "k2v", "k2v-bridge");
    let renewed = pki::forwarded(dir.path(), "k2v");
    let accepted = wait_until(Duration::from_secs(5), async || {
        decision(&mut client, &register("k2v-bridge", "x-k2v", Some(&renewed))).await == "ok"
    })
    .await;
    assert!(accepted, "renewed service certificate accepted");
    assert_eq!(decision(&mut client, &register("k2v-bridge", "x-k2v", Some(&own))).await, "ok");
    assert!(denied(&decision(&mut client, &register("k2v-bridge", "x-k2v", Some(&forged))).await));
}

/// Attack 2, by fingerprint: SERVICE_CERT_FINGERPRINTS names other instances' certificates.
#[tokio::test]
async fn service_certificates_pinned_by_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    pki::write(dir.path());
    pki::issue(dir.path(), "other", "k2v-bridge");
    let pem = std::fs::read(dir.path().join("other.pem")).unwrap();
    let der = openssl::x509::X509::from_pem(&pem).unwrap().to_der().unwrap();
    let hex: String = openssl::sha::sha256(&der).iter().map(|b| format!("{b:02X}:")).collect();
    let app = spawn_app(&flags(&[("SERVICE_CERT_FINGERPRINTS", hex.trim_end_matches(':'))])).await;
    let mut client = app.client().await;
    let other = pki::forwarded(dir.path(), "other");
    assert_eq!(decision(&mut client, &register("k2v-bridge", "y-k2v", Some(&other))).await, "ok");
    let k2v = pki::forwarded(dir.path(), "k2v");
    assert!(denied(&decision(&mut client, &register("k2v-bridge", "y-k2v", Some(&k2v))).await));
}

/// Attack 4: no device takes a client id of the service's own clients (`<MQTT_CLIENT_ID>-<role>`), in any policy.
#[tokio::test]
async fn devices_never_use_the_services_client_ids() {
    for policy in ["any", "equal", "prefix", "scoped"] {
        let app = spawn_app(&flags(&[
            ("CLIENT_ID_POLICY", policy),
            ("MQTT_CLIENT_ID", "gw1"),
            ("SERVICE_CLIENT_ID_PREFIX", "gw1"),
        ]))
        .await;
        let mut client = app.client().await;
        for id in ["gw1-v2k", "gw1-k2v", "gw1", "gw1-anything"] {
            let result = decision(&mut client, &register("admin:a1998e", id, None)).await;
            assert!(denied(&result), "{policy}: device with client id {id} got {result}");
        }
        let own = if policy == "prefix" || policy == "equal" { "admin:a1998e" } else { "sensor-1" };
        assert_eq!(decision(&mut client, &register("admin:a1998e", own, None)).await, "ok", "{policy}: {own}");
    }
}

/// Attack 4b: a device answered by one instance asks for another instance's session ids (VerneMQ's takeover is
/// cluster-wide), under the default prefix every instance's ids start with.
#[tokio::test]
async fn devices_never_use_another_instances_client_ids() {
    let app = spawn_app(&flags(&[("CLIENT_ID_POLICY", "any"), ("MQTT_CLIENT_ID", "iotagent-mqtt-node-1")])).await;
    let mut client = app.client().await;
    for id in ["iotagent-mqtt-node-2-v2k", "iotagent-mqtt-node-2-k2v", "iotagent-mqtt-plain-v2k", "iotagent-mqtt"] {
        let result = decision(&mut client, &register("admin:a1998e", id, None)).await;
        assert!(denied(&result), "device with client id {id} got {result}");
    }
    assert_eq!(decision(&mut client, &register("admin:a1998e", "iotagent-mq", None)).await, "ok", "not the prefix");
}

/// Attack 5: a tenant id with a dot would alias another tenant's Kafka topics.
#[tokio::test]
async fn tenant_ids_have_no_dots() {
    let app = spawn_app(&[]).await;
    let mut client = app.client().await;
    for username in ["admin.x:a1998e", "a.b:dev"] {
        assert!(denied(&decision(&mut client, &register(username, "c", None)).await), "{username}");
    }
    assert_eq!(decision(&mut client, &register("admin_x-1:dev.1", "c", None)).await, "ok", "device ids keep dots");
    let publish = json!({"username": "admin.x:a1998e", "client_id": "c", "qos": 1, "topic": "admin.x:a1998e/attrs",
                         "payload": "e30=", "retain": false});
    let reply = client.hook("auth_on_publish", publish.to_string().as_bytes()).await;
    assert!(denied(&reply.json()["result"]));
    drop(client);
    let narrow = spawn_app(&flags(&[("TENANT_ID_CHARS", "a-z")])).await;
    let mut client = narrow.client().await;
    assert!(denied(&decision(&mut client, &register("Admin:dev", "c", None)).await));
    assert_eq!(decision(&mut client, &register("admin:Dev", "c", None)).await, "ok");
}

/// The plain listener's stance: without REQUIRE_CLIENT_CERT a device is who its username says (the seed's testing
/// mode, warned about at start); with it, a device without a forwarded certificate is refused.
#[tokio::test]
async fn devices_without_certificate_only_when_allowed() {
    let open = spawn_app(&[]).await;
    let mut client = open.client().await;
    assert_eq!(decision(&mut client, &register("admin:a1998e", "c", None)).await, "ok");
    let strict = spawn_app(&flags(&[("REQUIRE_CLIENT_CERT", "true")])).await;
    let mut client = strict.client().await;
    assert!(denied(&decision(&mut client, &register("admin:a1998e", "c", None)).await));
}
