//! Certificate, CSR and CRL building with the openssl crate; no I/O here.

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{
    CrlNumber, X509, X509Builder, X509Crl, X509CrlBuilder, X509Name, X509NameRef, X509Ref, X509Req, X509RevokedBuilder,
};

use super::PkiError;

const SECONDS_PER_DAY: i64 = 24 * 3600;

/// What a leaf certificate is for.
pub(super) enum Usage<'a> {
    /// A TLS server (the broker), with these subjectAltNames.
    Server(&'a [String]),
    /// A TLS client (the service, devices).
    Client,
}

/// A new P-256 key: quick to generate, and accepted by VerneMQ (Erlang ssl), Mosquitto and rumqttc's native-tls.
pub(super) fn new_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn name(cn: &str) -> Result<X509Name, ErrorStack> {
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(name.build())
}

/// The first CN of a name, if it is UTF-8.
pub(super) fn common_name(name: &X509NameRef) -> Option<String> {
    let entry = name.entries_by_nid(Nid::COMMONNAME).next()?;
    entry.data().to_string().ok()
}

/// A fresh random serial: 127 random bits with the top one set, so it is positive, never zero, and always 16 bytes
/// of DER (well inside RFC 5280's 20).
fn random_serial() -> Result<Asn1Integer, ErrorStack> {
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::ONE, false)?;
    serial.to_asn1_integer()
}

/// The serial as upper-case hex, the form the index and `pki revoke --serial` use.
pub(super) fn serial_hex(cert: &X509Ref) -> Result<String, ErrorStack> {
    Ok(cert.serial_number().to_bn()?.to_hex_str()?.to_string())
}

/// Seconds since the Unix epoch of an ASN.1 time.
pub(super) fn unix_time(time: &openssl::asn1::Asn1TimeRef) -> Result<i64, ErrorStack> {
    let diff = Asn1Time::from_unix(0)?.diff(time)?;
    Ok(i64::from(diff.days) * SECONDS_PER_DAY + i64::from(diff.secs))
}

fn builder(cn: &str, key: &PKeyRef<impl openssl::pkey::HasPublic>, days: u32) -> Result<X509Builder, ErrorStack> {
    let mut cert = X509Builder::new()?;
    cert.set_version(2)?;
    cert.set_serial_number(&*random_serial()?)?;
    cert.set_subject_name(&*name(cn)?)?;
    cert.set_pubkey(key)?;
    // A minute back, so that a peer whose clock lags a little does not see a certificate from the future.
    cert.set_not_before(&*Asn1Time::from_unix(now() - 60)?)?;
    cert.set_not_after(&*Asn1Time::days_from_now(days)?)?;
    Ok(cert)
}

pub(super) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A self-signed CA certificate.
pub(super) fn ca_certificate(cn: &str, key: &PKeyRef<Private>, days: u32) -> Result<X509, ErrorStack> {
    let mut ca = builder(cn, key, days)?;
    ca.set_issuer_name(&*name(cn)?)?;
    ca.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    ca.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
    let ski = SubjectKeyIdentifier::new().build(&ca.x509v3_context(None, None))?;
    ca.append_extension(ski)?;
    ca.sign(key, MessageDigest::sha256())?;
    Ok(ca.build())
}

/// A leaf certificate for `cn` and `public`, signed by the CA. Nothing of a CSR but its key and CN is copied: the
/// extensions are the CA's decision.
pub(super) fn leaf(
    ca: &X509Ref,
    ca_key: &PKeyRef<Private>,
    cn: &str,
    public: &PKeyRef<Public>,
    days: u32,
    usage: &Usage<'_>,
) -> Result<X509, ErrorStack> {
    let mut cert = builder(cn, public, days)?;
    cert.set_issuer_name(ca.subject_name())?;
    cert.append_extension(BasicConstraints::new().critical().build()?)?;
    cert.append_extension(KeyUsage::new().critical().digital_signature().key_encipherment().build()?)?;
    let eku = match usage {
        Usage::Server(_) => ExtendedKeyUsage::new().server_auth().build()?,
        Usage::Client => ExtendedKeyUsage::new().client_auth().build()?,
    };
    cert.append_extension(eku)?;
    let ski = SubjectKeyIdentifier::new().build(&cert.x509v3_context(Some(ca), None))?;
    cert.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new().keyid(true).build(&cert.x509v3_context(Some(ca), None))?;
    cert.append_extension(aki)?;
    if let Usage::Server(names) = usage {
        let mut san = SubjectAlternativeName::new();
        for n in names.iter() {
            if n.parse::<std::net::IpAddr>().is_ok() {
                san.ip(n);
            } else {
                san.dns(n);
            }
        }
        cert.append_extension(san.build(&cert.x509v3_context(Some(ca), None))?)?;
    }
    cert.sign(ca_key, MessageDigest::sha256())?;
    Ok(cert.build())
}

/// Parses a CSR in PEM or DER and checks that it is signed by its own key (proof that the requester holds it).
///
/// # Errors
/// `PkiError::Request` for anything that is not a well-signed CSR.
pub(super) fn parse_csr(bytes: &[u8]) -> Result<X509Req, PkiError> {
    let trimmed = bytes.trim_ascii_start();
    let req = if trimmed.starts_with(b"-----BEGIN") { X509Req::from_pem(trimmed) } else { X509Req::from_der(bytes) }
        .map_err(|_| PkiError::Request("not a PKCS#10 certificate request (PEM or DER)".into()))?;
    let key = req.public_key().map_err(|_| PkiError::Request("the request's public key is unreadable".into()))?;
    if !req.verify(&key).unwrap_or(false) {
        return Err(PkiError::Request("the request's signature does not verify with its own key".into()));
    }
    Ok(req)
}

/// A revoked entry: serial (hex) and revocation time (Unix seconds).
pub(super) struct Revoked<'a> {
    pub serial: &'a str,
    pub at: i64,
}

/// A version 2 CRL signed by the CA (SHA-256), with the authorityKeyIdentifier and crlNumber RFC 5280 asks for.
pub(super) fn crl(
    ca: &X509Ref,
    ca_key: &PKeyRef<Private>,
    revoked: &[Revoked<'_>],
    number: u64,
    days: u32,
) -> Result<X509Crl, ErrorStack> {
    let mut crl = X509CrlBuilder::new()?;
    crl.set_issuer_name(ca.subject_name())?;
    crl.set_last_update(&*Asn1Time::from_unix(now() - 60)?)?;
    crl.set_next_update(&*Asn1Time::days_from_now(days)?)?;
    let dummy = X509Builder::new()?;
    let aki = AuthorityKeyIdentifier::new().keyid(true).build(&dummy.x509v3_context(Some(ca), None))?;
    crl.append_extension(aki)?;
    // CrlNumber::new asserts the number is below 2^159; a u64 always is.
    crl.append_extension(CrlNumber::new(BigNum::from_dec_str(&number.to_string())?)?.build()?)?;
    for entry in revoked {
        let mut r = X509RevokedBuilder::new()?;
        r.set_serial_number(&*BigNum::from_hex_str(entry.serial)?.to_asn1_integer()?)?;
        r.set_revocation_date(&*Asn1Time::from_unix(entry.at)?)?;
        crl.add_revoked(r.build())?;
    }
    crl.sort()?;
    crl.sign(ca_key, MessageDigest::sha256())?;
    crl.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_lists_revoked_serials_and_verifies_with_the_ca_key() {
        let key = new_key().unwrap();
        let ca = ca_certificate("Test CA", &key, 10).unwrap();
        let device_key = new_key().unwrap();
        let public = PKey::public_key_from_der(&device_key.public_key_to_der().unwrap()).unwrap();
        let a = leaf(&ca, &key, "t:a", &public, 1, &Usage::Client).unwrap();
        let b = leaf(&ca, &key, "t:b", &public, 1, &Usage::Client).unwrap();
        let (sa, sb) = (serial_hex(&a).unwrap(), serial_hex(&b).unwrap());
        assert_ne!(sa, sb, "fresh serials");
        let der = crl(&ca, &key, &[Revoked { serial: &sa, at: now() }, Revoked { serial: &sb, at: now() }], 7, 30)
            .unwrap()
            .to_der()
            .unwrap();
        let parsed = X509Crl::from_der(&der).unwrap();
        assert!(parsed.verify(&key).unwrap());
        let mut listed: Vec<String> = parsed
            .get_revoked()
            .unwrap()
            .iter()
            .map(|r| r.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string())
            .collect();
        listed.sort();
        let mut wanted = vec![sa, sb];
        wanted.sort();
        assert_eq!(listed, wanted);
        let (_, number) = parsed.extension::<CrlNumber>().unwrap().unwrap();
        assert_eq!(number.to_bn().unwrap().to_string(), "7");
        // Another CA's key does not verify it.
        assert!(!parsed.verify(&new_key().unwrap()).unwrap());
    }

    #[test]
    fn empty_crl_is_valid() {
        let key = new_key().unwrap();
        let ca = ca_certificate("Test CA", &key, 10).unwrap();
        let parsed = X509Crl::from_der(&crl(&ca, &key, &[], 1, 30).unwrap().to_der().unwrap()).unwrap();
        assert!(parsed.verify(&key).unwrap());
        assert!(parsed.get_revoked().is_none_or(|r| r.is_empty()));
    }

    #[test]
    fn csr_must_be_signed_by_its_own_key() {
        assert!(matches!(parse_csr(b"garbage"), Err(PkiError::Request(_))));
        assert!(matches!(parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"), Err(PkiError::Request(_))));
        let key = new_key().unwrap();
        let other = new_key().unwrap();
        let mut req = openssl::x509::X509ReqBuilder::new().unwrap();
        req.set_subject_name(&name("t:d").unwrap()).unwrap();
        req.set_pubkey(&key).unwrap();
        // Signed with a key that is not the one inside: the requester does not prove possession.
        req.sign(&other, MessageDigest::sha256()).unwrap();
        let pem = req.build().to_pem().unwrap();
        assert!(matches!(parse_csr(&pem), Err(PkiError::Request(_))));
    }
}
