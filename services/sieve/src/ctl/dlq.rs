//! `sieve ctl dlq list|show|redrive`: inspect a stage's dead-letter topic and send records
//! back once their cause is fixed.
//!
//! Every stage writes the same DLQ shape (`sieve_core::dlq`): the original key, payload and
//! headers plus `sieve-dlq-*` headers naming stage, reason, detail and origin. A redrive
//! re-publishes the original bytes and headers (without the `sieve-dlq-*` headers and the
//! DLQ write's own `sieve-id`) with `sieve-redriven-from: <dlq topic>/<partition>/<offset>`,
//! and records each redriven DLQ record in the compacted topic `<dlq topic>.redriven`, so no
//! DLQ record is redriven twice, whatever filters later runs use.

use std::collections::{BTreeMap, HashSet};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sieve_core::config::KafkaArgs;
use sieve_core::dlq;
use sieve_core::kafka::Clients;
use sieve_core::read::{read_range, read_range_while};
use sieve_core::record::{header, ID_HEADER};
use sieve_core::CoreError;

use super::replay::parse_datetime;
use super::{settle, watermarks};

/// Marker header of a redriven record.
pub const REDRIVEN_FROM: &str = "sieve-redriven-from";
const DLQ_HEADER_PREFIX: &str = "sieve-dlq-";
const IDLE: Duration = Duration::from_secs(30);
const PREVIEW_BYTES: usize = 120;

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// Reasons with counts and first and last times.
    List(DlqArgs),
    /// Records: offset, reason, detail, source, payload preview.
    Show(DlqArgs),
    /// Re-publish original bytes and headers to the source topic (or --to-topic), each DLQ
    /// record at most once.
    Redrive {
        #[command(flatten)]
        args: DlqArgs,
        /// Destination instead of each record's source topic.
        #[arg(long)]
        to_topic: Option<String>,
    },
}

/// Which DLQ topic, and which of its records.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The DLQ topic, e.g. dlq.dedup.
    #[arg(long)]
    pub topic: String,
    /// Only records with this reason (the sieve-dlq-reason header).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only records dead-lettered at or after this instant (RFC 3339).
    #[arg(long, value_parser = parse_datetime)]
    pub since: Option<i64>,
    /// Only records dead-lettered before this instant (RFC 3339).
    #[arg(long, value_parser = parse_datetime)]
    pub to: Option<i64>,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DlqArgs {
    fn filter(&self) -> Filter {
        Filter {
            reason: self.reason.clone(),
            since: self.since,
            to: self.to,
            limit: self.limit,
        }
    }
}

pub fn run(cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCmd::List(a) => list(a.kafka.clone(), &a.topic, &a.filter()),
        DlqCmd::Show(a) => show(a.kafka.clone(), &a.topic, &a.filter()),
        DlqCmd::Redrive { args, to_topic } => {
            let filter = args.filter();
            redrive(args.kafka, &args.topic, &filter, to_topic.as_deref())
        }
    }
}

/// Which DLQ records a command looks at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    /// Dead-lettered at or after (ms since the epoch).
    pub since: Option<i64>,
    /// Dead-lettered before (ms since the epoch).
    pub to: Option<i64>,
    /// At most this many matching records.
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, m: &OwnedMessage) -> bool {
        let ts = m.timestamp().to_millis().unwrap_or(0);
        self.reason
            .as_deref()
            .is_none_or(|r| header(m, dlq::REASON) == Some(r.as_bytes()))
            && self.since.is_none_or(|s| ts >= s)
            && self.to.is_none_or(|t| ts < t)
    }
}

/// Where a redriven DLQ record went (the value in `<dlq topic>.redriven`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Redriven {
    topic: String,
    partition: i32,
    offset: i64,
}

/// Compacted topic recording which records of `dlq_topic` were redriven.
pub fn redriven_topic(dlq_topic: &str) -> String {
    format!("{dlq_topic}.redriven")
}

fn redriven_key(partition: i32, offset: i64) -> String {
    format!("{partition}/{offset}")
}

/// Visits the matching records of every partition of `topic`, in offset order per
/// partition, until the filter's limit; starts at `--since` by the broker's time index.
fn scan(
    clients: &Clients,
    reader: &BaseConsumer,
    topic: &str,
    filter: &Filter,
    mut f: impl FnMut(&OwnedMessage) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let marks = watermarks(clients, reader, topic)?;
    let starts = match filter.since {
        Some(ms) => start_offsets(reader, topic, &marks, ms)?,
        None => marks.iter().map(|(p, lo, _)| (*p, *lo)).collect(),
    };
    let mut left = filter.limit.unwrap_or(usize::MAX);
    for (p, _, high) in marks {
        if left == 0 {
            break;
        }
        let from = starts.get(&p).copied().unwrap_or(high);
        read_range_while(reader, topic, p, from, high, IDLE, |m| {
            if left == 0 {
                // The limit is reached mid-partition.
                return Ok(ControlFlow::Break(()));
            }
            if filter.matches(m) {
                left -= 1;
                f(m).map_err(|e| CoreError::Operator(format!("{e:#}")))?;
            }
            Ok(ControlFlow::Continue(()))
        })?;
    }
    Ok(())
}

/// Per partition, the first offset at or after `ms` (the end when none is).
fn start_offsets(
    reader: &BaseConsumer,
    topic: &str,
    marks: &[(i32, i64, i64)],
    ms: i64,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in marks {
        tpl.add_partition_offset(topic, *p, Offset::Offset(ms))?;
    }
    let found = reader
        .offsets_for_times(tpl, Duration::from_secs(10))
        .with_context(|| format!("offsets for times of {topic}"))?;
    Ok(marks
        .iter()
        .map(|(p, _, high)| {
            let o = match found.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => o,
                _ => *high,
            };
            (*p, o)
        })
        .collect())
}

fn text(m: &OwnedMessage, name: &str) -> String {
    header(m, name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| "-".into())
}

fn when(m: &OwnedMessage) -> String {
    m.timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// Reasons with counts and the first and last time each was seen.
fn list(kafka: KafkaArgs, topic: &str, filter: &Filter) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let mut reasons: BTreeMap<String, (u64, String, String)> = BTreeMap::new();
    scan(&clients, &reader, topic, filter, |m| {
        let t = when(m);
        let e = reasons
            .entry(text(m, dlq::REASON))
            .or_insert((0, t.clone(), t.clone()));
        e.0 += 1;
        e.2 = t;
        Ok(())
    })?;
    println!(
        "{:<32} {:>10}  {:<24}  {:<24}",
        "REASON", "COUNT", "FIRST", "LAST"
    );
    for (reason, (n, first, last)) in &reasons {
        println!("{reason:<32} {n:>10}  {first:<24}  {last:<24}");
    }
    let total: u64 = reasons.values().map(|r| r.0).sum();
    println!("{:<32} {total:>10}", "TOTAL");
    Ok(ExitCode::SUCCESS)
}

/// One line per record: where, why, from where, and a payload preview.
fn show(kafka: KafkaArgs, topic: &str, filter: &Filter) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    scan(&clients, &reader, topic, filter, |m| {
        let payload = m.payload().unwrap_or_default();
        let preview = String::from_utf8_lossy(&payload[..payload.len().min(PREVIEW_BYTES)])
            .escape_debug()
            .to_string();
        println!(
            "{}/{} {}  reason={} stage={} source={}/{}/{}  detail={:?}\n    payload({} bytes): {preview}",
            m.partition(),
            m.offset(),
            when(m),
            text(m, dlq::REASON),
            text(m, dlq::STAGE),
            text(m, dlq::SOURCE_TOPIC),
            text(m, dlq::SOURCE_PARTITION),
            text(m, dlq::SOURCE_OFFSET),
            text(m, dlq::DETAIL),
            payload.len(),
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Re-publishes matching records not redriven before; `to_topic` overrides each record's
/// source topic.
fn redrive(
    kafka: KafkaArgs,
    topic: &str,
    filter: &Filter,
    to_topic: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let clients = Clients::new(kafka);
    clients.check_reachable()?;
    let reader = clients.reader()?;
    let ledger = redriven_topic(topic);
    let replication = clients.replication_of(&reader, topic)?;
    futures::executor::block_on(clients.ensure_topic(
        &ledger,
        1,
        Some(replication),
        &[("cleanup.policy", "compact"), ("retention.ms", "-1")],
    ))?;
    let done = redriven_set(&reader, &ledger)?;
    let producer = clients.producer()?;
    let mut sent = Vec::new();
    let mut skipped = 0u64;
    scan(&clients, &reader, topic, filter, |m| {
        if done.contains(&redriven_key(m.partition(), m.offset())) {
            skipped += 1;
            return Ok(());
        }
        let source = header(m, dlq::SOURCE_TOPIC).map(|s| String::from_utf8_lossy(s).into_owned());
        let Some(dest) = to_topic.map(str::to_string).or(source.clone()) else {
            bail!(
                "{topic}/{}/{} names no source topic; pass --to-topic",
                m.partition(),
                m.offset()
            );
        };
        let mut rec = FutureRecord::<[u8], [u8]>::to(&dest).headers(redrive_headers(m, topic));
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        // Back to its own topic, a record goes back to its own partition: per-key order as
        // the producer first placed it.
        let source_partition = header(m, dlq::SOURCE_PARTITION)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i32>().ok());
        if let (Some(p), true) = (source_partition, source.as_deref() == Some(dest.as_str())) {
            rec = rec.partition(p);
        }
        let fut = producer.send_result(rec).map_err(|(e, _)| e)?;
        sent.push((m.partition(), m.offset(), dest, fut));
        Ok(())
    })?;
    // Only acknowledged records are written down as redriven.
    let mut marks = Vec::new();
    let mut count = 0u64;
    for (p, o, dest, fut) in sent {
        let (dest_partition, dest_offset) = match futures::executor::block_on(fut) {
            Ok(Ok(d)) => (d.partition, d.offset),
            Ok(Err((e, _))) => bail!("redrive of {topic}/{p}/{o} failed: {e}"),
            Err(_) => bail!("redrive of {topic}/{p}/{o} canceled"),
        };
        let value = serde_json::to_vec(&Redriven {
            topic: dest,
            partition: dest_partition,
            offset: dest_offset,
        })?;
        let key = redriven_key(p, o);
        let rec = FutureRecord::to(&ledger)
            .key(key.as_bytes())
            .payload(&value)
            .partition(0);
        marks.push(producer.send_result(rec).map_err(|(e, _)| e)?);
        count += 1;
    }
    settle(&mut marks)?;
    println!("redriven {count} record(s) from {topic}; {skipped} skipped as redriven before");
    Ok(ExitCode::SUCCESS)
}

/// The original headers, without the DLQ's own, plus where the record was redriven from.
fn redrive_headers(m: &OwnedMessage, dlq_topic: &str) -> OwnedHeaders {
    let marker = format!("{dlq_topic}/{}/{}", m.partition(), m.offset());
    let mut h = OwnedHeaders::new();
    if let Some(hs) = m.headers() {
        for x in hs.iter() {
            if x.key.starts_with(DLQ_HEADER_PREFIX) || x.key == ID_HEADER {
                continue;
            }
            h = h.insert(Header {
                key: x.key,
                value: x.value,
            });
        }
    }
    h.insert(Header {
        key: REDRIVEN_FROM,
        value: Some(marker.as_bytes()),
    })
}

/// Keys of the DLQ records already redriven, from the ledger topic.
fn redriven_set(reader: &BaseConsumer, ledger: &str) -> anyhow::Result<HashSet<String>> {
    let (low, high) = reader
        .fetch_watermarks(ledger, 0, Duration::from_secs(10))
        .with_context(|| format!("watermarks of {ledger}"))?;
    let mut done = HashSet::new();
    read_range(reader, ledger, 0, low, high, IDLE, |m| {
        if let Some(k) = m.key() {
            done.insert(String::from_utf8_lossy(k).into_owned());
        }
        Ok(())
    })?;
    Ok(done)
}
