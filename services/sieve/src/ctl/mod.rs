//! `sieve ctl`: the operator's tool. Each subcommand's module owns its options and its `run`.

pub mod dlq;
pub mod gen;
pub mod lag;
pub mod produce;
pub mod replay;
pub mod topics;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sieve_core::kafka::Clients;

#[derive(Debug, Subcommand)]
pub enum CtlCmd {
    /// Topics from the declarative topics file.
    Topics {
        #[command(subcommand)]
        command: topics::TopicsCmd,
    },
    /// Deterministic data for demos, tests and benchmarks.
    Gen {
        #[command(subcommand)]
        command: gen::GenCmd,
    },
    /// Produce NDJSON from stdin, one record per line, keyed by a JSON pointer.
    Produce(produce::ProduceArgs),
    /// Per partition: committed offset of a group, end offset, lag; and the total.
    Lag(lag::LagArgs),
    /// Rewind a stopped consumer group (like `kafka-consumer-groups --reset-offsets`); its
    /// stateful services rebuild their state for the replay when they start.
    Replay(replay::ReplayArgs),
    /// Dead-letter topics: reasons with counts, records, redrive.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCmd,
    },
}

pub fn run(cmd: CtlCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CtlCmd::Topics { command } => topics::run(command),
        CtlCmd::Gen { command } => gen::run(command),
        CtlCmd::Produce(args) => produce::run(args),
        CtlCmd::Lag(args) => lag::run(args),
        CtlCmd::Replay(args) => replay::run(args),
        CtlCmd::Dlq { command } => dlq::run(command),
    }
}

fn settle(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
    for r in futures::executor::block_on(join_all(pending.drain(..))) {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("delivery failed: {e}"),
            Err(_) => anyhow::bail!("delivery canceled"),
        }
    }
    Ok(())
}

/// (low, high) watermarks of every partition of `topic`.
fn watermarks(
    clients: &Clients,
    reader: &BaseConsumer,
    topic: &str,
) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let n = clients.partition_count(reader, topic)?;
    (0..n)
        .map(|p| {
            let (lo, hi) = reader
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("watermarks of {topic}/{p}"))?;
            Ok((p, lo, hi))
        })
        .collect()
}
