//! Test harness: Apache Kafka (KRaft, started by `scripts/broker.sh run`) on free loopback ports,
//! unique topic and group names, child-process services, and readers that check outputs.
//!
//! Every helper waits for a condition with a deadline; none sleeps and hopes.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::future::join_all;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sieve_core::config::KafkaArgs;
use sieve_core::kafka::Clients;
use sieve_core::read::count_range;
use sieve_core::signal::{self, Signal};
use sieve_core::telemetry::proc_status_kb;

pub mod chaos;

/// `scripts/broker.sh`: installs and runs Apache Kafka; the harness starts each broker through
/// its `run` command, so tests, the demo and the benchmarks share one broker configuration.
pub fn broker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh")
}

/// The broker the harness runs, as reports name it: "Apache Kafka 4.4.0".
pub fn broker_name() -> Result<String> {
    let out = Command::new(broker_script())
        .arg("version")
        .output()
        .context("scripts/broker.sh version")?;
    ensure!(out.status.success(), "scripts/broker.sh version failed");
    Ok(format!(
        "Apache Kafka {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}

/// A topic's config value as the broker reports it (DescribeConfigs), defaults included.
pub fn topic_config(clients: &Clients, topic: &str, name: &str) -> Result<Option<String>> {
    let admin = clients.admin()?;
    let described = block(admin.describe_configs(
        &[rdkafka::admin::ResourceSpecifier::Topic(topic)],
        &rdkafka::admin::AdminOptions::new(),
    ))?;
    Ok(described
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| r.get(name).and_then(|e| e.value.clone())))
}

/// Runs `bin args…` with `stdin` and `RUST_LOG=off`: its exit code and its stdout followed by
/// its stderr (for the CLI tests of a binary).
pub fn run_cli(bin: &Path, args: &[&str], stdin: &[u8]) -> Result<(i32, String)> {
    use std::io::Write;
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.code().unwrap_or(-1), text))
}

/// Runs one of Kafka's own command-line tools (a class of the jars `scripts/broker.sh`
/// installed, such as `org.apache.kafka.tools.consumer.group.ConsumerGroupCommand`) with
/// `stdin`; returns its exit code and stdout, or an error naming its stderr.
pub fn kafka_tool(class: &str, args: &[&str], stdin: &[u8]) -> Result<(i32, String)> {
    use std::io::Write;
    let out = Command::new(broker_script())
        .arg("bin")
        .output()
        .context("scripts/broker.sh bin")?;
    let libs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let log4j = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kafka/log4j2.yaml");
    let mut child = Command::new("java")
        .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
        .arg("-cp")
        .arg(format!("{libs}/*"))
        .arg(class)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {class}"))?;
    child.stdin.take().context("tool stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let code = out.status.code().unwrap_or(-1);
    ensure!(
        code == 0,
        "{class} exited with {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// A loopback port nothing listens on, below Linux's ephemeral range (32768–60999): a port
/// the kernel hands out to outgoing connections can be taken again between this check and the
/// listener's bind (a Kafka node binds seconds later), one of ours only by another test.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

/// Topic configs under which Kafka's log cleaner compacts within a test: a segment rolls at
/// the first write 100 ms after it began, any dirty share is worth cleaning, and tombstones
/// are kept for 100 ms after their segment was first cleaned.
pub const FAST_COMPACTION: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("retention.ms", "-1"),
    ("segment.ms", "100"),
    ("min.cleanable.dirty.ratio", "0.01"),
    ("min.compaction.lag.ms", "0"),
    ("delete.retention.ms", "100"),
];

/// Key of the tombstones [`Broker::wait_compacted`] writes to roll segments.
pub const ROLL_KEY: &[u8] = b"~roll";

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Client settings for brokers on loopback that the harness reaches.
fn loopback_args(brokers: String) -> KafkaArgs {
    KafkaArgs {
        brokers,
        properties: Vec::new(),
        connect_timeout: Duration::from_secs(5),
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

/// Per partition of a topic: the offset counted up to, and the records seen before it.
type Counted = BTreeMap<i32, (i64, i64)>;

/// An Apache Kafka node (KRaft, broker and controller in one JVM) on loopback, with its data
/// in a temporary directory; SIGKILLed when dropped.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    controller_port: u16,
    dir: tempfile::TempDir,
    /// The addresses of brokers started by someone else (librdkafka's mock cluster, a
    /// [`Cluster`]): never spawned or killed here.
    external: Option<String>,
    counted: Mutex<HashMap<String, Counted>>,
}

impl Broker {
    /// A fresh single-node Kafka on free loopback ports. Each test gets its own broker, so a
    /// test that kills, freezes or fills one cannot disturb another. A port taken between the
    /// check and the JVM's bind (another test's) is given up for two others.
    pub fn start() -> Result<Broker> {
        let mut attempt = 0;
        loop {
            let mut b = Broker {
                child: None,
                port: free_port(),
                controller_port: free_port(),
                dir: tempfile::tempdir()?,
                external: None,
                counted: Mutex::default(),
            };
            match b.spawn() {
                Ok(()) => return Ok(b),
                Err(e) if attempt < 3 && b.log_tail(200).contains("Address already in use") => {
                    eprintln!("harness: a broker port was taken meanwhile ({e:#}); new ports");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The helpers of this type (produce, read, count…) for brokers on loopback that the
    /// harness did not start as a `Broker`, such as librdkafka's mock cluster or a
    /// [`Cluster`]; `addrs` is `127.0.0.1:PORT[,127.0.0.1:PORT…]`.
    pub fn external(addrs: &str) -> Result<Broker> {
        let ports: Vec<u16> = addrs
            .split(',')
            .map(|a| a.strip_prefix("127.0.0.1:").and_then(|p| p.parse().ok()))
            .collect::<Option<_>>()
            .with_context(|| format!("not loopback addresses: {addrs}"))?;
        Ok(Broker {
            child: None,
            port: ports[0],
            controller_port: 0,
            dir: tempfile::tempdir()?,
            external: Some(addrs.to_string()),
            counted: Mutex::default(),
        })
    }

    pub fn addr(&self) -> String {
        match &self.external {
            Some(addrs) => addrs.clone(),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The broker JVM's pid (for its CPU time), when the harness started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> Result<()> {
        if self.external.is_some() {
            bail!("an external broker is not started by the harness");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // `broker.sh run` formats the data directory when it is new and then execs the JVM:
        // the child's pid is the broker's, so kill and freeze reach it.
        let child = Command::new(broker_script())
            .arg("run")
            .arg(self.port.to_string())
            .arg(self.dir.path().join("node"))
            .arg(self.controller_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting Kafka with scripts/broker.sh run")?;
        self.child = Some(child);
        let clients = self.clients();
        let ready = wait_for(
            "the broker to answer metadata",
            Duration::from_secs(90),
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        return Some(Err(anyhow::anyhow!("broker exited with {status}")));
                    }
                }
                clients.check_reachable().ok().map(Ok)
            },
        )
        .and_then(|r| r);
        ready.with_context(|| format!("broker log tail:\n{}", self.log_tail(20)))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// The last `lines` lines of the broker's log (its start script's errors included).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(self.log_path()).unwrap_or_default(),
            lines,
        )
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
        let pid = self.child.as_ref().context("broker not running")?.id();
        signal::send(pid, Signal::Stop)?;
        std::thread::sleep(d);
        signal::send(pid, Signal::Cont)?;
        Ok(())
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn kafka_args(&self) -> KafkaArgs {
        loopback_args(self.addr())
    }

    pub fn clients(&self) -> Clients {
        Clients::new(self.kafka_args())
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        self.create_topic_with(name, partitions, &[("retention.ms", "-1")])
    }

    /// A topic with these configs (such as [`FAST_COMPACTION`]).
    pub fn create_topic_with(
        &self,
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        block(self.clients().ensure_topic(name, partitions, None, configs))?;
        Ok(())
    }

    /// Waits until Kafka's log cleaner has compacted `topic` (made with [`FAST_COMPACTION`]):
    /// read from the start, it holds one record per key and no tombstone, besides the
    /// [`ROLL_KEY`] tombstones written here to close active segments (only closed segments
    /// are cleaned). Returns the records, roll markers left out.
    pub fn wait_compacted(&self, topic: &str, timeout: Duration) -> Result<Vec<OwnedMessage>> {
        let producer = self.clients().producer()?;
        let partitions = self.end_offsets(topic)?.len() as i32;
        let mut last = String::from("nothing read");
        let res = wait_for(
            &format!("Kafka's log cleaner to compact {topic}"),
            timeout,
            || {
                let mut pending = Vec::new();
                for p in 0..partitions {
                    let roll = FutureRecord::<[u8], [u8]>::to(topic)
                        .key(ROLL_KEY)
                        .partition(p);
                    pending.push(producer.send_result(roll).ok()?);
                }
                settle(&mut pending).ok()?;
                let records: Vec<OwnedMessage> = self
                    .read_all(topic)
                    .ok()?
                    .into_iter()
                    .filter(|m| m.key() != Some(ROLL_KEY))
                    .collect();
                let tombstones = records.iter().filter(|m| m.payload().is_none()).count();
                let keys: std::collections::BTreeSet<&[u8]> =
                    records.iter().filter_map(|m| m.key()).collect();
                let superseded = records.len() - keys.len();
                last = format!(
                    "{} records, {superseded} superseded, {tombstones} tombstones",
                    records.len()
                );
                (tombstones == 0 && superseded == 0).then_some(records)
            },
        );
        res.with_context(|| format!("last read: {last}"))
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

    /// Records of `topic` a `read_committed` consumer sees now. Not the end offsets: a
    /// transaction's commit or abort marker takes an offset, and aborted records are never
    /// seen. Counted by reading, from where the last call stopped.
    pub fn count(&self, topic: &str) -> Result<i64> {
        let clients = self.clients();
        let reader = clients.reader()?;
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let parts = counted.entry(topic.to_string()).or_default();
        for (p, end) in self.end_offsets(topic)? {
            let (from, n) = parts.entry(p).or_insert((0, 0));
            *n += count_range(&reader, topic, p, *from, end, Duration::from_secs(30))?;
            *from = (*from).max(end);
        }
        Ok(parts.values().map(|(_, n)| n).sum())
    }

    /// Every record of every partition of `topic`, partition by partition, in offset order.
    pub fn read_all(&self, topic: &str) -> Result<Vec<OwnedMessage>> {
        let clients = self.clients();
        let reader = clients.reader()?;
        let mut out = Vec::new();
        for (p, high) in self.end_offsets(topic)? {
            sieve_core::read::read_range(
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

    /// Records of `topic` that `group` has not committed yet, as a `read_committed` consumer
    /// reads them (the offsets between overstate it by the transaction markers).
    pub fn lag(&self, group: &str, topic: &str) -> Result<i64> {
        let committed = self.committed(group, topic)?;
        let reader = self.clients().reader()?;
        let mut lag = 0;
        for (p, end) in self.end_offsets(topic)? {
            let from = committed.get(&p).copied().unwrap_or(0);
            lag += count_range(&reader, topic, p, from, end, Duration::from_secs(30))?;
        }
        Ok(lag)
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

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        // For a post-mortem with Kafka's own tools (kafka.tools.DumpLogSegments).
        if std::env::var_os("SIEVE_KEEP_BROKER_DATA").is_some() && self.external.is_none() {
            self.dir.disable_cleanup(true);
            eprintln!("harness: broker data kept in {}", self.dir.path().display());
        }
    }
}

/// `transaction.state.log.num.partitions` in deploy/kafka/server.properties.
const TRANSACTION_STATE_PARTITIONS: i32 = 8;

/// A cluster of Kafka nodes on loopback (`scripts/broker.sh cluster N`): replication factor 3
/// (or N when smaller) and `min.insync.replicas=2` by default, data in a temporary directory;
/// every node stopped when dropped.
pub struct Cluster {
    pub nodes: usize,
    pub first_port: u16,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start(nodes: usize) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        // The script takes 2N consecutive ports (clients, then controllers): find a free run.
        let first_port = (0..50)
            .map(|_| free_port())
            .find(|p| {
                (1..2 * nodes as u16).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok())
            })
            .context("no run of free loopback ports")?;
        let cluster = Cluster {
            nodes,
            first_port,
            dir,
        };
        cluster.launch_stopped()?;
        Ok(cluster)
    }

    /// Starts every node that is not running, on its ports and data (`broker.sh cluster`
    /// skips running nodes), and waits until the cluster answers metadata.
    pub fn launch_stopped(&self) -> Result<()> {
        let out = Command::new(broker_script())
            .args([
                "cluster",
                &self.nodes.to_string(),
                &self.first_port.to_string(),
            ])
            .env("SIEVE_BROKER_DIR", self.dir.path())
            .output()
            .context("scripts/broker.sh cluster")?;
        ensure!(
            out.status.success(),
            "scripts/broker.sh cluster {}: {}",
            self.nodes,
            String::from_utf8_lossy(&out.stderr)
        );
        let clients = self.clients();
        wait_for(
            "the cluster to answer metadata",
            Duration::from_secs(90),
            || clients.check_reachable().ok(),
        )
    }

    /// SIGKILLs node `n` (1-based; its data survives) and waits until it is gone.
    pub fn kill(&self, n: usize) -> Result<()> {
        let pid = self.pid(n)?;
        signal::send(pid, Signal::Kill)?;
        wait_for(&format!("node {n} to die"), Duration::from_secs(30), || {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
    }

    /// The node leading partition `partition` of `topic`.
    pub fn leader(&self, topic: &str, partition: i32) -> Result<usize> {
        let reader = self.clients().reader()?;
        let md = reader.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let leader = md
            .topics()
            .first()
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| p.leader())
            .with_context(|| format!("no leader of {topic}/{partition}"))?;
        usize::try_from(leader).with_context(|| format!("{topic}/{partition} has no leader"))
    }

    /// The node coordinating the transactions of `transactional_id`: the leader of its
    /// partition of `__transaction_state` (Kafka hashes the id as Java's `String.hashCode`).
    pub fn transaction_coordinator(&self, transactional_id: &str) -> Result<usize> {
        let hash = transactional_id
            .encode_utf16()
            .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)));
        let abs = if hash == i32::MIN { 0 } else { hash.abs() };
        self.leader("__transaction_state", abs % TRANSACTION_STATE_PARTITIONS)
    }

    /// Every node's address, comma-separated, as `--brokers` takes them.
    pub fn addr(&self) -> String {
        (0..self.nodes as u16)
            .map(|i| format!("127.0.0.1:{}", self.first_port + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn clients(&self) -> Clients {
        Clients::new(loopback_args(self.addr()))
    }

    /// The pid of node `n` (1-based), for SIGKILL or SIGSTOP.
    pub fn pid(&self, n: usize) -> Result<u32> {
        let path = self.dir.path().join(format!("node-{n}/pid"));
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .parse()?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in 1..=self.nodes {
            if let Ok(pid) = self.pid(n) {
                let _ = signal::send(pid, Signal::Kill);
            }
        }
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
    /// `/metrics` of earlier lifetimes ended by `respawn`: their counters still count, so
    /// reconciliations hold across a restart.
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
            earlier_metrics: Vec::new(),
        })
    }

    /// Waits until `/readyz` answers 200 (joined, every assigned partition restored); the
    /// error names the log's last lines.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let res = wait_for("/readyz to answer 200", timeout, || {
            if self.exited().is_some() {
                return Some(Err(anyhow::anyhow!("the service exited")));
            }
            self.get("/readyz")
                .filter(|(code, _)| *code == 200)
                .map(|_| Ok(()))
        })
        .and_then(|r| r);
        res.with_context(|| format!("log tail:\n{}", self.log_tail(30)))
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

    /// Whether the process is frozen by SIGSTOP (state `T` in /proc/PID/stat).
    pub fn is_stopped(&self) -> bool {
        self.pid()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .and_then(|stat| {
                // The state follows the command name, which is in parentheses.
                let after = stat.rsplit_once(')')?.1;
                after.split_whitespace().next().map(|state| state == "T")
            })
            .unwrap_or(false)
    }

    /// SIGCONT: a process frozen by SIGSTOP (a failpoint's `:stop`) goes on.
    pub fn resume(&self) -> Result<()> {
        let pid = self.pid().context("service not running")?;
        signal::send(pid, Signal::Cont)?;
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
        signal::send(c.id(), Signal::Term)?;
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
        let res = wait_for(what, timeout, || self.exited());
        res.with_context(|| format!("log tail:\n{}", self.log_tail(40)))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.logs(), lines)
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
