//! `sieve all`: every long-running service of the pipeline under one supervisor.
//!
//! Each service runs as a child process of the same binary, not as a thread: a crash (or a
//! SIGKILL from a test) takes down one service, not the pipeline; each keeps its own
//! Prometheus registry, consumer group and state directory; and the supervisor restarts a
//! service that dies after it once became ready. A service that fails before it ever became
//! ready is a configuration or environment error: the supervisor stops the others and exits
//! with that service's last log lines. SIGTERM is passed on to every service, which commits
//! what it processed; the supervisor exits when all have stopped (or kills them after
//! `--shutdown-timeout`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::routing::get;
use axum::{Json, Router};
use clap::{Args, ValueEnum};
use serde::Serialize;
use sieve_core::config::{KafkaArgs, LogFormat};
use sieve_core::signal::{self, Signal};
use sieve_core::telemetry::{self, Health};
use sieve_core::topics;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::metrics;

/// Log lines kept per service for the message when it fails to start.
const TAIL_LINES: usize = 20;
/// A service that ran this long before dying restarts without backoff.
const STABLE_RUN: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The services `sieve all` runs, in start order; the index is the metrics port offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Svc {
    Ingest,
    Dedup,
    Antijoin,
    Planner,
    Deliver,
    Feedback,
}

impl Svc {
    const ALL: [Svc; 6] = [
        Svc::Ingest,
        Svc::Dedup,
        Svc::Antijoin,
        Svc::Planner,
        Svc::Deliver,
        Svc::Feedback,
    ];

    fn name(self) -> &'static str {
        match self {
            Svc::Ingest => "ingest",
            Svc::Dedup => "dedup",
            Svc::Antijoin => "antijoin",
            Svc::Planner => "planner",
            Svc::Deliver => "deliver",
            Svc::Feedback => "feedback",
        }
    }

    fn subcommand(self) -> &'static [&'static str] {
        match self {
            Svc::Ingest => &["ingest", "serve"],
            Svc::Dedup => &["dedup"],
            Svc::Antijoin => &["antijoin", "stream"],
            Svc::Planner => &["notify", "planner"],
            Svc::Deliver => &["notify", "deliver"],
            Svc::Feedback => &["notify", "feedback"],
        }
    }

    fn offset(self) -> u16 {
        Svc::ALL.iter().position(|s| *s == self).unwrap_or(0) as u16
    }
}

#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Services to run, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ingest,dedup,antijoin,planner,deliver,feedback"
    )]
    pub services: Vec<Svc>,
    /// Base directory of the services' state; each gets `<dir>/<service>`.
    #[arg(long, env = "SIEVE_STATE_DIR", default_value = "./state")]
    pub state_dir: PathBuf,
    /// Consumer groups are `<prefix>-<service>` (dedup, antijoin, planner, deliver, feedback).
    #[arg(long, env = "SIEVE_ALL_GROUP_PREFIX", default_value = "sieve")]
    pub group_prefix: String,
    /// The supervisor's /metrics, /healthz, /readyz (every service ready) and /services.
    #[arg(long, env = "SIEVE_METRICS_ADDR", default_value = "127.0.0.1:9460")]
    pub metrics_addr: SocketAddr,
    /// First metrics port of the services (dedup +0, antijoin +1, planner +2, deliver +3,
    /// feedback +4); default: the supervisor's port + 1.
    #[arg(long, env = "SIEVE_ALL_SERVICE_PORT_BASE")]
    pub service_port_base: Option<u16>,
    /// Address of ingest's HTTP API (which also serves its /metrics).
    #[arg(long, env = "SIEVE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub ingest_listen: SocketAddr,
    /// Create the missing topics of this file (`ctl topics apply`) before starting.
    #[arg(long)]
    pub topics: Option<PathBuf>,
    /// On SIGTERM, how long the services may take to commit and stop before SIGKILL.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    #[arg(long, env = "SIEVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl AllArgs {
    /// Where a service serves /readyz and /metrics.
    fn health_addr(&self, svc: Svc) -> SocketAddr {
        if svc == Svc::Ingest {
            return self.ingest_listen;
        }
        let base = self
            .service_port_base
            .unwrap_or(self.metrics_addr.port().saturating_add(1));
        SocketAddr::new(
            self.metrics_addr.ip(),
            base.saturating_add(svc.offset() - 1),
        )
    }

    /// The child's command line after the binary: subcommand, Kafka, identity, telemetry.
    /// Every other setting reaches it through its `SIEVE_*` environment variables.
    fn child_args(&self, svc: Svc) -> Vec<String> {
        let mut a: Vec<String> = svc.subcommand().iter().map(|s| s.to_string()).collect();
        a.extend(["--brokers".into(), self.kafka.brokers.clone()]);
        for p in &self.kafka.properties {
            a.extend(["-X".into(), format!("{}={}", p.key, p.value)]);
        }
        a.extend([
            "--connect-timeout".into(),
            humantime::format_duration(self.kafka.connect_timeout).to_string(),
        ]);
        if let Some(format) = self.log_format.to_possible_value() {
            a.extend(["--log-format".into(), format.get_name().to_string()]);
        }
        if svc == Svc::Ingest {
            a.extend(["--listen".into(), self.ingest_listen.to_string()]);
        } else {
            a.extend([
                "--group".into(),
                format!("{}-{}", self.group_prefix, svc.name()),
                "--state-dir".into(),
                self.state_dir.join(svc.name()).display().to_string(),
                "--metrics-addr".into(),
                self.health_addr(svc).to_string(),
            ]);
        }
        a
    }
}

/// What the supervisor knows of one service, served at `/services`.
#[derive(Debug, Clone, Serialize)]
struct Status {
    service: Svc,
    pid: Option<u32>,
    ready: bool,
    ever_ready: bool,
    restarts: u64,
    health_addr: SocketAddr,
    #[serde(skip)]
    tail: VecDeque<String>,
}

type Board = Arc<Vec<Mutex<Status>>>;

fn lock(board: &Board, i: usize) -> std::sync::MutexGuard<'_, Status> {
    board[i].lock().unwrap_or_else(|p| p.into_inner())
}

pub fn run(args: AllArgs) -> anyhow::Result<ExitCode> {
    if args.services.is_empty() {
        bail!("--services names no service");
    }
    if let Some(file) = &args.topics {
        let code = crate::ctl::topics::apply(args.kafka.clone(), file, "", topics::Mode::Create)?;
        if code != ExitCode::SUCCESS {
            tracing::warn!(file = %file.display(), "topics drift from the file; starting anyway");
        }
    }
    let exe = std::env::current_exe().context("locating the sieve binary")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sieve-all")
        .enable_all()
        .build()?;
    rt.block_on(supervise(args, exe))
}

async fn supervise(args: AllArgs, exe: PathBuf) -> anyhow::Result<ExitCode> {
    let mut services = args.services.clone();
    services.sort_by_key(|s| s.offset());
    services.dedup();
    let board: Board = Arc::new(
        services
            .iter()
            .map(|&s| {
                Mutex::new(Status {
                    service: s,
                    pid: None,
                    ready: false,
                    ever_ready: false,
                    restarts: 0,
                    health_addr: args.health_addr(s),
                    tail: VecDeque::new(),
                })
            })
            .collect(),
    );
    let health = Health::new();
    health.set_live(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = telemetry::serve(
        args.metrics_addr,
        health.clone(),
        status_routes(board.clone()),
        stopped(stop_rx.clone()),
    )
    .await?;
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(services.len());
    let mut tasks = Vec::new();
    for i in 0..services.len() {
        tasks.push(tokio::spawn(keep_running(
            i,
            args.clone(),
            exe.clone(),
            board.clone(),
            stop_rx.clone(),
            fatal_tx.clone(),
        )));
    }
    tokio::spawn(watch_readiness(board.clone(), health, stop_rx.clone()));
    tracing::info!(
        services = ?services.iter().map(|s| s.name()).collect::<Vec<_>>(),
        addr = %args.metrics_addr,
        "sieve all: supervising"
    );
    let failure = tokio::select! {
        _ = sieve_core::service::wait_for_signal() => None,
        Some(msg) = fatal_rx.recv() => Some(msg),
    };
    tracing::info!("stopping every service");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = server.await;
    match failure {
        None => {
            tracing::info!("every service stopped; bye");
            Ok(ExitCode::SUCCESS)
        }
        Some(msg) => {
            eprintln!("error: {msg}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    until_stopped(&mut rx).await;
}

/// Resolves when the supervisor is stopping (or its sender is gone).
async fn until_stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn status_routes(board: Board) -> Router {
    Router::new().route(
        "/services",
        get(move || {
            let board = board.clone();
            async move {
                let all: Vec<Status> = (0..board.len()).map(|i| lock(&board, i).clone()).collect();
                Json(all)
            }
        }),
    )
}

/// Runs service `i` until the supervisor stops: restarts it when it dies after it once became
/// ready (backoff doubling to 30 s, reset after a minute of running), reports a death before
/// that as fatal.
async fn keep_running(
    i: usize,
    args: AllArgs,
    exe: PathBuf,
    board: Board,
    mut stop: watch::Receiver<bool>,
    fatal: tokio::sync::mpsc::Sender<String>,
) {
    let svc = lock(&board, i).service;
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let mut child = match spawn(&exe, &args, svc, &board, i) {
            Ok(c) => c,
            Err(e) => {
                let _ = fatal.send(format!("{}: {e:#}", svc.name())).await;
                return;
            }
        };
        let status = tokio::select! {
            s = child.wait() => s,
            _ = until_stopped(&mut stop) => {
                terminate(&mut child, svc, args.shutdown_timeout).await;
                lock(&board, i).pid = None;
                return;
            }
        };
        let exit = status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        let (ever_ready, tail) = {
            let mut st = lock(&board, i);
            st.pid = None;
            st.ready = false;
            (st.ever_ready, st.tail.iter().cloned().collect::<Vec<_>>())
        };
        if *stop.borrow() {
            return;
        }
        if !ever_ready {
            let _ = fatal
                .send(format!(
                    "{} exited ({exit}) before it became ready; its last log lines:\n{}",
                    svc.name(),
                    tail.join("\n")
                ))
                .await;
            return;
        }
        if started.elapsed() >= STABLE_RUN {
            backoff = Duration::from_secs(1);
        }
        tracing::warn!(service = svc.name(), %exit, ?backoff, "service died; restarting");
        metrics::restart(svc.name());
        lock(&board, i).restarts += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = until_stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn spawn(exe: &Path, args: &AllArgs, svc: Svc, board: &Board, i: usize) -> anyhow::Result<Child> {
    let mut child = Command::new(exe)
        .args(args.child_args(svc))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let json = args.log_format == LogFormat::Json;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(relay(out, svc, json, board.clone(), i));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay(err, svc, json, board.clone(), i));
    }
    lock(board, i).pid = child.id();
    tracing::info!(service = svc.name(), pid = child.id(), "service started");
    Ok(child)
}

/// Copies a child's output to ours, each line marked with the service (a `service` field in
/// JSON logs), and keeps the last lines for a start failure's message.
async fn relay(stream: impl AsyncRead + Unpin, svc: Svc, json: bool, board: Board, i: usize) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{}", mark(&line, svc.name(), json));
        let mut st = lock(&board, i);
        if st.tail.len() == TAIL_LINES {
            st.tail.pop_front();
        }
        st.tail.push_back(line);
    }
}

fn mark(line: &str, service: &str, json: bool) -> String {
    match line.strip_prefix('{') {
        Some(rest) if json => format!("{{\"service\":\"{service}\",{rest}"),
        _ => format!("{service:>8} | {line}"),
    }
}

/// SIGTERM, then SIGKILL after `timeout`.
async fn terminate(child: &mut Child, svc: Svc, timeout: Duration) {
    // Our own child, not reaped yet (wait has not returned): the pid is still its.
    if let Some(pid) = child.id() {
        if let Err(e) = signal::send(pid, Signal::Term) {
            tracing::warn!(service = svc.name(), error = %e, "SIGTERM failed");
        }
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => tracing::info!(service = svc.name(), %status, "service stopped"),
        Ok(Err(e)) => tracing::warn!(service = svc.name(), error = %e, "waiting for the service"),
        Err(_) => {
            tracing::warn!(
                service = svc.name(),
                ?timeout,
                "service did not stop in time: SIGKILL"
            );
            let _ = child.kill().await;
        }
    }
}

/// Polls every service's /readyz; the supervisor is ready when all are.
async fn watch_readiness(board: Board, health: Arc<Health>, stop: watch::Receiver<bool>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(1))
        .build();
    while !*stop.borrow() {
        let mut all = true;
        for i in 0..board.len() {
            let (addr, pid, svc) = {
                let st = lock(&board, i);
                (st.health_addr, st.pid, st.service)
            };
            let agent = agent.clone();
            let ready = match pid {
                Some(_) => tokio::task::spawn_blocking(move || {
                    agent.get(&format!("http://{addr}/readyz")).call().is_ok()
                })
                .await
                .unwrap_or(false),
                None => false,
            };
            let mut st = lock(&board, i);
            st.ready = ready && st.pid.is_some();
            st.ever_ready |= st.ready;
            all &= st.ready;
            metrics::service_ready(svc.name(), st.ready);
        }
        health.set_joined(all);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        all: AllArgs,
    }

    fn parse(extra: &[&str]) -> AllArgs {
        let mut argv = vec!["sieve-all", "--brokers", "b:9092", "-X", "a=b"];
        argv.extend(extra);
        Cli::parse_from(argv).all
    }

    #[test]
    fn services_get_their_own_group_state_and_port() {
        let a = parse(&["--metrics-addr", "127.0.0.1:9000", "--state-dir", "/s"]);
        let dedup = a.child_args(Svc::Dedup);
        let joined = dedup.join(" ");
        assert!(
            joined.starts_with("dedup --brokers b:9092 -X a=b"),
            "{joined}"
        );
        assert!(joined.contains("--group sieve-dedup"), "{joined}");
        assert!(joined.contains("--state-dir /s/dedup"), "{joined}");
        assert!(joined.contains("--metrics-addr 127.0.0.1:9001"), "{joined}");
        let deliver = a.child_args(Svc::Deliver).join(" ");
        assert!(deliver.starts_with("notify deliver "), "{deliver}");
        assert!(
            deliver.contains("--metrics-addr 127.0.0.1:9004"),
            "{deliver}"
        );
        let ingest = a.child_args(Svc::Ingest).join(" ");
        assert!(ingest.contains("--listen 127.0.0.1:8080"), "{ingest}");
        assert!(!ingest.contains("--group"), "{ingest}");
    }

    /// What the supervisor passes its children is what the children accept.
    #[test]
    fn child_command_lines_parse() {
        let a = parse(&["--connect-timeout", "1500ms", "--log-format", "json"]);
        for svc in Svc::ALL {
            let argv = std::iter::once("sieve".to_string()).chain(a.child_args(svc));
            let cli = crate::cli::Cli::try_parse_from(argv)
                .unwrap_or_else(|e| panic!("{}: {e}", svc.name()));
            assert_eq!(cli.log_format(), LogFormat::Json, "{}", svc.name());
        }
        let joined = a.child_args(Svc::Dedup).join(" ");
        assert!(joined.contains("--connect-timeout 1s 500ms"), "{joined}");
    }

    #[test]
    fn a_port_base_moves_every_service_port() {
        let a = parse(&["--service-port-base", "20000"]);
        assert_eq!(a.health_addr(Svc::Dedup).port(), 20000);
        assert_eq!(a.health_addr(Svc::Deliver).port(), 20003);
    }

    #[test]
    fn log_lines_are_marked_with_their_service() {
        assert_eq!(
            mark("{\"level\":\"INFO\"}", "dedup", true),
            "{\"service\":\"dedup\",\"level\":\"INFO\"}"
        );
        assert_eq!(mark("hello", "dedup", false), "   dedup | hello");
        assert_eq!(mark("not json", "dedup", true), "   dedup | not json");
    }
}
