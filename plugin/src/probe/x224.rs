//! X.224 Connection Request / Connection Confirm (MS-RDPBCGR 2.2.1.1, 2.2.1.2), sans I/O.
//!
//! No sockets, no clock: the caller owns the stream and the deadline, feeds the bytes it has
//! read so far to [`decode_server_pdu`], and reads more while the answer is
//! [`Decoded::Incomplete`].
//!
//! ```text
//! TPKT (RFC 1006)            X.224 TPDU (ISO 8073 class 0)
//! +----+----+---------+      +----+------+---------+---------+-------+-----------------+
//! | 03 | 00 | len BE  |      | LI | code | dst-ref | src-ref | class | variable part   |
//! +----+----+---------+      +----+------+---------+---------+-------+-----------------+
//!  0    1    2..4             4    5      6..8      8..10     10      11..len
//! ```
//! Connection Confirm variable part: nothing (legacy server) or 8 bytes of RDP_NEG_RSP
//! (type 0x02) / RDP_NEG_FAILURE (type 0x03): `type u8 | flags u8 | length u16 LE = 8 |
//! value u32 LE`.

use std::fmt;

/// Security protocol bits of `requestedProtocols` / `selectedProtocol`.
pub mod protocol {
    /// Standard RDP Security.
    pub const RDP: u32 = 0x0000_0000;
    /// TLS.
    pub const SSL: u32 = 0x0000_0001;
    /// CredSSP (NLA).
    pub const HYBRID: u32 = 0x0000_0002;
    /// RDSTLS.
    pub const RDSTLS: u32 = 0x0000_0004;
    /// CredSSP with Early User Authorization Result.
    pub const HYBRID_EX: u32 = 0x0000_0008;
    /// Azure AD authentication.
    pub const RDSAAD: u32 = 0x0000_0010;

    /// Human name of a single protocol value (raw hex for unknown values).
    pub fn name(p: u32) -> String {
        match p {
            RDP => "RDP".into(),
            SSL => "SSL".into(),
            HYBRID => "HYBRID".into(),
            RDSTLS => "RDSTLS".into(),
            HYBRID_EX => "HYBRID_EX".into(),
            RDSAAD => "RDSAAD".into(),
            other => format!("0x{other:08x}"),
        }
    }

    /// Names of the bits in a requestedProtocols mask (`RDP` for 0).
    pub fn names(mask: u32) -> String {
        if mask == RDP {
            return "RDP".into();
        }
        let mut out = Vec::new();
        for bit in 0..32 {
            let b = 1u32 << bit;
            if mask & b != 0 {
                out.push(name(b));
            }
        }
        out.join("|")
    }

    /// Strength rank for policy comparisons; `None` for values that are not one known protocol.
    pub fn strength(p: u32) -> Option<u8> {
        match p {
            RDP => Some(0),
            SSL => Some(1),
            RDSTLS => Some(2),
            HYBRID | RDSAAD => Some(3),
            HYBRID_EX => Some(4),
            _ => None,
        }
    }

    /// True when the protocol runs inside TLS (the TLS stage applies).
    pub fn uses_tls(p: u32) -> bool {
        matches!(p, SSL | HYBRID | HYBRID_EX | RDSTLS | RDSAAD)
    }
}

/// RDP_NEG_FAILURE failure codes (kept raw in [`Confirm::Failure`]).
pub mod failure {
    /// The server requires TLS.
    pub const SSL_REQUIRED_BY_SERVER: u32 = 1;
    /// The server allows only Standard RDP Security.
    pub const SSL_NOT_ALLOWED_BY_SERVER: u32 = 2;
    /// The server has no usable certificate.
    pub const SSL_CERT_NOT_ON_SERVER: u32 = 3;
    /// Inconsistent flags.
    pub const INCONSISTENT_FLAGS: u32 = 4;
    /// The server requires NLA.
    pub const HYBRID_REQUIRED_BY_SERVER: u32 = 5;
    /// The server requires TLS with user authentication.
    pub const SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER: u32 = 6;

    /// Spec name of a failure code, when known.
    pub fn name(code: u32) -> Option<&'static str> {
        Some(match code {
            SSL_REQUIRED_BY_SERVER => "SSL_REQUIRED_BY_SERVER",
            SSL_NOT_ALLOWED_BY_SERVER => "SSL_NOT_ALLOWED_BY_SERVER",
            SSL_CERT_NOT_ON_SERVER => "SSL_CERT_NOT_ON_SERVER",
            INCONSISTENT_FLAGS => "INCONSISTENT_FLAGS",
            HYBRID_REQUIRED_BY_SERVER => "HYBRID_REQUIRED_BY_SERVER",
            SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER => "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
            _ => return None,
        })
    }
}

const TPKT_VERSION: u8 = 0x03;
const TPKT_HEADER_LEN: usize = 4;
/// TPKT header + LI + code + dst-ref + src-ref + class.
const X224_FIXED_LEN: usize = 11;
const TPDU_CR: u8 = 0xE0;
const TPDU_CC: u8 = 0xD0;
const TPDU_DR: u8 = 0x80;
const NEG_REQ: u8 = 0x01;
const NEG_RSP: u8 = 0x02;
const NEG_FAILURE: u8 = 0x03;
const NEG_LEN: usize = 8;
/// A Connection Confirm is at most 19 bytes; allow slack for odd servers, refuse junk lengths.
const MAX_SERVER_PDU: usize = 512;
/// Longest `mstshash` cookie value accepted for encoding.
pub const MAX_COOKIE_LEN: usize = 64;

/// Encodes an X.224 Connection Request with an optional `Cookie: mstshash=<id>` and an
/// RDP_NEG_REQ carrying `requested` (flags 0).
pub fn encode_connection_request(cookie: Option<&str>, requested: u32) -> Result<Vec<u8>, EncodeError> {
    let cookie_line = match cookie {
        Some(c) if c.len() > MAX_COOKIE_LEN => return Err(EncodeError::CookieTooLong(c.len())),
        Some(c) if !c.bytes().all(|b| b.is_ascii_graphic()) => return Err(EncodeError::CookieNotPrintable),
        Some(c) => format!("Cookie: mstshash={c}\r\n"),
        None => String::new(),
    };
    let total = X224_FIXED_LEN + cookie_line.len() + NEG_LEN;
    let total_u16 = u16::try_from(total).map_err(|_| EncodeError::CookieTooLong(cookie_line.len()))?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&[TPKT_VERSION, 0x00]); // TPKT version 3, reserved
    out.extend_from_slice(&total_u16.to_be_bytes()); // TPKT length, big-endian
    out.push((total - 5) as u8); // LI: bytes after itself (total fits in u8 by the checks above)
    out.push(TPDU_CR); // CR TPDU code, CDT 0
    out.extend_from_slice(&[0, 0, 0, 0, 0]); // DST-REF, SRC-REF, class 0
    out.extend_from_slice(cookie_line.as_bytes());
    out.push(NEG_REQ); // RDP_NEG_REQ
    out.push(0); // flags
    out.extend_from_slice(&(NEG_LEN as u16).to_le_bytes()); // length 8, little-endian
    out.extend_from_slice(&requested.to_le_bytes()); // requestedProtocols, little-endian
    Ok(out)
}

/// The request could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Cookie longer than [`MAX_COOKIE_LEN`].
    #[error("mstshash cookie is {0} bytes, at most {MAX_COOKIE_LEN} allowed")]
    CookieTooLong(usize),
    /// Cookie with spaces, control characters or non-ASCII.
    #[error("mstshash cookie must be printable ASCII without spaces")]
    CookieNotPrintable,
}

/// What the server answered to the Connection Request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerPdu {
    /// A Connection Confirm.
    Confirm(Confirm),
    /// An X.224 Disconnect Request; `reason` is the DR reason byte when present.
    Disconnect {
        /// DR reason octet.
        reason: Option<u8>,
    },
}

/// The body of a Connection Confirm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// RDP_NEG_RSP.
    Negotiated {
        /// Flags byte, raw.
        flags: u8,
        /// selectedProtocol, raw.
        selected: u32,
    },
    /// RDP_NEG_FAILURE.
    Failure {
        /// Flags byte, raw.
        flags: u8,
        /// failureCode, raw (see [`failure`]).
        code: u32,
    },
    /// No negotiation data: a legacy server speaking Standard RDP Security only.
    Legacy,
}

/// Result of feeding bytes to the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed; at least this many in total.
    Incomplete(usize),
    /// A whole PDU, and how many bytes it used.
    Complete(ServerPdu, usize),
}

/// The server's bytes are not an X.224 answer from an RDP server.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// First byte is not TPKT version 3 (another service, a proxy page, garbage).
    #[error("not a TPKT header (first bytes {first_bytes})")]
    NotTpkt {
        /// Hex of up to 16 leading bytes.
        first_bytes: String,
    },
    /// TPKT length out of range.
    #[error("TPKT length {0} out of range")]
    BadTpktLength(usize),
    /// Length indicator disagrees with the TPKT length.
    #[error("X.224 length indicator {li} does not match TPKT length {tpkt_len}")]
    BadLengthIndicator {
        /// LI byte.
        li: u8,
        /// TPKT length.
        tpkt_len: usize,
    },
    /// A TPDU that is neither a Connection Confirm nor a Disconnect Request.
    #[error("unexpected X.224 TPDU code 0x{0:02x}")]
    UnexpectedTpdu(u8),
    /// Negotiation data of an unknown type.
    #[error("unknown negotiation type 0x{0:02x}")]
    BadNegotiationType(u8),
    /// Negotiation structure whose length field is not 8.
    #[error("negotiation length {0}, expected 8")]
    BadNegotiationLength(u16),
    /// Variable part of an unexpected size.
    #[error("connection confirm has {0} bytes of variable data, expected 0 or 8")]
    BadVariablePart(usize),
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter()
        .take(16)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decodes the server's answer to a Connection Request from the bytes read so far.
///
/// Garbage is rejected as soon as the first byte shows it, without waiting for more input.
pub fn decode_server_pdu(buf: &[u8]) -> Result<Decoded, DecodeError> {
    // TPKT header: version 3, reserved 0, length big-endian.
    match buf {
        [] => return Ok(Decoded::Incomplete(TPKT_HEADER_LEN)),
        [v, ..] if *v != TPKT_VERSION => {
            return Err(DecodeError::NotTpkt {
                first_bytes: hex_prefix(buf),
            })
        }
        [_, r, ..] if *r != 0 => {
            return Err(DecodeError::NotTpkt {
                first_bytes: hex_prefix(buf),
            })
        }
        _ if buf.len() < TPKT_HEADER_LEN => return Ok(Decoded::Incomplete(TPKT_HEADER_LEN)),
        _ => {}
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    // Smallest TPDU we accept: LI + code (a DR is at least 7 bytes of TPDU; a CC 7).
    if !(TPKT_HEADER_LEN + 2..=MAX_SERVER_PDU).contains(&len) {
        return Err(DecodeError::BadTpktLength(len));
    }
    if buf.len() < len {
        return Ok(Decoded::Incomplete(len));
    }
    let pdu = &buf[..len];
    // X.224: length indicator counts the bytes after itself.
    let li = pdu[4];
    if usize::from(li) != len - 5 {
        return Err(DecodeError::BadLengthIndicator { li, tpkt_len: len });
    }
    let code = pdu[5] & 0xF0; // low nibble is CDT / credit
    match code {
        TPDU_CC => decode_confirm(pdu).map(|c| Decoded::Complete(ServerPdu::Confirm(c), len)),
        // DR: code | dst-ref(2) | src-ref(2) | reason(1)
        TPDU_DR => Ok(Decoded::Complete(
            ServerPdu::Disconnect {
                reason: pdu.get(10).copied(),
            },
            len,
        )),
        _ => Err(DecodeError::UnexpectedTpdu(pdu[5])),
    }
}

fn decode_confirm(pdu: &[u8]) -> Result<Confirm, DecodeError> {
    if pdu.len() < X224_FIXED_LEN {
        return Err(DecodeError::BadTpktLength(pdu.len()));
    }
    // DST-REF (6..8), SRC-REF (8..10) and class (10) carry nothing for RDP: ignored.
    let var = &pdu[X224_FIXED_LEN..];
    if var.is_empty() {
        return Ok(Confirm::Legacy);
    }
    if var.len() != NEG_LEN {
        return Err(DecodeError::BadVariablePart(var.len()));
    }
    let kind = var[0];
    let flags = var[1];
    let length = u16::from_le_bytes([var[2], var[3]]);
    let value = u32::from_le_bytes([var[4], var[5], var[6], var[7]]);
    if usize::from(length) != NEG_LEN {
        return Err(DecodeError::BadNegotiationLength(length));
    }
    match kind {
        NEG_RSP => Ok(Confirm::Negotiated { flags, selected: value }),
        NEG_FAILURE => Ok(Confirm::Failure { flags, code: value }),
        other => Err(DecodeError::BadNegotiationType(other)),
    }
}

/// Why a selected protocol is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downgrade {
    /// The server selected a protocol the client did not offer.
    NotRequested,
    /// The server selected a protocol weaker than the policy minimum.
    BelowMinimum,
}

impl fmt::Display for Downgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Downgrade::NotRequested => "selected a protocol that was not requested",
            Downgrade::BelowMinimum => "selected a protocol weaker than the policy minimum",
        })
    }
}

/// Compares the server's selection with what was requested and with the policy minimum
/// (a single protocol value; `None` = the weakest requested protocol).
pub fn judge_selection(requested: u32, selected: u32, minimum: Option<u32>) -> Result<(), Downgrade> {
    let offered = if requested == protocol::RDP {
        selected == protocol::RDP
    } else {
        selected != protocol::RDP && selected.count_ones() == 1 && selected & !requested == 0
    };
    if !offered {
        return Err(Downgrade::NotRequested);
    }
    if let (Some(min), Some(got)) = (minimum.and_then(protocol::strength), protocol::strength(selected)) {
        if got < min {
            return Err(Downgrade::BelowMinimum);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MS-RDPBCGR 2.2.1.1, minimal request with negotiation, SSL|HYBRID, no cookie.
    const CR_SSL_HYBRID: [u8; 19] = [
        0x03, 0x00, // TPKT version 3, reserved
        0x00, 0x13, // TPKT length 19, big-endian
        0x0e, // LI = 14
        0xe0, // CR TPDU
        0x00, 0x00, // DST-REF
        0x00, 0x00, // SRC-REF
        0x00, // class 0
        0x01, // RDP_NEG_REQ
        0x00, // flags
        0x08, 0x00, // length 8, little-endian
        0x03, 0x00, 0x00, 0x00, // requestedProtocols SSL|HYBRID, little-endian
    ];

    /// Connection Confirm with RDP_NEG_RSP selecting HYBRID, flags 0x1f.
    const CC_HYBRID: [u8; 19] = [
        0x03, 0x00, 0x00, 0x13, // TPKT, length 19
        0x0e, 0xd0, // LI 14, CC
        0x00, 0x00, 0x12, 0x34, // DST-REF 0, SRC-REF 0x1234 (ignored)
        0x00, // class
        0x02, // RDP_NEG_RSP
        0x1f, // flags: EXTENDED_CLIENT_DATA | GFX | … (raw)
        0x08, 0x00, // length 8
        0x02, 0x00, 0x00, 0x00, // selectedProtocol HYBRID
    ];

    /// Connection Confirm with RDP_NEG_FAILURE SSL_CERT_NOT_ON_SERVER.
    const CC_FAILURE_3: [u8; 19] = [
        0x03, 0x00, 0x00, 0x13, 0x0e, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x03, // RDP_NEG_FAILURE
        0x00, // flags
        0x08, 0x00, // length 8
        0x03, 0x00, 0x00, 0x00, // failureCode 3
    ];

    /// Legacy Connection Confirm: no negotiation data, TPKT length 11.
    const CC_LEGACY: [u8; 11] = [0x03, 0x00, 0x00, 0x0b, 0x06, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x00];

    /// X.224 Disconnect Request: LI 6, DR, DST-REF, SRC-REF, reason 0x00.
    const DR: [u8; 11] = [0x03, 0x00, 0x00, 0x0b, 0x06, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00];

    #[test]
    fn request_matches_the_spec_vector() {
        let got = encode_connection_request(None, protocol::SSL | protocol::HYBRID).expect("encodes");
        assert_eq!(got, CR_SSL_HYBRID);
    }

    #[test]
    fn request_with_cookie() {
        let got = encode_connection_request(Some("gw"), protocol::SSL).expect("encodes");
        let cookie = b"Cookie: mstshash=gw\r\n";
        assert_eq!(got.len(), 19 + cookie.len());
        assert_eq!(&got[2..4], &(got.len() as u16).to_be_bytes());
        assert_eq!(usize::from(got[4]), got.len() - 5);
        assert_eq!(&got[11..11 + cookie.len()], cookie);
        assert_eq!(&got[got.len() - 8..], &[0x01, 0x00, 0x08, 0x00, 0x01, 0x00, 0x00, 0x00]);
        assert_eq!(
            encode_connection_request(Some("a b"), 1),
            Err(EncodeError::CookieNotPrintable)
        );
        assert!(matches!(
            encode_connection_request(Some(&"x".repeat(65)), 1),
            Err(EncodeError::CookieTooLong(65))
        ));
    }

    #[test]
    fn golden_confirms() {
        let c = |b: &[u8]| decode_server_pdu(b).expect("decodes");
        assert_eq!(
            c(&CC_HYBRID),
            Decoded::Complete(
                ServerPdu::Confirm(Confirm::Negotiated {
                    flags: 0x1f,
                    selected: 2
                }),
                19
            )
        );
        assert_eq!(
            c(&CC_FAILURE_3),
            Decoded::Complete(ServerPdu::Confirm(Confirm::Failure { flags: 0, code: 3 }), 19)
        );
        assert_eq!(
            c(&CC_LEGACY),
            Decoded::Complete(ServerPdu::Confirm(Confirm::Legacy), 11)
        );
        assert_eq!(c(&DR), Decoded::Complete(ServerPdu::Disconnect { reason: Some(0) }, 11));
    }

    #[test]
    fn unknown_failure_code_and_flags_are_kept_raw() {
        let mut b = CC_FAILURE_3;
        b[12] = 0xa5;
        b[15..19].copy_from_slice(&0x0000_0063u32.to_le_bytes());
        assert_eq!(
            decode_server_pdu(&b),
            Ok(Decoded::Complete(
                ServerPdu::Confirm(Confirm::Failure { flags: 0xa5, code: 99 }),
                19
            ))
        );
    }

    #[test]
    fn trailing_bytes_after_the_pdu_are_left_to_the_caller() {
        let mut b = CC_HYBRID.to_vec();
        b.extend_from_slice(&[0x16, 0x03, 0x03]);
        assert!(matches!(decode_server_pdu(&b), Ok(Decoded::Complete(_, 19))));
    }

    #[test]
    fn garbage_is_rejected_at_the_first_byte() {
        assert!(matches!(decode_server_pdu(b"H"), Err(DecodeError::NotTpkt { .. })));
        let e = decode_server_pdu(b"HTTP/1.1 400 Bad Request\r\n").expect_err("garbage");
        assert_eq!(
            e,
            DecodeError::NotTpkt {
                first_bytes: "48 54 54 50 2f 31 2e 31 20 34 30 30 20 42 61 64".into()
            }
        );
        assert!(matches!(
            decode_server_pdu(&[0x03, 0x01]),
            Err(DecodeError::NotTpkt { .. })
        ));
        // A TLS record where a confirm should be.
        assert!(matches!(
            decode_server_pdu(&[0x16, 0x03, 0x01, 0x00]),
            Err(DecodeError::NotTpkt { .. })
        ));
    }

    #[test]
    fn malformed_confirms() {
        assert_eq!(decode_server_pdu(&[3, 0, 0, 5, 0]), Err(DecodeError::BadTpktLength(5)));
        assert_eq!(
            decode_server_pdu(&[3, 0, 0xff, 0xff]),
            Err(DecodeError::BadTpktLength(65535))
        );
        let mut b = CC_HYBRID;
        b[4] = 0x0d;
        assert_eq!(
            decode_server_pdu(&b),
            Err(DecodeError::BadLengthIndicator { li: 0x0d, tpkt_len: 19 })
        );
        let mut b = CC_HYBRID;
        b[5] = 0xf0; // DT TPDU
        assert_eq!(decode_server_pdu(&b), Err(DecodeError::UnexpectedTpdu(0xf0)));
        let mut b = CC_HYBRID;
        b[11] = 0x07;
        assert_eq!(decode_server_pdu(&b), Err(DecodeError::BadNegotiationType(7)));
        let mut b = CC_HYBRID;
        b[13] = 0x09;
        assert_eq!(decode_server_pdu(&b), Err(DecodeError::BadNegotiationLength(9)));
        let b = [3, 0, 0, 15, 10, 0xd0, 0, 0, 0, 0, 0, 2, 0, 8, 0];
        assert_eq!(decode_server_pdu(&b), Err(DecodeError::BadVariablePart(4)));
    }

    #[test]
    fn one_byte_at_a_time_and_every_split_give_the_same_result() {
        for golden in [&CC_HYBRID[..], &CC_FAILURE_3, &CC_LEGACY, &DR] {
            let whole = decode_server_pdu(golden);
            // Growing prefix, as a socket delivering one byte at a time would.
            for n in 0..golden.len() {
                match decode_server_pdu(&golden[..n]) {
                    Ok(Decoded::Incomplete(need)) => assert!(need > n, "need {need} at {n}"),
                    other => panic!("prefix of {n} bytes gave {other:?}"),
                }
            }
            // Every split into two reads ends at the same answer once joined.
            for split in 0..=golden.len() {
                let mut buf = golden[..split].to_vec();
                let first = decode_server_pdu(&buf);
                if split < golden.len() {
                    assert!(matches!(first, Ok(Decoded::Incomplete(_))));
                }
                buf.extend_from_slice(&golden[split..]);
                assert_eq!(decode_server_pdu(&buf), whole);
            }
        }
    }

    #[test]
    fn selection_policy() {
        use protocol::*;
        assert_eq!(judge_selection(SSL | HYBRID, HYBRID, None), Ok(()));
        assert_eq!(judge_selection(SSL | HYBRID, SSL, None), Ok(()));
        assert_eq!(judge_selection(SSL | HYBRID, RDP, None), Err(Downgrade::NotRequested));
        assert_eq!(judge_selection(SSL, HYBRID, None), Err(Downgrade::NotRequested));
        assert_eq!(
            judge_selection(SSL | HYBRID, SSL | HYBRID, None),
            Err(Downgrade::NotRequested)
        );
        assert_eq!(
            judge_selection(SSL | HYBRID, SSL, Some(HYBRID)),
            Err(Downgrade::BelowMinimum)
        );
        assert_eq!(judge_selection(RDP, RDP, None), Ok(()));
        assert_eq!(protocol::names(SSL | HYBRID), "SSL|HYBRID");
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_server_pdu(&bytes);
        }

        #[test]
        fn tpkt_shaped_input_never_panics(len in 0u16..40, body in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let mut b = vec![3, 0];
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&body);
            let _ = decode_server_pdu(&b);
        }
    }
}
