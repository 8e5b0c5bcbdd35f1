//! The `weak_rsa` target's TLS 1.2 server flight, written by hand from RFC 5246 and RFC 8422
//! because ring (and so rustls) refuses to sign with an RSA key below 2048 bits: ServerHello
//! (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256), Certificate (the RSA-1024 fixture, issued by the
//! fixture rsa1024 CA), ServerKeyExchange (an X25519 share signed with rsa_pkcs1_sha256 by the
//! RSA-1024 key, computed here with num-bigint) and ServerHelloDone. A client whose library
//! accepts RSA-1024 (mstsc's Schannel does) can check that signature; the flight ends there,
//! as no key exchange is ever completed. No I/O here.

use num_bigint::BigUint;
use ring::{
    agreement,
    digest::{self, SHA256},
    rand::SecureRandom,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivatePkcs1KeyDer};

/// The RSA-1024 leaf (`CN=cert-rsa1024`).
pub(crate) const CERT_PEM: &str = include_str!("../fixtures/rsa1024.pem");
/// Its PKCS#1 private key.
const KEY_PEM: &str = include_str!("../fixtures/rsa1024.key");
/// The CA that issued it, part of the fleet's trust bundle.
pub(crate) const CA_PEM: &str = include_str!("../fixtures/rsa1024-ca.pem");

/// The flight could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlightError {
    /// A fixture did not parse.
    #[error("rsa1024 fixture: {0}")]
    Fixture(String),
    /// No randomness or no key share.
    #[error("key share: {0}")]
    Crypto(&'static str),
}

/// The private key's modulus and private exponent.
struct RsaKey {
    n: BigUint,
    d: BigUint,
    /// Modulus length in bytes.
    k: usize,
}

/// Reads one DER TLV at the start of `b`: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// RSAPrivateKey ::= SEQUENCE { version, modulus, publicExponent, privateExponent, … }
/// (RFC 8017 A.1.2).
fn parse_key(der: &[u8]) -> Option<RsaKey> {
    let (0x30, body, _) = tlv(der)? else { return None };
    let mut ints = Vec::new();
    let mut rest = body;
    while ints.len() < 4 {
        let (0x02, value, next) = tlv(rest)? else { return None };
        ints.push(value);
        rest = next;
    }
    let n = BigUint::from_bytes_be(ints[1]);
    let k = usize::try_from(n.bits().div_ceil(8)).ok()?;
    Some(RsaKey {
        n,
        d: BigUint::from_bytes_be(ints[3]),
        k,
    })
}

/// RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.1, EMSA-PKCS1-v1_5 9.2).
fn sign_pkcs1_sha256(key: &RsaKey, message: &[u8]) -> Vec<u8> {
    // DigestInfo prefix for SHA-256 (RFC 8017 9.2 note 1).
    const SHA256_PREFIX: [u8; 19] = [
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04,
        0x20,
    ];
    let hash = digest::digest(&SHA256, message);
    let t_len = SHA256_PREFIX.len() + hash.as_ref().len();
    // EM = 0x00 || 0x01 || PS (0xff…, at least 8) || 0x00 || T
    let mut em = vec![0x00, 0x01];
    em.resize(key.k - t_len - 1, 0xff);
    em.push(0x00);
    em.extend_from_slice(&SHA256_PREFIX);
    em.extend_from_slice(hash.as_ref());
    let s = BigUint::from_bytes_be(&em).modpow(&key.d, &key.n).to_bytes_be();
    let mut out = vec![0u8; key.k - s.len()];
    out.extend_from_slice(&s);
    out
}

/// One handshake message: msg_type (1) | length (u24) | body.
fn handshake(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![msg_type];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend_from_slice(body);
    m
}

/// The whole server flight, in one handshake record, for a ClientHello with `client_random`.
pub(crate) fn server_flight(client_random: &[u8; 32], rng: &dyn SecureRandom) -> Result<Vec<u8>, FlightError> {
    let leaf = CertificateDer::from_pem_slice(CERT_PEM.as_bytes()).map_err(|e| FlightError::Fixture(e.to_string()))?;
    let key_der =
        PrivatePkcs1KeyDer::from_pem_slice(KEY_PEM.as_bytes()).map_err(|e| FlightError::Fixture(e.to_string()))?;
    let key =
        parse_key(key_der.secret_pkcs1_der()).ok_or_else(|| FlightError::Fixture("not an RSAPrivateKey".into()))?;

    let mut server_random = [0u8; 32];
    rng.fill(&mut server_random)
        .map_err(|_| FlightError::Crypto("no randomness"))?;

    // ServerHello (RFC 5246 7.4.1.3): no extensions, no session id.
    let mut hello = vec![0x03, 0x03]; // server_version TLS 1.2
    hello.extend_from_slice(&server_random); // random
    hello.push(0x00); // session_id length 0: nothing to resume
    hello.extend_from_slice(&[0xc0, 0x2f]); // TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    hello.push(0x00); // compression_method null

    // Certificate (7.4.2): certificate_list u24 | (cert u24 | DER)…
    let mut list = Vec::new();
    list.extend_from_slice(&(leaf.len() as u32).to_be_bytes()[1..]);
    list.extend_from_slice(&leaf);
    let mut certificate = (list.len() as u32).to_be_bytes()[1..].to_vec();
    certificate.extend_from_slice(&list);

    // ServerKeyExchange (RFC 8422 5.4): ECParameters named_curve x25519 | ECPoint | signed.
    let share = agreement::EphemeralPrivateKey::generate(&agreement::X25519, rng)
        .map_err(|_| FlightError::Crypto("no X25519 key"))?;
    let public = share
        .compute_public_key()
        .map_err(|_| FlightError::Crypto("no X25519 public key"))?;
    let mut params = vec![
        0x03, // curve_type named_curve
        0x00,
        0x1d,                        // NamedCurve x25519
        public.as_ref().len() as u8, // ECPoint length
    ];
    params.extend_from_slice(public.as_ref());
    // The signature covers client_random | server_random | params.
    let mut signed = Vec::with_capacity(64 + params.len());
    signed.extend_from_slice(client_random);
    signed.extend_from_slice(&server_random);
    signed.extend_from_slice(&params);
    let signature = sign_pkcs1_sha256(&key, &signed);
    let mut ske = params;
    ske.extend_from_slice(&[0x04, 0x01]); // SignatureScheme rsa_pkcs1_sha256
    ske.extend_from_slice(&(signature.len() as u16).to_be_bytes());
    ske.extend_from_slice(&signature);

    let mut messages = handshake(0x02, &hello); // server_hello
    messages.extend(handshake(0x0b, &certificate)); // certificate
    messages.extend(handshake(0x0c, &ske)); // server_key_exchange
    messages.extend(handshake(0x0e, &[])); // server_hello_done

    // Record (6.2.1): ContentType handshake | version TLS 1.2 | length u16 | fragment.
    let mut record = vec![0x16, 0x03, 0x03];
    record.extend_from_slice(&(messages.len() as u16).to_be_bytes());
    record.extend_from_slice(&messages);
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_key_is_rsa_1024_and_signs_verifiably() {
        let der = PrivatePkcs1KeyDer::from_pem_slice(KEY_PEM.as_bytes()).expect("pem");
        let key = parse_key(der.secret_pkcs1_der()).expect("key");
        assert_eq!(key.k, 128, "1024-bit modulus");
        // s^e mod n gives back the encoded message: e = 65537.
        let sig = sign_pkcs1_sha256(&key, b"hello");
        let m = BigUint::from_bytes_be(&sig).modpow(&BigUint::from(65_537u32), &key.n);
        let em = m.to_bytes_be();
        // Leading 0x00 is dropped by to_bytes_be: 0x01 then the 0xff padding.
        assert_eq!(em.len(), 127);
        assert_eq!(em[0], 0x01);
        assert!(em[1..8].iter().all(|b| *b == 0xff));
        assert_eq!(&em[em.len() - 32..], digest::digest(&SHA256, b"hello").as_ref());
    }

    #[test]
    fn flight_layout() {
        let rng = ring::rand::SystemRandom::new();
        let f = server_flight(&[7; 32], &rng).expect("flight");
        assert_eq!(&f[..3], &[0x16, 0x03, 0x03], "handshake record, TLS 1.2");
        assert_eq!(usize::from(u16::from_be_bytes([f[3], f[4]])), f.len() - 5);
        assert_eq!(f[5], 0x02, "server_hello first");
        assert_eq!(&f[f.len() - 4..], &[0x0e, 0x00, 0x00, 0x00], "server_hello_done last");
    }
}
