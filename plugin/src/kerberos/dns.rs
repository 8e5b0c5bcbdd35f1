//! Finding the KDCs of a realm through DNS (RFC 4120 7.2.3.2): the SRV records of
//! `_kerberos._tcp.<realm>` (RFC 2782), asked directly of the configured DNS servers (by
//! default the `nameserver` lines of `/etc/resolv.conf`), because the system resolver has no
//! SRV lookup. The message code is sans-IO (RFC 1035 4.1, name compression included); [`lookup`]
//! owns the UDP socket and the time.
//!
//! The targets' addresses come from the answer's additional section when the server put them
//! there (AD's DNS does), else from an A query to the same server, else the host name is kept
//! for the system resolver at connect time. Targets are ordered by priority, then by weight
//! (highest first); "." (the service is not offered) is dropped.

use std::{net::Ipv4Addr, time::Duration};

use tokio::net::UdpSocket;

/// RR types.
const SRV: u16 = 33;
const A: u16 = 1;

/// One SRV record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    /// Lower first.
    pub priority: u16,
    /// Higher first among equal priorities.
    pub weight: u16,
    /// Port.
    pub port: u16,
    /// Host name, without the final dot.
    pub target: String,
    /// Seconds the record may be kept.
    pub ttl: u32,
}

/// What an answer says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// RCODE (3: the name does not exist).
    pub rcode: u8,
    /// SRV records of the answer section.
    pub srv: Vec<Srv>,
    /// A records of any section: (name, address).
    pub a: Vec<(String, Ipv4Addr)>,
    /// The answer was truncated (TC).
    pub truncated: bool,
}

/// A query for `name`, type `qtype`, class IN, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 || !label.is_ascii() {
            return Err(format!("{name:?} is not a DNS name"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Ok(q)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|x| u16::from_be_bytes([x[0], x[1]]))
        .ok_or_else(|| "truncated message".to_owned())
}

/// Reads the name at `at`: (name, offset after it in place). Follows compression pointers,
/// at most 32 of them.
fn name_at(b: &[u8], mut at: usize) -> Result<(String, usize), String> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    for _ in 0..32 {
        let len = *b.get(at).ok_or("truncated name")?;
        match len {
            0 => {
                let name = labels.join(".");
                return Ok((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let ptr = usize::from(u16_at(b, at)? & 0x3fff);
                end.get_or_insert(at + 2);
                at = ptr;
            }
            l if l & 0xc0 == 0 => {
                let l = usize::from(l);
                let label = b.get(at + 1..at + 1 + l).ok_or("truncated label")?;
                labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                at += 1 + l;
            }
            _ => return Err("bad label type".into()),
        }
    }
    Err("too many compression pointers".into())
}

/// Reads the answer to query `id`.
pub fn parse(b: &[u8], id: u16) -> Result<Answer, String> {
    if u16_at(b, 0)? != id {
        return Err("answer to another query".into());
    }
    let flags = u16_at(b, 2)?;
    if flags & 0x8000 == 0 {
        return Err("not an answer".into());
    }
    let mut out = Answer {
        rcode: (flags & 0x000f) as u8,
        truncated: flags & 0x0200 != 0,
        ..Answer::default()
    };
    let (qd, an) = (u16_at(b, 4)?, u16_at(b, 6)?);
    let others = u16_at(b, 8)? as usize + u16_at(b, 10)? as usize;
    let mut at = 12;
    for _ in 0..qd {
        at = name_at(b, at)?.1 + 4;
    }
    for i in 0..usize::from(an) + others {
        let (name, after) = name_at(b, at)?;
        let rtype = u16_at(b, after)?;
        let ttl = b
            .get(after + 4..after + 8)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
            .ok_or("truncated record")?;
        let rdlen = usize::from(u16_at(b, after + 8)?);
        let rdata = after + 10;
        if b.len() < rdata + rdlen {
            return Err("truncated record data".into());
        }
        match rtype {
            SRV if i < usize::from(an) && rdlen >= 7 => out.srv.push(Srv {
                priority: u16_at(b, rdata)?,
                weight: u16_at(b, rdata + 2)?,
                port: u16_at(b, rdata + 4)?,
                target: name_at(b, rdata + 6)?.0,
                ttl,
            }),
            A if rdlen == 4 => out
                .a
                .push((name, Ipv4Addr::new(b[rdata], b[rdata + 1], b[rdata + 2], b[rdata + 3]))),
            _ => {}
        }
        at = rdata + rdlen;
    }
    out.srv.retain(|s| !s.target.is_empty());
    out.srv
        .sort_by(|x, y| x.priority.cmp(&y.priority).then(y.weight.cmp(&x.weight)));
    Ok(out)
}

/// The `nameserver` lines of resolv.conf text, as `ip:53`.
pub fn nameservers(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]:53")
            } else {
                format!("{ip}:53")
            }
        })
        .collect()
}

async fn ask(server: &str, name: &str, qtype: u16, limit: Duration) -> Result<Answer, String> {
    let id = {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 2];
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        u16::from_be_bytes(b)
    };
    let q = query(id, name, qtype)?;
    let io = async {
        let addr: std::net::SocketAddr = tokio::net::lookup_host(server)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        sock.connect(addr).await.map_err(|e| e.to_string())?;
        sock.send(&q).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            // Another id is someone else's answer (or a spoof): keep waiting.
            if let Ok(a) = parse(&buf[..n], id) {
                return Ok(a);
            }
        }
    };
    tokio::time::timeout(limit, io)
        .await
        .map_err(|_| format!("{server}: no answer within {} ms", limit.as_millis()))?
}

/// The KDCs of `realm` from the first of `servers` that answers: (host or address, port) in
/// order, and the smallest TTL. An empty list when the realm has no SRV records.
pub async fn lookup(realm: &str, servers: &[String], limit: Duration) -> Result<(Vec<(String, u16)>, u32), String> {
    let name = format!("_kerberos._tcp.{}", realm.to_ascii_lowercase());
    let mut errors = Vec::new();
    for server in servers {
        let answer = match ask(server, &name, SRV, limit).await {
            Ok(a) => a,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if answer.rcode != 0 && answer.rcode != 3 {
            errors.push(format!("{server}: RCODE {}", answer.rcode));
            continue;
        }
        let ttl = answer.srv.iter().map(|s| s.ttl).min().unwrap_or(0);
        let mut kdcs = Vec::new();
        for s in &answer.srv {
            let mut ip = answer.a.iter().find(|(n, _)| *n == s.target).map(|(_, ip)| *ip);
            if ip.is_none() {
                ip = ask(server, &s.target, A, limit)
                    .await
                    .ok()
                    .and_then(|a| a.a.into_iter().map(|(_, ip)| ip).next());
            }
            kdcs.push((ip.map_or_else(|| s.target.clone(), |ip| ip.to_string()), s.port));
        }
        return Ok((kdcs, ttl));
    }
    Err(if errors.is_empty() {
        "no DNS server configured".into()
    } else {
        errors.join("; ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer written by hand from RFC 1035 and RFC 2782: id 0x1234, one question
    /// `_kerberos._tcp.example.test` SRV, two SRV answers (priority 0 weight 100 port 88
    /// `dc1.example.test`, with a compression pointer to `example.test` in the question;
    /// priority 10 port 88 `dc2.example.test`), and one additional A record for dc1.
    fn answer() -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x85, 0x80, 0, 1, 0, 2, 0, 0, 0, 1];
        // question at 12: 09 _kerberos 04 _tcp 07 example 04 test 00
        m.push(9);
        m.extend_from_slice(b"_kerberos");
        m.push(4);
        m.extend_from_slice(b"_tcp");
        let example_at = m.len() as u16; // 12 + 10 + 5 = 27
        m.push(7);
        m.extend_from_slice(b"example");
        m.push(4);
        m.extend_from_slice(b"test");
        m.push(0);
        m.extend_from_slice(&[0, 33, 0, 1]);
        let srv = |m: &mut Vec<u8>, prio: u16, weight: u16, host: &[u8]| {
            m.extend_from_slice(&[0xc0, 12]); // the question's name
            m.extend_from_slice(&[0, 33, 0, 1, 0, 0, 2, 88]); // SRV IN ttl 600
            let rdlen = 6 + 1 + host.len() + 2;
            m.extend_from_slice(&(rdlen as u16).to_be_bytes());
            m.extend_from_slice(&prio.to_be_bytes());
            m.extend_from_slice(&weight.to_be_bytes());
            m.extend_from_slice(&88u16.to_be_bytes());
            m.push(host.len() as u8);
            m.extend_from_slice(host);
            m.extend_from_slice(&(0xc000 | example_at).to_be_bytes());
        };
        srv(&mut m, 10, 0, b"dc2");
        srv(&mut m, 0, 100, b"dc1");
        // additional: dc1.example.test A 127.0.0.1 (name: 03 dc1 + pointer)
        m.push(3);
        m.extend_from_slice(b"dc1");
        m.extend_from_slice(&(0xc000 | example_at).to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
        m
    }

    #[test]
    fn srv_answer_is_read_and_ordered() {
        let a = parse(&answer(), 0x1234).expect("parses");
        assert_eq!(a.rcode, 0);
        let targets: Vec<_> = a.srv.iter().map(|s| (s.priority, s.target.as_str(), s.port)).collect();
        assert_eq!(targets, vec![(0, "dc1.example.test", 88), (10, "dc2.example.test", 88)]);
        assert_eq!(a.srv[0].ttl, 600);
        assert_eq!(a.a, vec![("dc1.example.test".to_owned(), Ipv4Addr::new(127, 0, 0, 1))]);
        assert!(parse(&answer(), 0x4321).is_err(), "another id");
    }

    #[test]
    fn hostile_answers_are_errors_not_panics() {
        let good = answer();
        for n in 0..good.len() {
            let _ = parse(&good[..n], 0x1234);
        }
        // A pointer loop.
        let mut looped = good[..12].to_vec();
        looped[5] = 1;
        looped.extend_from_slice(&[0xc0, 12]);
        assert!(parse(&looped, 0x1234).is_err());
    }

    #[test]
    fn query_and_resolv_conf() {
        let q = query(7, "_kerberos._tcp.example.test", SRV).expect("query");
        assert_eq!(&q[..4], &[0, 7, 1, 0]);
        assert_eq!(&q[q.len() - 4..], &[0, 33, 0, 1]);
        assert!(query(7, "a..b", SRV).is_err());
        let servers = nameservers("# c\nnameserver 10.0.0.2\nsearch x\nnameserver fe80::1\nnameserver bogus\n");
        assert_eq!(servers, vec!["10.0.0.2:53".to_owned(), "[fe80::1]:53".to_owned()]);
    }
}
