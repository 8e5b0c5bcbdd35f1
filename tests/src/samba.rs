//! A real Samba AD DC for a test (`server services = ldap, kdc`): provisioned in a temporary
//! directory, listening on the loopback interface (the KDC on 127.0.0.1:88, so it runs as root
//! and one at a time), stopped on drop.
//!
//! Needs Debian's `samba`, `samba-ad-dc` and `samba-ad-provision` (`scripts/install-test-deps.sh`).

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// The realm.
pub const REALM: &str = "EXAMPLE.TEST";
/// The administrator's password.
pub const ADMIN_PW: &str = "Admin-Pass-1!";

/// One Samba at a time (port 88).
static ONE: Mutex<()> = Mutex::new(());

/// A running DC.
pub struct Samba {
    dir: tempfile::TempDir,
    child: Option<Child>,
    _one: MutexGuard<'static, ()>,
}

fn tool(name: &str) -> PathBuf {
    for d in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed (Debian packages samba, samba-ad-dc, samba-ad-provision): run `sudo scripts/install-test-deps.sh`");
}

impl Samba {
    /// Provisions and starts a DC; returns once the KDC accepts connections.
    pub fn start() -> Samba {
        Samba::start_opts(false)
    }

    /// The same with Samba's own DNS server on 127.0.0.1:53 (`server services` gains `dns`),
    /// holding the domain's records: `_kerberos._tcp.example.test` SRV → `dc1.example.test` A
    /// 127.0.0.1.
    pub fn start_with_dns() -> Samba {
        Samba::start_opts(true)
    }

    fn start_opts(dns: bool) -> Samba {
        let one = ONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::Builder::new()
            .prefix("preflight-samba")
            .tempdir()
            .expect("tmp");
        let d = dir.path().display().to_string();
        let out = Command::new(tool("samba-tool"))
            .args([
                "domain",
                "provision",
                "--realm",
                REALM,
                "--domain",
                "EXAMPLE",
                "--server-role=dc",
            ])
            .args(if dns {
                &["--dns-backend=SAMBA_INTERNAL", "--host-ip=127.0.0.1", "--host-name=dc1"][..]
            } else {
                &["--dns-backend=NONE"][..]
            })
            .args(["--adminpass", ADMIN_PW, "--targetdir", &d])
            .args(["--option=interfaces = lo", "--option=bind interfaces only = yes"])
            .arg(if dns {
                "--option=server services = ldap, kdc, dns, rpc"
            } else {
                "--option=server services = ldap, kdc"
            })
            .arg(format!("--option=pid directory = {d}/pid"))
            .output()
            .expect("samba-tool");
        assert!(
            out.status.success(),
            "provision: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir_all(dir.path().join("pid")).expect("pid dir");
        // LDAPS with a certificate for 127.0.0.1 from a CA of the test's (Samba's own names its
        // host name only).
        let (ca, cert, key) = crate::slapd::test_ca_and_cert();
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        std::fs::write(tls.join("ca.pem"), ca).expect("ca");
        std::fs::write(tls.join("cert.pem"), cert).expect("cert");
        std::fs::write(tls.join("key.pem"), key).expect("key");
        std::fs::set_permissions(tls.join("key.pem"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let conf = dir.path().join("etc/smb.conf");
        let text = std::fs::read_to_string(&conf).expect("smb.conf");
        let t = tls.display();
        let text = text.replacen(
            "[global]\n",
            &format!(
                "[global]\n\ttls enabled = yes\n\ttls keyfile = {t}/key.pem\n\ttls certfile = {t}/cert.pem\n\ttls cafile = {t}/ca.pem\n"
            ),
            1,
        );
        std::fs::write(&conf, text).expect("smb.conf");
        let log = std::fs::File::create(dir.path().join("samba.log")).expect("log");
        let child = Command::new(tool("samba"))
            .args(["-i", "-M", "single", "-s"])
            .arg(dir.path().join("etc/smb.conf"))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start samba");
        let s = Samba {
            dir,
            child: Some(child),
            _one: one,
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", 88)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the KDC did not start: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if dns {
            // Provisioning leaves out the DC's A record for a loopback address: add it (over
            // DCE/RPC, hence the `rpc` service).
            let admin = format!("--password={ADMIN_PW}");
            let t0 = Instant::now();
            loop {
                let args = ["dns", "add", "127.0.0.1", "example.test", "dc1", "A", "127.0.0.1"];
                let out = Command::new(tool("samba-tool"))
                    .args(args)
                    .args(["-U", "Administrator", &admin, "-s"])
                    .arg(s.dir.path().join("etc/smb.conf"))
                    .output()
                    .expect("samba-tool");
                if out.status.success() {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "samba-tool dns add: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        s
    }

    /// The server's output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("samba.log")).unwrap_or_default()
    }

    /// `ldaps://127.0.0.1:636`.
    pub fn ldaps_url(&self) -> String {
        "ldaps://127.0.0.1:636".into()
    }

    /// The CA of the LDAPS certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    /// `host:port` of the KDC.
    pub fn kdc(&self) -> String {
        "127.0.0.1:88".into()
    }

    /// Runs `samba-tool ARGS` against this DC's database; panics with its output on failure.
    pub fn tool(&self, args: &[&str]) -> String {
        let out = Command::new(tool("samba-tool"))
            .args(args)
            .arg("-s")
            .arg(self.dir.path().join("etc/smb.conf"))
            .output()
            .expect("samba-tool");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "samba-tool {args:?}: {text}");
        text
    }

    /// Creates a user with a password.
    pub fn user(&self, name: &str, password: &str) {
        self.tool(&["user", "create", name, password]);
    }

    /// Adds `attribute: value` to an object (`samba-tool <kind> edit NAME`, kind `user` or
    /// `computer`, with an editor that puts the line into the LDIF it is given).
    pub fn add_attribute(&self, kind: &str, name: &str, attribute: &str, value: &str) {
        use std::os::unix::fs::PermissionsExt;
        let script = self.dir.path().join("append-editor.sh");
        // After the dn line: the LDIF ends with a blank line that would start a new record.
        let body = format!("#!/bin/sh\nsed -i '1a {attribute}: {value}' \"$1\"\n");
        std::fs::write(&script, body).expect("editor script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        self.tool(&[kind, "edit", name, &format!("--editor={}", script.display())]);
    }

    /// Applies to `user` a password settings object `name` that locks after `threshold` bad
    /// passwords (for 10 minutes).
    pub fn lockout_pso(&self, name: &str, threshold: u32, user: &str) {
        let threshold = format!("--account-lockout-threshold={threshold}");
        self.tool(&[
            "domain",
            "passwordsettings",
            "pso",
            "create",
            name,
            "1",
            &threshold,
            "--account-lockout-duration=10",
            "--reset-account-lockout-after=10",
        ]);
        self.tool(&["domain", "passwordsettings", "pso", "apply", name, user]);
    }

    /// The user's badPwdCount and whether it is locked out (lockoutTime set).
    pub fn bad_pwd(&self, name: &str) -> (u32, bool) {
        let out = self.tool(&["user", "show", name, "--attributes=badPwdCount,lockoutTime"]);
        let get = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        (
            u32::try_from(get("badPwdCount")).unwrap_or(u32::MAX),
            get("lockoutTime") > 0,
        )
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
