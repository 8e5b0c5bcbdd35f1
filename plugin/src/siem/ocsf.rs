//! OCSF events from audit records: a pure mapping from the cause catalog and the record.
//!
//! The primary cause chooses the class: credential causes (6xx) and the NLA logon failures
//! (702, 703) are Authentication (3002) with `status_detail` the cause name and `user` the
//! account; connection causes are RDP Activity (4005) once an RDP exchange began (X.224, TLS,
//! certificate, NLA) and Network Activity (4001) before it (resolution, TCP, network quality,
//! policy, deadline). The cause's number, name, owner and remediation travel in `enrichments`
//! and `unmapped`. `docs/siem.md`'s mapping table is generated from [`docs_table`].

use serde_json::{json, Map, Value};

use crate::{
    audit::record::{parse_rfc3339, AuditRecord},
    cause::{Cause, Severity, CATALOG},
};

/// The OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.3.0";

/// Class and activity of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// `class_uid`.
    pub class_uid: u32,
    /// `class_name`.
    pub class_name: &'static str,
    /// `category_uid`.
    pub category_uid: u32,
    /// `category_name`.
    pub category_name: &'static str,
    /// `activity_id`.
    pub activity_id: u32,
    /// `activity_name`.
    pub activity_name: &'static str,
}

impl Mapping {
    /// `type_uid`: `class_uid * 100 + activity_id`.
    pub fn type_uid(&self) -> u32 {
        self.class_uid * 100 + self.activity_id
    }
}

const fn class(class_uid: u32, class_name: &'static str, activity_id: u32, activity_name: &'static str) -> Mapping {
    let (category_uid, category_name) = if class_uid / 1000 == 3 {
        (3, "Identity & Access Management")
    } else {
        (4, "Network Activity")
    };
    Mapping {
        class_uid,
        class_name,
        category_uid,
        category_name,
        activity_id,
        activity_name,
    }
}

/// Authentication: Logon.
pub const AUTH_LOGON: Mapping = class(3002, "Authentication", 1, "Logon");
/// Network Activity: Fail.
pub const NET_FAIL: Mapping = class(4001, "Network Activity", 4, "Fail");
/// Network Activity: Refuse.
pub const NET_REFUSE: Mapping = class(4001, "Network Activity", 5, "Refuse");
/// Network Activity: Traffic.
pub const NET_TRAFFIC: Mapping = class(4001, "Network Activity", 6, "Traffic");
/// Network Activity: Other (the plugin's target policy refused the connection).
pub const NET_POLICY: Mapping = class(4001, "Network Activity", 99, "Refused by policy");
/// RDP Activity: Initial Request (the X.224 Connection Request / Confirm).
pub const RDP_INITIAL: Mapping = class(4005, "RDP Activity", 1, "Initial Request");
/// RDP Activity: Connect Request (CredSSP / NLA, or the whole check).
pub const RDP_CONNECT: Mapping = class(4005, "RDP Activity", 3, "Connect Request");
/// RDP Activity: TLS Handshake (TLS and the certificate).
pub const RDP_TLS: Mapping = class(4005, "RDP Activity", 5, "TLS Handshake");

/// The class and activity of a record whose primary cause is `cause`. A clean check (`OK`) is
/// an RDP connect request, or a logon when the request carried an account.
pub fn mapping(cause: Cause, with_account: bool) -> Mapping {
    if cause == Cause::Ok {
        return if with_account { AUTH_LOGON } else { RDP_CONNECT };
    }
    match cause.number() {
        201 => NET_REFUSE,
        100..=299 | 902 => NET_FAIL,
        300..=399 => RDP_INITIAL,
        400..=599 => RDP_TLS,
        600..=699 | 702 | 703 => AUTH_LOGON,
        700..=799 => RDP_CONNECT,
        800..=899 => NET_TRAFFIC,
        901 => NET_POLICY,
        _ => NET_FAIL,
    }
}

/// OCSF `severity_id` and `severity` from the verdict.
fn severity(verdict: &str) -> (u8, &'static str) {
    match verdict {
        "deny" => (3, "Medium"),
        "allow_with_warnings" => (2, "Low"),
        _ => (1, "Informational"),
    }
}

fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Deny => "deny",
        Severity::Warn => "warn",
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 time (0 when unparsable).
fn epoch_ms(t: &str) -> i64 {
    let fmt = time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(t, &fmt)
        .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
        .ok()
        .or_else(|| parse_rfc3339(t).map(|s| s * 1000))
        .unwrap_or(0)
}

/// The OCSF event of one audit record. Its `metadata.uid` is the record's `check_id`, so an
/// event replayed from the audit log carries the uid it had when first sent.
pub fn event(rec: &AuditRecord) -> Value {
    let cause = Cause::from_number(rec.primary_cause.number).unwrap_or(Cause::Ok);
    let info = cause.info();
    let m = mapping(cause, rec.account.is_some());
    let (severity_id, severity) = severity(&rec.verdict);
    let failed = rec.verdict == "deny";
    let message = rec
        .findings
        .iter()
        .find(|f| f.number == rec.primary_cause.number)
        .map_or_else(|| format!("check {}", rec.verdict), |f| f.message.clone());

    let mut dst = Map::new();
    let host_is_ip = rec.target.host.parse::<std::net::IpAddr>().is_ok();
    if !host_is_ip && !rec.target.host.is_empty() {
        dst.insert("hostname".into(), json!(rec.target.host));
    }
    let ip = rec
        .target
        .connected
        .as_deref()
        .and_then(|c| c.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip().to_string())
        .or_else(|| rec.target.resolved.first().cloned())
        .or_else(|| host_is_ip.then(|| rec.target.host.clone()));
    if let Some(ip) = ip {
        dst.insert("ip".into(), json!(ip));
    }
    dst.insert("port".into(), json!(rec.target.port));

    let cause_data = json!({
        "number": rec.primary_cause.number,
        "name": rec.primary_cause.name,
        "owner": info.map_or("", |i| i.owner.as_str()),
        "stage": info.map_or("", |i| i.stage.as_str()),
        "default_severity": info.map_or("", |i| severity_name(i.severity)),
        "remediation": info.map_or("", |i| i.remediation),
    });

    let mut e = json!({
        "activity_id": m.activity_id,
        "activity_name": m.activity_name,
        "category_uid": m.category_uid,
        "category_name": m.category_name,
        "class_uid": m.class_uid,
        "class_name": m.class_name,
        "type_uid": m.type_uid(),
        "type_name": format!("{}: {}", m.class_name, m.activity_name),
        "time": epoch_ms(&rec.time),
        "duration": rec.duration_ms.round() as i64,
        "severity_id": severity_id,
        "severity": severity,
        "status_id": if failed { 2 } else { 1 },
        "status": if failed { "Failure" } else { "Success" },
        "status_code": rec.primary_cause.number.to_string(),
        "status_detail": rec.primary_cause.name,
        "message": message,
        "metadata": {
            "version": OCSF_VERSION,
            "uid": rec.check_id,
            "correlation_uid": rec.request_id,
            "log_name": "rdp-preflight audit",
            "original_time": rec.time,
            "product": {
                "name": "rdp-preflight",
                "vendor_name": "rdp-preflight",
                "version": rec.plugin_version,
            },
        },
        "dst_endpoint": Value::Object(dst),
        "enrichments": [{
            "name": "rdp_preflight.cause",
            "value": rec.primary_cause.name,
            "type": "cause",
            "data": cause_data.clone(),
        }],
        "unmapped": {
            "rdp_preflight": {
                "cause": cause_data,
                "verdict": rec.verdict,
                "seq": rec.seq,
                "check_id": rec.check_id,
                "request_id": rec.request_id,
                "findings": rec.findings,
                "stages": rec.stages,
                "facts": rec.facts,
            }
        },
    });
    let obj = match e.as_object_mut() {
        Some(o) => o,
        None => return e,
    };
    if !rec.requester.user.is_empty() {
        obj.insert("actor".into(), json!({ "user": { "name": rec.requester.user } }));
    }
    if m.class_uid == AUTH_LOGON.class_uid {
        let mut user = Map::new();
        match &rec.account {
            Some(a) => {
                user.insert("name".into(), json!(a.username));
                if !a.domain.is_empty() {
                    user.insert("domain".into(), json!(a.domain));
                }
            }
            None => {
                user.insert("name".into(), json!("-"));
            }
        }
        obj.insert("user".into(), Value::Object(user));
        obj.insert("is_remote".into(), json!(true));
        // An NLA logon failure is the target's logon (NTLM, or Kerberos with the service
        // ticket), whatever proved the password first.
        let nla = matches!(rec.primary_cause.number, 702 | 703);
        let by = match (nla, rec.facts.nla_auth.as_str()) {
            (true, "kerberos") => "nla_kerberos",
            (true, _) => "nla",
            (false, _) => rec.facts.credential_checked_by.as_str(),
        };
        let (proto_id, proto, logon_type_id, logon_type) = match by {
            "nla" => (1, "NTLM", 10, "Remote Interactive"),
            "nla_kerberos" => (2, "Kerberos", 10, "Remote Interactive"),
            "kerberos" => (2, "Kerberos", 3, "Network"),
            "ldap" => (99, "LDAP bind", 3, "Network"),
            _ => (0, "Unknown", 0, "Unknown"),
        };
        obj.insert("auth_protocol_id".into(), json!(proto_id));
        obj.insert("auth_protocol".into(), json!(proto));
        obj.insert("logon_type_id".into(), json!(logon_type_id));
        obj.insert("logon_type".into(), json!(logon_type));
        obj.insert("service".into(), json!({ "name": "rdp" }));
        if rec.requester.source_address.parse::<std::net::IpAddr>().is_ok() {
            obj.insert("src_endpoint".into(), json!({ "ip": rec.requester.source_address }));
        }
    }
    e
}

/// The mapping table of `docs/siem.md`: one row per catalog cause, and `OK`.
pub fn docs_table() -> String {
    let mut s = String::from(
        "| # | cause | owner | OCSF class | activity | `type_uid` |\n\
         |---|---|---|---|---|---|\n",
    );
    let row = |s: &mut String, number: u16, name: &str, owner: &str, m: Mapping| {
        s.push_str(&format!(
            "| {number} | {name} | {owner} | {} ({}) | {} ({}) | {} |\n",
            m.class_name,
            m.class_uid,
            m.activity_name,
            m.activity_id,
            m.type_uid()
        ));
    };
    let ok = Cause::Ok.number();
    row(&mut s, ok, "OK, without an account", "", mapping(Cause::Ok, false));
    row(&mut s, ok, "OK, with an account", "", mapping(Cause::Ok, true));
    for c in CATALOG {
        row(&mut s, c.number, c.name, c.owner.as_str(), mapping(c.cause, true));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_a_class_of_the_brief() {
        for c in CATALOG {
            let m = mapping(c.cause, false);
            assert_eq!(m, mapping(c.cause, true), "{}: only OK depends on the account", c.name);
            let n = c.number;
            let want = if (600..700).contains(&n) || n == 702 || n == 703 {
                vec![3002]
            } else {
                vec![4001, 4005]
            };
            assert!(want.contains(&m.class_uid), "{}: class {}", c.name, m.class_uid);
            assert_eq!(m.type_uid(), m.class_uid * 100 + m.activity_id);
            assert_eq!(m.category_uid, m.class_uid / 1000);
        }
        assert_eq!(mapping(Cause::TcpRefused, false), NET_REFUSE);
        assert_eq!(mapping(Cause::CertExpired, false), RDP_TLS);
        assert_eq!(mapping(Cause::NlaLogonFailed, false), AUTH_LOGON);
        assert_eq!(mapping(Cause::Ok, true), AUTH_LOGON);
        assert_eq!(mapping(Cause::Ok, false), RDP_CONNECT);
    }
}
