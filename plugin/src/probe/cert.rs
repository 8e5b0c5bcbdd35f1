//! Server certificate analysis: pure, with an injected `now` (no clock, no I/O).
//!
//! Self-signed RDP certificates are normal, and many carry `CA:TRUE`, which webpki rejects as
//! an end entity. So the path verifier's verdict is recorded as one fact among others, and the
//! certificate is always judged here: validity, names, key, signature, usage, pin.

use std::{net::IpAddr, time::Duration};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer, public_key::PublicKey};

use crate::{cause::Cause, report::CertFacts, report::Finding};

/// Remote Desktop Authentication EKU (1.3.6.1.4.1.311.54.1.2), DER content octets.
const RDP_AUTH_EKU: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x36, 0x01, 0x02];
const RDP_AUTH_EKU_STR: &str = "1.3.6.1.4.1.311.54.1.2";

/// Verdict string for a chain that verifies to a configured anchor.
pub const TRUSTED: &str = "trusted";

/// What the analysis needs besides the certificates.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The name the gateway dials (or the request's expected name): DNS name or IP literal.
    pub expected_name: &'a str,
    /// Seconds since the Unix epoch.
    pub now: i64,
    /// Warn when notAfter is closer than this.
    pub expiring_window: Duration,
    /// Configured trust anchors (may be empty: then nothing is trusted).
    pub anchors: &'a [TrustAnchor<'static>],
}

/// Analyses the server's chain (end entity first). Returns the facts and the 5xx findings
/// (pin checks are separate: see [`pin_finding`]).
pub fn analyse(chain: &[CertificateDer<'_>], input: &Inputs<'_>) -> (CertFacts, Vec<Finding>) {
    let mut findings = Vec::new();
    let Some(ee_der) = chain.first() else {
        findings.push(Finding::new(Cause::CertUntrusted, "the server sent no certificate"));
        return (CertFacts::default(), findings);
    };
    let mut facts = CertFacts {
        chain_length: u32::try_from(chain.len()).unwrap_or(u32::MAX),
        sha256_fingerprint: fingerprint(ee_der),
        ..CertFacts::default()
    };
    let cert = match X509Certificate::from_der(ee_der) {
        Ok((_, c)) => c,
        Err(e) => {
            facts.verifier_verdict = format!("unparsable certificate: {e}");
            findings.push(
                Finding::new(Cause::CertUntrusted, "the server's certificate cannot be parsed")
                    .with("error", e)
                    .with("sha256_fingerprint", &facts.sha256_fingerprint),
            );
            return (facts, findings);
        }
    };

    facts.subject = cert.subject().to_string();
    facts.issuer = cert.issuer().to_string();
    facts.serial = cert.raw_serial_as_string().replace(':', "");
    facts.not_before = cert.validity().not_before.timestamp();
    facts.not_after = cert.validity().not_after.timestamp();
    facts.signature_algorithm = signature_name(&cert.signature_algorithm.algorithm.to_id_string());
    let (key_type, key_bits) = key_info(&cert);
    facts.key_type = key_type;
    facts.key_bits = key_bits;
    facts.is_ca = cert.is_ca();
    facts.self_signed = cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => facts.san_dns.push((*d).to_owned()),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_from_bytes(b) {
                        facts.san_ip.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let mut has_eku = false;
    let mut eku_ok = true;
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        has_eku = true;
        let e = &eku.value;
        if e.any {
            facts.extended_key_usage.push("anyExtendedKeyUsage".into());
        }
        if e.server_auth {
            facts.extended_key_usage.push("serverAuth".into());
        }
        if e.client_auth {
            facts.extended_key_usage.push("clientAuth".into());
        }
        let mut rdp = false;
        for o in &e.other {
            let s = o.to_id_string();
            rdp |= s == RDP_AUTH_EKU_STR;
            facts.extended_key_usage.push(if s == RDP_AUTH_EKU_STR {
                "remoteDesktopAuthentication".into()
            } else {
                s
            });
        }
        eku_ok = e.any || e.server_auth || rdp;
    }

    // Validity, judged against the injected clock.
    let fp = facts.sha256_fingerprint.clone();
    if input.now > facts.not_after {
        findings.push(
            Finding::new(
                Cause::CertExpired,
                format!(
                    "the server certificate expired {} ago",
                    days(input.now - facts.not_after)
                ),
            )
            .with("not_after", rfc3339(facts.not_after))
            .with("subject", &facts.subject)
            .with("sha256_fingerprint", &fp),
        );
    } else if input.now < facts.not_before {
        findings.push(
            Finding::new(
                Cause::CertNotYetValid,
                format!(
                    "the server certificate becomes valid only in {}",
                    days(facts.not_before - input.now)
                ),
            )
            .with("not_before", rfc3339(facts.not_before))
            .with("subject", &facts.subject)
            .with("sha256_fingerprint", &fp),
        );
    } else if facts.not_after - input.now < i64::try_from(input.expiring_window.as_secs()).unwrap_or(i64::MAX) {
        findings.push(
            Finding::new(
                Cause::CertExpiringSoon,
                format!(
                    "the server certificate expires in {}",
                    days(facts.not_after - input.now)
                ),
            )
            .with("not_after", rfc3339(facts.not_after))
            .with("window_days", input.expiring_window.as_secs() / 86_400)
            .with("sha256_fingerprint", &fp),
        );
    }

    // Names: SAN DNS and IP entries, CN as fallback.
    let cn = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok().map(str::to_owned))
        .collect::<Vec<_>>();
    if !name_matches(input.expected_name, &facts.san_dns, &facts.san_ip, &cn) {
        findings.push(
            Finding::new(
                Cause::CertNameMismatch,
                format!("the certificate is not issued for {:?}", input.expected_name),
            )
            .with("expected_name", input.expected_name)
            .with("san_dns", facts.san_dns.join(","))
            .with("san_ip", facts.san_ip.join(","))
            .with("subject_cn", cn.join(",")),
        );
    }

    // Path verification against the configured anchors, at a time inside the validity period
    // so that expiry is reported once (above), not twice.
    facts.verifier_verdict = verify_path(chain, input, facts.not_before, facts.not_after);
    // A chain refused only for a SHA-1/MD5 signature or for its EKU is reported as CERT_WEAK or
    // CERT_WRONG_USAGE below, the specific causes; it is not also "untrusted".
    let verdict_has_own_cause = facts.verifier_verdict.starts_with("UnsupportedSignatureAlgorithm")
        || facts.verifier_verdict.starts_with("RequiredEkuNotFound");
    if facts.verifier_verdict != TRUSTED && !verdict_has_own_cause {
        let msg = if facts.self_signed {
            "the certificate is self-signed (normal for RDP, but not verifiable)"
        } else {
            "the certificate chain does not verify to a configured trust anchor"
        };
        findings.push(
            Finding::new(Cause::CertUntrusted, msg)
                .with("verifier", &facts.verifier_verdict)
                .with("issuer", &facts.issuer)
                .with("self_signed", facts.self_signed)
                .with("is_ca", facts.is_ca)
                .with("chain_length", facts.chain_length),
        );
    }

    // Key and signature strength.
    let weak_key = facts.key_type == "RSA" && facts.key_bits < 2048;
    let weak_sig = facts.signature_algorithm.starts_with("sha1")
        || facts.signature_algorithm.starts_with("md5")
        || facts.signature_algorithm == "ecdsa-with-SHA1";
    if weak_key || weak_sig {
        let what = match (weak_key, weak_sig) {
            (true, true) => "a weak key and a weak signature",
            (true, false) => "a weak key",
            _ => "a weak signature algorithm",
        };
        findings.push(
            Finding::new(Cause::CertWeak, format!("the certificate has {what}"))
                .with("key", format!("{} {}", facts.key_type, facts.key_bits))
                .with("signature_algorithm", &facts.signature_algorithm),
        );
    }
    if has_eku && !eku_ok {
        findings.push(
            Finding::new(Cause::CertWrongUsage, "the certificate's extended key usage allows neither server authentication nor Remote Desktop Authentication")
                .with("extended_key_usage", facts.extended_key_usage.join(",")),
        );
    }
    (facts, findings)
}

/// Pin comparison: `pinned` is the configured pin or the fingerprint last seen for the target.
pub fn pin_finding(fingerprint: &str, pinned: &str, source: &str) -> Option<Finding> {
    if fingerprint.eq_ignore_ascii_case(pinned) {
        return None;
    }
    Some(
        Finding::new(
            Cause::CertPinMismatch,
            format!("the certificate differs from the {source} one"),
        )
        .with("sha256_fingerprint", fingerprint)
        .with("pinned_sha256", pinned)
        .with("pin_source", source),
    )
}

/// Lower-case hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn verify_path(chain: &[CertificateDer<'_>], input: &Inputs<'_>, not_before: i64, not_after: i64) -> String {
    if input.anchors.is_empty() {
        return "no trust anchors configured".into();
    }
    let Some(ee) = chain.first() else {
        return "no certificate".into();
    };
    let ee = match webpki::EndEntityCert::try_from(ee) {
        Ok(e) => e,
        Err(e) => return format!("{e:?}"),
    };
    let at = input.now.clamp(not_before, not_after).max(0);
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).unwrap_or(0)));
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let verify = |usage| {
        ee.verify_for_usage(algs, input.anchors, &chain[1..], time, usage, None, None)
            .map(|_| ())
    };
    match verify(webpki::KeyUsage::server_auth()) {
        Ok(()) => TRUSTED.into(),
        Err(e) => {
            // An RDP certificate may carry only the Remote Desktop Authentication EKU.
            if matches!(e, webpki::Error::RequiredEkuNotFoundContext(_))
                && verify(webpki::KeyUsage::required_if_present(RDP_AUTH_EKU)).is_ok()
            {
                return TRUSTED.into();
            }
            match e {
                webpki::Error::RequiredEkuNotFoundContext(_) => "RequiredEkuNotFound".into(),
                other => {
                    let s = format!("{other:?}");
                    s.split(['(', '{']).next().unwrap_or(&s).trim().to_owned()
                }
            }
        }
    }
}

fn name_matches(expected: &str, san_dns: &[String], san_ip: &[String], cn: &[String]) -> bool {
    let expected = expected.trim_end_matches('.');
    if let Ok(ip) = expected.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return san_ip.iter().any(|s| s.parse::<IpAddr>().is_ok_and(|x| x == ip))
            || cn.iter().any(|c| c.parse::<IpAddr>().is_ok_and(|x| x == ip));
    }
    san_dns.iter().chain(cn).any(|pattern| dns_match(pattern, expected))
}

/// RFC 6125 style: case-insensitive, a wildcard only as the whole left-most label.
fn dns_match(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    if let Some(rest) = pattern.strip_prefix("*.") {
        return match name.split_once('.') {
            Some((label, tail)) => !label.is_empty() && tail.eq_ignore_ascii_case(rest) && rest.contains('.'),
            None => false,
        };
    }
    pattern.eq_ignore_ascii_case(name)
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

fn key_info(cert: &X509Certificate<'_>) -> (String, u32) {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => ("RSA".into(), u32::try_from(rsa.key_size()).unwrap_or(0)),
        Ok(PublicKey::EC(ec)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| match o.to_id_string().as_str() {
                    "1.2.840.10045.3.1.7" => "P-256".to_owned(),
                    "1.3.132.0.34" => "P-384".to_owned(),
                    "1.3.132.0.35" => "P-521".to_owned(),
                    other => other.to_owned(),
                })
                .unwrap_or_default();
            (
                format!("EC {curve}").trim().to_owned(),
                u32::try_from(ec.key_size()).unwrap_or(0),
            )
        }
        Ok(PublicKey::DSA(_)) => ("DSA".into(), 0),
        Ok(_) => match spki.algorithm.algorithm.to_id_string().as_str() {
            "1.3.101.112" => ("Ed25519".into(), 256),
            "1.3.101.113" => ("Ed448".into(), 456),
            other => (other.to_owned(), 0),
        },
        Err(_) => ("unknown".into(), 0),
    }
}

fn signature_name(oid: &str) -> String {
    match oid {
        "1.2.840.113549.1.1.4" => "md5WithRSAEncryption",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.113549.1.1.10" => "rsassaPss",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1",
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.3.101.112" => "Ed25519",
        other => return other.to_owned(),
    }
    .to_owned()
}

/// RFC 3339 form of a Unix timestamp.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

fn days(secs: i64) -> String {
    let d = secs / 86_400;
    if d >= 1 {
        format!("{d} day{}", if d == 1 { "" } else { "s" })
    } else {
        format!("{} hours", secs / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_800_000_000; // 2027-01-15

    struct Ca {
        key: KeyPair,
        cert: rcgen::Certificate,
        params: CertificateParams,
    }

    fn ts(t: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(t).expect("valid time")
    }

    fn ca() -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = ts(NOW - 365 * DAY);
        p.not_after = ts(NOW + 3650 * DAY);
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("ca");
        Ca { key, cert, params: p }
    }

    fn leaf(ca: &Ca, f: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(vec!["rdp1.example.test".to_owned()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, "rdp1.example.test");
        p.not_before = ts(NOW - 30 * DAY);
        p.not_after = ts(NOW + 300 * DAY);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        f(&mut p);
        let key = KeyPair::generate().expect("key");
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        p.signed_by(&key, &issuer).expect("sign").der().clone()
    }

    fn anchors(ca: &Ca) -> Vec<TrustAnchor<'static>> {
        vec![webpki::anchor_from_trusted_cert(ca.cert.der())
            .expect("anchor")
            .to_owned()]
    }

    fn run(chain: &[CertificateDer<'_>], name: &str, anchors: &[TrustAnchor<'static>]) -> (CertFacts, Vec<Cause>) {
        let input = Inputs {
            expected_name: name,
            now: NOW,
            expiring_window: Duration::from_secs(14 * 86_400),
            anchors,
        };
        let (facts, f) = analyse(chain, &input);
        (facts, f.into_iter().map(|f| f.cause).collect())
    }

    #[test]
    fn chain_to_test_ca_is_clean() {
        let ca = ca();
        let a = anchors(&ca);
        let (facts, causes) = run(&[leaf(&ca, |_| {})], "rdp1.example.test", &a);
        assert_eq!(causes, vec![]);
        assert_eq!(facts.verifier_verdict, TRUSTED);
        assert_eq!(facts.key_type, "EC P-256");
        assert_eq!(facts.signature_algorithm, "ecdsa-with-SHA256");
        assert_eq!(facts.san_dns, vec!["rdp1.example.test"]);
        assert_eq!(facts.sha256_fingerprint.len(), 64);
        assert!(!facts.self_signed);
        // Case-insensitive name.
        assert_eq!(run(&[leaf(&ca, |_| {})], "RDP1.Example.Test", &a).1, vec![]);
    }

    #[test]
    fn validity_window() {
        let ca = ca();
        let a = anchors(&ca);
        let expired = leaf(&ca, |p| p.not_after = ts(NOW - 2 * DAY));
        assert_eq!(run(&[expired], "rdp1.example.test", &a).1, vec![Cause::CertExpired]);
        let future = leaf(&ca, |p| p.not_before = ts(NOW + 2 * DAY));
        assert_eq!(run(&[future], "rdp1.example.test", &a).1, vec![Cause::CertNotYetValid]);
        let soon = leaf(&ca, |p| p.not_after = ts(NOW + 3 * DAY));
        assert_eq!(run(&[soon], "rdp1.example.test", &a).1, vec![Cause::CertExpiringSoon]);
    }

    #[test]
    fn names_ip_san_wildcard_and_cn_fallback() {
        let ca = ca();
        let a = anchors(&ca);
        assert_eq!(
            run(&[leaf(&ca, |_| {})], "other.example.test", &a).1,
            vec![Cause::CertNameMismatch]
        );
        let ip = leaf(&ca, |p| {
            p.subject_alt_names = vec![SanType::IpAddress("10.1.2.3".parse().expect("ip"))]
        });
        let (facts, causes) = run(std::slice::from_ref(&ip), "10.1.2.3", &a);
        assert_eq!(causes, vec![]);
        assert_eq!(facts.san_ip, vec!["10.1.2.3"]);
        assert_eq!(run(&[ip], "10.1.2.4", &a).1, vec![Cause::CertNameMismatch]);
        assert!(dns_match("*.example.test", "rdp1.example.test"));
        assert!(!dns_match("*.example.test", "a.b.example.test"));
        assert!(!dns_match("*.test", "example.test"));
        // CN only, no SAN.
        assert!(name_matches("host1", &[], &[], &["HOST1".into()]));
    }

    #[test]
    fn self_signed_ca_true_is_analysed_not_rejected() {
        // Like Windows' own RDP certificates: self-signed, CA:TRUE, CN = host name.
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, "WIN-RDP01");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = ts(NOW - DAY);
        p.not_after = ts(NOW + 180 * DAY);
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("cert");
        let other = ca();
        let (facts, causes) = run(&[cert.der().clone()], "win-rdp01", &anchors(&other));
        assert_eq!(causes, vec![Cause::CertUntrusted]);
        assert!(facts.self_signed && facts.is_ca);
        assert!(facts.not_after > NOW);
        // With itself as the anchor webpki refuses a CA as end entity: still only a warning.
        let own = vec![webpki::anchor_from_trusted_cert(cert.der()).expect("anchor").to_owned()];
        let (facts, causes) = run(&[cert.der().clone()], "win-rdp01", &own);
        assert_eq!(causes, vec![Cause::CertUntrusted]);
        assert!(
            facts.verifier_verdict.contains("CaUsedAsEndEntity"),
            "{}",
            facts.verifier_verdict
        );
    }

    #[test]
    fn no_anchors_means_untrusted() {
        let ca = ca();
        let (facts, causes) = run(&[leaf(&ca, |_| {})], "rdp1.example.test", &[]);
        assert_eq!(causes, vec![Cause::CertUntrusted]);
        assert_eq!(facts.verifier_verdict, "no trust anchors configured");
    }

    #[test]
    fn wrong_eku_and_rdp_eku() {
        let ca = ca();
        let a = anchors(&ca);
        let client_only = leaf(&ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]
        });
        let (_, causes) = run(&[client_only], "rdp1.example.test", &a);
        assert!(causes.contains(&Cause::CertWrongUsage), "{causes:?}");
        let rdp_only = leaf(&ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 4, 1, 311, 54, 1, 2])]
        });
        let (facts, causes) = run(&[rdp_only], "rdp1.example.test", &a);
        assert_eq!(causes, vec![], "{facts:?}");
        assert_eq!(facts.extended_key_usage, vec!["remoteDesktopAuthentication"]);
    }

    /// RSA-1024 key with a SHA-1 signature, made once with
    /// `openssl req -x509 -newkey rsa:1024 -sha1 -nodes -days 36500 -subj /CN=weak.example.test`.
    const WEAK_PEM: &str = include_str!("../../testdata/weak-rsa1024-sha1.pem");

    #[test]
    fn weak_key_and_sha1_signature() {
        let der = pem_der(WEAK_PEM);
        let (facts, causes) = run(&[der], "weak.example.test", &[]);
        assert_eq!(facts.key_type, "RSA");
        assert_eq!(facts.key_bits, 1024);
        assert_eq!(facts.signature_algorithm, "sha1WithRSAEncryption");
        assert!(facts.self_signed);
        assert_eq!(causes, vec![Cause::CertUntrusted, Cause::CertWeak]);
    }

    #[test]
    fn pins() {
        assert!(pin_finding("ABCD", "abcd", "pinned").is_none());
        let f = pin_finding("abcd", "ef01", "last seen").expect("mismatch");
        assert_eq!(f.cause, Cause::CertPinMismatch);
        assert!(f.evidence.contains(&("pinned_sha256".into(), "ef01".into())));
    }

    #[test]
    fn garbage_certificate_does_not_panic() {
        let (_, causes) = run(&[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])], "x", &[]);
        assert_eq!(causes, vec![Cause::CertUntrusted]);
        let (_, causes) = run(&[], "x", &[]);
        assert_eq!(causes, vec![Cause::CertUntrusted]);
    }

    fn pem_der(pem: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
    }
}
