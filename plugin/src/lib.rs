//! rdp-preflight: answers, before an RDP session starts, whether the target and the target
//! account's credential will work, and if not, exactly why.
//!
//! See `ARCHITECTURE.md` at the top of the repository for the code map and invariants.

pub mod audit;
pub mod cause;
pub mod check;
pub mod cli;
pub mod config;
pub mod credential;
pub mod deadline;
pub mod fleet;
pub mod fleet_cli;
pub mod guard;
pub mod history;
pub mod kerberos;
pub mod metrics;
pub mod nla;
pub mod otel;
pub mod policy;
pub mod probe;
pub mod report;
pub mod secret;
pub mod service;
pub mod siem;
pub mod store;
pub mod sweep;

use std::{future::Future, sync::Arc};

use tokio::net::{TcpListener, UnixListener};

/// A bound listener: TCP, or a Unix domain socket.
pub enum Bound {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain socket.
    Unix(UnixListener),
}

impl Bound {
    /// Binds what the config asks for: `server.unix_socket` when set, else `server.listen`.
    pub async fn bind(cfg: &config::Config) -> std::io::Result<Bound> {
        match &cfg.unix_socket {
            Some(path) => {
                // A stale socket file from a previous run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path)?;
                }
                UnixListener::bind(path).map(Bound::Unix)
            }
            None => TcpListener::bind(cfg.listen).await.map(Bound::Tcp),
        }
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(l) => l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            Bound::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix socket".into()),
        }
    }
}

/// Serves the gRPC API on `listener` until `shutdown` completes; then reports NOT_SERVING and
/// drains the checks in flight.
pub async fn run(
    cfg: Arc<config::Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    serve(cfg, Bound::Tcp(listener), shutdown).await
}

/// Like [`run`], on a TCP or Unix listener.
pub async fn serve(
    cfg: Arc<config::Config>,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    serve_with_ready(cfg, bound, shutdown, |_| {}).await
}

/// Like [`serve`]; `ready` is called with the listen address once everything that can fail at
/// startup (audit log, admin listener, directory client) is in place.
pub async fn serve_with_ready(
    cfg: Arc<config::Config>,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(&str),
) -> Result<(), String> {
    let metrics = Arc::new(metrics::Metrics::new());
    let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
    let admin = match cfg.admin_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("admin listener {addr}: {e}"))?;
            let bound = l.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string());
            tracing::info!(listen = %bound, "admin listener: serving /metrics and /healthz");
            let mut rx = admin_stopped.clone();
            Some(tokio::spawn(metrics::serve_admin(l, metrics.clone(), async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })))
        }
        None => None,
    };
    let (checker, store) = check::Checker::open(cfg.clone())
        .await
        .map_err(|e| format!("startup: {e}"))?;
    let audit = match (&cfg.audit, &store) {
        (Some(a), Some(s)) if a.backend == audit::Backend::Store => {
            tracing::info!(store = %s.display(), "audit log in the shared store");
            Some(audit::AuditLog::open_store(a.clone(), s.clone()))
        }
        (Some(a), _) => Some(
            audit::AuditLog::open(a.clone())
                .await
                .map_err(|e| format!("audit log: {e}"))?,
        ),
        (None, _) => None,
    };
    if let Some(s) = &store {
        metrics.set_store(s.clone());
    }
    // The SIEM export follows the audit log: it is offered each record once it is recorded.
    let siem = match (&cfg.siem, &audit) {
        (Some(sc), Some(a)) => {
            let x = siem::Exporter::start(sc.clone());
            metrics.set_siem(x.stats());
            a.export_to(x.clone());
            Some(x)
        }
        _ => None,
    };
    let history: Arc<dyn history::History> = match &store {
        Some(s) => Arc::new(store::history::PgHistory::new(s.clone(), cfg.history)),
        None => Arc::new(history::MemoryHistory::new(cfg.history)),
    };
    let checker = Arc::new(checker);
    // The scheduled sweep, one per interval for the cluster when the store holds the lease.
    let (stop_sweep, sweep_stopped) = tokio::sync::watch::channel(false);
    let sweeper = cfg.sweep.clone().map(|sc| {
        let lease: Arc<dyn sweep::Lease> = match &store {
            Some(s) => Arc::new(store::lease::PgLease::new(s.clone(), ulid::Ulid::new().to_string())),
            None => Arc::new(sweep::LocalLease),
        };
        tracing::info!(inventory = %sc.inventory.display(), interval_secs = sc.interval.as_secs(), "scheduled sweep on");
        let scheduler = Arc::new(sweep::Scheduler::new(checker.clone(), sc, history.clone(), lease));
        let mut rx = sweep_stopped.clone();
        let task = tokio::spawn(scheduler.clone().run(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }));
        (scheduler, task)
    });
    let fleet = Arc::new(fleet::Fleet::new(
        history,
        cfg.history,
        sweeper.as_ref().map(|(s, _)| s.clone()),
        cfg.default_port,
    ));
    let sweeper = sweeper.map(|(_, task)| task);
    // The fleet's gauges, computed from the history once per sweep interval (the sweep's data
    // change no faster), every minute without a sweep, while the admin listener serves them.
    let gauges = cfg.admin_listen.map(|_| {
        let (fleet, metrics) = (fleet.clone(), metrics.clone());
        let label = cfg.sweep.as_ref().and_then(|s| s.metric_label.clone());
        let every = cfg
            .sweep
            .as_ref()
            .map_or(std::time::Duration::from_secs(60), |s| s.interval);
        let mut rx = sweep_stopped.clone();
        tokio::spawn(async move {
            loop {
                match fleet.status(&fleet::Filter::default()).await {
                    Ok(s) => metrics.set_fleet(metrics::FleetGauges::of(&s, label.as_deref())),
                    Err(e) => tracing::warn!(error = %e, "fleet gauges: history not readable"),
                }
                tokio::select! {
                    _ = rx.wait_for(|stop| *stop) => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    });
    let (router, reporter) = service::router(checker, audit.clone(), metrics, fleet).await?;
    // Health follows the shared store: NOT_SERVING while it is down, SERVING when it is back.
    let (stop_watch, watch_stopped) = tokio::sync::watch::channel(false);
    let watcher = store.map(|s| {
        let r = reporter.clone();
        let mut rx = watch_stopped.clone();
        tokio::spawn(s.watch(
            std::time::Duration::from_secs(1),
            move |up| {
                let r = r.clone();
                Box::pin(async move { service::set_health(&r, up).await })
            },
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            },
        ))
    });
    ready(&bound.describe());
    let shutdown = async move {
        shutdown.await;
        let _ = stop_sweep.send(true);
        for task in [sweeper, gauges].into_iter().flatten() {
            let _ = task.await;
        }
        let _ = stop_watch.send(true);
        if let Some(w) = watcher {
            let _ = w.await;
        }
        service::set_not_serving(&reporter).await;
        tracing::info!("shutting down: draining checks in flight");
    };
    let r = match bound {
        Bound::Tcp(l) => {
            let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
        Bound::Unix(l) => {
            router
                .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(l), shutdown)
                .await
        }
    };
    // Drained: flush the audit log and the SIEM export, then stop the admin listener.
    if let Some(a) = audit {
        a.close().await;
    }
    if let Some(x) = siem {
        x.close().await;
    }
    let _ = stop_admin.send(true);
    if let Some(h) = admin {
        let _ = h.await;
    }
    r.map_err(|e| format!("server: {e}"))
}
