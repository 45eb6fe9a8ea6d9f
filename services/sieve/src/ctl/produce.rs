//! `sieve ctl produce`: NDJSON from stdin to a topic, one record per line.

use std::process::ExitCode;

use anyhow::Context;
use rdkafka::producer::FutureRecord;
use sieve_core::config::KafkaArgs;
use sieve_core::kafka::Clients;

use super::settle;

#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[arg(long)]
    pub topic: String,
    /// JSON pointer of the record key (for example /id); no key when absent.
    #[arg(long)]
    pub key_pointer: Option<String>,
}

pub fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    produce_ndjson(
        args.kafka,
        &args.topic,
        args.key_pointer.as_deref(),
        std::io::stdin().lock(),
    )
}

/// Produces NDJSON lines from `input` to `topic`, keyed by the value at `key_pointer`; a line
/// that is not JSON or has no such key stops the run, naming the line.
pub fn produce_ndjson(
    kafka: KafkaArgs,
    topic: &str,
    key_pointer: Option<&str>,
    input: impl std::io::BufRead,
) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let producer = clients.producer()?;
    let mut pending = Vec::new();
    let mut n = 0u64;
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let key = match key_pointer {
            Some(ptr) => Some(
                sieve_formats::jsonkey::extract(line.as_bytes(), ptr)
                    .with_context(|| format!("line {}: key {ptr}", i + 1))?,
            ),
            None => None,
        };
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic).payload(line.as_bytes());
        if let Some(k) = &key {
            rec = rec.key(k);
        }
        pending.push(producer.send_result(rec).map_err(|(err, _)| err)?);
        n += 1;
        if pending.len() >= 20_000 {
            settle(&mut pending)?;
        }
    }
    settle(&mut pending)?;
    eprintln!("produced {n} records to {topic}");
    Ok(ExitCode::SUCCESS)
}
