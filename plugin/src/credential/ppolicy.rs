//! The LDAP password-policy response control (draft-behera-ldap-password-policy), decoded by
//! hand: it is small, and the decoder must never panic on whatever a server sends.
//!
//! ```text
//! PasswordPolicyResponseValue ::= SEQUENCE {
//!     warning [0] CHOICE {
//!         timeBeforeExpiration [0] INTEGER (0 .. maxInt),
//!         graceAuthNsRemaining [1] INTEGER (0 .. maxInt) } OPTIONAL,
//!     error   [1] ENUMERATED {
//!         passwordExpired (0), accountLocked (1), changeAfterReset (2),
//!         passwordModNotAllowed (3), mustSupplyOldPassword (4),
//!         insufficientPasswordQuality (5), passwordTooShort (6),
//!         passwordTooYoung (7), passwordInHistory (8) } OPTIONAL }
//! ```
//!
//! On the wire (BER, implicit tags; a CHOICE is always explicitly tagged): `30 len`, then
//! optionally `A0 len (80|81) len INTEGER-bytes`, then optionally `81 len ENUM-bytes`.

use std::fmt;

/// OID of the request and response control.
pub const OID_PASSWORD_POLICY: &str = "1.3.6.1.4.1.42.2.27.8.5.1";

/// The `warning` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PpolicyWarning {
    /// Seconds until the password expires.
    TimeBeforeExpiration(i64),
    /// Grace logins left after expiry.
    GraceAuthNsRemaining(i64),
}

impl fmt::Display for PpolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PpolicyWarning::TimeBeforeExpiration(s) => write!(f, "timeBeforeExpiration={s}"),
            PpolicyWarning::GraceAuthNsRemaining(n) => write!(f, "graceAuthNsRemaining={n}"),
        }
    }
}

/// The `error` enumeration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PpolicyError {
    /// 0
    PasswordExpired,
    /// 1
    AccountLocked,
    /// 2 (the bind itself succeeds)
    ChangeAfterReset,
    /// 3 to 8, or a value outside the draft: kept raw.
    Other(i64),
}

impl PpolicyError {
    fn from_raw(v: i64) -> Self {
        match v {
            0 => PpolicyError::PasswordExpired,
            1 => PpolicyError::AccountLocked,
            2 => PpolicyError::ChangeAfterReset,
            v => PpolicyError::Other(v),
        }
    }

    /// The raw enumeration value.
    pub fn raw(self) -> i64 {
        match self {
            PpolicyError::PasswordExpired => 0,
            PpolicyError::AccountLocked => 1,
            PpolicyError::ChangeAfterReset => 2,
            PpolicyError::Other(v) => v,
        }
    }
}

impl fmt::Display for PpolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.raw() {
            0 => "passwordExpired",
            1 => "accountLocked",
            2 => "changeAfterReset",
            3 => "passwordModNotAllowed",
            4 => "mustSupplyOldPassword",
            5 => "insufficientPasswordQuality",
            6 => "passwordTooShort",
            7 => "passwordTooYoung",
            8 => "passwordInHistory",
            _ => "unknown",
        };
        write!(f, "{name}({})", self.raw())
    }
}

/// A decoded response value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PpolicyResponse {
    /// The warning, if any.
    pub warning: Option<PpolicyWarning>,
    /// The error, if any.
    pub error: Option<PpolicyError>,
}

/// Why a response value could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Ran out of bytes.
    Truncated,
    /// A tag other than the ones the ASN.1 allows where it matters.
    UnexpectedTag(u8),
    /// Indefinite or over-long length.
    BadLength,
    /// INTEGER / ENUMERATED empty or wider than 8 bytes.
    BadInteger,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated"),
            DecodeError::UnexpectedTag(t) => write!(f, "unexpected tag 0x{t:02x}"),
            DecodeError::BadLength => f.write_str("bad length"),
            DecodeError::BadInteger => f.write_str("bad integer"),
        }
    }
}

/// Reads one TLV: returns (tag, value, rest). Single-byte tags only (all this control uses).
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), DecodeError> {
    let (&tag, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
    if tag & 0x1f == 0x1f {
        // Multi-byte tag numbers never appear in this control.
        return Err(DecodeError::UnexpectedTag(tag));
    }
    let (&first, mut rest) = rest.split_first().ok_or(DecodeError::Truncated)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            // 0x80 = indefinite length (not allowed in LDAP's BER); > 4 bytes is absurd here.
            return Err(DecodeError::BadLength);
        }
        if rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (len_bytes, r) = rest.split_at(n);
        rest = r;
        len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (value, rest) = rest.split_at(len);
    Ok((tag, value, rest))
}

/// Two's-complement big-endian, 1 to 8 bytes.
fn integer(bytes: &[u8]) -> Result<i64, DecodeError> {
    if bytes.is_empty() || bytes.len() > 8 {
        return Err(DecodeError::BadInteger);
    }
    let negative = bytes[0] & 0x80 != 0;
    let mut v: i64 = if negative { -1 } else { 0 };
    for b in bytes {
        v = (v << 8) | i64::from(*b);
    }
    Ok(v)
}

/// Decodes a PasswordPolicyResponseValue. Unknown context tags inside the sequence are skipped
/// (extensibility); bytes after the outer sequence are ignored.
pub fn decode(value: &[u8]) -> Result<PpolicyResponse, DecodeError> {
    let (tag, mut body, _trailing) = tlv(value)?;
    if tag != 0x30 {
        return Err(DecodeError::UnexpectedTag(tag));
    }
    let mut out = PpolicyResponse::default();
    while !body.is_empty() {
        let (tag, v, rest) = tlv(body)?;
        body = rest;
        match tag {
            // warning [0], constructed (explicit tag around the CHOICE)
            0xa0 => {
                let (inner, iv, _) = tlv(v)?;
                out.warning = Some(match inner {
                    0x80 => PpolicyWarning::TimeBeforeExpiration(integer(iv)?),
                    0x81 => PpolicyWarning::GraceAuthNsRemaining(integer(iv)?),
                    t => return Err(DecodeError::UnexpectedTag(t)),
                });
            }
            // error [1], primitive (implicit ENUMERATED)
            0x81 => out.error = Some(PpolicyError::from_raw(integer(v)?)),
            // error [1] sent constructed around a universal ENUMERATED: tolerated
            0xa1 => {
                let (inner, iv, _) = tlv(v)?;
                if inner != 0x0a {
                    return Err(DecodeError::UnexpectedTag(inner));
                }
                out.error = Some(PpolicyError::from_raw(integer(iv)?));
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sequence_means_nothing_to_say() {
        // 30 00: SEQUENCE, length 0 (OpenLDAP sends this on a plain success)
        assert_eq!(decode(&[0x30, 0x00]), Ok(PpolicyResponse::default()));
    }

    #[test]
    fn time_before_expiration() {
        let bytes = [
            0x30, 0x07, // SEQUENCE, 7 bytes
            0xa0, 0x05, // warning [0] constructed, 5 bytes
            0x80, 0x03, // timeBeforeExpiration [0] INTEGER, 3 bytes
            0x06, 0x97, 0x7f, // 431999 seconds (0x06977f)
        ];
        let r = decode(&bytes).expect("decodes");
        assert_eq!(r.warning, Some(PpolicyWarning::TimeBeforeExpiration(431_999)));
        assert_eq!(r.error, None);
    }

    #[test]
    fn grace_logins_remaining() {
        let bytes = [
            0x30, 0x05, // SEQUENCE, 5 bytes
            0xa0, 0x03, // warning [0]
            0x81, 0x01, // graceAuthNsRemaining [1] INTEGER, 1 byte
            0x02, // 2 grace logins
        ];
        let r = decode(&bytes).expect("decodes");
        assert_eq!(r.warning, Some(PpolicyWarning::GraceAuthNsRemaining(2)));
    }

    #[test]
    fn each_error() {
        for (raw, want) in [
            (0u8, PpolicyError::PasswordExpired),
            (1, PpolicyError::AccountLocked),
            (2, PpolicyError::ChangeAfterReset),
            (8, PpolicyError::Other(8)),
        ] {
            let bytes = [
                0x30, 0x03, // SEQUENCE, 3 bytes
                0x81, 0x01, // error [1] ENUMERATED (implicit), 1 byte
                raw,  // the value
            ];
            assert_eq!(decode(&bytes).expect("decodes").error, Some(want));
        }
    }

    #[test]
    fn warning_and_error_together() {
        let bytes = [
            0x30, 0x08, // SEQUENCE, 8 bytes
            0xa0, 0x03, // warning [0]
            0x81, 0x01, 0x00, // graceAuthNsRemaining 0
            0x81, 0x01, 0x00, // error passwordExpired
        ];
        let r = decode(&bytes).expect("decodes");
        assert_eq!(r.warning, Some(PpolicyWarning::GraceAuthNsRemaining(0)));
        assert_eq!(r.error, Some(PpolicyError::PasswordExpired));
    }

    #[test]
    fn long_form_lengths_and_unknown_elements() {
        let bytes = [
            0x30, 0x81, 0x07, // SEQUENCE, long-form length 7
            0x82, 0x02, 0xff, 0xff, // unknown [2] primitive: skipped
            0x81, 0x01, 0x01, // error accountLocked
        ];
        assert_eq!(
            decode(&bytes).expect("decodes").error,
            Some(PpolicyError::AccountLocked)
        );
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x30],
            &[0x30, 0x05, 0xa0],
            &[0x30, 0x80, 0x00, 0x00],                            // indefinite length
            &[0x30, 0x85, 1, 1, 1, 1, 1],                         // 5-byte length
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],                // length far past the end
            &[0x04, 0x00],                                        // not a SEQUENCE
            &[0x30, 0x02, 0x81, 0x00],                            // empty ENUMERATED
            &[0x30, 0x0b, 0x81, 0x09, 1, 2, 3, 4, 5, 6, 7, 8, 9], // 9-byte integer
            &[0x30, 0x04, 0xa0, 0x02, 0x85, 0x00],                // unknown warning choice
            &[0x1f, 0x81, 0x00],                                  // multi-byte tag
        ];
        for c in cases {
            assert!(decode(c).is_err(), "{c:02x?}");
        }
    }

    #[test]
    fn negative_integers_are_sign_extended() {
        assert_eq!(integer(&[0xff]), Ok(-1));
        assert_eq!(integer(&[0x00, 0x80]), Ok(128));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode(&bytes);
            let mut framed = vec![0x30, bytes.len().min(127) as u8];
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }
    }
}
