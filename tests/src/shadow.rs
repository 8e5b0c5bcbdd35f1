//! A real NLA server for the NLA tests: FreeRDP's shadow server (`freerdp-shadow-cli`,
//! `/sec:nla`) sharing an `Xvfb` display, with accounts in a SAM file made by `winpr-hash`.
//! Started as the current user on a free loopback port, with its home (where it generates its
//! TLS certificate) in a temporary directory; both processes are killed on drop.
//!
//! Needs Debian's `freerdp2-shadow-x11`, `winpr-utils` and `xvfb`:
//! `scripts/install-test-deps.sh` installs them.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use crate::slapd::free_port;

static STARTING: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Display numbers from a range that depends on the process id, so that two test processes
/// rarely collide (and retry when they do).
fn next_display() -> u32 {
    300 + (std::process::id() % 500) * 8 + NEXT.fetch_add(1, Ordering::Relaxed) % 4000
}

/// Accounts in the SAM file: (user, password). No domain: the entries match any domain.
pub const USERS: &[(&str, &str)] = &[("alice", "Alice-Pass-1"), ("bob", "Bob-Pass-2")];

/// The password of a user in [`USERS`].
pub fn password(user: &str) -> &'static str {
    USERS.iter().find(|u| u.0 == user).map_or("", |u| u.1)
}

/// A running shadow server and its X display.
pub struct Shadow {
    xvfb: Option<Child>,
    server: Option<Child>,
    dir: tempfile::TempDir,
    /// The RDP port on 127.0.0.1.
    pub port: u16,
    /// The X display number.
    pub display: u32,
}

fn tool(name: &str, package: &str) -> PathBuf {
    for d in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed (Debian package {package}): run `sudo scripts/install-test-deps.sh` \
         (installs freerdp2-shadow-x11, winpr-utils and xvfb for the NLA tests)"
    );
}

fn log_tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Shadow {
    /// Starts Xvfb and the shadow server; returns once the RDP port accepts connections.
    pub fn start() -> Shadow {
        let xvfb_bin = tool("Xvfb", "xvfb");
        let shadow_bin = tool("freerdp-shadow-cli", "freerdp2-shadow-x11");
        let hash_bin = tool("winpr-hash", "winpr-utils");
        let mut dir = tempfile::tempdir().expect("tempdir");

        // SAM file: one `user:domain:LM:NT:::` line per account.
        let mut sam = String::new();
        for (user, pw) in USERS {
            let out = Command::new(&hash_bin)
                .args(["-u", user, "-p", pw, "-f", "sam"])
                .output()
                .expect("winpr-hash");
            assert!(out.status.success(), "winpr-hash failed: {out:?}");
            sam.push_str(String::from_utf8_lossy(&out.stdout).trim());
            sam.push('\n');
        }
        let sam_path = dir.path().join("sam");
        fs::write(&sam_path, sam).expect("write SAM");

        // Startups are serialised within this process: shadow servers started side by side
        // sometimes fail to open their (distinct) X displays. A start that fails that way is
        // retried on a fresh display.
        let _serial = STARTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let home = dir.path().join("home");
        fs::create_dir_all(&home).expect("home");
        let log_path = dir.path().join("shadow.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (xvfb, display) = start_xvfb(&xvfb_bin, dir.path());
            let port = free_port();
            let log = fs::File::create(&log_path).expect("log");
            let server = Command::new(&shadow_bin)
                .arg(format!("/port:{port}"))
                .arg("/bind-address:127.0.0.1")
                .arg("/sec:nla")
                .arg(format!("/sam-file:{}", sam_path.display()))
                .env("DISPLAY", format!(":{display}"))
                .env("HOME", &home)
                .env("XDG_CONFIG_HOME", home.join(".config"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn freerdp-shadow-cli");
            let mut s = Shadow {
                xvfb: Some(xvfb),
                server: Some(server),
                dir,
                port,
                display,
            };
            let until = Instant::now() + Duration::from_secs(10);
            let exited = loop {
                if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok() {
                    return s;
                }
                let exited = s.server.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > until {
                    break exited;
                }
                std::thread::sleep(Duration::from_millis(25));
            };
            let log = log_tail(&log_path);
            if exited.is_some() && log.contains("failed to open display") && attempt < 4 {
                // Keep the temporary directory for the next attempt.
                s.stop();
                dir = std::mem::replace(&mut s.dir, tempfile::tempdir().expect("tempdir"));
                continue;
            }
            panic!(
                "freerdp-shadow-cli did not start listening on 127.0.0.1:{port} ({exited:?}):\n{log}\n\
                 Xvfb :{display}:\n{}",
                log_tail(&s.dir.path().join("xvfb.log"))
            );
        }
    }

    fn stop(&mut self) {
        // SIGTERM first so that Xvfb removes its socket; SIGKILL if it lingers.
        for child in [self.server.take(), self.xvfb.take()].into_iter().flatten() {
            let mut child = child;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let until = Instant::now() + Duration::from_secs(2);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        log_tail(&self.dir.path().join("shadow.log"))
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Xvfb on a display of our choosing: a second server on a taken display exits ("cannot
/// establish any listening sockets") and the next number is tried. With `-displayfd 1` it
/// writes the number to stdout once it accepts connections.
fn start_xvfb(bin: &Path, dir: &Path) -> (Child, u32) {
    let mut tries = 0;
    loop {
        tries += 1;
        let display = next_display();
        let xlog = fs::File::create(dir.join("xvfb.log")).expect("log");
        let mut xvfb = Command::new(bin)
            .arg(format!(":{display}"))
            .args(["-displayfd", "1", "-screen", "0", "640x480x24", "-nolisten", "tcp"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(xlog)
            .spawn()
            .expect("spawn Xvfb");
        let mut line = String::new();
        if let Some(out) = xvfb.stdout.take() {
            // Xvfb either writes the number or exits (EOF): this read cannot hang.
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if line.trim() == display.to_string() {
            return (xvfb, display);
        }
        let _ = xvfb.kill();
        let _ = xvfb.wait();
        assert!(tries < 20, "Xvfb did not start: {}", log_tail(&dir.join("xvfb.log")));
    }
}
