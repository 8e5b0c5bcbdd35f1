//! A real OpenLDAP `slapd` for the credential tests: started as the current user on free
//! loopback ports from a temporary directory, with the ppolicy overlay (lockout on, low
//! `pwdMaxFailure`), LDAPS and StartTLS with a test CA made by rcgen, and users in each
//! password-policy state. Stopped (killed) on drop.
//!
//! Needs Debian's `slapd` and `ldap-utils`: `scripts/install-test-deps.sh` installs them.

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};

/// Directory suffix.
pub const SUFFIX: &str = "dc=example,dc=test";
/// Root DN (not subject to ppolicy).
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=test";
/// Root password.
pub const ROOT_PW: &str = "Root-Secret-1";
/// Service account DN (search-then-bind, lockout-state reads).
pub const SERVICE_DN: &str = "cn=svc,dc=example,dc=test";
/// Service account password.
pub const SERVICE_PW: &str = "Service-Pass-1";
/// DN template for `bind_as`.
pub const DN_TEMPLATE: &str = "dn:uid={user},ou=people,dc=example,dc=test";
/// The default policy's pwdMaxFailure.
pub const MAX_FAILURE: usize = 3;

/// Users loaded into every instance: (uid, password, state).
pub const USERS: &[(&str, &str, &str)] = &[
    ("good", "Good-Pass-1", "good"),
    ("good2", "Good-Pass-2", "good"),
    ("guarded", "Guarded-Pass-1", "good"),
    ("near", "Near-Pass-1", "good"),
    ("locked", "Locked-Pass-1", "locked"),
    ("expired", "Expired-Pass-1", "expired"),
    ("mustchange", "Must-Change-1", "must_change"),
    ("grace", "Grace-Pass-1", "grace"),
    ("expiring", "Expiring-Pass-1", "expiring"),
    // One account per benchmark worker (concurrent checks of one account share one bind).
    ("bench0", "Bench-Pass-1", "good"),
    ("bench1", "Bench-Pass-1", "good"),
    ("bench2", "Bench-Pass-1", "good"),
    ("bench3", "Bench-Pass-1", "good"),
    ("bench4", "Bench-Pass-1", "good"),
    ("bench5", "Bench-Pass-1", "good"),
    ("bench6", "Bench-Pass-1", "good"),
    ("bench7", "Bench-Pass-1", "good"),
];

/// The password of a user in [`USERS`].
pub fn password(uid: &str) -> &'static str {
    USERS.iter().find(|u| u.0 == uid).map_or("", |u| u.1)
}

/// The DN of a user.
pub fn user_dn(uid: &str) -> String {
    format!("uid={uid},ou=people,{SUFFIX}")
}

/// A running slapd.
pub struct Slapd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// LDAPS port.
    pub ldaps_port: u16,
    /// Plain / StartTLS port.
    pub ldap_port: u16,
}

fn find_slapd() -> PathBuf {
    for p in ["/usr/sbin/slapd", "/usr/local/sbin/slapd", "/usr/libexec/slapd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "OpenLDAP slapd is not installed (looked in /usr/sbin, /usr/local/sbin, /usr/libexec): \
         run `sudo scripts/install-test-deps.sh` (installs Debian's slapd and ldap-utils)"
    );
}

fn module_dir() -> PathBuf {
    for p in [
        "/usr/lib/ldap",
        "/usr/lib/x86_64-linux-gnu/ldap",
        "/usr/lib/aarch64-linux-gnu/ldap",
        "/usr/libexec/openldap",
    ] {
        if Path::new(p).join("ppolicy.so").exists() || Path::new(p).join("ppolicy.la").exists() {
            return PathBuf::from(p);
        }
    }
    panic!("slapd's ppolicy module not found: run `sudo scripts/install-test-deps.sh`");
}

fn tool(name: &str) -> PathBuf {
    for d in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run `sudo scripts/install-test-deps.sh` (ldap-utils)");
}

/// A free loopback port (bound then released: a tiny race, acceptable for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A fresh CA and a server certificate for 127.0.0.1 / localhost: (ca_pem, cert_pem, key_pem).
pub fn test_ca_and_cert() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "rdp-preflight test CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    leaf.distinguished_name = dn;
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    (ca_pem, cert.pem(), key.serialize_pem())
}

fn gtime(ago: Duration) -> String {
    let t = std::time::SystemTime::now() - ago;
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    // Civil-from-days (Howard Hinnant), UTC.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn ldif() -> String {
    let now = gtime(Duration::ZERO);
    let old = gtime(Duration::from_secs(400 * 86_400));
    let warn = gtime(Duration::from_secs(25 * 86_400));
    let mut s = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: example\ndc: example\n\n\
         dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=policies,{SUFFIX}\nobjectClass: organizationalUnit\nou: policies\n\n\
         dn: {SERVICE_DN}\nobjectClass: person\ncn: svc\nsn: service\nuserPassword: {SERVICE_PW}\n\
         pwdPolicySubentry: cn=service,ou=policies,{SUFFIX}\npwdChangedTime: {now}\n\n\
         dn: cn=default,ou=policies,{SUFFIX}\nobjectClass: person\nobjectClass: pwdPolicy\ncn: default\nsn: policy\n\
         pwdAttribute: userPassword\npwdMaxFailure: {MAX_FAILURE}\npwdLockout: TRUE\npwdLockoutDuration: 0\n\
         pwdMustChange: TRUE\npwdMaxAge: 2592000\npwdExpireWarning: 604800\npwdGraceAuthNLimit: 0\n\n\
         dn: cn=grace,ou=policies,{SUFFIX}\nobjectClass: person\nobjectClass: pwdPolicy\ncn: grace\nsn: policy\n\
         pwdAttribute: userPassword\npwdMaxFailure: {MAX_FAILURE}\npwdLockout: TRUE\npwdMaxAge: 2592000\n\
         pwdGraceAuthNLimit: 1000\n\n\
         dn: cn=service,ou=policies,{SUFFIX}\nobjectClass: person\nobjectClass: pwdPolicy\ncn: service\nsn: policy\n\
         pwdAttribute: userPassword\npwdLockout: FALSE\n\n"
    );
    for (uid, pw, state) in USERS {
        let _ = write!(
            s,
            "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {pw}\n",
            user_dn(uid)
        );
        let changed = match *state {
            "expired" | "grace" => &old,
            "expiring" => &warn,
            _ => &now,
        };
        let _ = writeln!(s, "pwdChangedTime: {changed}");
        match *state {
            "locked" => s.push_str("pwdAccountLockedTime: 000001010000Z\n"),
            "must_change" => s.push_str("pwdReset: TRUE\n"),
            "grace" => {
                let _ = writeln!(s, "pwdPolicySubentry: cn=grace,ou=policies,{SUFFIX}");
            }
            _ => {}
        }
        s.push('\n');
    }
    s
}

impl Slapd {
    /// Starts an instance. `require_tls` adds `security simple_bind=64`: a simple bind on a
    /// connection without TLS gets resultCode 13 (confidentialityRequired).
    pub fn start(require_tls: bool) -> Slapd {
        let slapd = find_slapd();
        let modules = module_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (ca, cert, key) = test_ca_and_cert();
        std::fs::write(d.join("ca.pem"), ca).expect("write");
        std::fs::write(d.join("server.pem"), cert).expect("write");
        std::fs::write(d.join("server.key"), key).expect("write");
        std::fs::create_dir(d.join("db")).expect("mkdir");
        let security = if require_tls { "security simple_bind=64\n" } else { "" };
        let conf = format!(
            "include /etc/ldap/schema/core.schema\n\
             include /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\n\
             modulepath {modules}\n\
             moduleload back_mdb\n\
             moduleload ppolicy\n\
             pidfile {dir}/slapd.pid\n\
             argsfile {dir}/slapd.args\n\
             TLSCACertificateFile {dir}/ca.pem\n\
             TLSCertificateFile {dir}/server.pem\n\
             TLSCertificateKeyFile {dir}/server.key\n\
             {security}\
             access to attrs=userPassword by self write by anonymous auth by * none\n\
             access to * by * read\n\
             database mdb\n\
             maxsize 67108864\n\
             suffix \"{SUFFIX}\"\n\
             rootdn \"{ROOT_DN}\"\n\
             rootpw {ROOT_PW}\n\
             directory {dir}/db\n\
             overlay ppolicy\n\
             ppolicy_default \"cn=default,ou=policies,{SUFFIX}\"\n\
             ppolicy_use_lockout\n",
            modules = modules.display(),
            dir = d.display(),
        );
        std::fs::write(d.join("slapd.conf"), conf).expect("write");
        std::fs::write(d.join("data.ldif"), ldif()).expect("write");
        let out = Command::new(tool("slapadd"))
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-l")
            .arg(d.join("data.ldif"))
            .output()
            .expect("run slapadd");
        assert!(
            out.status.success(),
            "slapadd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ldaps_port = free_port();
        let ldap_port = free_port();
        let log = std::fs::File::create(d.join("slapd.log")).expect("log");
        let child = Command::new(slapd)
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-h")
            .arg(format!("ldaps://127.0.0.1:{ldaps_port}/ ldap://127.0.0.1:{ldap_port}/"))
            .arg("-d")
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slapd");
        let mut s = Slapd {
            child: Some(child),
            dir,
            ldaps_port,
            ldap_port,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let up = [self.ldaps_port, self.ldap_port].iter().all(|p| {
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *p)), Duration::from_millis(200)).is_ok()
            });
            if up {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("slapd exited at start ({status}): {}", self.log());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "slapd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// slapd's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default()
    }

    /// `ldaps://127.0.0.1:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.ldaps_port)
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.ldap_port)
    }

    /// PEM file of the CA that issued slapd's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops slapd (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ldap_env(&self, cmd: &mut Command) {
        cmd.env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .env("LDAPCONF", "/dev/null");
    }

    /// Number of `pwdFailureTime` values on a user (read as the root DN over LDAPS).
    pub fn pwd_failure_count(&self, uid: &str) -> usize {
        let mut cmd = Command::new(tool("ldapsearch"));
        self.ldap_env(&mut cmd);
        let out = cmd
            .args([
                "-LLL",
                "-x",
                "-H",
                &self.ldaps_url(),
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PW,
                "-s",
                "base",
                "-b",
            ])
            .arg(user_dn(uid))
            .arg("pwdFailureTime")
            .output()
            .expect("run ldapsearch");
        assert!(
            out.status.success(),
            "ldapsearch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("pwdFailureTime:"))
            .count()
    }

    /// Binds with `ldapwhoami` over LDAPS; true on success.
    pub fn ldapwhoami(&self, dn: &str, password: &str) -> bool {
        let mut cmd = Command::new(tool("ldapwhoami"));
        self.ldap_env(&mut cmd);
        cmd.args(["-x", "-H", &self.ldaps_url(), "-D", dn, "-w", password])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
