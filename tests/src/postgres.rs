//! A real PostgreSQL for a test: `initdb` in a temporary directory, started with `pg_ctl` on a
//! free loopback port (as the `postgres` user when the tests run as root, since the server
//! refuses to run as root), stopped and removed on drop.
//!
//! Needs Debian's `postgresql` (`scripts/install-test-deps.sh` installs it).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

/// A running cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// With TLS: the CA's PEM file.
    pub ca_file: Option<PathBuf>,
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("initdb").exists());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL is not installed (Debian package postgresql): run `sudo scripts/install-test-deps.sh`")
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL tool, as `postgres` when we are root.
fn run(tool: &Path, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", tool.display()))
}

impl Postgres {
    /// initdb + start; returns once the server accepts connections.
    pub fn start() -> Postgres {
        Postgres::init(false)
    }

    /// As [`Postgres::start`], with `ssl = on` and a certificate for `127.0.0.1` and
    /// `localhost` from a CA of its own ([`Postgres::ca_file`]).
    pub fn start_tls() -> Postgres {
        Postgres::init(true)
    }

    fn init(tls: bool) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("preflight-pg").tempdir().expect("tmp");
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(st.success(), "chown of the cluster directory");
        }
        let data = dir.path().join("data");
        let out = run(
            &bin.join("initdb"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Postgres {
            port: crate::slapd::free_port(),
            bin,
            dir,
            ca_file: None,
        };
        if tls {
            let (ca, cert, key) = crate::slapd::test_ca_and_cert();
            let ca_file = pg.dir.path().join("ca.pem");
            std::fs::write(&ca_file, ca).expect("ca");
            std::fs::write(data.join("server.crt"), cert).expect("cert");
            let key_file = data.join("server.key");
            std::fs::write(&key_file, key).expect("key");
            std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
            if is_root() {
                let st = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&key_file)
                    .arg(data.join("server.crt"))
                    .status()
                    .expect("chown");
                assert!(st.success());
            }
            let conf = data.join("postgresql.auto.conf");
            let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
            text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            std::fs::write(&conf, text).expect("conf");
            pg.ca_file = Some(ca_file);
        }
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start_server(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let out = run(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) {
        let _ = run(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data().to_string_lossy(), "-m", "fast", "-w", "stop"],
        );
    }

    /// Starts it again after [`Postgres::stop`], on the same port.
    pub fn restart(&self) {
        self.start_server();
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with `psql` (as a user of the cluster would); returns stdout.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `psql` can connect (after a restart).
    pub fn wait_ready(&self) {
        for _ in 0..100 {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("PostgreSQL did not come back");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = run(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data().to_string_lossy(), "-m", "immediate", "-w", "stop"],
        );
    }
}
