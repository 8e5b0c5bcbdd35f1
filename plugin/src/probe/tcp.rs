//! The TCP stage: connect to the resolved addresses in turn, time the connect, map OS errors to
//! causes.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{net::TcpStream, time::Instant};

use crate::{cause::Cause, report::Finding};

/// A connection and how long its connect took (the SYN / SYN-ACK round trip).
#[derive(Debug)]
pub struct Connected {
    /// The stream (TCP_NODELAY set).
    pub stream: TcpStream,
    /// The address it reached.
    pub addr: SocketAddr,
    /// The connect's duration.
    pub rtt: Duration,
}

/// Why no connection was made.
#[derive(Debug)]
pub enum ConnectError {
    /// The last address's connect failed: the target or the path.
    Target(SocketAddr, io::Error),
    /// Our own side failed (a socket option, no address to try): not the target's doing.
    Ours(String),
}

/// Connects to each address in turn; returns the first success or the last error.
pub async fn connect_any(addrs: &[SocketAddr]) -> Result<Connected, ConnectError> {
    let mut last = None;
    for addr in addrs {
        let t0 = Instant::now();
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let rtt = t0.elapsed();
                // Small writes (X.224, TLS, CredSSP) must not wait for delayed ACKs.
                if let Err(e) = stream.set_nodelay(true) {
                    return Err(ConnectError::Ours(format!("TCP_NODELAY could not be set: {e}")));
                }
                return Ok(Connected {
                    stream,
                    addr: *addr,
                    rtt,
                });
            }
            Err(e) => last = Some(ConnectError::Target(*addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Ours("no address to connect to".into())))
}

/// The finding for a failed connect.
pub fn finding(addr: SocketAddr, e: &io::Error) -> Finding {
    let (cause, msg) = match e.kind() {
        io::ErrorKind::ConnectionRefused => (
            Cause::TcpRefused,
            "the target refused the TCP connection: nothing listens on the port",
        ),
        io::ErrorKind::TimedOut => (Cause::TcpTimeout, "the TCP connect timed out"),
        // The handshake completed and the target reset it before the connect returned.
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => (
            Cause::X224Closed,
            "the target accepted TCP and reset the connection at once",
        ),
        _ => (
            Cause::TcpUnreachable,
            "the target is unreachable (no route, ICMP unreachable or network down)",
        ),
    };
    Finding::new(cause, msg)
        .with("address", addr)
        .with(
            "os_error",
            e.raw_os_error()
                .map_or_else(|| format!("{:?}", e.kind()), |c| c.to_string()),
        )
        .with("error", e)
}

/// The finding for a connect that ran out of its stage time.
pub fn timeout_finding(addrs: &[SocketAddr]) -> Finding {
    Finding::new(
        Cause::TcpTimeout,
        "no answer to the TCP connect (SYN) before the stage deadline: a firewall drops it, or the host is down",
    )
    .with(
        "addresses",
        addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_map_to_their_causes() {
        let addr: SocketAddr = "192.0.2.1:3389".parse().expect("addr");
        let cause = |k: io::ErrorKind| finding(addr, &io::Error::from(k)).cause;
        assert_eq!(cause(io::ErrorKind::ConnectionRefused), Cause::TcpRefused);
        assert_eq!(cause(io::ErrorKind::TimedOut), Cause::TcpTimeout);
        assert_eq!(cause(io::ErrorKind::NetworkUnreachable), Cause::TcpUnreachable);
        assert_eq!(cause(io::ErrorKind::HostUnreachable), Cause::TcpUnreachable);
        assert_eq!(cause(io::ErrorKind::NetworkDown), Cause::TcpUnreachable);
        assert_eq!(cause(io::ErrorKind::ConnectionReset), Cause::X224Closed);
        // ENETUNREACH as the OS reports it keeps the raw number as evidence.
        let f = finding(addr, &io::Error::from_raw_os_error(101));
        assert_eq!(f.cause, Cause::TcpUnreachable);
        assert!(
            f.evidence.contains(&("os_error".into(), "101".into())),
            "{:?}",
            f.evidence
        );
    }
}
