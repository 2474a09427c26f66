//! The API at its trust boundary: missing or wrong tokens, malformed bodies, foreign or refused identities, huge
//! bodies. Every refusal is a 4xx with a JSON error, and nothing is signed.

use serde_json::{Value, json};

use super::{CA_NAME, PkiService, issued, key_and_csr};

async fn send(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url).header("Content-Type", "application/json");
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request.body(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, json)
}

#[tokio::test]
async fn refusals_are_json_4xx_and_sign_nothing() {
    use reqwest::Method;
    let pki = tempfile::tempdir().unwrap();
    let service = PkiService::start(pki.path(), &[]).await;
    let url = &service.url;
    let jwt = service.jwt().await;
    let before = issued(pki.path());

    // /auth: wrong password, unknown user, missing fields, wrong types, not JSON.
    for body in [
        json!({"username": "admin", "passwd": "nope"}).to_string(),
        json!({"username": "root", "passwd": "admin"}).to_string(),
        json!({"username": "admin"}).to_string(),
        json!({"username": 1, "passwd": "admin"}).to_string(),
        "not json".to_string(),
    ] {
        let (status, error) = send(Method::POST, format!("{url}/auth"), None, body.clone()).await;
        assert!((400..500).contains(&status) && error["error"].is_string(), "{body}: {status} {error}");
    }
    let (status, _) =
        send(Method::POST, format!("{url}/auth"), None, json!({"username":"admin","passwd":"nope"}).to_string()).await;
    assert_eq!(status, 401);

    // Every other route without a token, with a tampered one, with one signed by another secret.
    let mut tampered = jwt.clone();
    tampered.insert(tampered.len() - 3, 'x');
    let parts: Vec<&str> = jwt.split('.').collect();
    let no_alg = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
    let routes = [
        (Method::POST, "/user".to_string()),
        (Method::POST, "/sign/admin:d1/pkcs10".to_string()),
        (Method::POST, "/revoke/admin:d1".to_string()),
        (Method::GET, format!("/ca/{CA_NAME}")),
        (Method::GET, format!("/ca/{CA_NAME}/crl")),
    ];
    for (method, route) in &routes {
        for token in [None, Some(tampered.as_str()), Some(no_alg.as_str()), Some("garbage")] {
            let (status, _) = send(method.clone(), format!("{url}{route}"), token, "{}").await;
            assert_eq!(status, 401, "{method} {route} with {token:?}");
        }
    }
    let token = Some(jwt.as_str());

    // /user: identities the ACL refuses, missing fields, wrong types.
    for body in [
        json!({"username": "k2v-bridge"}),
        json!({"username": "admin:a/b"}),
        json!({"username": "a:b:c"}),
        json!({"username": "admin:+"}),
        json!({"username": ""}),
        json!({"username": 5}),
        json!({"name": "admin:d1"}),
        json!(["admin:d1"]),
    ] {
        let (status, error) = send(Method::POST, format!("{url}/user"), token, body.to_string()).await;
        assert!((400..500).contains(&status) && error["error"].is_string(), "{body}: {status} {error}");
    }
    let (status, _) =
        send(Method::POST, format!("{url}/user"), token, json!({"username": "admin:d1"}).to_string()).await;
    assert!((200..300).contains(&status));
    let (status, _) =
        send(Method::POST, format!("{url}/user"), token, json!({"username": "admin:d1"}).to_string()).await;
    assert!((200..300).contains(&status), "registering again is fine");

    // /sign: another CN in the CSR, an unregistered CN, a refused CN, garbage CSRs, missing fields, wrong types.
    let (_, other_csr) = key_and_csr("admin:d2");
    let (_, service_csr) = key_and_csr("k2v-bridge");
    let (_, good_csr) = key_and_csr("admin:d1");
    let cases = [
        ("/sign/admin:d1/pkcs10", json!({"certificate": other_csr, "passwd": "dojot"})),
        ("/sign/admin:d2/pkcs10", json!({"certificate": other_csr, "passwd": "dojot"})),
        ("/sign/k2v-bridge/pkcs10", json!({"certificate": service_csr, "passwd": "dojot"})),
        ("/sign/admin:d1/pkcs10", json!({"certificate": "bm90IGEgY3Ny", "passwd": "dojot"})),
        ("/sign/admin:d1/pkcs10", json!({"certificate": "%%%", "passwd": "dojot"})),
        ("/sign/admin:d1/pkcs10", json!({"certificate": good_csr[..good_csr.len() / 2], "passwd": "dojot"})),
        ("/sign/admin:d1/pkcs10", json!({"passwd": "dojot"})),
        ("/sign/admin:d1/pkcs10", json!({"certificate": 42})),
        ("/sign/a:b:c/pkcs10", json!({"certificate": good_csr})),
    ];
    for (route, body) in &cases {
        let (status, error) = send(Method::POST, format!("{url}{route}"), token, body.to_string()).await;
        assert!((400..500).contains(&status) && error["error"].is_string(), "{route} {body}: {status} {error}");
    }

    // A 1 MB body.
    let huge = json!({"certificate": "A".repeat(1024 * 1024), "passwd": "dojot"}).to_string();
    let (status, error) = send(Method::POST, format!("{url}/sign/admin:d1/pkcs10"), token, huge).await;
    assert_eq!(status, 413, "{error}");

    // Unknown CA name.
    for route in ["/ca/OtherCA", "/ca/OtherCA/crl"] {
        let (status, error) = send(Method::GET, format!("{url}{route}"), token, "").await;
        assert_eq!(status, 404, "{route}: {error}");
    }
    // Revoking refused identities.
    let (status, _) = send(Method::POST, format!("{url}/revoke/k2v-bridge"), token, "").await;
    assert_eq!(status, 400);

    assert_eq!(issued(pki.path()), before, "a refused request signed something");

    // The good request still works, and signing again gives a new serial (the first stays valid until revoked).
    let mut serials = Vec::new();
    for _ in 0..2 {
        let (status, body) = send(
            Method::POST,
            format!("{url}/sign/admin:d1/pkcs10"),
            token,
            json!({"certificate": good_csr, "passwd": "dojot"}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD.decode(body["status"]["data"].as_str().unwrap()).unwrap();
        serials.push(
            openssl::x509::X509::from_der(&der)
                .unwrap()
                .serial_number()
                .to_bn()
                .unwrap()
                .to_hex_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_ne!(serials[0], serials[1]);
    assert_eq!(issued(pki.path()), before + 2);
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let pki = tempfile::tempdir().unwrap();
    let service = PkiService::start(pki.path(), &[("PKI_TOKEN_TTL", "1s")]).await;
    let jwt = service.jwt().await;
    let (status, _) = send(reqwest::Method::GET, format!("{}/ca/{CA_NAME}", service.url), Some(&jwt), "").await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, _) = send(reqwest::Method::GET, format!("{}/ca/{CA_NAME}", service.url), Some(&jwt), "").await;
    assert_eq!(status, 401);
}

/// A flood of `/auth` with a hashed user's name: each argon2 check takes long (far longer in this unoptimised build),
/// and must not hold the service's async threads, here the test's own single thread.
#[tokio::test]
async fn password_checks_do_not_stall_the_service() {
    use argon2::PasswordHasher as _;
    use std::time::{Duration, Instant};
    let hash = argon2::Argon2::default().hash_password(b"right").unwrap().to_string();
    let pki = tempfile::tempdir().unwrap();
    let service = PkiService::start(pki.path(), &[("PKI_USERS", &format!("ops:{hash}"))]).await;
    let url = format!("{}/auth", service.url);
    let auth = |passwd: &str| {
        let body = json!({"username": "ops", "passwd": passwd}).to_string();
        send(reqwest::Method::POST, url.clone(), None, body)
    };
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..6 {
        flood.spawn(auth("wrong"));
    }
    let (mut refused, mut latest) = (0, Duration::ZERO);
    loop {
        let asked = Instant::now();
        tokio::select! {
            answer = flood.join_next() => match answer {
                Some(answer) => {
                    assert_eq!(answer.unwrap().0, 401, "a wrong password refused");
                    refused += 1;
                }
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(10)) => latest = latest.max(asked.elapsed()),
        }
    }
    assert_eq!(refused, 6);
    assert!(
        // Inline checks held the thread 3.0–3.3 s; a busy 2-core CI machine may delay a timer by some 100 ms.
        latest < Duration::from_millis(1000),
        "a 10 ms timer fired after {latest:?} while the checks ran ({:?} in all)",
        started.elapsed()
    );
    assert_eq!(auth("right").await.0, 200, "the right password still works");
}
