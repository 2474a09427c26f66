//! `iotagent-mqtt pki` (the built binary, as the compose `pki` step runs it) produces what the broker and the
//! service read, and signs and revokes a device as the README shows.

use openssl::x509::{X509, X509Crl};

use super::checks::check_tls_files;
use super::{compose, conf, pki_command, run_pki};

#[test]
fn pki_bootstrap_produces_what_broker_and_service_read() {
    let (conf, compose) = (conf(), compose());
    let dir = tempfile::tempdir().unwrap();
    run_pki(&compose, dir.path(), &["init"]);
    let out = dir.path().join("pki");
    if let Err(problems) = check_tls_files(&conf, &compose, &out) {
        panic!("TLS files:\n{}", problems.join("\n"));
    }

    let load = |name: &str| X509::from_pem(&std::fs::read(out.join(name)).unwrap()).unwrap();
    let (ca, server, service) = (load("ca.crt"), load("server.crt"), load("service.crt"));
    let ca_key = ca.public_key().unwrap();
    assert!(server.verify(&ca_key).unwrap() && service.verify(&ca_key).unwrap(), "signed by the CA");
    let cn = |cert: &X509| {
        let entry = cert.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME).next().unwrap();
        String::from_utf8_lossy(entry.data().as_slice()).to_string()
    };
    let agent = compose.agent().unwrap();
    let username = compose.env(agent).get("MQTT_USERNAME").cloned().unwrap_or_else(|| "k2v-bridge".into());
    assert_eq!(cn(&service), username);
    // The service connects to the broker by its compose name; the README's devices use localhost and 127.0.0.1.
    let names: Vec<String> = server
        .subject_alt_names()
        .unwrap()
        .iter()
        .filter_map(|n| {
            n.dnsname()
                .map(str::to_string)
                .or_else(|| n.ipaddress().map(|ip| ip.iter().map(u8::to_string).collect::<Vec<_>>().join(".")))
        })
        .collect();
    for wanted in [compose.broker().unwrap(), "localhost", "127.0.0.1"] {
        assert!(names.iter().any(|n| n == wanted), "server.crt SAN {names:?} lacks {wanted}");
    }
    // The HTTPS webhook pair: VerneMQ checks webhook.crt against the host of its endpoint URLs (the compose service),
    // and presents broker-client.crt, CN vernemq, the name the service's IOTAGENT_TLS_CLIENT_NAMES lets in.
    let webhook = load("webhook.crt");
    let webhook_names: Vec<String> =
        webhook.subject_alt_names().unwrap().iter().filter_map(|n| n.dnsname().map(str::to_string)).collect();
    assert!(webhook_names.iter().any(|n| n == agent), "webhook.crt SAN {webhook_names:?} lacks {agent}");
    assert!(webhook.verify(&ca_key).unwrap());
    assert_eq!(cn(&load("broker-client.crt")), "vernemq");
    let crl = X509Crl::from_pem(&std::fs::read(out.join("crl.pem")).unwrap()).unwrap();
    assert!(crl.verify(&ca_key).unwrap(), "CRL signed by the CA");
    assert!(crl.get_revoked().is_none_or(|r| r.is_empty()), "nothing revoked yet");

    // Keys are private, and (run as root, as the compose step is) owned by their readers: VerneMQ, the service.
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let keys = [("server.key", 10000), ("broker-client.key", 10000), ("service.key", 10001), ("webhook.key", 10001)];
    for (key, uid) in keys.into_iter().chain([("ca/ca.key", 10001)]) {
        let meta = std::fs::metadata(out.join(key)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "{key}");
        if root {
            assert_eq!(meta.uid(), uid, "{key} owner");
        }
    }

    // A second run keeps keys and certificates.
    let before: Vec<Vec<u8>> = ["ca.crt", "server.crt", "server.key", "service.key"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    run_pki(&compose, dir.path(), &["init"]);
    let after: Vec<Vec<u8>> = ["ca.crt", "server.crt", "server.key", "service.key"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    assert!(before == after, "re-running init replaced keys or certificates");
}

#[test]
fn pki_signs_and_revokes_a_device_as_the_readme_does() {
    let compose = compose();
    let dir = tempfile::tempdir().unwrap();
    run_pki(&compose, dir.path(), &["init"]);
    // The device makes its own key and CSR; only the CSR goes to the PKI step (on stdin, as with docker compose run).
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, "admin:a1998e").unwrap();
    let mut csr = openssl::x509::X509ReqBuilder::new().unwrap();
    csr.set_subject_name(&name.build()).unwrap();
    csr.set_pubkey(&key).unwrap();
    csr.sign(&key, openssl::hash::MessageDigest::sha256()).unwrap();
    let csr_pem = csr.build().to_pem().unwrap();

    let with_stdin = |args: &[&str], input: &[u8]| {
        use std::io::Write as _;
        let mut child = pki_command(&compose, dir.path(), args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    let device = X509::from_pem(&with_stdin(&["sign"], &csr_pem)).expect("sign prints a PEM certificate");
    let ca = X509::from_pem(&run_pki(&compose, dir.path(), &["ca"]).stdout).expect("ca prints the CA");
    assert!(device.verify(&ca.public_key().unwrap()).unwrap());
    let cn = device.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME).next().unwrap();
    assert_eq!(String::from_utf8_lossy(cn.data().as_slice()).to_string(), "admin:a1998e");
    assert!(device.public_key().unwrap().public_eq(&key), "the device keeps its own key");

    with_stdin(&["revoke"], &device.to_pem().unwrap());
    let crl = X509Crl::from_pem(&std::fs::read(dir.path().join("pki/crl.pem")).unwrap()).unwrap();
    let revoked: Vec<_> =
        crl.get_revoked().unwrap().iter().map(|r| r.serial_number().to_bn().unwrap().to_vec()).collect();
    assert_eq!(revoked, vec![device.serial_number().to_bn().unwrap().to_vec()]);
}
