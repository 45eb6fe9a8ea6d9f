//! `sieve ctl lag`: per partition, a group's committed offset, the end offset and the lag.
//!
//! The lag is counted in records a `read_committed` consumer reads: a transaction's commit
//! marker takes an offset, so on a topic written with transactions (every topic sieve's own
//! stages write) the end offset stays past a caught-up group's committed offset.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use sieve_core::config::KafkaArgs;
use sieve_core::kafka::Clients;

use super::watermarks;

#[derive(Debug, clap::Args)]
pub struct LagArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(long)]
    pub group: String,
    #[arg(long)]
    pub topic: String,
    /// Print only the total lag (for scripts).
    #[arg(long)]
    pub total: bool,
}

pub fn run(args: LagArgs) -> anyhow::Result<ExitCode> {
    lag(args.kafka, &args.group, &args.topic, args.total)
}

fn lag(kafka: KafkaArgs, group: &str, topic: &str, total_only: bool) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let marks = watermarks(&clients, &reader, topic)?;
    let consumer: BaseConsumer = clients.consumer_config(group).create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &marks {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .context("committed offsets")?;
    let mut total = 0i64;
    let mut rows = Vec::new();
    for (p, lo, hi) in marks {
        let c = committed
            .find_partition(topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0);
        // Without a commit the group would start at the earliest offset.
        let lag = records_between(&reader, topic, p, c.unwrap_or(lo), hi)?;
        total += lag;
        rows.push((p, c, hi, lag));
    }
    if total_only {
        println!("{total}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:>9} {:>12} {:>12} {:>10}",
        "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
    );
    for (p, c, hi, lag) in rows {
        let c = c.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        println!("{topic:<40} {p:>9} {c:>12} {hi:>12} {lag:>10}");
    }
    println!(
        "{:<40} {:>9} {:>12} {:>12} {total:>10}",
        "TOTAL", "", "", ""
    );
    Ok(ExitCode::SUCCESS)
}

/// Ranges up to this many offsets are counted record by record; longer ones report their
/// offset difference, which overstates the lag by the transaction markers in it.
const COUNTED_UP_TO: i64 = 100_000;

/// Records a `read_committed` consumer reads in `[from, to)`.
fn records_between(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> anyhow::Result<i64> {
    if to - from > COUNTED_UP_TO || to <= from {
        return Ok((to - from).max(0));
    }
    sieve_core::read::count_range(reader, topic, partition, from, to, Duration::from_secs(30))
        .with_context(|| format!("reading {topic}/{partition}"))
}
