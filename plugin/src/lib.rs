//! rdp-preflight: answers, before an RDP session starts, whether the target and the target
//! account's credential will work, and if not, exactly why.
//!
//! See `ARCHITECTURE.md` at the top of the repository for the code map and invariants.

pub mod cause;
pub mod check;
pub mod cli;
pub mod config;
pub mod credential;
pub mod deadline;
pub mod policy;
pub mod probe;
pub mod report;
pub mod secret;
pub mod service;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;

/// Serves the gRPC API on `listener` until `shutdown` completes; then reports NOT_SERVING and
/// drains the checks in flight.
pub async fn run(
    cfg: Arc<config::Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let checker = Arc::new(check::Checker::new(cfg).map_err(|e| format!("startup: {e}"))?);
    let (router, reporter) = service::router(checker).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = async move {
        shutdown.await;
        service::set_not_serving(&reporter).await;
        tracing::info!("shutting down: draining checks in flight");
    };
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("server: {e}"))
}
