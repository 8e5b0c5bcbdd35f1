//! The network-quality stage, pure: judged from the round trips that say something about the
//! path (the TCP connect and the X.224 confirm), never from handshakes that wait on the
//! target's CPU (TLS, CredSSP). When the plugin itself was busy while measuring, the evidence
//! says so: the figures may then include our own wait.

use std::time::Duration;

use crate::{cause::Cause, report::Finding};

/// How busy the plugin was around the measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Probes running in this process at the time (this one included).
    pub probes_in_flight: usize,
    /// How long a task that yielded waited to run again, right after the X.224 exchange: the
    /// scheduler's queue, i.e. our own CPU.
    pub scheduler_lag: Duration,
}

/// A scheduler lag above this means the plugin was busy.
pub const BUSY_LAG: Duration = Duration::from_millis(5);

/// What was measured, and the thresholds.
#[derive(Clone, Copy, Debug)]
pub struct Inputs {
    /// SYN to SYN-ACK, as the connect saw it.
    pub tcp_connect: Option<Duration>,
    /// Connection Request written to the first byte of the confirm.
    pub x224_round_trip: Option<Duration>,
    /// Our own load.
    pub load: Load,
    /// NET_HIGH_LATENCY above this.
    pub high_latency: Duration,
    /// A connect this slow while the X.224 round trip stayed fast: a SYN retransmission.
    pub retransmission: Duration,
}

/// The stage's verdict: findings and a one-line detail. `None` when nothing was measured.
pub fn judge(i: &Inputs) -> Option<(Vec<Finding>, String)> {
    let ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| d.as_millis().to_string());
    if i.tcp_connect.is_none() && i.x224_round_trip.is_none() {
        return None;
    }
    let busy = i.load.scheduler_lag >= BUSY_LAG;
    let evidence = |f: Finding| {
        let f = f
            .with("tcp_connect_ms", ms(i.tcp_connect))
            .with("x224_round_trip_ms", ms(i.x224_round_trip));
        if busy {
            f.with("plugin_busy", true)
                .with("scheduler_lag_ms", i.load.scheduler_lag.as_millis())
                .with("probes_in_flight", i.load.probes_in_flight)
        } else {
            f
        }
    };
    let mut findings = Vec::new();
    match (i.tcp_connect, i.x224_round_trip) {
        (Some(tcp), Some(x224)) if tcp > i.retransmission && x224 < i.retransmission / 4 => {
            findings.push(evidence(Finding::new(
                Cause::NetUnstable,
                "the TCP connect needed a retransmission-scale delay while later round trips were fast: packet loss suspected",
            )));
        }
        (tcp, x224) => {
            let rtt = tcp.max(x224).unwrap_or_default();
            if rtt > i.high_latency {
                let mut msg = format!("a handshake round trip to the target took {} ms", rtt.as_millis());
                if busy {
                    msg.push_str(&format!(
                        " (the plugin itself was busy: tasks waited {} ms for a CPU, which may be part of it)",
                        i.load.scheduler_lag.as_millis()
                    ));
                }
                findings.push(evidence(
                    Finding::new(Cause::NetHighLatency, msg).with("threshold_ms", i.high_latency.as_millis()),
                ));
            }
        }
    }
    let mut detail = format!("tcp {} ms, x224 {} ms", ms(i.tcp_connect), ms(i.x224_round_trip));
    if busy {
        detail.push_str(&format!(
            ", plugin busy ({} ms scheduler lag)",
            i.load.scheduler_lag.as_millis()
        ));
    }
    Some((findings, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(tcp: u64, x224: u64, lag: u64) -> Inputs {
        Inputs {
            tcp_connect: Some(Duration::from_millis(tcp)),
            x224_round_trip: Some(Duration::from_millis(x224)),
            load: Load {
                probes_in_flight: 40,
                scheduler_lag: Duration::from_millis(lag),
            },
            high_latency: Duration::from_millis(250),
            retransmission: Duration::from_millis(900),
        }
    }

    fn causes(i: &Inputs) -> Vec<Cause> {
        judge(i)
            .map(|(f, _)| f.iter().map(|f| f.cause).collect())
            .unwrap_or_default()
    }

    #[test]
    fn latency_from_the_path_round_trips() {
        assert_eq!(causes(&inputs(1, 2, 0)), vec![]);
        assert_eq!(causes(&inputs(1, 400, 0)), vec![Cause::NetHighLatency]);
        assert_eq!(causes(&inputs(1000, 2, 0)), vec![Cause::NetUnstable]);
        let none = Inputs {
            tcp_connect: None,
            x224_round_trip: None,
            ..inputs(0, 0, 0)
        };
        assert!(judge(&none).is_none());
        // TCP alone still says something about the path.
        let tcp_only = Inputs {
            x224_round_trip: None,
            ..inputs(300, 0, 0)
        };
        assert_eq!(causes(&tcp_only), vec![Cause::NetHighLatency]);
    }

    #[test]
    fn a_busy_plugin_says_so() {
        let (f, detail) = judge(&inputs(1, 400, 120)).expect("measured");
        assert!(
            f[0].evidence.contains(&("plugin_busy".into(), "true".into())),
            "{:?}",
            f[0].evidence
        );
        assert!(f[0].evidence.contains(&("scheduler_lag_ms".into(), "120".into())));
        assert!(f[0].message.contains("busy"));
        assert!(detail.contains("busy"));
        let (f, _) = judge(&inputs(1, 400, 0)).expect("measured");
        assert!(!f[0].evidence.iter().any(|(k, _)| k == "plugin_busy"));
    }
}
