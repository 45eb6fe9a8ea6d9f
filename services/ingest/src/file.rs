//! `sieve ingest file`: streams NDJSON or JSON-array files (plain, gzip, zstd) into a
//! stream's topic with memory independent of file size, a resumable checkpoint, bad records
//! in the DLQ with their position, and a summary.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::Path;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use serde::Serialize;
use sieve_core::kafka::Clients;
use sieve_formats::jsonfile::{self, BytesRead, Position};

use crate::checkpoint::{Checkpoint, FileIdentity};
use crate::config::FileArgs;
use crate::error::{IngestError, Result};
use crate::headers;
use crate::keys::{self, KeySource};
use crate::producer::{self, Out};
use crate::reject::Rejection;
use crate::streams::{Registry, Stream};
use crate::validate;

/// Totals over every file of the run (records before a checkpoint included).
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub files: usize,
    /// Records of the files, loaded by this run or an earlier one.
    pub read: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Records skipped because a checkpoint said an earlier run loaded them.
    pub skipped: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Peak resident memory of the process (VmHWM), for the constant-memory claim.
    pub peak_rss_bytes: u64,
    pub dry_run: bool,
}

impl Summary {
    pub fn error_rate(&self) -> f64 {
        if self.read == 0 {
            0.0
        } else {
            self.rejected as f64 / self.read as f64
        }
    }
}

/// A record sent and not yet acknowledged, in file order.
struct Pending {
    n: u64,
    bytes: u64,
    rejected: Option<&'static str>,
    ack: Option<DeliveryFuture>,
}

/// One file's load: the checkpoint follows the acknowledged prefix.
struct Load<'a> {
    stream: &'a Stream,
    args: &'a FileArgs,
    producer: Option<FutureProducer>,
    checkpoint: Option<Checkpoint>,
    key_prefix: Option<String>,
    source: String,
    pending: VecDeque<Pending>,
    /// Counts of the acknowledged prefix (what the checkpoint holds).
    acked: Counts,
    last_save: Instant,
    bytes_read: BytesRead,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    done: u64,
    bytes: u64,
    accepted: u64,
    rejected: BTreeMap<String, u64>,
}

impl Counts {
    fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Loads every file; the summary says what happened. Fails on unreadable files, a broken
/// JSON array (the checkpoint keeps what was loaded) or a broker that does not acknowledge.
pub fn run(args: &FileArgs) -> Result<Summary> {
    crate::metrics::describe();
    let registry = Registry::load(&args.streams.streams, &args.streams.schemas)?;
    let stream = registry.get(&args.stream).ok_or_else(|| {
        IngestError::Config(format!(
            "no stream {:?} in {}",
            args.stream,
            args.streams.streams.display()
        ))
    })?;
    let producer = if args.dry_run {
        None
    } else {
        let clients = Clients::new(args.kafka.clone());
        clients.check_reachable()?;
        let reader = clients.reader()?;
        clients.partition_count(&reader, &stream.spec.topic)?;
        clients.partition_count(&reader, &args.streams.dlq)?;
        Some(clients.producer()?)
    };
    let start = Instant::now();
    let mut summary = Summary {
        dry_run: args.dry_run,
        ..Default::default()
    };
    for path in &args.paths {
        load_file(args, stream, producer.clone(), path, &mut summary)?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    summary.peak_rss_bytes = sieve_core::telemetry::peak_rss_bytes();
    Ok(summary)
}

fn load_file(
    args: &FileArgs,
    stream: &Stream,
    producer: Option<FutureProducer>,
    path: &Path,
    summary: &mut Summary,
) -> Result<()> {
    let stdin = path.as_os_str() == "-";
    let identity = if stdin {
        None
    } else {
        Some(FileIdentity::of(path)?)
    };
    let checkpoint =
        match (&identity, args.dry_run) {
            (Some(id), false) => {
                let old = if args.restart {
                    None
                } else {
                    Checkpoint::load(&args.checkpoint_dir, id, &stream.name)?
                };
                Some(old.unwrap_or_else(|| {
                    Checkpoint::new(id.clone(), &stream.name, &stream.spec.topic)
                }))
            }
            _ => None,
        };
    let acked = checkpoint
        .as_ref()
        .map(|c| Counts {
            done: c.done,
            bytes: c.bytes,
            accepted: c.accepted,
            rejected: c.rejected.clone(),
        })
        .unwrap_or_default();
    summary.files += 1;
    if checkpoint.as_ref().is_some_and(|c| c.complete) {
        tracing::info!(file = %path.display(), records = acked.done, "already loaded (checkpoint complete); --restart loads it again");
        add(summary, &acked);
        return Ok(());
    }
    if acked.done > 0 {
        tracing::info!(file = %path.display(), done = acked.done, "resuming after the checkpoint");
    }
    let (reader, bytes_read) = jsonfile::open(path)?;
    // stdin has no identity: its records without an idempotency field get content keys
    // (two different stdin loads must not share `stdin:N` keys, dedup would drop one).
    let key_prefix = identity.as_ref().map(FileIdentity::id);
    let total = identity.as_ref().map(|i| i.size).unwrap_or(0);
    let mut load = Load {
        stream,
        args,
        producer,
        checkpoint,
        key_prefix,
        source: path.display().to_string(),
        pending: VecDeque::new(),
        acked,
        last_save: Instant::now(),
        bytes_read: bytes_read.clone(),
    };
    let resume_at = load.acked.done;
    let progress = Progress::new(args, total, bytes_read);
    let mut skipped = 0u64;
    let name = path.display().to_string();
    let res = jsonfile::for_each_record(&name, reader, |pos, bytes| {
        let n = match pos {
            Position::Line(n) | Position::Element(n) => n,
        };
        if n <= resume_at {
            skipped += 1;
            return Ok(());
        }
        load.record(n, pos, bytes).map_err(|e| e.to_string())?;
        progress.tick(&load.acked, load.pending.len());
        Ok(())
    });
    // Whatever happened, keep what was acknowledged.
    let drained = load.drain_all();
    let complete = res.is_ok() && drained.is_ok();
    load.save(complete)?;
    progress.finish(&load.acked);
    crate::metrics::file_records("skipped", skipped);
    summary.skipped += skipped;
    add(summary, &load.acked);
    res?;
    drained
}

fn add(summary: &mut Summary, c: &Counts) {
    // Records, not positions: NDJSON line numbers count blank lines too.
    summary.read += c.accepted + c.rejected_total();
    summary.accepted += c.accepted;
    summary.rejected += c.rejected_total();
    summary.bytes += c.bytes;
    for (r, n) in &c.rejected {
        *summary.rejected_by_reason.entry(r.clone()).or_default() += n;
    }
}

impl Load<'_> {
    fn record(&mut self, n: u64, pos: Position, bytes: &[u8]) -> Result<()> {
        // Copies of the shared references: the records borrow them, not `self`.
        let (stream, args) = (self.stream, self.args);
        let position_key = self.key_prefix.as_ref().map(|p| format!("{p}:{n}"));
        let source = match &position_key {
            Some(k) => KeySource::Position(k),
            None => KeySource::None,
        };
        let verdict = validate::check(stream, bytes, args.streams.limits())
            .and_then(|v| keys::prepare(stream, &v.doc, bytes, source));
        let at = self.bytes_read.get();
        let (out, rejected) = match &verdict {
            Ok(p) => {
                let mut h = vec![
                    (
                        headers::IDEMPOTENCY_KEY,
                        p.idempotency_key.clone().into_bytes(),
                    ),
                    (headers::STREAM, stream.name.clone().into_bytes()),
                    (
                        headers::SOURCE,
                        format!("file {} {pos}", self.source).into_bytes(),
                    ),
                ];
                if let Some(s) = p.salt {
                    h.push((headers::SALT, s.to_string().into_bytes()));
                }
                let out = Out {
                    topic: &stream.spec.topic,
                    key: p.key.clone(),
                    payload: bytes,
                    headers: h,
                };
                (out, None)
            }
            Err(r) => {
                let origin = format!("file {} {pos} (byte {at})", self.source);
                let key = format!("{}:{pos}", self.key_prefix.as_deref().unwrap_or("stdin"));
                let out = dead_letter(stream, &args.streams.dlq, key, origin, r, bytes);
                (out, Some(r.reason.as_str()))
            }
        };
        let ack = match &self.producer {
            None => None,
            Some(p) => Some(self.enqueue(&p.clone(), &out)?),
        };
        self.pending.push_back(Pending {
            n,
            bytes: at,
            rejected,
            ack,
        });
        self.settle_ready()?;
        while self.pending.len() >= self.args.inflight_records.max(1) {
            self.settle_front()?;
        }
        if self.last_save.elapsed() >= self.args.checkpoint_every {
            self.save(false)?;
        }
        Ok(())
    }

    /// Enqueues, waiting for acknowledgements while librdkafka's queue is full.
    fn enqueue(&mut self, p: &FutureProducer, out: &Out<'_>) -> Result<DeliveryFuture> {
        loop {
            match producer::enqueue(p, out) {
                Ok(f) => return Ok(f),
                Err(e) if self.pending.is_empty() => return Err(IngestError::Kafka(e)),
                Err(_) => self.settle_front()?,
            }
        }
    }

    /// Moves the acknowledged prefix forward over every delivery already done.
    fn settle_ready(&mut self) -> Result<()> {
        let waker = futures::task::noop_waker_ref();
        let mut cx = Context::from_waker(waker);
        while let Some(front) = self.pending.front_mut() {
            let ready = match front.ack.as_mut() {
                None => Poll::Ready(Ok(())),
                Some(f) => match f.poll_unpin(&mut cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(r) => Poll::Ready(delivered(r)),
                },
            };
            match ready {
                Poll::Pending => return Ok(()),
                Poll::Ready(r) => {
                    r?;
                    self.pop_acked();
                }
            }
        }
        Ok(())
    }

    fn settle_front(&mut self) -> Result<()> {
        if let Some(f) = self.pending.front_mut().and_then(|p| p.ack.take()) {
            delivered(futures::executor::block_on(f))?;
        }
        self.pop_acked();
        Ok(())
    }

    fn pop_acked(&mut self) {
        if let Some(p) = self.pending.pop_front() {
            self.acked.done = p.n;
            self.acked.bytes = p.bytes;
            match p.rejected {
                None => {
                    self.acked.accepted += 1;
                    crate::metrics::file_records("accepted", 1);
                }
                Some(r) => {
                    *self.acked.rejected.entry(r.to_string()).or_default() += 1;
                    crate::metrics::file_records("rejected", 1);
                }
            }
        }
    }

    fn drain_all(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.settle_front()?;
        }
        if let Some(p) = &self.producer {
            p.flush(Duration::from_secs(30))
                .map_err(|e| IngestError::Kafka(format!("flush: {e}")))?;
        }
        Ok(())
    }

    fn save(&mut self, complete: bool) -> Result<()> {
        self.last_save = Instant::now();
        let Some(cp) = self.checkpoint.as_mut() else {
            return Ok(());
        };
        cp.done = self.acked.done;
        cp.bytes = self.acked.bytes;
        cp.accepted = self.acked.accepted;
        cp.rejected = self.acked.rejected.clone();
        cp.complete = complete;
        cp.save(&self.args.checkpoint_dir)
    }
}

fn dead_letter<'b>(
    stream: &'b Stream,
    dlq: &'b str,
    key: String,
    origin: String,
    r: &Rejection,
    bytes: &'b [u8],
) -> Out<'b> {
    Out {
        topic: dlq,
        key: key.into_bytes(),
        payload: bytes,
        headers: r.dlq_headers(stream, origin),
    }
}

fn delivered(
    r: std::result::Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(IngestError::Kafka(format!(
            "broker did not acknowledge a record ({e}); rerun the same command to resume"
        ))),
        Err(_) => Err(IngestError::Kafka("delivery canceled".into())),
    }
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    every: Duration,
    last: std::cell::Cell<Instant>,
    start: Instant,
    bytes: BytesRead,
}

impl Progress {
    fn new(args: &FileArgs, total: u64, bytes: BytesRead) -> Progress {
        let bar = (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            every: args.log_every.max(Duration::from_secs(1)),
            last: std::cell::Cell::new(Instant::now()),
            start: Instant::now(),
            bytes,
        }
    }

    fn tick(&self, c: &Counts, inflight: usize) {
        if self.last.get().elapsed() < Duration::from_millis(200) {
            return;
        }
        if let Some(bar) = &self.bar {
            self.last.set(Instant::now());
            bar.set_position(self.bytes.get());
            bar.set_message(format!(
                "{} records, {} rejected",
                c.accepted,
                c.rejected_total()
            ));
        } else if self.last.get().elapsed() >= self.every {
            self.last.set(Instant::now());
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                acknowledged = c.done,
                accepted = c.accepted,
                rejected = c.rejected_total(),
                inflight,
                mb_per_s = format!("{:.1}", self.bytes.get() as f64 / secs / 1e6),
                "loading"
            );
        }
    }

    fn finish(&self, c: &Counts) {
        if let Some(bar) = &self.bar {
            bar.set_position(self.bytes.get());
            bar.finish_with_message(format!("{} records", c.accepted));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FileArgs,
    }

    /// A dry run needs no broker: every record is read, checked and counted by reason.
    #[test]
    fn dry_run_counts_by_reason_across_files_and_formats() {
        let dir = tempfile::tempdir().unwrap();
        let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let streams = dir.path().join("streams.toml");
        std::fs::write(
            &streams,
            "[streams.u]\ntopic='t'\nschema='user.schema.json'\n",
        )
        .unwrap();
        let nd = dir.path().join("a.ndjson");
        std::fs::write(&nd, "{\"id\":\"a\"}\n\n{bad\n{\"id\":7}\n").unwrap();
        let arr = dir.path().join("b.json");
        std::fs::write(&arr, "[{\"id\":\"b\"},{\"id\":\"c\",\"seq\":-1}]").unwrap();
        let cli = Cli::parse_from([
            "t".as_ref(),
            "--stream".as_ref(),
            "u".as_ref(),
            "--dry-run".as_ref(),
            "--streams".as_ref(),
            streams.as_os_str(),
            "--schemas".as_ref(),
            schemas.as_os_str(),
            nd.as_os_str(),
            arr.as_os_str(),
        ]);
        let s = run(&cli.args).unwrap();
        assert_eq!((s.files, s.read, s.accepted, s.rejected), (2, 5, 2, 3));
        assert_eq!(s.rejected_by_reason["bad_json"], 1);
        assert_eq!(s.rejected_by_reason["schema_violation"], 2);
        assert!(s.dry_run && s.peak_rss_bytes > 0);
        assert!(
            !cli.args.checkpoint_dir.exists(),
            "a dry run writes no checkpoint"
        );
    }
}
