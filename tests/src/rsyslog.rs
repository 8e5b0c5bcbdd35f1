//! A real rsyslog for a test: `rsyslogd -n` with a configuration in a temporary directory, a
//! TLS listener (`imtcp` with the GnuTLS stream driver, mutual TLS: client certificates signed
//! by the test CA are required) on a free loopback port, a UDP listener (`imudp`) and a Unix
//! datagram socket (`imuxsock`, not the system's `/dev/log`), and everything received on them
//! written raw (`%rawmsg%`, one message per line) to a file the test reads. Stopped with
//! SIGTERM, restarted on the same ports; killed on drop.
//!
//! Needs Debian's `rsyslog` and `rsyslog-gnutls` (`scripts/install-test-deps.sh` installs them).

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A running rsyslogd.
pub struct Rsyslog {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The TLS listener's port on 127.0.0.1.
    pub port: u16,
    /// The UDP listener's port on 127.0.0.1.
    pub udp_port: u16,
}

/// PEM files of a test CA, a server certificate for `localhost` / 127.0.0.1 and a client
/// certificate, in `dir`.
struct Pki;

impl Pki {
    fn write(dir: &Path) {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "rdp-preflight siem test CA");
        ca.distinguished_name = dn;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca.pem");
        let issuer = Issuer::new(ca, ca_key);
        for (name, server) in [("server", true), ("client", false)] {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            p.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, if server { "localhost" } else { "rdp-preflight" });
            p.distinguished_name = dn;
            p.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = p.signed_by(&key, &issuer).expect("leaf");
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("cert");
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("key");
        }
    }
}

impl Rsyslog {
    /// Writes the PKI and the configuration, starts rsyslogd, waits for the listener.
    pub fn start_tls() -> Rsyslog {
        assert!(
            Path::new("/usr/sbin/rsyslogd").exists(),
            "rsyslog is not installed (Debian packages rsyslog, rsyslog-gnutls): run `sudo scripts/install-test-deps.sh`"
        );
        let dir = tempfile::Builder::new()
            .prefix("preflight-rsyslog")
            .tempdir()
            .expect("tmp");
        Pki::write(dir.path());
        let port = crate::slapd::free_port();
        let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("free UDP port");
        let d = dir.path().display();
        let conf = format!(
            r#"global(
    workDirectory="{d}"
    maxMessageSize="64k"
    defaultNetstreamDriver="gtls"
    defaultNetstreamDriverCAFile="{d}/ca.pem"
    defaultNetstreamDriverCertFile="{d}/server.pem"
    defaultNetstreamDriverKeyFile="{d}/server.key"
)
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="received") {{
    action(type="omfile" file="{d}/received.log" template="raw")
}}
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="received")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="received")
module(load="imuxsock" sysSock.use="off")
input(type="imuxsock" socket="{d}/relay.sock" ruleset="received")
"#
        );
        std::fs::write(dir.path().join("rsyslog.conf"), conf).expect("conf");
        let mut r = Rsyslog {
            dir,
            child: None,
            port,
            udp_port,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("rsyslogd.out")).expect("log");
        let child = Command::new("/usr/sbin/rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(d.join("rsyslog.conf"))
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn rsyslogd");
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("rsyslogd exited ({st}): {}", self.output());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "rsyslogd does not listen: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What rsyslogd printed.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.out")).unwrap_or_default()
    }

    /// The CA of the server certificate (for `siem.ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The Unix datagram socket rsyslog reads (a local relay's).
    pub fn unix_socket(&self) -> PathBuf {
        self.dir.path().join("relay.sock")
    }

    /// A client certificate and key signed by the CA (for mutual TLS).
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("client.pem"), self.dir.path().join("client.key"))
    }

    /// Stops rsyslogd with SIGTERM (it closes its connections) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let t0 = Instant::now();
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again, on the same port.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// The messages received so far, one per line.
    pub fn received(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("received.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until at least `n` messages were received.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<String> {
        let t0 = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                t0.elapsed() < limit,
                "rsyslog received {} of {n} messages: {got:#?}\n{}",
                got.len(),
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
