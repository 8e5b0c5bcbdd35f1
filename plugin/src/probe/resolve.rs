//! Name resolution through the system resolver (so /etc/hosts and nsswitch apply, as for the
//! gateway itself), on the blocking pool: no blocking call on a runtime thread. IP literals skip
//! DNS. "No such name" and "resolver failed" are told apart.

use std::net::SocketAddr;

use dns_lookup::{AddrInfoHints, LookupErrorKind};

use crate::{cause::Cause, report::Finding};

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// NXDOMAIN, or no A/AAAA records.
    #[error("no such name ({0})")]
    NotFound(String),
    /// The resolver failed (SERVFAIL, refused, unreachable).
    #[error("resolver failure ({0})")]
    Failed(String),
}

impl ResolveError {
    /// The finding for this error.
    pub fn finding(&self, host: &str) -> Finding {
        match self {
            ResolveError::NotFound(d) => Finding::new(
                Cause::ResolveNameNotFound,
                format!("{host:?} does not resolve: no such name or no A/AAAA records"),
            )
            .with("host", host)
            .with("resolver_error", d),
            ResolveError::Failed(d) => Finding::new(Cause::ResolveFailed, format!("the resolver failed for {host:?}"))
                .with("host", host)
                .with("resolver_error", d),
        }
    }
}

/// Maps a getaddrinfo error kind.
pub fn classify(kind: LookupErrorKind, detail: String) -> ResolveError {
    match kind {
        LookupErrorKind::NoName | LookupErrorKind::NoData => ResolveError::NotFound(detail),
        _ => ResolveError::Failed(detail),
    }
}

/// Resolves `host`; the bool is true for an IP literal (no lookup made).
pub async fn resolve(host: &str, port: u16) -> Result<(Vec<SocketAddr>, bool), ResolveError> {
    if let Some(ip) = crate::policy::is_ip_literal(host) {
        return Ok((vec![SocketAddr::new(ip, port)], true));
    }
    let h = host.to_owned();
    let res = tokio::task::spawn_blocking(move || {
        let hints = AddrInfoHints {
            socktype: libc_sock_stream(),
            ..AddrInfoHints::default()
        };
        match dns_lookup::getaddrinfo(Some(&h), None, Some(hints)) {
            Ok(iter) => {
                let mut out: Vec<SocketAddr> = Vec::new();
                for ai in iter.flatten() {
                    let a = SocketAddr::new(ai.sockaddr.ip(), port);
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                if out.is_empty() {
                    Err(ResolveError::NotFound("no addresses".into()))
                } else {
                    Ok(out)
                }
            }
            Err(e) => {
                let kind = e.kind();
                Err(classify(kind, format!("{kind:?}")))
            }
        }
    })
    .await
    .map_err(|e| ResolveError::Failed(format!("resolver task failed: {e}")))?;
    res.map(|a| (a, false))
}

/// SOCK_STREAM, without a libc dependency (1 on Linux and the BSDs).
fn libc_sock_stream() -> i32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_skip_dns() {
        let (a, lit) = resolve("192.0.2.7", 3389).await.expect("literal");
        assert!(lit);
        assert_eq!(a, vec!["192.0.2.7:3389".parse().expect("addr")]);
        let (a, _) = resolve("[2001:db8::1]", 3390).await.expect("literal");
        assert_eq!(a, vec!["[2001:db8::1]:3390".parse().expect("addr")]);
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system_resolver() {
        let (a, lit) = resolve("localhost", 3389).await.expect("localhost resolves");
        assert!(!lit);
        assert!(a.iter().all(|s| s.ip().is_loopback()));
    }

    #[test]
    fn error_kinds() {
        assert!(matches!(
            classify(LookupErrorKind::NoName, String::new()),
            ResolveError::NotFound(_)
        ));
        assert!(matches!(
            classify(LookupErrorKind::NoData, String::new()),
            ResolveError::NotFound(_)
        ));
        assert!(matches!(
            classify(LookupErrorKind::Again, String::new()),
            ResolveError::Failed(_)
        ));
        assert!(matches!(
            classify(LookupErrorKind::Fail, String::new()),
            ResolveError::Failed(_)
        ));
        assert_eq!(
            classify(LookupErrorKind::NoName, String::new()).finding("x").cause,
            Cause::ResolveNameNotFound
        );
    }
}
