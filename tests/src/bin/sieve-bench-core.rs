//! Benchmark of the core loop, dedup and the stream anti-join against raw librdkafka on the
//! same broker and data, in one run: raw consume→produce pass-through (the ceiling), the core
//! runner's pass-through under each guarantee, dedup (10 % retries by default) under each
//! guarantee and, with transactions, at commit intervals of 10 ms, 100 ms and 1 s, and
//! the anti-join against a right side holding every other key. Prints records/s and the
//! ratio to raw, plus the Bloom filter's bits per key at 1 % FP. A naive dedup (a `HashSet`
//! of every key, consume→produce) is the second baseline for dedup: each stage's peak RSS is
//! measured (the process's high-water mark is reset before it), so the set's growth shows
//! beside dedup's bounded state. `--json` writes the results for `bench/run`.
//!
//!   cargo run -p sieve-tests --bin sieve-bench-core -- [--records N]
//!     [--stages raw,raw-default,core-eo,core-ids,core-alo,dedup,...] [--json PATH]
//!
//! CPU is counted per stage for this process (the stage) and for the broker separately: on
//! a shared 2-core machine CPU-seconds per record are steadier than records/s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sieve_core::config::{Guarantee, LogFormat, ServiceArgs};
use sieve_core::engine;
use sieve_core::operator::{Ctx, Operator, OperatorFactory};
use sieve_core::record::Output;
use sieve_core::store::PartitionStore;
use sieve_core::telemetry::Health;
use sieve_tests::{broker_name, unique, wait_for, Broker};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Share of input records that repeat an earlier key with the same payload.
    #[arg(long, default_value_t = 0.1)]
    retry_rate: f64,
    /// Stages to run, in order (`raw` first: it is the baseline of the ratios).
    #[arg(long, value_delimiter = ',', default_values_t = STAGES.map(String::from))]
    stages: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// A librdkafka property on top of sieve's client settings in the `raw` stage
    /// (`-X compression.type=none`), to measure what one setting costs.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    properties: Vec<sieve_core::config::KafkaProperty>,
}

/// Every stage. The naive dedup runs last: the memory its set held stays in the process.
const STAGES: [&str; 13] = [
    "raw",
    "raw-default",
    "core-eo",
    "core-ids",
    "core-alo",
    "dedup",
    "dedup-ids",
    "dedup-alo",
    "dedup-txn-10ms",
    "dedup-txn-100ms",
    "dedup-txn-1000ms",
    "antijoin",
    "naive-dedup",
];

#[derive(serde::Serialize)]
struct StageResult {
    stage: String,
    name: &'static str,
    records_per_s: f64,
    seconds: f64,
    outputs: i64,
    expected_outputs: usize,
    peak_rss_mib: f64,
    /// CPU-seconds per million input records: this process (the stage), and the broker.
    stage_cpu_s_per_m: f64,
    broker_cpu_s_per_m: f64,
}

/// How a stage runs the engine: the guarantee and the batch (transaction) bounds.
#[derive(Clone, Copy)]
struct Mode {
    guarantee: Guarantee,
    batch_records: usize,
    batch_linger: Duration,
}

impl Mode {
    fn of(guarantee: Guarantee) -> Mode {
        Mode {
            guarantee,
            batch_records: 5_000,
            batch_linger: Duration::from_millis(50),
        }
    }

    /// Transactions committed every `ms` (the batch bound set far above what arrives).
    fn interval(ms: u64) -> Mode {
        Mode {
            guarantee: Guarantee::ExactlyOnce,
            batch_records: 200_000,
            batch_linger: Duration::from_millis(ms),
        }
    }
}

/// User plus system CPU-seconds of process `pid` so far (`/proc/PID/stat`).
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    let ticks: f64 = fields
        .get(11)
        .zip(fields.get(12))
        .map_or(Ok(0.0), |(u, s)| {
            Ok::<_, anyhow::Error>(u.parse::<f64>()? + s.parse::<f64>()?)
        })?;
    Ok(ticks / 100.0)
}

/// Resets this process's peak RSS (VmHWM) to its current RSS (Linux `clear_refs` 5).
fn reset_peak_rss() -> Result<()> {
    Ok(std::fs::write("/proc/self/clear_refs", "5")?)
}

fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))?;
    Ok(kb / 1024.0)
}

struct Pass(String);
impl Operator for Pass {
    fn process(&mut self, r: &OwnedMessage, ctx: &mut Ctx<'_>) -> sieve_core::Result<()> {
        let mut o = Output::new(&self.0);
        o.key = r.key().map(<[u8]>::to_vec);
        o.payload = r.payload().map(<[u8]>::to_vec);
        ctx.emit(o);
        Ok(())
    }
}
struct PassFactory {
    input: String,
    output: String,
}
impl OperatorFactory for PassFactory {
    type Op = Pass;
    fn inputs(&self) -> Vec<String> {
        vec![self.input.clone()]
    }
    fn outputs(&self) -> Vec<String> {
        vec![self.output.clone()]
    }
    fn open(&self, _: &str, _: i32, _: &PartitionStore) -> sieve_core::Result<Pass> {
        Ok(Pass(self.output.clone()))
    }
}

/// librdkafka's own defaults, with only what a consume→produce loop needs: where, the group,
/// manual offsets from the start, and the idempotent producer every stage of sieve uses.
fn default_configs(broker: &Broker) -> (ClientConfig, ClientConfig) {
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", broker.addr())
        .set("group.id", unique("raw-default"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", broker.addr())
        .set("enable.idempotence", "true");
    (consumer, producer)
}

/// sieve's client settings (`sieve_core::kafka::Clients`), `extra` on top.
fn tuned_configs(
    broker: &Broker,
    extra: &[sieve_core::config::KafkaProperty],
) -> (ClientConfig, ClientConfig) {
    let mut args = broker.kafka_args();
    args.properties = extra.to_vec();
    let clients = sieve_core::kafka::Clients::new(args);
    (
        clients.consumer_config(&unique("raw")),
        clients.producer_config(),
    )
}

/// Raw librdkafka: consume every record, produce those `keep` accepts, wait for all acks,
/// commit.
fn raw_passthrough(
    (consumer, producer): (ClientConfig, ClientConfig),
    input: &str,
    output: &str,
    n: usize,
    mut keep: impl FnMut(&BorrowedMessage<'_>) -> bool,
) -> Result<Duration> {
    let consumer: BaseConsumer = consumer.create()?;
    consumer.subscribe(&[input])?;
    let producer: FutureProducer = producer.create()?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    let mut seen = 0;
    while seen < n {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            seen += 1;
            consumer.store_offset_from_message(&m)?;
            if !keep(&m) {
                continue;
            }
            let mut rec = FutureRecord::<[u8], [u8]>::to(output);
            if let Some(k) = m.key() {
                rec = rec.key(k);
            }
            if let Some(v) = m.payload() {
                rec = rec.payload(v);
            }
            // A real pass-through keeps the headers (here the idempotency key).
            if let Some(h) = m.headers() {
                rec = rec.headers(h.detach());
            }
            loop {
                match producer.send_result(rec) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((_, r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "raw pass-through stalled at {seen}"
        );
    }
    for r in futures::executor::block_on(join_all(pending)) {
        ensure!(matches!(r, Ok(Ok(_))), "raw delivery failed");
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    Ok(started.elapsed())
}

fn service_args(mode: Mode, dir: &std::path::Path) -> Result<ServiceArgs> {
    Ok(ServiceArgs {
        group: unique("core"),
        state_dir: dir.to_path_buf(),
        metrics_addr: "127.0.0.1:0".parse()?,
        log_format: LogFormat::Text,
        guarantee: mode.guarantee,
        instance_id: None,
        batch_records: mode.batch_records,
        batch_linger: mode.batch_linger,
        state_memory_mb: 64,
        group_stall: Duration::from_secs(60),
    })
}

/// Runs the factory `make` builds in-process until `output` holds `expect` records; returns
/// the time.
fn run_until<F: OperatorFactory>(
    broker: &Broker,
    make: impl FnOnce(&ServiceArgs) -> Result<F>,
    output: &str,
    expect: usize,
    mode: Mode,
) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let args = service_args(mode, dir.path())?;
    let factory = make(&args)?;
    let clients = broker.clients();
    let shutdown = Arc::new(AtomicBool::new(false));
    let stop = shutdown.clone();
    let started = Instant::now();
    let worker =
        std::thread::spawn(move || engine::run(factory, &clients, &args, Health::new(), stop));
    wait_for("outputs", Duration::from_secs(900), || {
        (broker.count(output).ok()? >= expect as i64).then_some(())
    })?;
    let elapsed = started.elapsed();
    shutdown.store(true, Ordering::SeqCst);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("runner panicked"))??;
    Ok(elapsed)
}

fn core_passthrough(
    broker: &Broker,
    input: &str,
    output: &str,
    n: usize,
    mode: Mode,
) -> Result<Duration> {
    let factory = PassFactory {
        input: input.to_string(),
        output: output.to_string(),
    };
    run_until(broker, |_| Ok(factory), output, n, mode)
}

/// Dedup's flags with their defaults, as `sieve dedup` parses them.
#[derive(Parser)]
struct DedupCli {
    #[command(flatten)]
    dedup: sieve_dedup::DedupArgs,
}

fn dedup(
    broker: &Broker,
    input: &str,
    output: &str,
    unique_n: usize,
    mode: Mode,
) -> Result<Duration> {
    let dlq = unique("bench-dlq");
    broker.create_topic(&dlq, 1)?;
    let cfg =
        DedupCli::parse_from(["dedup", "--input", input, "--output", output, "--dlq", &dlq]).dedup;
    run_until(
        broker,
        |_| Ok(sieve_dedup::DedupFactory::new(cfg)),
        output,
        unique_n,
        mode,
    )
}

/// The stream anti-join's flags with their defaults, as `sieve antijoin stream` parses them.
#[derive(Parser)]
struct AntijoinCli {
    #[command(flatten)]
    stream: sieve_antijoin::stream::StreamArgs,
}

fn antijoin(
    broker: &Broker,
    left: &str,
    right: &str,
    output: &str,
    expect: usize,
) -> Result<Duration> {
    let dlq = unique("bench-dlq");
    broker.create_topic(&dlq, 1)?;
    let cfg = AntijoinCli::parse_from([
        "antijoin", "--left", left, "--right", right, "--out", output, "--dlq", &dlq,
    ])
    .stream;
    run_until(
        broker,
        |svc| Ok(sieve_antijoin::stream::StreamFactory::open(cfg, svc)?),
        output,
        expect,
        Mode::of(Guarantee::ExactlyOnce),
    )
}

/// Bits per key of a filled Bloom filter at 1 % target FP, and its measured FP rate.
fn bloom_bits_per_key(keys: usize) -> Result<(f64, f64)> {
    let mut b = sieve_core::bloom::KeyBloom::new(0.01, keys);
    for i in 0..keys {
        b.insert(format!("evt-{i:010}").as_bytes());
    }
    let bits = b.to_bytes()?.len() as f64 * 8.0 / keys as f64;
    let probes = 200_000;
    let fp = (0..probes)
        .filter(|i| b.may_contain(format!("other-{i}").as_bytes()))
        .count();
    Ok((bits, fp as f64 / probes as f64))
}

fn main() -> Result<()> {
    let args = Args::parse();
    sieve_core::telemetry::init_logs(LogFormat::Text);
    let broker = Broker::start()?;
    let engine = broker_name()?;
    let input = unique("bench-in");
    broker.create_topic(&input, args.partitions)?;
    // Every record has its own idempotency key except `retry_rate` exact repeats, so the
    // pass-through stages and dedup read the same bytes. Values are JSON carrying the key
    // (the anti-join's join key), padded to `value_bytes`.
    let keys: Vec<String> = (0..args.records)
        .map(|i| {
            let step = |n: usize| (n as f64 * args.retry_rate).floor();
            let repeat = i > 0 && step(i) != step(i + 1);
            format!("evt-{:010}", if repeat { i - 1 } else { i })
        })
        .collect();
    let unique_n = keys.iter().collect::<std::collections::HashSet<_>>().len();
    let values: Vec<String> = keys
        .iter()
        .map(|k| {
            let v = format!(r#"{{"id":"{k}","pad":""}}"#);
            let pad = "x".repeat(args.value_bytes.saturating_sub(v.len()));
            format!(r#"{{"id":"{k}","pad":"{pad}"}}"#)
        })
        .collect();
    broker.produce_records(
        &input,
        keys.iter()
            .zip(&values)
            .map(|(k, v)| sieve_tests::TestRecord {
                key: k.as_bytes(),
                value: v.as_bytes(),
                headers: vec![("idempotency-key", k.as_bytes())],
                timestamp_ms: None,
            }),
    )?;
    ensure!(broker.count(&input)? == args.records as i64, "input count");
    // The anti-join's right side: every key with an even number.
    let even = |k: &str| k.ends_with(['0', '2', '4', '6', '8']);
    let right = unique("bench-right");
    broker.create_topic(&right, args.partitions)?;
    let right_keys: std::collections::BTreeSet<&String> = keys.iter().filter(|k| even(k)).collect();
    broker.produce(&right, right_keys.iter().map(|k| (k.as_str(), "{}")))?;
    let missing = keys.iter().filter(|k| !even(k)).count();

    let records = args.records;
    drop((keys, values));
    let mut rows: Vec<StageResult> = Vec::new();
    let (eo, ids, alo) = (
        Mode::of(Guarantee::ExactlyOnce),
        Mode::of(Guarantee::ExactlyOnceIds),
        Mode::of(Guarantee::AtLeastOnce),
    );
    let broker_pid = broker.pid().context("broker pid")?.to_string();
    for stage in &args.stages {
        let out = unique("bench-out");
        broker.create_topic(&out, args.partitions)?;
        reset_peak_rss()?;
        let cpu_before = (cpu_seconds("self")?, cpu_seconds(&broker_pid)?);
        let (name, elapsed, expect) = match stage.as_str() {
            "raw" => (
                "raw librdkafka pass-through (sieve's client settings)",
                raw_passthrough(
                    tuned_configs(&broker, &args.properties),
                    &input,
                    &out,
                    records,
                    |_| true,
                )?,
                records,
            ),
            "raw-default" => (
                "raw librdkafka pass-through (librdkafka defaults)",
                raw_passthrough(default_configs(&broker), &input, &out, records, |_| true)?,
                records,
            ),
            "core-eo" => (
                "core pass-through, exactly-once (transactions)",
                core_passthrough(&broker, &input, &out, records, eo)?,
                records,
            ),
            "core-ids" => (
                "core pass-through, exactly-once-ids",
                core_passthrough(&broker, &input, &out, records, ids)?,
                records,
            ),
            "core-alo" => (
                "core pass-through, at-least-once",
                core_passthrough(&broker, &input, &out, records, alo)?,
                records,
            ),
            "dedup" => (
                "dedup, exactly-once (transactions, batches of 5 000 or 50 ms)",
                dedup(&broker, &input, &out, unique_n, eo)?,
                unique_n,
            ),
            "dedup-ids" => (
                "dedup, exactly-once-ids",
                dedup(&broker, &input, &out, unique_n, ids)?,
                unique_n,
            ),
            "dedup-alo" => (
                "dedup, at-least-once",
                dedup(&broker, &input, &out, unique_n, alo)?,
                unique_n,
            ),
            "dedup-txn-10ms" => (
                "dedup, a transaction every 10 ms",
                dedup(&broker, &input, &out, unique_n, Mode::interval(10))?,
                unique_n,
            ),
            "dedup-txn-100ms" => (
                "dedup, a transaction every 100 ms",
                dedup(&broker, &input, &out, unique_n, Mode::interval(100))?,
                unique_n,
            ),
            "dedup-txn-1000ms" => (
                "dedup, a transaction every 1 s",
                dedup(&broker, &input, &out, unique_n, Mode::interval(1000))?,
                unique_n,
            ),
            "antijoin" => (
                "anti-join stream, exactly-once (right: half the keys)",
                antijoin(&broker, &input, &right, &out, missing)?,
                missing,
            ),
            "naive-dedup" => {
                let mut seen = std::collections::HashSet::new();
                let elapsed =
                    raw_passthrough(tuned_configs(&broker, &[]), &input, &out, records, |m| {
                        seen.insert(m.key().map(<[u8]>::to_vec))
                    })?;
                ("naive dedup (HashSet of every key)", elapsed, unique_n)
            }
            other => anyhow::bail!("unknown stage {other}; stages: {}", STAGES.join(",")),
        };
        let count = broker.count(&out)?;
        ensure!(
            count == expect as i64,
            "{name}: {count} outputs, expected {expect}"
        );
        // Rates count input records consumed, so a stage that drops records compares fairly.
        let rate = records as f64 / elapsed.as_secs_f64();
        let per_m = |before: f64, now: f64| (now - before) / records as f64 * 1e6;
        let stage_cpu_s_per_m = per_m(cpu_before.0, cpu_seconds("self")?);
        let broker_cpu_s_per_m = per_m(cpu_before.1, cpu_seconds(&broker_pid)?);
        eprintln!("{name}: {rate:.0} records/s");
        rows.push(StageResult {
            stage: stage.clone(),
            name,
            records_per_s: rate,
            seconds: elapsed.as_secs_f64(),
            outputs: count,
            expected_outputs: expect,
            peak_rss_mib: peak_rss_mib()?,
            stage_cpu_s_per_m,
            broker_cpu_s_per_m,
        });
    }
    let raw = rows
        .iter()
        .find(|r| r.stage == "raw")
        .map_or(f64::NAN, |r| r.records_per_s);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n{} records x {} B ({:.0} % retries), {} partitions, {}, {cores} cores\n",
        records,
        args.value_bytes,
        args.retry_rate * 100.0,
        args.partitions,
        engine,
    );
    println!(
        "| run | input records/s | ratio to raw | CPU-s per M records: stage / broker | peak RSS (MiB) |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} / {:.2} | {:.0} |",
            r.name,
            r.records_per_s,
            r.records_per_s / raw,
            r.stage_cpu_s_per_m,
            r.broker_cpu_s_per_m,
            r.peak_rss_mib
        );
    }
    let (bits, fp) = bloom_bits_per_key(1_000_000)?;
    println!(
        "\nBloom filter, 1 M keys at 1 % target: {bits:.1} bits/key, measured FP {:.2} %",
        fp * 100.0
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "records": records,
            "unique_keys": unique_n,
            "value_bytes": args.value_bytes,
            "retry_rate": args.retry_rate,
            "partitions": args.partitions,
            "engine": engine,
            "cores": cores,
            "stages": rows,
            "bloom": {"keys": 1_000_000, "bits_per_key": bits, "false_positive_rate": fp},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
