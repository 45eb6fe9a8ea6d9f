//! `sieve ctl`: the operator's tool.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::TopicPartitionList;
use sieve_core::config::{KafkaArgs, KafkaProperty};
use sieve_core::kafka::Clients;
use sieve_core::topics::{self, Action, TopicsFile};

use crate::gen::{self, EventKind, EventSpec, UsersSpec};

pub fn topics_apply(
    kafka: KafkaArgs,
    file: &Path,
    prefix: &str,
    mode: topics::Mode,
) -> anyhow::Result<ExitCode> {
    let desired = TopicsFile::load(file)?.desired(prefix)?;
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reports = rt
        .block_on(topics::apply(&clients, &desired, mode))
        .context("applying topics")?;
    let mut drifted = 0;
    println!("{:<32} RESULT", "TOPIC");
    for r in &reports {
        let what = match &r.action {
            Action::Created => "created".to_string(),
            Action::WouldCreate => "would create".to_string(),
            Action::UpToDate => "up to date".to_string(),
            Action::Fixed(d) => format!("fixed: {}", d.join("; ")),
            Action::Drift(d) => {
                drifted += 1;
                format!("DRIFT: {}", d.join("; "))
            }
        };
        println!("{:<32} {what}", r.topic);
    }
    // Drift that remains (partitions and replication are never changed here; configs without
    // --fix): exit 3 lets scripts notice.
    Ok(if drifted > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn print_events(spec: EventSpec) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in gen::events(spec) {
        out.write_all(&e.payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Produces generated events keyed and `idempotency-key`-headed by their id, plus `extra`
/// headers on every record (a benchmark's raw baseline carries what the path it measures
/// carries).
pub fn produce_events(
    kafka: KafkaArgs,
    topic: &str,
    spec: EventSpec,
    extra: &[KafkaProperty],
) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let producer = clients.producer()?;
    let started = Instant::now();
    let mut pending = Vec::new();
    let mut n = 0u64;
    for e in gen::events(spec) {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(e.key.as_bytes()),
        });
        for h in extra {
            headers = headers.insert(Header {
                key: &h.key,
                value: Some(h.value.as_bytes()),
            });
        }
        let rec = FutureRecord::to(topic)
            .key(e.key.as_bytes())
            .payload(&e.payload)
            .headers(headers);
        pending.push(producer.send_result(rec).map_err(|(err, _)| err)?);
        n += 1;
        if pending.len() >= 20_000 {
            settle(&mut pending)?;
        }
    }
    settle(&mut pending)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "produced {n} events to {topic} in {secs:.1}s ({:.0}/s)",
        n as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
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

pub(crate) fn settle(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
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
pub(crate) fn watermarks(
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

pub fn count(kafka: KafkaArgs, topic: &str, distinct_keys: bool) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let marks = watermarks(&clients, &reader, topic)?;
    // Records, not offsets: a transaction's commit marker takes an offset and an aborted
    // transaction's records are never read; compaction leaves gaps.
    let mut records = 0u64;
    let mut keys: HashSet<Vec<u8>> = HashSet::new();
    for (p, lo, hi) in marks {
        sieve_core::changelog::read_range(
            &reader,
            topic,
            p,
            lo,
            hi,
            Duration::from_secs(30),
            |m| {
                records += 1;
                if distinct_keys {
                    keys.insert(m.key().unwrap_or_default().to_vec());
                }
                Ok(())
            },
        )?;
    }
    println!(
        "{}",
        if distinct_keys {
            keys.len() as u64
        } else {
            records
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn lag(
    kafka: KafkaArgs,
    group: &str,
    topic: &str,
    total_only: bool,
) -> anyhow::Result<ExitCode> {
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
        let lag = hi - c.unwrap_or(lo);
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

pub fn summarise_events(spec: EventSpec) -> anyhow::Result<ExitCode> {
    let (mut new, mut retries, mut conflicts) = (0u64, 0u64, 0u64);
    for e in gen::events(spec) {
        match e.kind {
            EventKind::New => new += 1,
            EventKind::Retry => retries += 1,
            EventKind::Conflict => conflicts += 1,
        }
    }
    println!("{new} new, {retries} retries, {conflicts} conflicts");
    Ok(ExitCode::SUCCESS)
}

/// Prints generated records as NDJSON.
pub fn print_records(records: impl Iterator<Item = (String, Vec<u8>)>) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    write_json_records(&mut out, records.map(|(_, r)| r), false)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Writes one side of the users data set as NDJSON or one JSON array.
pub fn write_users(
    spec: &UsersSpec,
    legacy: bool,
    array: bool,
    out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let sink: Box<dyn Write> = match out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = std::io::BufWriter::with_capacity(1 << 20, sink);
    let records: Box<dyn Iterator<Item = (String, Vec<u8>)>> = if legacy {
        Box::new(spec.legacy())
    } else {
        Box::new(spec.current())
    };
    write_json_records(&mut w, records.map(|(_, r)| r), array)?;
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// NDJSON, or a JSON array with one record per line.
pub fn write_json_records(
    w: &mut dyn Write,
    records: impl Iterator<Item = Vec<u8>>,
    array: bool,
) -> std::io::Result<()> {
    if array {
        w.write_all(b"[\n")?;
    }
    for (i, r) in records.enumerate() {
        if array && i > 0 {
            w.write_all(b",\n")?;
        }
        w.write_all(&r)?;
        if !array {
            w.write_all(b"\n")?;
        }
    }
    if array {
        w.write_all(b"\n]\n")?;
    }
    Ok(())
}
