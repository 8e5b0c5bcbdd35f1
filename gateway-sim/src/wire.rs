//! Hand-built wire bytes the simulated targets send, and the small parser for the client's
//! X.224 Connection Request. Every constant is laid out field by field from MS-RDPBCGR
//! (2.2.1.1 / 2.2.1.2), X.224 (ITU-T T.123 / X.224 class 0) and the TLS record layer
//! (RFC 5246), so a reader can check it against the spec. No I/O here.

/// PROTOCOL_RDP: Standard RDP Security.
pub(crate) const PROTOCOL_RDP: u32 = 0x0000_0000;
/// PROTOCOL_SSL: TLS.
pub(crate) const PROTOCOL_SSL: u32 = 0x0000_0001;
/// PROTOCOL_HYBRID: CredSSP (NLA), which implies TLS.
pub(crate) const PROTOCOL_HYBRID: u32 = 0x0000_0002;

/// RDP_NEG_FAILURE SSL_REQUIRED_BY_SERVER.
pub(crate) const SSL_REQUIRED_BY_SERVER: u32 = 1;
/// RDP_NEG_FAILURE HYBRID_REQUIRED_BY_SERVER.
pub(crate) const HYBRID_REQUIRED_BY_SERVER: u32 = 5;

/// Flags a recent Windows server puts in RDP_NEG_RSP: EXTENDED_CLIENT_DATA_SUPPORTED (0x01) |
/// DYNVC_GFX_PROTOCOL_SUPPORTED (0x02) | NEGRSP_FLAG_RESERVED (0x04) |
/// RESTRICTED_ADMIN_MODE_SUPPORTED (0x08) | REDIRECTED_AUTHENTICATION_MODE_SUPPORTED (0x10).
pub(crate) const NEG_RSP_FLAGS_WINDOWS: u8 = 0x1f;

/// Length of a TPKT header.
pub(crate) const TPKT_HEADER_LEN: usize = 4;
/// Largest Connection Request the targets accept (cookie or routing token included).
pub(crate) const MAX_CONNECTION_REQUEST: usize = 1024;

/// X.224 Connection Confirm carrying an RDP_NEG_RSP (MS-RDPBCGR 2.2.1.2.1).
pub(crate) fn confirm_with_neg_rsp(flags: u8, selected_protocol: u32) -> [u8; 19] {
    let p = selected_protocol.to_le_bytes();
    [
        0x03, // TPKT version 3
        0x00, // TPKT reserved
        0x00, 0x13, // TPKT length = 19, big-endian
        0x0e, // X.224 length indicator = 14 (TPKT length - 5)
        0xd0, // X.224 CC TPDU code (Connection Confirm), credit 0
        0x00, 0x00, // DST-REF
        0x12, 0x34,  // SRC-REF (the value Windows sends)
        0x00,  // class 0, no options
        0x02,  // RDP_NEG_RSP type = TYPE_RDP_NEG_RSP
        flags, // RDP_NEG_RSP flags
        0x08, 0x00, // RDP_NEG_RSP length = 8, little-endian
        p[0], p[1], p[2], p[3], // selectedProtocol, u32 little-endian
    ]
}

/// X.224 Connection Confirm carrying an RDP_NEG_FAILURE (MS-RDPBCGR 2.2.1.2.2).
pub(crate) fn confirm_with_neg_failure(failure_code: u32) -> [u8; 19] {
    let c = failure_code.to_le_bytes();
    [
        0x03, // TPKT version 3
        0x00, // TPKT reserved
        0x00, 0x13, // TPKT length = 19, big-endian
        0x0e, // X.224 length indicator = 14
        0xd0, // X.224 CC TPDU code
        0x00, 0x00, // DST-REF
        0x12, 0x34, // SRC-REF
        0x00, // class 0
        0x03, // RDP_NEG_FAILURE type = TYPE_RDP_NEG_FAILURE
        0x00, // flags: none defined, must be 0
        0x08, 0x00, // length = 8, little-endian
        c[0], c[1], c[2], c[3], // failureCode, u32 little-endian
    ]
}

/// X.224 Connection Confirm with no negotiation data: what a pre-RDP-5.2 (Standard RDP
/// Security only) server answers.
pub(crate) const CONFIRM_LEGACY: [u8; 11] = [
    0x03, // TPKT version 3
    0x00, // TPKT reserved
    0x00, 0x0b, // TPKT length = 11, big-endian
    0x06, // X.224 length indicator = 6
    0xd0, // X.224 CC TPDU code
    0x00, 0x00, // DST-REF
    0x12, 0x34, // SRC-REF
    0x00, // class 0
];

/// X.224 Disconnect Request TPDU (X.224 13.5), sent instead of a confirm or a ServerHello.
pub(crate) const DISCONNECT_REQUEST: [u8; 11] = [
    0x03, // TPKT version 3
    0x00, // TPKT reserved
    0x00, 0x0b, // TPKT length = 11, big-endian
    0x06, // X.224 length indicator = 6
    0x80, // X.224 DR TPDU code (Disconnect Request)
    0x00, 0x00, // DST-REF
    0x00, 0x00, // SRC-REF
    0x00, // reason: 0, not specified
];

/// What a web server on the RDP port answers to the binary request.
pub(crate) const GARBAGE_HTTP: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Plain text where a TLS ServerHello should be.
pub(crate) const NOT_TLS_TEXT: &[u8] = b"RDP service unavailable: this is not TLS\r\n";

/// TLS fatal alert handshake_failure (40), TLS 1.2 record version.
pub(crate) const ALERT_HANDSHAKE_FAILURE: [u8; 7] = [
    0x15, // ContentType alert (21)
    0x03, 0x03, // record version TLS 1.2
    0x00, 0x02, // record length = 2
    0x02, // AlertLevel fatal
    0x28, // AlertDescription handshake_failure (40)
];

/// TLS fatal alert protocol_version (70), TLS 1.0 record version (as a TLS 1.0-only server
/// sends it).
pub(crate) const ALERT_PROTOCOL_VERSION: [u8; 7] = [
    0x15, // ContentType alert (21)
    0x03, 0x01, // record version TLS 1.0
    0x00, 0x02, // record length = 2
    0x02, // level fatal
    0x46, // description protocol_version (70)
];

/// TLS fatal alert internal_error (80), TLS 1.2 record version.
pub(crate) const ALERT_INTERNAL_ERROR: [u8; 7] = [
    0x15, // ContentType alert (21)
    0x03, 0x03, // record version TLS 1.2
    0x00, 0x02, // record length = 2
    0x02, // AlertLevel fatal
    0x50, // AlertDescription internal_error (80)
];

/// A TLS 1.0 ServerHello (RFC 2246 7.4.1.3) choosing TLS_RSA_WITH_AES_128_CBC_SHA, as a
/// TLS 1.0-only Schannel answers: no extensions, empty session id.
pub(crate) fn tls10_server_hello(random: &[u8; 32]) -> [u8; 47] {
    let mut out = [0u8; 47];
    let head = [
        0x16, // ContentType handshake (22)
        0x03, 0x01, // record version TLS 1.0
        0x00, 0x2a, // record length = 42 (4 handshake header + 38 body)
        0x02, // HandshakeType server_hello
        0x00, 0x00, 0x26, // handshake length = 38, u24 big-endian
        0x03, 0x01, // server_version TLS 1.0 (legacy_version 0x0301)
    ];
    out[..11].copy_from_slice(&head);
    out[11..43].copy_from_slice(random); // Random: 32 bytes
    let tail = [
        0x00, // session_id length = 0
        0x00, 0x2f, // cipher_suite TLS_RSA_WITH_AES_128_CBC_SHA
        0x00, // compression_method null
    ];
    out[43..].copy_from_slice(&tail);
    out
}

/// What the `line_service` target answers a line: a web server's reply to a request line it
/// cannot parse (RFC 9112 status line, headers, blank line, body).
pub(crate) const LINE_SERVICE_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\n\
Content-Length: 12\r\n\
Connection: close\r\n\
\r\n\
bad request\n";

/// The minimal client request used by the bench's direct handshake: 19 bytes, no cookie,
/// RDP_NEG_REQ asking for `requested` (MS-RDPBCGR 2.2.1.1).
pub(crate) fn connection_request(requested: u32) -> [u8; 19] {
    let r = requested.to_le_bytes();
    [
        0x03, // TPKT version 3
        0x00, // TPKT reserved
        0x00, 0x13, // TPKT length = 19, big-endian
        0x0e, // X.224 length indicator = 14
        0xe0, // X.224 CR TPDU code (Connection Request), credit 0
        0x00, 0x00, // DST-REF
        0x00, 0x00, // SRC-REF
        0x00, // class 0
        0x01, // RDP_NEG_REQ type = TYPE_RDP_NEG_REQ
        0x00, // flags
        0x08, 0x00, // length = 8, little-endian
        r[0], r[1], r[2], r[3], // requestedProtocols, u32 little-endian
    ]
}

/// The parts of a client's X.224 Connection Request a target looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnectionRequest {
    /// `Cookie: mstshash=…` or routing token line, without its CRLF.
    pub(crate) cookie: Option<String>,
    /// requestedProtocols of the RDP_NEG_REQ, if the request carried one.
    pub(crate) requested_protocols: Option<u32>,
}

/// Why a request could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// Not a TPKT version 3 header.
    #[error("not a TPKT v3 header")]
    NotTpkt,
    /// TPKT length outside 11..=MAX_CONNECTION_REQUEST or different from the bytes given.
    #[error("bad TPKT length")]
    BadLength,
    /// Not an X.224 CR TPDU.
    #[error("not an X.224 Connection Request")]
    NotConnectionRequest,
    /// Cookie line without CRLF, or a malformed RDP_NEG_REQ.
    #[error("malformed variable part")]
    Malformed,
}

/// Length announced in a TPKT header (`03 00 len_be16`).
pub(crate) fn tpkt_length(header: &[u8; TPKT_HEADER_LEN]) -> Result<usize, RequestError> {
    // offset 0: version 3; offset 1: reserved
    if header[0] != 0x03 {
        return Err(RequestError::NotTpkt);
    }
    // offset 2..4: whole PDU length, big-endian
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if !(11..=MAX_CONNECTION_REQUEST).contains(&len) {
        return Err(RequestError::BadLength);
    }
    Ok(len)
}

/// Parses a whole Connection Request PDU (TPKT header included).
///
/// ```text
/// 0 TPKT 03 | 1 00 | 2-3 length BE | 4 LI | 5 E0 | 6-7 DST-REF | 8-9 SRC-REF | 10 class
/// 11.. optional "Cookie: mstshash=x\r\n" | optional RDP_NEG_REQ (01 flags 08 00 proto_le32)
/// ```
pub(crate) fn parse_connection_request(pdu: &[u8]) -> Result<ConnectionRequest, RequestError> {
    let header: &[u8; TPKT_HEADER_LEN] = pdu
        .get(..TPKT_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(RequestError::BadLength)?;
    let len = tpkt_length(header)?;
    if len != pdu.len() {
        return Err(RequestError::BadLength);
    }
    // offset 4: length indicator = bytes after it
    if usize::from(pdu[4]) != len - 5 {
        return Err(RequestError::BadLength);
    }
    // offset 5: CR code in the high nibble (low nibble = credit)
    if pdu[5] & 0xf0 != 0xe0 {
        return Err(RequestError::NotConnectionRequest);
    }
    let mut rest = &pdu[11..];
    let mut request = ConnectionRequest::default();
    // A cookie or routing token is ASCII text ending in CRLF; RDP_NEG_REQ starts with 0x01.
    if rest.first().is_some_and(|b| *b != 0x01) {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(RequestError::Malformed)?;
        request.cookie = Some(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end + 2..];
    }
    if let Some(neg) = rest.get(..8) {
        // type 0x01, flags, length u16 LE = 8, requestedProtocols u32 LE
        if neg[0] != 0x01 || u16::from_le_bytes([neg[2], neg[3]]) != 8 {
            return Err(RequestError::Malformed);
        }
        request.requested_protocols = Some(u32::from_le_bytes([neg[4], neg[5], neg[6], neg[7]]));
        // Anything after (RDP_NEG_CORRELATION_INFO) is ignored.
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_minimal_request() {
        let pdu = [
            0x03, 0x00, 0x00, 0x13, 0x0e, 0xe0, 0, 0, 0, 0, 0, 0x01, 0x00, 0x08, 0x00, 0x03, 0, 0, 0,
        ];
        let r = parse_connection_request(&pdu).expect("valid request");
        assert_eq!(r.requested_protocols, Some(3));
        assert_eq!(r.cookie, None);
        assert_eq!(connection_request(3), pdu);
    }

    #[test]
    fn parses_cookie_and_no_negotiation() {
        let mut pdu = vec![0x03, 0x00, 0x00, 0x00, 0x00, 0xe0, 0, 0, 0, 0, 0];
        pdu.extend_from_slice(b"Cookie: mstshash=alice\r\n");
        let len = pdu.len();
        pdu[3] = u8::try_from(len).expect("small");
        pdu[4] = u8::try_from(len - 5).expect("small");
        let r = parse_connection_request(&pdu).expect("valid request");
        assert_eq!(r.cookie.as_deref(), Some("Cookie: mstshash=alice"));
        assert_eq!(r.requested_protocols, None);
    }

    #[test]
    fn rejects_non_tpkt_and_truncation() {
        assert_eq!(
            parse_connection_request(b"GET / HTTP/1.1\r\n\r\n"),
            Err(RequestError::NotTpkt)
        );
        let pdu = connection_request(1);
        for cut in 0..pdu.len() {
            assert!(parse_connection_request(&pdu[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn tls10_server_hello_layout() {
        let hello = tls10_server_hello(&[0xab; 32]);
        assert_eq!(&hello[..5], &[0x16, 0x03, 0x01, 0x00, 0x2a]);
        assert_eq!(usize::from(hello[4]) + 5, hello.len());
        assert_eq!(usize::from(hello[8]) + 9, hello.len());
        assert_eq!(&hello[9..11], &[0x03, 0x01]);
        assert_eq!(&hello[43..], &[0x00, 0x00, 0x2f, 0x00]);
    }
}
