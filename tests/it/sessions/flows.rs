//! The captured webhook sequences, replayed as VerneMQ sends them after the client-id rewrite: the registry follows
//! register → on_register → … → offline/gone exactly (but for the one key a connection left without any hook), and
//! operator disconnects reach the API as one encoded call.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::common::{flags, spawn_app};

const SETTLE: Duration = Duration::from_millis(300);

async fn app_with(recorder: &Recorder, extra: &[(&'static str, String)]) -> TestApp {
    let mut env = session_env(recorder);
    env.extend_from_slice(extra);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn_app(&flags(&pairs)).await
}

/// Captures in which VerneMQ dropped a connection without any hook: capture 4 disconnects with `--cleanup`.
const HOOKLESS_DROPS: &[&str] = &["4-http-api-disconnect.jsonl"];

/// Replays every request of `file` in order. Once `auth_on_register` answered with a rewritten key, the later hooks
/// of that connection carry the rewritten key, as VerneMQ sends them; hooks of refused connections are not sent
/// (VerneMQ sends none). After every session hook of the device, the admin list must equal the model — after a
/// hookless drop, the model plus exactly that key: the next connection under it owes a gone hook that never comes
/// (the registry cannot tell it from a taken-over connection's), so the key stays listed once its connection went.
/// Only the captures in `HOOKLESS_DROPS` may have one. Returns the checks made and the key left listed, if any.
async fn replay(app: &TestApp, file: &str) -> (usize, Option<(String, String)>) {
    let mut client = app.client().await;
    // Original (mountpoint, client id) → the key VerneMQ uses, for connections that were let in.
    let mut keys: HashMap<(String, String), (String, String)> = HashMap::new();
    let mut model: BTreeSet<(String, String)> = BTreeSet::new();
    // Keys registered (on_register) and not gone since; a new auth_on_register under one is a hookless drop (the
    // captures hold no takeover whose old gone hook follows).
    let mut registered: BTreeSet<(String, String)> = BTreeSet::new();
    let mut stale: Option<(String, String)> = None;
    let mut checked = 0;
    for c in captures::load().into_iter().filter(|c| c.file == file) {
        let body: Value = serde_json::from_str(&c.body_raw).expect("JSON body");
        let original = (
            body["mountpoint"].as_str().unwrap_or_default().to_string(),
            body["client_id"].as_str().unwrap_or_default().to_string(),
        );
        let device = body["username"].as_str() == Some(DEVICE);
        if c.hook.starts_with("auth_on_register") {
            let reply = client.hook(&c.hook, c.body_raw.as_bytes()).await;
            assert_eq!(reply.status, 200, "{file} seq {}", c.seq);
            if allowed(&reply) {
                let key = session_key(&reply, &original.0, &original.1);
                if registered.contains(&key) {
                    assert!(HOOKLESS_DROPS.contains(&file), "{file} seq {}: a connection left without a hook", c.seq);
                    assert!(stale.as_ref().is_none_or(|s| *s == key), "{file} seq {}: one key at most", c.seq);
                    stale = Some(key.clone());
                }
                if device {
                    model.insert(key.clone());
                }
                keys.insert(original, key);
            } else {
                keys.remove(&original);
            }
        } else {
            let Some(key) = keys.get(&original).cloned() else { continue };
            let sent = body_with(&c.body_raw, &[("mountpoint", json!(key.0)), ("client_id", json!(key.1))]);
            let reply = client.hook(&c.hook, &sent).await;
            // Hooks the service does not serve are never registered in vernemq.conf (404 here).
            let served = reply.status != 404 || !is_session_hook(&c.hook);
            assert!(reply.status == 200 || (reply.status == 404 && served), "{file} seq {} {}", c.seq, c.hook);
            if c.hook.starts_with("on_register") {
                registered.insert(key.clone());
            }
            if c.hook == "on_client_offline" || c.hook == "on_client_gone" {
                model.remove(&key);
                registered.remove(&key);
                keys.remove(&original);
            }
        }
        if is_session_hook(&c.hook) {
            let listed: BTreeSet<_> = listed(app, DEVICE).await.into_iter().collect();
            let expected: BTreeSet<_> = model.iter().chain(&stale).cloned().collect();
            assert_eq!(listed, expected, "{file} after seq {} {}", c.seq, c.hook);
            checked += 1;
        }
    }
    assert!(model.is_empty(), "{file}: every connection of the capture went");
    (checked, stale)
}

fn is_session_hook(hook: &str) -> bool {
    matches!(
        hook,
        "auth_on_register"
            | "auth_on_register_m5"
            | "on_register"
            | "on_register_m5"
            | "on_client_offline"
            | "on_client_gone"
    )
}

#[tokio::test]
async fn captured_sequences_keep_the_registry_exact_with_and_without_lifetimes() {
    let recorder = Recorder::start().await;
    for lifetime in ["1800", "0"] {
        // One instance for all captures: each must leave nothing listed for the next, but the hookless drop's key,
        // which is why capture 4 comes last.
        let app = app_with(&recorder, &[("MAX_CONNECTION_LIFETIME", lifetime.into())]).await;
        for file in [
            "1a-v311-device-session.jsonl",
            "1b-v5-device-session.jsonl",
            "1c-random-clientid.jsonl",
            "1d-persistent-sessions.jsonl",
            "3-max-connection-lifetime.jsonl",
            "5c-crl-refresh.jsonl",
            "4-http-api-disconnect.jsonl",
        ] {
            let (checked, stale) = replay(&app, file).await;
            assert!(checked >= 4, "{file}: {checked} checks");
            let left: Vec<_> = stale.into_iter().collect();
            assert_eq!(listed(&app, DEVICE).await, left, "{file}: left listed");
            assert_eq!(left.is_empty(), !HOOKLESS_DROPS.contains(&file), "{file}");
        }
        app.stop().await.expect("clean stop");
    }
    assert!(recorder.settled(SETTLE).await.is_empty(), "no trigger, no API call");
}

#[tokio::test]
async fn operator_disconnect_needs_the_token_and_names_the_rewritten_key() {
    let recorder = Recorder::start().await;
    let app = app_with(&recorder, &[]).await;
    let mut client = app.client().await;
    let reply = register(&mut client, DEVICE, "", DEVICE, None).await;
    assert!(allowed(&reply));
    let key = session_key(&reply, "", DEVICE);
    assert_eq!(key, (String::new(), format!("{DEVICE}|{DEVICE}")), "scoped policy's rewrite");
    let on_register = captured("1a-v311-device-session.jsonl", "on_register");
    let sent = body_with(&on_register.body_raw, &[("client_id", json!(key.1))]);
    assert_eq!(client.hook("on_register", &sent).await.status, 200);
    assert_eq!(listed(&app, DEVICE).await, vec![key.clone()]);

    let base = app.url("");
    for token in [None, Some("wrong"), Some("")] {
        let (status, _) = operator_disconnect(&base, DEVICE, token).await;
        assert_eq!(status, 401, "{token:?}");
    }
    let unauthorised = reqwest::get(app.url(&format!("/admin/sessions?device={DEVICE}"))).await.unwrap();
    assert_eq!(unauthorised.status(), 401);
    assert!(recorder.settled(SETTLE).await.is_empty(), "refused requests disconnect nothing");
    let wakeup = captured("1a-v311-device-session.jsonl", "on_client_wakeup");
    let reply = client.hook("on_client_wakeup", wakeup.body_raw.as_bytes()).await;
    assert_eq!(reply.status, 404, "the token guards the admin routes only, not every unmatched path");

    let (status, body) = operator_disconnect(&base, DEVICE, Some(ADMIN_TOKEN)).await;
    assert_eq!((status, &body["queued"]), (202, &json!(1)));
    let calls = recorder.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].assert_disconnect(&key.0, &key.1);
    // VerneMQ then fires the gone hook with that key; the entry is gone already (a done disconnect forgets it).
    let gone = captured("1a-v311-device-session.jsonl", "on_client_gone");
    assert_eq!(
        client.hook("on_client_gone", &body_with(&gone.body_raw, &[("client_id", json!(key.1))])).await.status,
        200
    );
    assert!(listed(&app, DEVICE).await.is_empty());
    let (status, body) = operator_disconnect(&base, DEVICE, Some(ADMIN_TOKEN)).await;
    assert_eq!((status, &body["queued"]), (202, &json!(0)), "nothing left to close");
    let (status, _) = operator_disconnect(&base, "not-a-device", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 400);
    assert_eq!(recorder.settled(SETTLE).await.len(), 1);
}

#[tokio::test]
async fn a_takeover_keeps_the_new_connection_closable_whichever_hook_comes_first() {
    // Without lifetimes nothing else ends the new connection's entry. VerneMQ sends the old connection's gone hook
    // after the new one's auth_on_register, racing its on_register; both carry only the key.
    let recorder = Recorder::start().await;
    for old_gone_first in [true, false] {
        let app = app_with(&recorder, &[("MAX_CONNECTION_LIFETIME", "0".into())]).await;
        let mut client = app.client().await;
        let hook = |name: &str| captured("1a-v311-device-session.jsonl", name);
        let reply = register(&mut client, DEVICE, "", DEVICE, None).await;
        let key = session_key(&reply, "", DEVICE);
        let on_register = body_with(&hook("on_register").body_raw, &[("client_id", json!(key.1))]);
        let gone = body_with(&hook("on_client_gone").body_raw, &[("client_id", json!(key.1))]);
        assert_eq!(client.hook("on_register", &on_register).await.status, 200);
        assert!(allowed(&register(&mut client, DEVICE, "", DEVICE, None).await));
        let hooks = if old_gone_first { ["on_client_gone", "on_register"] } else { ["on_register", "on_client_gone"] };
        for name in hooks {
            let body = if name == "on_register" { &on_register } else { &gone };
            assert_eq!(client.hook(name, body).await.status, 200);
        }
        assert_eq!(listed(&app, DEVICE).await, vec![key.clone()], "old gone first: {old_gone_first}");
        let (status, body) = operator_disconnect(&app.url(""), DEVICE, Some(ADMIN_TOKEN)).await;
        assert_eq!((status, &body["queued"]), (202, &json!(1)));
        let calls = recorder.wait_for(1, Duration::from_secs(5)).await;
        calls.last().expect("a call").assert_disconnect(&key.0, &key.1);
        recorder.clear();
        app.stop().await.expect("clean stop");
    }
}

#[tokio::test]
async fn admin_routes_are_off_without_a_token() {
    let recorder = Recorder::start().await;
    let app = spawn_app(&flags(&[("VERNEMQ_API_URL", &recorder.url)])).await;
    let (status, _) = operator_disconnect(&app.url(""), DEVICE, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404);
    let listing = reqwest::Client::new()
        .get(app.url(&format!("/admin/sessions?device={DEVICE}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 404);
}

#[tokio::test]
async fn a_hostile_client_id_is_refused_and_a_hostile_mountpoint_stays_one_parameter() {
    let recorder = Recorder::start().await;
    let app = app_with(&recorder, &[]).await;
    let mut client = app.client().await;
    let hostile = r#"x" OR client_id <> ""#;
    for policy_id in [hostile, "x\\", "x\ny"] {
        let reply = register(&mut client, DEVICE, "", policy_id, None).await;
        assert_eq!(reply.json(), json!({"result": {"error": "not_allowed"}}), "{policy_id:?}");
    }
    assert!(listed(&app, DEVICE).await.is_empty(), "a refused connection is not recorded");
    let (_, body) = operator_disconnect(&app.url(""), DEVICE, Some(ADMIN_TOKEN)).await;
    assert_eq!(body["queued"], 0);

    // The mountpoint is the listener's (VerneMQ's configuration), not the device's: whatever it holds, it reaches the
    // API as one `--mountpoint` value and cannot add a second client id or `--cleanup`.
    let mountpoint = r#"site&client-id=*&--cleanup="x"#;
    let reply = register(&mut client, DEVICE, mountpoint, "c1", None).await;
    assert!(allowed(&reply));
    let key = session_key(&reply, mountpoint, "c1");
    assert_eq!(key, (mountpoint.to_string(), format!("{DEVICE}|c1")));
    let (_, body) = operator_disconnect(&app.url(""), DEVICE, Some(ADMIN_TOKEN)).await;
    assert_eq!(body["queued"], 1);
    let calls = recorder.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(calls.len(), 1);
    calls[0].assert_disconnect(mountpoint, &key.1);
    assert_eq!(calls[0].params("client-id"), [format!("{DEVICE}|c1")]);
    assert!(calls[0].params("--cleanup").is_empty());
}

/// VerneMQ 2.1 never prunes its webhook cache: with its API configured the service empties the node's cache on
/// `WEBHOOK_CACHE_CLEAR_INTERVAL`, with the API key, and counts it; with nothing cached it never calls.
#[tokio::test]
async fn vernemqs_webhook_cache_is_cleared_on_schedule_when_anything_is_cached() {
    let recorder = Recorder::start().await;
    let url = recorder.url.clone();
    let app = spawn_app(&flags(&[
        ("VERNEMQ_API_URL", &url),
        ("VERNEMQ_API_KEY", API_KEY),
        ("WEBHOOK_CACHE_CLEAR_INTERVAL", "1"),
    ]))
    .await;
    let calls = recorder.wait_for(2, Duration::from_secs(5)).await;
    assert!(calls.len() >= 2, "two clears within 5 s: {calls:?}");
    for call in &calls {
        assert_eq!((call.method.as_str(), call.path.as_str()), ("GET", "/api/v1/webhooks/cache/clear"), "{call:?}");
        assert!(call.query.is_empty(), "{call:?}");
        assert_eq!(call.api_key.as_deref(), Some(API_KEY));
    }
    let metrics = reqwest::get(app.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"iotagent_webhook_cache_clears_total{result="ok"}"#), "{metrics}");
    app.stop().await.expect("clean stop");

    let idle = Recorder::start().await;
    let app = spawn_app(&flags(&[
        ("VERNEMQ_API_URL", &idle.url),
        ("WEBHOOK_CACHE_CLEAR_INTERVAL", "1"),
        ("WEBHOOK_CACHE_MAX_AGE", "0"),
    ]))
    .await;
    assert_eq!(idle.settled(Duration::from_millis(2500)).await, [], "nothing cached, nothing to clear");
    app.stop().await.expect("clean stop");
}
