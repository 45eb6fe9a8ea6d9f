//! Benchmark of the core loop against raw librdkafka on the same broker and data, in one run:
//! raw consume→produce pass-through (the ceiling), then the core runner's pass-through with
//! exactly-once on and off. Prints records/s and the ratio core/raw.
//!
//!   cargo run -p sieve-tests --bin sieve-bench-core -- [--records N] [--engine sqlite|memory]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Parser;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use sieve_core::config::{Guarantee, LogFormat, ServiceArgs};
use sieve_core::record::Output;
use sieve_core::runner::{self, Ctx, Operator, OperatorFactory};
use sieve_core::store::PartitionStore;
use sieve_core::telemetry::Health;
use sieve_tests::{unique, wait_for, Broker, Engine};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// sqlite (correct, slower) or memory (fast; valid only because counts are checked).
    #[arg(long, default_value = "sqlite")]
    engine: String,
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

/// Raw librdkafka: consume every record, produce it, wait for all acks, commit.
fn raw_passthrough(broker: &Broker, input: &str, output: &str, n: usize) -> Result<Duration> {
    let clients = broker.clients();
    let consumer: BaseConsumer = clients.consumer_config(&unique("raw")).create()?;
    consumer.subscribe(&[input])?;
    let producer = clients.producer()?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    let mut seen = 0;
    while seen < n {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            let mut rec = FutureRecord::<[u8], [u8]>::to(output);
            if let Some(k) = m.key() {
                rec = rec.key(k);
            }
            if let Some(v) = m.payload() {
                rec = rec.payload(v);
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
            seen += 1;
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

fn core_passthrough(
    broker: &Broker,
    input: &str,
    output: &str,
    n: usize,
    guarantee: Guarantee,
) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let args = ServiceArgs {
        group: unique("core"),
        state_dir: dir.path().to_path_buf(),
        metrics_addr: "127.0.0.1:0".parse()?,
        log_format: LogFormat::Text,
        guarantee,
        batch_records: 5_000,
        batch_linger_ms: 50,
    };
    let clients = broker.clients();
    let shutdown = Arc::new(AtomicBool::new(false));
    let stop = shutdown.clone();
    let factory = PassFactory {
        input: input.to_string(),
        output: output.to_string(),
    };
    let started = Instant::now();
    let worker =
        std::thread::spawn(move || runner::run(factory, &clients, &args, Health::new(), stop));
    wait_for("core output", Duration::from_secs(600), || {
        (broker.count(output).ok()? >= n as i64).then_some(())
    })?;
    let elapsed = started.elapsed();
    shutdown.store(true, Ordering::SeqCst);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("runner panicked"))??;
    Ok(elapsed)
}

fn main() -> Result<()> {
    let args = Args::parse();
    sieve_core::telemetry::init_logs(LogFormat::Text);
    let engine = if args.engine == "memory" {
        Engine::Memory
    } else {
        Engine::Sqlite
    };
    let broker = Broker::start_with(engine)?;
    let input = unique("bench-in");
    broker.create_topic(&input, args.partitions)?;
    let value = "x".repeat(args.value_bytes);
    broker.produce(
        &input,
        (0..args.records).map(|i| (format!("k{}", i % 10_000), value.as_bytes())),
    )?;
    ensure!(broker.count(&input)? == args.records as i64, "input count");

    let mut rows = Vec::new();
    for (name, guarantee) in [
        ("raw librdkafka pass-through", None),
        (
            "core pass-through, exactly-once",
            Some(Guarantee::ExactlyOnce),
        ),
        (
            "core pass-through, at-least-once",
            Some(Guarantee::AtLeastOnce),
        ),
    ] {
        let out = unique("bench-out");
        broker.create_topic(&out, args.partitions)?;
        let elapsed = match guarantee {
            None => raw_passthrough(&broker, &input, &out, args.records)?,
            Some(g) => core_passthrough(&broker, &input, &out, args.records, g)?,
        };
        let count = broker.count(&out)?;
        ensure!(
            count == args.records as i64,
            "{name}: {count} outputs for {} inputs",
            args.records
        );
        rows.push((name, args.records as f64 / elapsed.as_secs_f64()));
    }
    let raw = rows[0].1;
    println!(
        "\n{} records x {} B, {} partitions, {} engine, {} cores\n",
        args.records,
        args.value_bytes,
        args.partitions,
        args.engine,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| run | records/s | ratio to raw |\n| --- | ---: | ---: |");
    for (name, rate) in &rows {
        println!("| {name} | {rate:.0} | {:.2} |", rate / raw);
    }
    Ok(())
}
