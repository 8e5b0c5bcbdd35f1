//! The X.224 stage: send the Connection Request, read the answer, judge it.
//!
//! [`judge`] is pure: the decoded answer, what was requested and the policy minimum in, the
//! findings and the negotiated facts out. [`exchange`] owns the socket I/O.

use std::{io, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::x224::{self, protocol, Confirm, ServerPdu};
use crate::{cause::Cause, report::Finding};

/// What the confirm means, as far as the probe cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Findings, most important first.
    pub findings: Vec<Finding>,
    /// selectedProtocol (Standard RDP Security for a legacy confirm).
    pub selected: Option<u32>,
    /// Flags of RDP_NEG_RSP / RDP_NEG_FAILURE.
    pub flags: Option<u8>,
    /// RDP_NEG_FAILURE failureCode.
    pub failure_code: Option<u32>,
    /// One line for the stage record.
    pub detail: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Judges the server's answer to a Connection Request that offered `requested`, against the
/// policy `minimum` (`None`: no minimum beyond what was requested).
///
/// A legacy confirm (no negotiation data) is Standard RDP Security selected by a server that
/// ignored the negotiation: it is judged against the minimum like any selection.
pub fn judge(requested: u32, minimum: Option<u32>, pdu: ServerPdu, bytes: &[u8]) -> Judgement {
    let raw = hex(bytes);
    let downgrade = |d: x224::Downgrade, selected: u32| {
        Finding::new(
            Cause::NegSecurityDowngrade,
            format!("the target {d}: {}", protocol::name(selected)),
        )
        .with("requested_protocols", protocol::names(requested))
        .with("selected_protocol", protocol::name(selected))
        .with("minimum_protocol", minimum.map_or("none".into(), protocol::name))
    };
    match pdu {
        ServerPdu::Disconnect { reason } => Judgement {
            findings: vec![Finding::new(
                Cause::X224Closed,
                "the target answered the connection request with an X.224 Disconnect Request",
            )
            .with("dr_reason", reason.map_or("none".into(), |r| r.to_string()))
            .with("confirm_bytes", raw)],
            detail: "disconnect request".into(),
            ..Judgement::default()
        },
        ServerPdu::Confirm(Confirm::Legacy) => {
            let mut findings = Vec::new();
            // The server did not read the request's negotiation data, so "not requested" does
            // not apply; the policy minimum does.
            if let Err(d) = x224::judge_selection(protocol::RDP, protocol::RDP, minimum) {
                findings.push(
                    downgrade(d, protocol::RDP)
                        .with("legacy_confirm", true)
                        .with("confirm_bytes", &raw),
                );
            }
            findings.push(
                Finding::new(
                    Cause::NegLegacyServer,
                    "the target answered without negotiation data: Standard RDP Security only",
                )
                .with("confirm_bytes", raw),
            );
            Judgement {
                findings,
                selected: Some(protocol::RDP),
                detail: "legacy confirm (no negotiation data)".into(),
                ..Judgement::default()
            }
        }
        ServerPdu::Confirm(Confirm::Failure { flags, code }) => {
            let name = x224::failure::name(code).unwrap_or("unknown");
            let cause = match code {
                x224::failure::SSL_REQUIRED_BY_SERVER => Cause::NegSslRequired,
                x224::failure::SSL_NOT_ALLOWED_BY_SERVER => Cause::NegSslNotAllowed,
                x224::failure::SSL_CERT_NOT_ON_SERVER => Cause::NegSslCertNotOnServer,
                x224::failure::HYBRID_REQUIRED_BY_SERVER => Cause::NegHybridRequired,
                _ => Cause::NegFailureOther,
            };
            Judgement {
                findings: vec![Finding::new(
                    cause,
                    format!("the target refused the negotiation: RDP_NEG_FAILURE {code} ({name})"),
                )
                .with("failure_code", code)
                .with("failure_name", name)
                .with("flags", format!("0x{flags:02x}"))
                .with("requested_protocols", protocol::names(requested))],
                flags: Some(flags),
                failure_code: Some(code),
                detail: format!("RDP_NEG_FAILURE {code}"),
                ..Judgement::default()
            }
        }
        ServerPdu::Confirm(Confirm::Negotiated { flags, selected }) => Judgement {
            findings: x224::judge_selection(requested, selected, minimum)
                .err()
                .map(|d| downgrade(d, selected))
                .into_iter()
                .collect(),
            selected: Some(selected),
            flags: Some(flags),
            failure_code: None,
            detail: format!("{} selected", protocol::name(selected)),
        },
    }
}

/// Cookie value sent when the request carries no usable user name (`probe.cookie` unset).
pub const DEFAULT_COOKIE: &str = "rdp-preflight";

/// The `Cookie: mstshash=` value for a Connection Request, as mstsc sends one: the credential's
/// user name when there is a usable one (printable ASCII, cut to [`x224::MAX_COOKIE_LEN`]),
/// else `fixed`. `fixed` = `None` (`probe.cookie = ""`) sends no cookie at all.
///
/// A service that waits for a line (a web server, SMTP …) answers a request with a cookie
/// line; without one it waits, and the probe could only say X224_TIMEOUT.
pub fn cookie(user: Option<&str>, fixed: Option<&str>) -> Option<String> {
    let fixed = fixed?;
    let usable = user.filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_graphic()));
    Some(match usable {
        Some(u) => u.chars().take(x224::MAX_COOKIE_LEN).collect(),
        None => fixed.to_owned(),
    })
}

/// Why the X.224 exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum X224Error {
    /// Closed (FIN or an error) before a whole answer.
    #[error("connection closed before a confirm")]
    Closed {
        /// What arrived before.
        got: Vec<u8>,
        /// The socket error, `None` for a FIN.
        error: Option<io::Error>,
    },
    /// The answer is not X.224.
    #[error("not an RDP answer: {0}")]
    NotRdp(x224::DecodeError, Vec<u8>),
}

fn spaced_hex(b: &[u8]) -> String {
    b.iter()
        .take(32)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The finding for bytes that are not a TPKT answer (another service on the port).
pub fn not_rdp_finding(got: &[u8], why: impl ToString) -> Finding {
    Finding::new(
        Cause::X224NotRdp,
        "the reply is not an X.224 Connection Confirm: another service answers on this port",
    )
    .with("decode_error", why.to_string())
    .with("first_bytes", spaced_hex(got))
    .with(
        "first_bytes_text",
        String::from_utf8_lossy(&got[..got.len().min(32)]).escape_debug(),
    )
}

impl X224Error {
    /// The finding.
    pub fn finding(&self) -> Finding {
        match self {
            // Whatever arrived before the close decides: bytes that are not TPKT are another
            // service's answer, not a close.
            X224Error::Closed { got, .. } if got.first().is_some_and(|b| *b != 0x03) => {
                not_rdp_finding(got, "not a TPKT header, then the connection closed")
            }
            X224Error::Closed { got, error } => Finding::new(
                Cause::X224Closed,
                "the target accepted TCP, then closed the connection before an X.224 Connection Confirm",
            )
            .with("bytes_received", got.len())
            .with(
                "how",
                error.as_ref().map_or("FIN".to_owned(), |e| format!("{:?}", e.kind())),
            ),
            X224Error::NotRdp(e, got) => not_rdp_finding(got, e),
        }
    }
}

/// Bytes of another service's answer kept as evidence.
const EVIDENCE_BYTES: usize = 64;
/// How long to wait for more of another service's answer, once it is known not to be RDP.
const EVIDENCE_WAIT: Duration = Duration::from_millis(100);

/// What [`exchange`] keeps even when it is cancelled by a deadline.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read so far.
    pub got: Vec<u8>,
    /// From the request's last byte written to the answer's first byte read: the round trip
    /// (plus the server's own time), without our parsing.
    pub round_trip: Option<Duration>,
}

/// Sends the Connection Request and reads until the decoder has a whole answer. Reads only
/// what the PDU needs: TLS bytes that follow belong to the next stage.
pub async fn exchange(stream: &mut TcpStream, cr: &[u8], progress: &mut Progress) -> Result<ServerPdu, X224Error> {
    stream.write_all(cr).await.map_err(|e| X224Error::Closed {
        got: Vec::new(),
        error: Some(e),
    })?;
    let sent = Instant::now();
    let buf = &mut progress.got;
    let mut chunk = [0u8; 512];
    loop {
        let want = match x224::decode_server_pdu(buf) {
            Ok(x224::Decoded::Complete(pdu, used)) => {
                buf.truncate(used);
                return Ok(pdu);
            }
            Ok(x224::Decoded::Incomplete(n)) => n.saturating_sub(buf.len()).clamp(1, chunk.len()),
            Err(e) => {
                // Another service: what it said beyond the first bytes is the best evidence.
                // Take what arrives within a moment, never more than [`EVIDENCE_BYTES`].
                if buf.len() < EVIDENCE_BYTES {
                    let room = EVIDENCE_BYTES - buf.len();
                    if let Ok(Ok(n)) = tokio::time::timeout(EVIDENCE_WAIT, stream.read(&mut chunk[..room])).await {
                        buf.extend_from_slice(&chunk[..n]);
                    }
                }
                return Err(X224Error::NotRdp(e, std::mem::take(buf)));
            }
        };
        match stream.read(&mut chunk[..want]).await {
            Ok(0) => {
                return Err(X224Error::Closed {
                    got: std::mem::take(buf),
                    error: None,
                })
            }
            Ok(n) => {
                if progress.round_trip.is_none() {
                    progress.round_trip = Some(sent.elapsed());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => {
                return Err(X224Error::Closed {
                    got: std::mem::take(buf),
                    error: Some(e),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Legacy Connection Confirm, written from MS-RDPBCGR 2.2.1.2 without negotiation data.
    const CC_LEGACY: [u8; 11] = [
        0x03, 0x00, // TPKT version 3, reserved
        0x00, 0x0b, // TPKT length 11, big-endian
        0x06, // LI: 6 bytes follow
        0xd0, // CC TPDU, CDT 0
        0x00, 0x00, // DST-REF
        0x00, 0x00, // SRC-REF
        0x00, // class 0; no RDP_NEG_RSP follows
    ];

    fn causes(j: &Judgement) -> Vec<Cause> {
        j.findings.iter().map(|f| f.cause).collect()
    }

    #[test]
    fn cookie_is_the_user_name_else_the_fixed_value_else_none() {
        assert_eq!(cookie(Some("svc-rdp"), Some("gw")), Some("svc-rdp".into()));
        assert_eq!(cookie(None, Some("gw")), Some("gw".into()));
        // Not encodable as a cookie: the fixed value instead.
        assert_eq!(cookie(Some("Jürgen"), Some("gw")), Some("gw".into()));
        assert_eq!(cookie(Some("a b"), Some("gw")), Some("gw".into()));
        assert_eq!(cookie(Some(""), Some("gw")), Some("gw".into()));
        assert_eq!(
            cookie(Some(&"x".repeat(100)), Some("gw")).map(|c| c.len()),
            Some(x224::MAX_COOKIE_LEN)
        );
        // probe.cookie = "": off, whatever the credential.
        assert_eq!(cookie(Some("svc-rdp"), None), None);
    }

    /// The request mstsc sends for user `svc`, written by hand from MS-RDPBCGR 2.2.1.1.
    #[test]
    fn request_with_the_user_cookie_matches_the_spec_layout() {
        // 11 fixed + 17 "Cookie: mstshash=" + 3 "svc" + 2 CRLF + 8 RDP_NEG_REQ = 41 bytes.
        let want: [u8; 41] = [
            0x03, 0x00, // TPKT version 3, reserved
            0x00, 0x29, // TPKT length 41, big-endian
            0x24, // LI = 41 - 5 = 36
            0xe0, // CR TPDU, CDT 0
            0x00, 0x00, // DST-REF
            0x00, 0x00, // SRC-REF
            0x00, // class 0
            b'C', b'o', b'o', b'k', b'i', b'e', b':', b' ', // "Cookie: "
            b'm', b's', b't', b's', b'h', b'a', b's', b'h', b'=', // "mstshash="
            b's', b'v', b'c', // the user name
            0x0d, 0x0a, // CRLF ends the line a line-based service waits for
            0x01, // RDP_NEG_REQ
            0x00, // flags
            0x08, 0x00, // length 8, little-endian
            0x03, 0x00, 0x00, 0x00, // requestedProtocols SSL | HYBRID, little-endian
        ];
        let c = cookie(Some("svc"), Some(DEFAULT_COOKIE));
        let got = x224::encode_connection_request(c.as_deref(), protocol::SSL | protocol::HYBRID).expect("encodes");
        assert_eq!(got, want);
    }

    #[test]
    fn legacy_confirm_is_judged_against_the_minimum() {
        let pdu = ServerPdu::Confirm(Confirm::Legacy);
        let ssl_hybrid = protocol::SSL | protocol::HYBRID;
        // No explicit minimum: a warning, as before.
        let j = judge(ssl_hybrid, None, pdu, &CC_LEGACY);
        assert_eq!(causes(&j), vec![Cause::NegLegacyServer]);
        assert_eq!(j.selected, Some(protocol::RDP));
        // minimum_protocol = hybrid: a downgrade like any weaker selection.
        let j = judge(ssl_hybrid, Some(protocol::HYBRID), pdu, &CC_LEGACY);
        assert_eq!(causes(&j), vec![Cause::NegSecurityDowngrade, Cause::NegLegacyServer]);
        assert!(j.findings[0]
            .evidence
            .contains(&("legacy_confirm".into(), "true".into())));
        // minimum_protocol = rdp: still only the warning.
        let j = judge(ssl_hybrid, Some(protocol::RDP), pdu, &CC_LEGACY);
        assert_eq!(causes(&j), vec![Cause::NegLegacyServer]);
    }

    #[test]
    fn selections_and_failures() {
        let ok = judge(
            protocol::SSL | protocol::HYBRID,
            Some(protocol::HYBRID),
            ServerPdu::Confirm(Confirm::Negotiated {
                flags: 0x1f,
                selected: protocol::HYBRID,
            }),
            &[],
        );
        assert!(ok.findings.is_empty());
        assert_eq!((ok.selected, ok.flags), (Some(protocol::HYBRID), Some(0x1f)));
        let weak = judge(
            protocol::SSL | protocol::HYBRID,
            Some(protocol::HYBRID),
            ServerPdu::Confirm(Confirm::Negotiated {
                flags: 0,
                selected: protocol::SSL,
            }),
            &[],
        );
        assert_eq!(causes(&weak), vec![Cause::NegSecurityDowngrade]);
        let fail = judge(
            protocol::SSL,
            None,
            ServerPdu::Confirm(Confirm::Failure { flags: 0, code: 5 }),
            &[],
        );
        assert_eq!(causes(&fail), vec![Cause::NegHybridRequired]);
        assert_eq!(fail.failure_code, Some(5));
        let dr = judge(protocol::SSL, None, ServerPdu::Disconnect { reason: Some(0) }, &[]);
        assert_eq!(causes(&dr), vec![Cause::X224Closed]);
    }

    #[test]
    fn bytes_that_are_not_tpkt_are_not_rdp_even_when_the_server_closes() {
        let closed = X224Error::Closed {
            got: b"500 5.5.2 Error: bad syntax\r\n".to_vec(),
            error: None,
        };
        let f = closed.finding();
        assert_eq!(f.cause, Cause::X224NotRdp);
        assert!(f
            .evidence
            .iter()
            .any(|(k, v)| k == "first_bytes_text" && v.starts_with("500 5.5.2")));
        let fin = X224Error::Closed {
            got: vec![0x03, 0x00],
            error: None,
        };
        assert_eq!(fin.finding().cause, Cause::X224Closed);
    }
}
