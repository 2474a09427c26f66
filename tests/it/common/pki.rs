//! A throwaway PKI made with the `openssl` crate (no openssl command line needed): a CA, a server certificate for
//! `localhost` / 127.0.0.1 and the service's client certificate (CN `k2v-bridge`), valid for two days.

use std::path::Path;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Builder, X509Name};

/// Writes into `dir`: `ca.pem`, `ca.key`, `server.pem`, `server.key` (SAN `DNS:localhost`, `IP:127.0.0.1`),
/// `k2v.pem`, `k2v.key` (CN `k2v-bridge`). Keys are unencrypted PKCS#8 PEM.
pub fn write(dir: &Path) {
    let ca_key = key();
    let mut ca = builder("Test CA", &ca_key);
    ca.set_issuer_name(&name("Test CA")).unwrap();
    ca.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    ca.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap()).unwrap();
    let ski = SubjectKeyIdentifier::new().build(&ca.x509v3_context(None, None)).unwrap();
    ca.append_extension(ski).unwrap();
    ca.sign(&ca_key, MessageDigest::sha256()).unwrap();
    let ca = ca.build();
    save(dir, "ca", &ca, &ca_key);

    for (file, cn, server) in [("server", "localhost", true), ("k2v", "k2v-bridge", false)] {
        let key = key();
        let mut cert = builder(cn, &key);
        cert.set_issuer_name(ca.subject_name()).unwrap();
        cert.append_extension(BasicConstraints::new().build().unwrap()).unwrap();
        let aki = AuthorityKeyIdentifier::new().keyid(false).build(&cert.x509v3_context(Some(&ca), None)).unwrap();
        cert.append_extension(aki).unwrap();
        if server {
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .ip("127.0.0.1")
                .build(&cert.x509v3_context(Some(&ca), None))
                .unwrap();
            cert.append_extension(san).unwrap();
        }
        cert.sign(&ca_key, MessageDigest::sha256()).unwrap();
        save(dir, file, &cert.build(), &key);
    }
}

fn key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

fn name(cn: &str) -> X509Name {
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    name.build()
}

/// A version 3 certificate for `cn` and `key`, valid from now for two days, with a random serial.
fn builder(cn: &str, key: &PKey<Private>) -> X509Builder {
    let mut cert = X509Builder::new().unwrap();
    cert.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    cert.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    cert.set_subject_name(&name(cn)).unwrap();
    cert.set_pubkey(key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
    cert
}

fn save(dir: &Path, file: &str, cert: &X509, key: &PKey<Private>) {
    std::fs::write(dir.join(format!("{file}.pem")), cert.to_pem().unwrap()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.private_key_to_pem_pkcs8().unwrap()).unwrap();
}

/// Issues `<file>.pem` / `<file>.key` for `cn` from the CA in `dir` (`ca.pem`, `ca.key`): another certificate of the
/// same PKI, such as a device certificate that claims the service's name.
pub fn issue(dir: &Path, file: &str, cn: &str) {
    let ca = X509::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let ca_key = PKey::private_key_from_pem(&std::fs::read(dir.join("ca.key")).unwrap()).unwrap();
    let key = key();
    let mut cert = builder(cn, &key);
    cert.set_issuer_name(ca.subject_name()).unwrap();
    cert.append_extension(BasicConstraints::new().build().unwrap()).unwrap();
    cert.sign(&ca_key, MessageDigest::sha256()).unwrap();
    save(dir, file, &cert.build(), &key);
}

/// The certificate in `<dir>/<file>.pem` as VerneMQ forwards it (`client_cert`: base64 DER).
pub fn forwarded(dir: &Path, file: &str) -> String {
    use base64::Engine as _;
    let cert = X509::from_pem(&std::fs::read(dir.join(format!("{file}.pem"))).unwrap()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(cert.to_der().unwrap())
}
