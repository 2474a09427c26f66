use std::time::Duration;

use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::x509::{X509Crl, X509NameBuilder, X509ReqBuilder};

use super::*;

fn store(dir: &Path) -> Store {
    Store::new(Settings::with_defaults(dir.to_path_buf()))
}

fn read(dir: &Path, files: &[&str]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect()
}

pub(crate) fn csr(cn: &str) -> Vec<u8> {
    let key = x509::new_key().unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let mut req = X509ReqBuilder::new().unwrap();
    req.set_subject_name(&name.build()).unwrap();
    req.set_pubkey(&key).unwrap();
    req.sign(&key, MessageDigest::sha256()).unwrap();
    req.build().to_pem().unwrap()
}

#[test]
fn init_is_idempotent_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    assert_eq!(s.init().unwrap(), vec![Role::Server, Role::Service, Role::Webhook, Role::BrokerClient]);
    let files = ["ca.crt", "server.crt", "server.key", "service.crt", "service.key", "webhook.crt", "ca/ca.key"];
    let before = read(dir.path(), &files);
    assert_eq!(s.init().unwrap(), Vec::<Role>::new(), "second init keeps everything");
    assert!(before == read(dir.path(), &files), "keys or certificates replaced");
    for key in ["server.key", "service.key", "webhook.key", "broker-client.key", "ca/ca.key", "ca/index.json"] {
        let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let mode = std::fs::metadata(dir.path().join("ca")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(std::fs::metadata(dir.path().join("crl.pem")).unwrap().permissions().mode() & 0o777, 0o644);
    // Four own certificates, nothing left behind by the atomic writes.
    assert_eq!(s.issued().unwrap().len(), 4);
    let stray: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn init_renews_within_the_window_and_replaces_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::with_defaults(dir.path().to_path_buf());
    settings.cert_days = 10;
    Store::new(settings.clone()).init().unwrap();
    let ca = read(dir.path(), &["ca.crt", "ca/ca.key"]);
    // 10-day certificates with a 30-day window: both are due again.
    settings.renew_before = Duration::from_secs(30 * 24 * 3600);
    let s = Store::new(settings.clone());
    assert_eq!(s.renew_own_certs().unwrap(), vec![Role::Server, Role::Service, Role::Webhook, Role::BrokerClient]);
    settings.renew_before = Duration::from_secs(24 * 3600);
    let s = Store::new(settings);
    assert_eq!(s.renew_own_certs().unwrap(), Vec::<Role>::new());
    assert!(ca == read(dir.path(), &["ca.crt", "ca/ca.key"]), "the CA is kept");
    // A key that does not match its certificate.
    std::fs::copy(dir.path().join("server.key"), dir.path().join("service.key")).unwrap();
    assert_eq!(s.init().unwrap(), vec![Role::Service]);
    std::fs::remove_file(dir.path().join("server.crt")).unwrap();
    assert_eq!(s.init().unwrap(), vec![Role::Server]);
}

#[test]
fn own_certificates_have_the_configured_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.init().unwrap();
    let ca = s.ca_certificate().unwrap();
    let server = X509::from_pem(&std::fs::read(dir.path().join("server.crt")).unwrap()).unwrap();
    let service = X509::from_pem(&std::fs::read(dir.path().join("service.crt")).unwrap()).unwrap();
    assert!(server.verify(&ca.public_key().unwrap()).unwrap());
    assert_eq!(x509::common_name(service.subject_name()).unwrap(), "k2v-bridge");
    let sans: Vec<String> = server
        .subject_alt_names()
        .unwrap()
        .iter()
        .map(|n| n.dnsname().map(str::to_string).unwrap_or_else(|| format!("{:?}", n.ipaddress().unwrap())))
        .collect();
    assert_eq!(sans, ["vernemq", "localhost", "[127, 0, 0, 1]"]);
    assert_eq!(x509::common_name(ca.subject_name()).unwrap(), "IOTmidCA");
    // The HTTPS webhook pair: the service's server certificate names its compose host, the broker's client
    // certificate is `vernemq` for client authentication.
    let webhook = X509::from_pem(&std::fs::read(dir.path().join("webhook.crt")).unwrap()).unwrap();
    let names: Vec<String> =
        webhook.subject_alt_names().unwrap().iter().filter_map(|n| n.dnsname().map(str::to_string)).collect();
    assert_eq!(names, ["iotagent-mqtt", "localhost"]);
    let client = X509::from_pem(&std::fs::read(dir.path().join("broker-client.crt")).unwrap()).unwrap();
    assert_eq!(x509::common_name(client.subject_name()).unwrap(), "vernemq");
    assert!(String::from_utf8_lossy(&client.to_text().unwrap()).contains("TLS Web Client Authentication"));
}

#[test]
fn sign_refuses_identities_the_acl_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.init().unwrap();
    for cn in ["k2v-bridge", "admin:a/b", "a:b:c", "admin:", ":dev", "admin:dev+", "admin:dé", "admin", "admin:#"] {
        assert!(matches!(s.sign(&csr(cn), None), Err(PkiError::Request(_))), "{cn:?} was signed");
    }
    // A service name that looks like a device is still never signed.
    let mut settings = Settings::with_defaults(dir.path().to_path_buf());
    settings.service_name = "svc:bridge".into();
    assert!(matches!(Store::new(settings).sign(&csr("svc:bridge"), None), Err(PkiError::Request(_))));
    assert_eq!(s.issued().unwrap().len(), 4, "nothing signed");
}

#[test]
fn sign_with_expected_cn_needs_the_same_registered_cn() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.init().unwrap();
    assert!(matches!(s.sign(&csr("admin:a1"), Some("admin:a1")), Err(PkiError::NotFound(_))));
    assert!(s.register("admin:a1").unwrap());
    assert!(!s.register("admin:a1").unwrap(), "registering twice is fine");
    assert!(matches!(s.sign(&csr("admin:a2"), Some("admin:a1")), Err(PkiError::Request(_))));
    assert_eq!(s.issued().unwrap().len(), 4);
    let cert = s.sign(&csr("admin:a1"), Some("admin:a1")).unwrap();
    let eku = cert.to_text().unwrap();
    assert!(String::from_utf8_lossy(&eku).contains("TLS Web Client Authentication"));
    assert!(matches!(s.register("k2v-bridge"), Err(PkiError::Request(_))));
}

#[test]
fn revoke_lists_serials_in_the_crl_and_resigning_gives_a_new_serial() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.init().unwrap();
    let first = s.sign(&csr("admin:d"), None).unwrap();
    let second = s.sign(&csr("admin:d"), None).unwrap();
    let other = s.sign(&csr("admin:e"), None).unwrap();
    let serial = |c: &X509| x509::serial_hex(c).unwrap();
    assert_ne!(serial(&first), serial(&second));
    let number_before = s.crl().unwrap().extension::<openssl::x509::CrlNumber>().unwrap().unwrap().1.to_bn().unwrap();

    let revoked = s.revoke_certificate(&first.to_pem().unwrap()).unwrap();
    assert_eq!(revoked.serial, serial(&first));
    let listed = |crl: &X509Crl| -> Vec<String> {
        crl.get_revoked()
            .map(|r| r.iter().map(|r| r.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let crl = s.crl().unwrap();
    assert!(crl.verify(&s.ca_certificate().unwrap().public_key().unwrap()).unwrap());
    assert_eq!(listed(&crl), vec![serial(&first)]);
    let number_after = crl.extension::<openssl::x509::CrlNumber>().unwrap().unwrap().1.to_bn().unwrap();
    assert!(number_after > number_before, "the CRL number grows");

    // By entity: the remaining certificate of admin:d, not admin:e's.
    let by_entity = s.revoke_entity("admin:d").unwrap();
    assert_eq!(by_entity.len(), 2);
    let mut now_listed = listed(&s.crl().unwrap());
    now_listed.sort();
    let mut wanted = vec![serial(&first), serial(&second)];
    wanted.sort();
    assert_eq!(now_listed, wanted);
    assert!(!now_listed.contains(&serial(&other)));

    // By serial, lower case with colons; unknown serials and garbage are errors.
    s.revoke_serial(&serial(&other).to_lowercase()).unwrap();
    assert!(matches!(s.revoke_serial("ABCDEF"), Err(PkiError::NotFound(_))));
    assert!(matches!(s.revoke_serial("xyz"), Err(PkiError::Request(_))));
    assert!(matches!(s.revoke_certificate(b"nope"), Err(PkiError::Request(_))));
}

#[test]
fn revoked_service_certificate_is_issued_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.init().unwrap();
    let service = std::fs::read(dir.path().join("service.crt")).unwrap();
    s.revoke_certificate(&service).unwrap();
    assert_eq!(s.renew_own_certs().unwrap(), vec![Role::Service]);
    assert_ne!(service, std::fs::read(dir.path().join("service.crt")).unwrap());
}

#[test]
fn operations_before_init_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    assert!(matches!(s.sign(&csr("a:b"), None), Err(PkiError::NoCa(_))));
    assert!(matches!(s.write_crl(), Err(PkiError::NoCa(_))));
    assert!(matches!(s.ca_certificate(), Err(PkiError::NoCa(_))));
}

#[test]
fn corrupt_index_is_an_error_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.init().unwrap();
    std::fs::write(dir.path().join("ca/index.json"), b"{not json").unwrap();
    assert!(matches!(s.sign(&csr("a:b"), None), Err(PkiError::Index { .. })));
}

#[test]
fn the_broker_key_is_shared_with_the_broker_group_only() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let gid_line = status.lines().find_map(|l| l.strip_prefix("Gid:")).unwrap();
    let own: u32 = gid_line.split_whitespace().next().unwrap().parse().unwrap();
    assert!(in_group(own));
    assert!(!in_group(4_000_000_000));
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::with_defaults(dir.path().to_path_buf());
    settings.broker_gid = Some(own);
    Store::new(settings).init().unwrap();
    let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("server.key"), 0o640, "the broker's group may read its key");
    assert_eq!(mode("service.key"), 0o600);
}
