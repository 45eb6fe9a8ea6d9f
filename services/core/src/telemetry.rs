//! Logs, metrics and the health server every long-running process exposes.
//!
//! All metric names live in [`names`], described once in [`describe`], so dashboards and
//! alerts have one list to follow.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::LogFormat;
use crate::error::{CoreError, Result};

/// Every metric sieve's runtime emits.
pub mod names {
    pub const RECORDS_IN: &str = "sieve_records_in_total";
    pub const RECORDS_OUT: &str = "sieve_records_out_total";
    pub const RECORDS_SKIPPED: &str = "sieve_records_skipped_total";
    pub const DLQ_RECORDS: &str = "sieve_dlq_records_total";
    pub const BATCH_SECONDS: &str = "sieve_batch_seconds";
    pub const CONSUMER_LAG: &str = "sieve_consumer_lag";
    pub const PREFETCH_BYTES: &str = "sieve_consumer_prefetch_bytes";
    pub const PAUSED_PARTITIONS: &str = "sieve_paused_partitions";
    pub const ASSIGNED_PARTITIONS: &str = "sieve_assigned_partitions";
    pub const STATE_BYTES: &str = "sieve_state_bytes";
    pub const RESTORE_RECORDS: &str = "sieve_restore_records_total";
    pub const RESTORE_IN_PROGRESS: &str = "sieve_restore_in_progress";
    pub const RECOVERY_SCANNED: &str = "sieve_recovery_scanned_total";
    pub const ERRORS: &str = "sieve_errors_total";
    pub const READY: &str = "sieve_ready";
    pub const BLOOM_FP_RATE: &str = "sieve_bloom_false_positive_rate";
    pub const SIDE_CATCH_UP_RECORDS: &str = "sieve_side_catch_up_records_total";
    pub const SIDE_RECORDS: &str = "sieve_side_records_total";
    pub const SIDE_REPLAYED: &str = "sieve_side_replayed_total";
    pub const STARVATION_GUARD: &str = "sieve_starvation_guard_total";
    pub const REPLAYS: &str = "sieve_replays_total";
    pub const REPLAY_WARMUP_RECORDS: &str = "sieve_replay_warmup_records_total";
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    use names::*;
    describe_counter!(
        REPLAYS,
        "Partition replays requested with `sieve ctl replay` and honoured (state wiped and rebuilt)."
    );
    describe_counter!(
        REPLAY_WARMUP_RECORDS,
        "Input records re-read before a replay offset to rebuild state, outputs discarded."
    );
    describe_counter!(RECORDS_IN, "Input records taken into processing, by topic.");
    describe_counter!(
        RECORDS_OUT,
        "Output records acknowledged by the broker, by topic."
    );
    describe_counter!(
        RECORDS_SKIPPED,
        "Records not processed or not produced again: already_processed (input before the stored offset), already_written (output found in the recovery scan)."
    );
    describe_counter!(
        DLQ_RECORDS,
        "Records sent to a dead-letter topic, by stage and reason (each stage's reasons: ops/runbooks/dlq.md)."
    );
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Time from the start of a batch's processing to its commit."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records between the consumer position and the end of the partition."
    );
    describe_gauge!(
        PREFETCH_BYTES,
        Unit::Bytes,
        "Fetched input waiting in librdkafka's queues; fetching pauses at queued.max.messages.kbytes, which bounds it."
    );
    describe_gauge!(
        PAUSED_PARTITIONS,
        "Input partitions paused by priority scheduling (0 for services without priorities)."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        "Input partitions assigned to this process."
    );
    describe_gauge!(
        STATE_BYTES,
        Unit::Bytes,
        "Estimated live bytes of local state, by partition."
    );
    describe_counter!(
        RESTORE_RECORDS,
        "Changelog records read while restoring state."
    );
    describe_gauge!(
        RESTORE_IN_PROGRESS,
        "Partitions whose state is being restored (not ready while > 0)."
    );
    describe_counter!(
        RECOVERY_SCANNED,
        "Output records read by recovery scans after an unclean stop."
    );
    describe_counter!(ERRORS, "Errors by kind.");
    describe_gauge!(
        READY,
        "1 when every assigned partition is restored and processing."
    );
    describe_gauge!(
        BLOOM_FP_RATE,
        "Observed Bloom filter false-positive rate (maybe answers that the store refuted)."
    );
    describe_counter!(
        SIDE_CATCH_UP_RECORDS,
        "Side-table records applied while catching up to the side topics' end (not ready meanwhile)."
    );
    describe_counter!(
        SIDE_RECORDS,
        "Side-table records applied while following the side topics."
    );
    describe_counter!(
        STARVATION_GUARD,
        "Times lower priorities were let through for one batch after being paused longer than the starvation guard."
    );
    describe_counter!(
        SIDE_REPLAYED,
        "Side records shown again to a partition that opened behind its side table."
    );
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics() -> Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0,
                10.0,
            ],
        )
        .map_err(|e| CoreError::Config(format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| CoreError::Config(format!("metrics recorder: {e}")))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, `sieve all`) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Liveness and readiness of a process, shared by its workers and its health server.
#[derive(Debug, Default)]
pub struct Health {
    live: AtomicBool,
    joined: AtomicBool,
    restoring: AtomicUsize,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.publish();
    }

    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::SeqCst);
        self.publish();
    }

    pub fn restore_started(&self) {
        self.restoring.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }

    pub fn restore_finished(&self) {
        self.restoring.fetch_sub(1, Ordering::SeqCst);
        self.publish();
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.is_live()
            && self.joined.load(Ordering::SeqCst)
            && self.restoring.load(Ordering::SeqCst) == 0
    }

    fn publish(&self) {
        metrics::gauge!(names::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
        metrics::gauge!(names::RESTORE_IN_PROGRESS)
            .set(self.restoring.load(Ordering::SeqCst) as f64);
    }
}

#[derive(Clone)]
struct ServerState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// `/metrics`, `/healthz` and `/readyz` on `addr`, plus any extra routes of the service.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    extra: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    serve_tls(addr, health, extra, None, shutdown).await
}

/// [`serve`], over TLS when an acceptor is given.
pub async fn serve_tls(
    addr: SocketAddr,
    health: Arc<Health>,
    extra: Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let state = ServerState {
        health,
        metrics: metrics()?,
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<ServerState>| async move { s.metrics.render() }),
        )
        .route(
            "/healthz",
            get(|State(s): State<ServerState>| async move {
                if s.health.is_live() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not live")
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<ServerState>| async move {
                if s.health.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(state)
        .merge(extra);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| CoreError::Config(format!("cannot listen on {addr}: {e}")))?;
    tracing::info!(%addr, tls = tls.is_some(), "HTTP server listening");
    Ok(tokio::spawn(accept_loop(listener, app, tls, shutdown)))
}

/// How long a client may take to finish the TLS handshake and send a request's headers.
/// A client that stays silent or trickles bytes is disconnected, so idle connections
/// cannot pile up (slowloris); a slow body is the handler's to bound.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves every accepted connection on its own task; on `shutdown` stops accepting and
/// waits for the requests in progress.
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, app, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, app, watcher).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    graceful.shutdown().await;
}

async fn serve_connection<S>(io: S, app: Router, watcher: Watcher)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A TLS acceptor from PEM files: the certificate chain and its private key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        CoreError::Config(format!("TLS: {}: {e}", what.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(cert, &e))?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .map_err(|e| bad(cert, &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Peak resident memory of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kb(std::process::id(), "VmHWM").unwrap_or(0) * 1024
}

/// Current resident memory of this process (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kb(std::process::id(), "VmRSS").unwrap_or(0) * 1024
}

/// A `kB` field (`VmRSS`, `VmHWM`…) of `/proc/PID/status`; `None` where /proc or the process
/// is gone.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_of_this_process_is_read_from_proc() {
        let (rss, peak) = (rss_bytes(), peak_rss_bytes());
        assert!(rss > 0 && peak >= rss, "rss {rss}, peak {peak}");
        assert_eq!(proc_status_kb(std::process::id(), "NoSuchField"), None);
        assert_eq!(proc_status_kb(0, "VmRSS"), None);
    }
}
