//! Starting the plugin for a test: the real `rdp-preflight serve` binary, or in-process.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use rdp_preflight::config::FileConfig;
use rdp_preflight_proto::v1::preflight_client::PreflightClient;
use tonic::transport::Channel;

static BUILD: std::sync::Once = std::sync::Once::new();

/// Path of the `rdp-preflight` binary of this build. `cargo build` runs once per test process
/// so a test never drives a stale binary (it returns at once when the binary is up to date).
pub fn plugin_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/rdp-preflight
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("rdp-preflight");
    BUILD.call_once(|| {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "rdp-preflight", "--bin", "rdp-preflight"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build");
        assert!(status.success(), "building rdp-preflight failed");
    });
    bin
}

/// A running `rdp-preflight serve`, killed on drop.
pub struct Served {
    /// The child process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Everything it printed on stderr, collected by a thread.
    pub stderr: Arc<std::sync::Mutex<String>>,
}

impl Served {
    /// `http://addr`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `[admin]` listener's address, as logged at info (`admin listener … listen=ADDR`).
    pub fn admin_addr(&self) -> Option<String> {
        let stderr = self.stderr.lock().map(|l| l.clone()).unwrap_or_default();
        admin_addr(&stderr)
    }
}

/// The `[admin]` listener's address in a plugin's stderr.
pub fn admin_addr(stderr: &str) -> Option<String> {
    stderr.lines().filter(|l| l.contains("admin listener")).find_map(|l| {
        l.split("listen=")
            .nth(1)
            .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
    })
}

/// `GET /metrics` from the admin listener at `addr`: the whole HTTP answer.
pub async fn metrics_text(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("admin listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `rdp-preflight serve --config <path> --listen 127.0.0.1:0` and waits for its address.
pub fn serve_binary(config: &Path, extra_env: &[(&str, &str)]) -> Served {
    let mut cmd = Command::new(plugin_bin());
    cmd.args(["serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn rdp-preflight serve");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("read the listen line");
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "unexpected first line {first:?}; stderr: {}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            )
        });
    Served {
        child,
        addr,
        stderr: log,
    }
}

/// A plugin served in-process on an ephemeral loopback port; stops when dropped.
pub struct InProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcess {
    /// Validates `cfg` and serves it.
    pub async fn start(cfg: &FileConfig) -> InProcess {
        let cfg = Arc::new(cfg.validate().expect("valid test config"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(rdp_preflight::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        InProcess { addr, stop: Some(stop) }
    }

    /// `http://addr`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected client.
    pub async fn client(&self) -> PreflightClient<Channel> {
        client(&self.endpoint()).await
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Connects a client, retrying briefly while the server starts.
pub async fn client(endpoint: &str) -> PreflightClient<Channel> {
    for _ in 0..50 {
        if let Ok(c) = PreflightClient::connect(endpoint.to_owned()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {endpoint}");
}
