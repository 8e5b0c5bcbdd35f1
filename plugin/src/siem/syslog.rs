//! RFC 5424 syslog messages and RFC 5425 / RFC 6587 octet-counting frames.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME rdp-preflight PROCID MSGID [rdp-preflight@32473 …] MSG`: facility
//! authpriv (10), severity from the verdict (deny: warning, allow with warnings: notice, allow:
//! informational), MSGID the verdict, the structured data element of ours carrying the ids and
//! the primary cause, MSG the event's JSON.

use crate::audit::AuditRecord;

/// Our SD-ID. 32473 is the private enterprise number IANA reserves for documentation
/// (RFC 5612): the project has none of its own.
pub const SD_ID: &str = "rdp-preflight@32473";
/// APP-NAME.
pub const APP_NAME: &str = "rdp-preflight";
/// authpriv: security messages that may name accounts.
const FACILITY: u8 = 10;

/// RFC 5424 severity of a verdict.
fn severity(verdict: &str) -> u8 {
    match verdict {
        "deny" => 4,
        "allow_with_warnings" => 5,
        _ => 6,
    }
}

/// A header field: printable US-ASCII without spaces, at most `max` characters, `-` if empty.
fn field(s: &str, max: usize) -> String {
    let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped (RFC 5424 section 6.3.3).
fn param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RFC 5424 message for `rec` with `body` as MSG.
pub fn message(rec: &AuditRecord, hostname: &str, procid: u32, body: &str) -> String {
    let pri = u16::from(FACILITY) * 8 + u16::from(severity(&rec.verdict));
    let msgid = field(&rec.verdict.to_ascii_uppercase(), 32);
    format!(
        "<{pri}>1 {} {} {APP_NAME} {procid} {msgid} [{SD_ID} check_id=\"{}\" request_id=\"{}\" seq=\"{}\" verdict=\"{}\" cause=\"{}\" cause_number=\"{}\"] {body}",
        field(&rec.time, 64),
        field(hostname, 255),
        param(&rec.check_id),
        param(&rec.request_id),
        rec.seq,
        param(&rec.verdict),
        param(&rec.primary_cause.name),
        rec.primary_cause.number,
    )
}

/// Octet counting (RFC 5425 / RFC 6587 section 3.4.1): `LEN SP MSG`.
pub fn octet_counted(msg: &str) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::CauseRef;

    fn record() -> AuditRecord {
        AuditRecord {
            time: "2026-01-02T03:04:05.678Z".into(),
            seq: 7,
            check_id: "01J0CHECK".into(),
            request_id: "req \"1\"]\\".into(),
            requester: Default::default(),
            target: Default::default(),
            account: None,
            verdict: "deny".into(),
            primary_cause: CauseRef {
                name: "TCP_REFUSED".into(),
                number: 201,
            },
            findings: vec![],
            stages: vec![],
            facts: Default::default(),
            duration_ms: 1.0,
            plugin_version: "0.1.0".into(),
            prev: String::new(),
        }
    }

    #[test]
    fn header_structured_data_and_framing() {
        let m = message(&record(), "gw host", 42, "{\"a\":1}");
        assert_eq!(
            m,
            "<84>1 2026-01-02T03:04:05.678Z gwhost rdp-preflight 42 DENY [rdp-preflight@32473 \
             check_id=\"01J0CHECK\" request_id=\"req \\\"1\\\"\\]\\\\\" seq=\"7\" verdict=\"deny\" \
             cause=\"TCP_REFUSED\" cause_number=\"201\"] {\"a\":1}"
        );
        assert_eq!(field("", 5), "-");
        let f = octet_counted("héllo");
        assert_eq!(f, b"6 h\xc3\xa9llo");
        let mut allow = record();
        allow.verdict = "allow".into();
        assert!(message(&allow, "", 1, "x").starts_with("<86>1 2026-01-02T03:04:05.678Z - "));
    }
}
