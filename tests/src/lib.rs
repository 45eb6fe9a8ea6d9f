//! Test harness: a real Kafka-protocol broker (Tansu, sqlite engine) on a free loopback port,
//! unique topic and group names, child-process services, and readers that check outputs.
//!
//! Every helper waits for a condition with a deadline; none sleeps and hopes.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::future::join_all;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sieve_core::config::KafkaArgs;
use sieve_core::kafka::Clients;

pub mod chaos;

/// Where the local broker binary is installed by `scripts/broker.sh install`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SIEVE_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/sieve/tansu/bin/tansu")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A record to produce in a test.
#[derive(Debug, Clone, Default)]
pub struct TestRecord<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub headers: Vec<(&'a str, &'a [u8])>,
    pub timestamp_ms: Option<i64>,
}

/// Storage engine of the local broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Keeps data and offsets across SIGKILL and serves mid-batch fetches correctly: the
    /// only engine for correctness tests.
    Sqlite,
    /// Fast but skips records on mid-batch fetches: throughput runs that read from offset 0
    /// without rebalancing only, with counts checked.
    Memory,
    /// Not started by the harness (librdkafka's mock cluster, for fault injection).
    External,
}

/// A local broker on loopback, stopped when dropped.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    engine: Engine,
}

impl Broker {
    /// A broker on the sqlite engine, on a free port.
    pub fn start() -> Result<Broker> {
        Self::start_with(Engine::Sqlite)
    }

    pub fn start_with(engine: Engine) -> Result<Broker> {
        let bin = tansu_bin();
        if !bin.exists() {
            bail!(
                "local broker not installed at {}: run `scripts/broker.sh install`",
                bin.display()
            );
        }
        let mut b = Broker {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir()?,
            engine,
        };
        b.spawn()?;
        Ok(b)
    }

    /// The helpers of this type (produce, read, count…) for a broker on loopback that the
    /// harness did not start, such as librdkafka's mock cluster; `addr` is `127.0.0.1:PORT`.
    pub fn external(addr: &str) -> Result<Broker> {
        let port = addr
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("not a loopback address: {addr}"))?;
        Ok(Broker {
            child: None,
            port,
            dir: tempfile::tempdir()?,
            engine: Engine::External,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = match self.engine {
            // Tansu resolves sqlite://PATH relative to its working directory.
            Engine::Sqlite => "sqlite://tansu.db".to_string(),
            Engine::Memory => "memory://tansu/".to_string(),
            Engine::External => bail!("an external broker is not started by the harness"),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))?;
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .arg("--storage-engine")
            .arg(storage)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the local broker")?;
        self.child = Some(child);
        let clients = self.clients();
        wait_for(
            "the broker to answer metadata",
            Duration::from_secs(30),
            || clients.check_reachable().ok(),
        )?;
        if self.engine == Engine::Sqlite {
            add_header_index(&self.dir.path().join("tansu.db"))?;
        }
        Ok(())
    }

    /// SIGKILL the broker (data on disk survives).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the broker (SIGSTOP) for `d`, then lets it go on (SIGCONT): a broker that
    /// stops answering without closing connections, like a long GC or disk stall.
    pub fn freeze(&self, d: Duration) -> Result<()> {
        let pid = self.child.as_ref().context("broker not running")?.id() as i32;
        // SAFETY: signals to our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        std::thread::sleep(d);
        unsafe {
            libc::kill(pid, libc::SIGCONT);
        }
        Ok(())
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn kafka_args(&self) -> KafkaArgs {
        KafkaArgs {
            brokers: self.addr(),
            properties: Vec::new(),
            connect_timeout_ms: 5_000,
        }
    }

    pub fn clients(&self) -> Clients {
        Clients::new(self.kafka_args())
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        block(
            self.clients()
                .ensure_topic(name, partitions, &[("retention.ms", "-1")]),
        )?;
        Ok(())
    }

    /// A producer to keep for many sends (see [`TestProducer`]).
    pub fn producer(&self) -> Result<TestProducer> {
        Ok(TestProducer(self.clients().producer()?))
    }

    /// Produces `(key, value)` records with a fresh producer, waiting until every one is
    /// acknowledged.
    pub fn produce<I, K, V>(&self, topic: &str, records: I) -> Result<usize>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        self.producer()?.produce(topic, records)
    }

    /// Produces records with headers and, when given, explicit timestamps (ms).
    pub fn produce_records<'a, I>(&self, topic: &str, records: I) -> Result<usize>
    where
        I: IntoIterator<Item = TestRecord<'a>>,
    {
        self.producer()?.produce_records(topic, records)
    }

    /// Produces keyed changes in order: a value, or a tombstone (no payload) for `None`.
    pub fn produce_changes<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        topic: &str,
        changes: &[(K, Option<V>)],
    ) -> Result<usize> {
        let producer = self.clients().producer()?;
        let mut pending = Vec::new();
        for (k, v) in changes {
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic).key(k.as_ref());
            if let Some(v) = v {
                rec = rec.payload(v.as_ref());
            }
            pending.push(
                producer
                    .send_result(rec)
                    .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?,
            );
        }
        settle(&mut pending)?;
        Ok(changes.len())
    }

    /// A compacted topic as a reader sees it once read to the end: the latest value of
    /// every key, keys whose latest record is a tombstone left out.
    pub fn compacted_view(&self, topic: &str) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut view = BTreeMap::new();
        for m in self.read_all(topic)? {
            let Some(k) = m.key() else { continue };
            match m.payload() {
                Some(v) => view.insert(k.to_vec(), v.to_vec()),
                None => view.remove(k),
            };
        }
        Ok(view)
    }

    /// End offsets of every partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>> {
        let clients = self.clients();
        let reader = clients.reader()?;
        let n = clients.partition_count(&reader, topic)?;
        let mut out = BTreeMap::new();
        for p in 0..n {
            let (_, high) = reader.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            out.insert(p, high);
        }
        Ok(out)
    }

    pub fn count(&self, topic: &str) -> Result<i64> {
        Ok(self.end_offsets(topic)?.values().sum())
    }

    /// Every record of every partition of `topic`, partition by partition, in offset order.
    pub fn read_all(&self, topic: &str) -> Result<Vec<OwnedMessage>> {
        let clients = self.clients();
        let reader = clients.reader()?;
        let mut out = Vec::new();
        for (p, high) in self.end_offsets(topic)? {
            sieve_core::changelog::read_range(
                &reader,
                topic,
                p,
                0,
                high,
                Duration::from_secs(30),
                |m| {
                    out.push(m.clone());
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }

    /// Offsets committed by `group` for `topic`, by partition (absent when none).
    pub fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
        let clients = self.clients();
        let c: rdkafka::consumer::BaseConsumer = clients.consumer_config(group).create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in self.end_offsets(topic)?.keys() {
            tpl.add_partition(topic, *p);
        }
        let res = c.committed_offsets(tpl, Duration::from_secs(10))?;
        Ok(res
            .elements()
            .iter()
            .filter_map(|e| {
                e.offset()
                    .to_raw()
                    .filter(|o| *o >= 0)
                    .map(|o| (e.partition(), o))
            })
            .collect())
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Tansu 0.6.0's sqlite schema has no index for the per-record header lookup of a fetch,
/// which makes reads quadratic; `scripts/broker-index.py` adds it (see its comment).
fn add_header_index(db: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker-index.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(db)
        .output()
        .context("running scripts/broker-index.py (needs python3)")?;
    if !out.status.success() {
        bail!(
            "broker-index.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One producer for many sends. A fresh producer stamps its first records before it has
/// connected and obtained a producer id; a latency measured from those stamps would count
/// the test's own start-up.
pub struct TestProducer(FutureProducer);

impl TestProducer {
    /// Produces `(key, value)` records, waiting until every one is acknowledged.
    pub fn produce<I, K, V>(&self, topic: &str, records: I) -> Result<usize>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let records: Vec<(K, V)> = records.into_iter().collect();
        self.produce_records(
            topic,
            records.iter().map(|(k, v)| TestRecord {
                key: k.as_ref(),
                value: v.as_ref(),
                ..Default::default()
            }),
        )
    }

    /// Produces records with headers and, when given, explicit timestamps (ms).
    pub fn produce_records<'a, I>(&self, topic: &str, records: I) -> Result<usize>
    where
        I: IntoIterator<Item = TestRecord<'a>>,
    {
        let producer = &self.0;
        let mut pending = Vec::new();
        let mut n = 0;
        for r in records {
            let mut h = OwnedHeaders::new();
            for (k, v) in &r.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(*v),
                });
            }
            let mut rec = FutureRecord::to(topic)
                .key(r.key)
                .payload(r.value)
                .headers(h);
            if let Some(ts) = r.timestamp_ms {
                rec = rec.timestamp(ts);
            }
            pending.push(
                producer
                    .send_result(rec)
                    .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?,
            );
            n += 1;
            if pending.len() >= 50_000 {
                settle(&mut pending)?;
            }
        }
        settle(&mut pending)?;
        Ok(n)
    }
}

fn settle(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> Result<()> {
    for r in block(join_all(pending.drain(..))) {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("delivery failed: {e}"),
            Err(_) => bail!("delivery canceled"),
        }
    }
    Ok(())
}

/// Runs a future to completion on the current thread (rdkafka futures need no runtime).
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// A service running as a child process, so tests can SIGKILL it like a crash.
pub struct Service {
    child: Option<Child>,
    pub metrics_port: u16,
    log: PathBuf,
    cmd: (PathBuf, Vec<String>, Vec<(String, String)>, PathBuf),
    started: Instant,
    last_healthy: Option<Instant>,
    /// `/metrics` of earlier lifetimes ended by `restart_if_unassigned`: their counters still
    /// count, so reconciliations hold across a harness restart.
    earlier_metrics: Vec<String>,
}

impl Service {
    /// Spawns `bin args…` with `--metrics-addr` on a free port; logs go to a file in `log_dir`.
    pub fn spawn(
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Service> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start((bin.to_path_buf(), args.to_vec(), env, log_dir.to_path_buf()))
    }

    fn start(spec: (PathBuf, Vec<String>, Vec<(String, String)>, PathBuf)) -> Result<Service> {
        let (bin, args, env, log_dir) = &spec;
        let metrics_port = free_port();
        let log = log_dir.join(format!("{}.log", unique("svc")));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Service {
            child: Some(child),
            metrics_port,
            log,
            cmd: spec.clone(),
            started: Instant::now(),
            last_healthy: None,
            earlier_metrics: Vec::new(),
        })
    }

    /// Harness workaround for a local-broker bug: Tansu 0.6.0's group coordinator leaves a
    /// member that joined while a SIGKILLed member's session still ran with an empty
    /// assignment that never changes. The runtime now waits out a crashed process of its own
    /// host before joining (`members::wait_after_crash`) and replaces a consumer that never
    /// settles (`group_watch`); this restart remains the net for a member killed elsewhere.
    /// A member subscribed with no partitions for `stall` is restarted, as an orchestrator's
    /// liveness probe would; every test's exactly-once checks still apply to whatever it wrote. A member
    /// that is restoring, or has not subscribed yet, is never touched.
    pub fn restart_if_unassigned(&mut self, stall: Duration) -> Result<bool> {
        // The gauge exists from the subscription on; before it, the member is starting.
        let assigned = self.metric("sieve_assigned_partitions", &[]);
        let restoring = self.metric("sieve_restore_in_progress", &[]).unwrap_or(0.0);
        if !(assigned == Some(0.0) && restoring == 0.0) || self.child.is_none() {
            self.last_healthy = Some(Instant::now());
            return Ok(false);
        }
        let since = self.last_healthy.unwrap_or(self.started);
        if since.elapsed() < stall {
            return Ok(false);
        }
        eprintln!("harness: no partitions for {stall:?}: restarting the member (local broker group stall)");
        self.respawn()?;
        Ok(true)
    }

    /// Kills the process (SIGKILL, if still running) and starts it again with the same
    /// command on a new metrics port; counters of the ended lifetime still count.
    pub fn respawn(&mut self) -> Result<()> {
        let mut earlier = std::mem::take(&mut self.earlier_metrics);
        earlier.extend(self.get("/metrics").map(|(_, body)| body));
        self.kill();
        *self = Self::start(self.cmd.clone())?;
        self.earlier_metrics = earlier;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak resident memory of the running process so far, in MiB.
    pub fn peak_rss_mib(&self) -> Option<u64> {
        proc_status_kb(self.pid()?, "VmHWM").map(|kb| kb / 1024)
    }

    /// SIGKILL: no cleanup, like a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Result<i32> {
        let Some(mut c) = self.child.take() else {
            bail!("not running")
        };
        // SAFETY: sending a signal to our own child's pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let status = wait_for("graceful exit", timeout, || c.try_wait().ok().flatten());
        match status {
            Ok(s) => Ok(s.code().unwrap_or(-1)),
            Err(e) => {
                let _ = c.kill();
                Err(e)
            }
        }
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(s)) => {
                self.child = None;
                Some(s.code().unwrap_or(-1))
            }
            _ => None,
        }
    }

    /// Waits for the process to exit by itself (a failpoint, an error); the error names the
    /// log's last lines when it does not.
    pub fn wait_exit(&mut self, what: &str, timeout: Duration) -> Result<i32> {
        let res = wait_for(what, timeout, || {
            if self.restart_if_unassigned(Duration::from_secs(40)).is_err() {
                return None;
            }
            self.exited()
        });
        res.with_context(|| format!("log tail:\n{}", self.log_tail(40)))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("http://127.0.0.1:{}{path}", self.metrics_port))
    }

    /// Sum of the samples of `name` with all `labels` from `/metrics`; counters (`*_total`)
    /// include the lifetimes ended by a harness restart.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        let now = metric_value(&body, name, labels)?;
        if !name.ends_with("_total") {
            return Some(now);
        }
        let earlier: f64 = self
            .earlier_metrics
            .iter()
            .filter_map(|b| metric_value(b, name, labels))
            .sum();
        Some(now + earlier)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Status and body of a GET, or None when nothing listens yet.
/// The arguments every stream service takes, for a test: this broker, `group`, a state
/// directory, and a short session timeout so a killed member's partitions move quickly.
pub fn service_args(broker: &Broker, group: &str, state: &Path) -> Vec<String> {
    service_args_at(&broker.addr(), group, state)
}

/// `service_args` for a broker address.
pub fn service_args_at(brokers: &str, group: &str, state: &Path) -> Vec<String> {
    [
        "--brokers",
        brokers,
        "--group",
        group,
        "--state-dir",
        &state.display().to_string(),
        "-X",
        "session.timeout.ms=6000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn http_get(url: &str) -> Option<(u16, String)> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    match agent.get(url).call() {
        Ok(r) => Some((r.status(), r.into_string().unwrap_or_default())),
        Err(ureq::Error::Status(code, r)) => Some((code, r.into_string().unwrap_or_default())),
        Err(_) => None,
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`…).
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

/// Sum of the samples of `name` whose label set contains every one of `labels`.
pub fn metric_value(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let bare = series.split('{').next().unwrap_or(series);
        if bare != name || !labels.iter().all(|l| series.contains(l)) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// Header value as UTF-8.
pub fn header_str(m: &OwnedMessage, name: &str) -> Option<String> {
    sieve_core::record::header(m, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The first header of `msgs`, as `name=value`, whose name or value holds one of `secrets`.
pub fn header_leak(msgs: &[OwnedMessage], secrets: &[&str]) -> Option<String> {
    use rdkafka::message::Headers;
    msgs.iter()
        .flat_map(|m| m.headers().into_iter().flat_map(|h| h.iter()))
        .map(|h| (h.key, String::from_utf8_lossy(h.value.unwrap_or_default())))
        .find(|(k, v)| secrets.iter().any(|s| k.contains(s) || v.contains(s)))
        .map(|(k, v)| format!("{k}={v}"))
}
