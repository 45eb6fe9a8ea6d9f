//! Process lifecycle shared by every long-running service: metrics and health server,
//! SIGTERM/SIGINT handling, and a graceful stop that commits what was processed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::Router;

use crate::config::{KafkaArgs, ServiceArgs};
use crate::engine;
use crate::error::{CoreError, Result};
use crate::kafka::Clients;
use crate::operator::OperatorFactory;
use crate::telemetry::{self, Health};

/// Set by SIGTERM or SIGINT; long loops check it between batches.
pub fn shutdown_on_signals(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    rt.spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing the current batch");
        f.store(true, Ordering::SeqCst);
    });
    flag
}

/// Resolves on SIGTERM or SIGINT (only SIGINT where SIGTERM cannot be handled).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A small runtime for the health server and signal handling, beside a blocking loop.
pub fn side_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sieve-http")
        .enable_all()
        .build()
        .map_err(CoreError::Io)
}

/// Runs a stream processor until SIGTERM/SIGINT, serving `/metrics`, `/healthz`, `/readyz`.
pub fn run_processor<F: OperatorFactory>(
    factory: F,
    kafka: &KafkaArgs,
    svc: &ServiceArgs,
    extra_routes: Router,
) -> Result<()> {
    let rt = side_runtime()?;
    let shutdown = shutdown_on_signals(&rt);
    let health = Health::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.block_on(telemetry::serve(
        svc.metrics_addr,
        health.clone(),
        extra_routes,
        async move {
            let _ = stop_rx.await;
        },
    ))?;
    let clients = Clients::new(kafka.clone());
    let result = engine::run(factory, &clients, svc, health, shutdown);
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    result
}
