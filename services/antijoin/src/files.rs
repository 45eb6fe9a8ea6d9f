//! `sieve antijoin files`: left records whose key has no match on the right, over files.
//!
//! The right side becomes a key set (memory, or RocksDB + Bloom past its budget). The left
//! side streams through: a reader thread cuts it into batches of original bytes, worker
//! threads extract keys and probe the set, and the writer puts results back in input order.
//! Channels are bounded, so memory depends on the budget and the batch size, never on the
//! size of the left input.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use crossbeam_channel::bounded;
use indicatif::{ProgressBar, ProgressStyle};
use sieve_core::telemetry::peak_rss_bytes;
use sieve_formats::jsonfile;
use sieve_formats::jsonkey;

use crate::columnar;
use crate::input::{self, Format, Item, KeyOf};

use crate::error::{AntijoinError, Result};
use crate::right::RightSet;

#[derive(Debug, Clone, Args)]
pub struct FilesArgs {
    /// Left input(s): NDJSON or a JSON array; plain, gzip or zstd.
    #[arg(long, required = true, num_args = 1..)]
    pub left: Vec<PathBuf>,
    /// Right input(s), same formats.
    #[arg(long, required = true, num_args = 1..)]
    pub right: Vec<PathBuf>,
    /// Output NDJSON file, or - for stdout.
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
    /// The key in left records: a field name (`id`) or a JSON pointer (`/user/id`).
    #[arg(long, default_value = "id", value_parser = jsonkey::key_pointer)]
    pub key: String,
    /// The key in right records, the same way (default: --key).
    #[arg(long, value_parser = jsonkey::key_pointer)]
    pub right_key: Option<String>,
    /// Fail (exit 2) when the records without a usable key, both sides together, exceed this
    /// share of the records read: a wrong --key must not pass as an empty answer.
    #[arg(long, default_value_t = 0.01)]
    pub max_error_rate: f64,
    /// Output the distinct missing keys with their counts instead of the left records.
    #[arg(long)]
    pub keys_only: bool,
    /// Memory budget in MiB for the right-side set and key counts; beyond it they move to
    /// RocksDB on disk.
    #[arg(long, default_value_t = 512)]
    pub memory_budget_mb: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory for spilled state (default: the system temp dir).
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
    /// No progress bar or periodic progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// What a run did, for the printed summary and for tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub right_records: u64,
    pub right_keys: u64,
    pub right_mode: &'static str,
    pub left_records: u64,
    pub emitted: u64,
    pub distinct_missing_keys: Option<u64>,
    /// Records without a usable key, by reason (both sides).
    pub rejected: BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub peak_rss_bytes: u64,
}

impl Summary {
    /// Records without a usable key, both sides, as a share of the records read.
    pub fn error_rate(&self) -> f64 {
        let rejected: u64 = self.rejected.values().sum();
        rejected as f64 / (self.left_records + self.right_records).max(1) as f64
    }

    pub fn print(&self, to: &mut dyn Write) -> std::io::Result<()> {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(to, "anti-join summary")?;
        writeln!(
            to,
            "  right records      {:>14}  ({} distinct keys, {})",
            self.right_records, self.right_keys, self.right_mode
        )?;
        writeln!(
            to,
            "  left records       {:>14}  ({:.0}/s)",
            self.left_records,
            self.left_records as f64 / secs
        )?;
        writeln!(to, "  emitted            {:>14}", self.emitted)?;
        if let Some(d) = self.distinct_missing_keys {
            writeln!(to, "  distinct keys      {d:>14}")?;
        }
        for (reason, n) in &self.rejected {
            writeln!(to, "  rejected {reason:<12}{n:>12}")?;
        }
        writeln!(to, "  time               {:>13.2}s", secs)?;
        writeln!(
            to,
            "  peak memory        {:>11} MiB",
            self.peak_rss_bytes >> 20
        )
    }
}

const BATCH_BYTES: usize = 1 << 20;

/// Records of one batch as one buffer plus ranges: one allocation per batch, not per record.
/// A batch holds records of one file, whose key they share.
struct Batch {
    data: Vec<u8>,
    records: Vec<(usize, usize)>,
    key: KeyOf,
    /// The CSV header to write before the output's first row.
    header: Option<Vec<u8>>,
}

impl Batch {
    fn new(key: KeyOf) -> Self {
        Batch {
            data: Vec::new(),
            records: Vec::new(),
            key,
            header: None,
        }
    }
}

struct Done {
    header: Option<Vec<u8>>,
    out: Vec<u8>,
    missing_keys: Vec<Vec<u8>>,
    records: u64,
    emitted: u64,
    rejected: BTreeMap<&'static str, u64>,
}

pub fn run(args: &FilesArgs) -> Result<Summary> {
    let started = Instant::now();
    let formats: Vec<Format> = args.left.iter().map(|p| Format::of(p)).collect();
    if formats.windows(2).any(|w| w[0] != w[1]) {
        return Err(AntijoinError::Input(
            "the left files mix formats (JSON, CSV, Parquet); the output takes the left \
             side's format, so give one format per run"
                .into(),
        ));
    }
    let budget = args.memory_budget_mb << 20;
    let spill_dir = args.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut summary = Summary::default();

    // Right side: the set, within half the budget (the other half is for key counts).
    let right_key = args.right_key.clone().unwrap_or_else(|| args.key.clone());
    let mut right = RightSet::new();
    for path in &args.right {
        input::for_each_key(path, &right_key, |key| {
            summary.right_records += 1;
            match key {
                Ok(k) => right
                    .insert(k, budget / 2, &spill_dir)
                    .map_err(|e| e.to_string()),
                Err(reason) => {
                    *summary
                        .rejected
                        .entry(format!("right_{reason}"))
                        .or_default() += 1;
                    Ok(())
                }
            }
        })?;
    }
    right.seal()?;
    summary.right_keys = right.len();
    summary.right_mode = right.mode();

    let threads = args
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
        .max(1);
    let total_bytes: u64 = args
        .left
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let progress = Progress::new(total_bytes, args.quiet);

    let out: Box<dyn Write + Send> = if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::fs::File::create(&args.out)?)
    };
    let mut out = Some(BufWriter::with_capacity(1 << 20, out));
    let mut counts = KeyCounts::new(budget / 2, &spill_dir);

    if formats.first() == Some(&Format::Parquet) {
        // Rows are columns here, not bytes: the left side streams as record batches into a
        // Parquet writer (which then owns the output), or only its keys are counted.
        let sink = match args.keys_only {
            true => None,
            false => out.take().map(|o| Box::new(o) as Box<dyn Write + Send>),
        };
        let left = columnar::left(
            &args.left,
            &args.key,
            sink,
            |k| Ok(!right.contains(k)?),
            |reason| {
                *summary
                    .rejected
                    .entry(format!("left_{reason}"))
                    .or_default() += 1
            },
            |k| {
                if args.keys_only {
                    counts.add(k)
                } else {
                    Ok(())
                }
            },
        )?;
        summary.left_records = left.records;
        summary.emitted = left.emitted;
    } else if let Some(out) = out.as_mut() {
        std::thread::scope(|scope| -> Result<()> {
            let (batch_tx, batch_rx) = bounded::<(u64, Batch)>(threads * 2);
            let (done_tx, done_rx) = bounded::<(u64, Done)>(threads * 2);
            let reader = scope.spawn(|| read_left(&args.left, &args.key, batch_tx, &progress));
            let right = &right;
            for _ in 0..threads {
                let (rx, tx) = (batch_rx.clone(), done_tx.clone());
                let keys_only = args.keys_only;
                scope.spawn(move || {
                    for (seq, batch) in rx {
                        let done = probe(batch, right, keys_only);
                        if tx.send((seq, done)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop((batch_rx, done_tx));
            // Writer: results in input order; out-of-order batches wait in a bounded map.
            let mut next = 0u64;
            let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
            let mut write_err = None;
            for (seq, done) in done_rx {
                waiting.insert(seq, done);
                while let Some(d) = waiting.remove(&next) {
                    next += 1;
                    summary.left_records += d.records;
                    summary.emitted += d.emitted;
                    for (r, n) in d.rejected {
                        *summary.rejected.entry(format!("left_{r}")).or_default() += n;
                    }
                    if let (Some(h), false) = (&d.header, args.keys_only) {
                        if let Err(e) = out.write_all(h).and_then(|()| out.write_all(b"\n")) {
                            write_err.get_or_insert(e.into());
                        }
                    }
                    let res = if args.keys_only {
                        d.missing_keys.iter().try_for_each(|k| counts.add(k))
                    } else {
                        out.write_all(&d.out).map_err(AntijoinError::from)
                    };
                    if let Err(e) = res {
                        write_err.get_or_insert(e);
                    }
                    progress.records(summary.left_records);
                }
            }
            reader
                .join()
                .map_err(|_| AntijoinError::Worker("reader panicked".into()))??;
            write_err.map_or(Ok(()), Err)
        })?;
    }

    if let Some(mut out) = out {
        if args.keys_only {
            summary.distinct_missing_keys = Some(counts.write_sorted(&mut out)?);
        }
        out.flush()?;
    }
    progress.finish();
    summary.elapsed = started.elapsed();
    summary.peak_rss_bytes = peak_rss_bytes();
    Ok(summary)
}

fn read_left(
    paths: &[PathBuf],
    pointer: &str,
    tx: crossbeam_channel::Sender<(u64, Batch)>,
    progress: &Progress,
) -> Result<()> {
    let mut seq = 0u64;
    let mut send = |batch: Batch| -> std::result::Result<(), String> {
        tx.send((seq, batch))
            .map_err(|_| "workers stopped".to_string())?;
        seq += 1;
        Ok(())
    };
    let mut first_header: Option<Vec<u8>> = None;
    let mut done_bytes = 0u64;
    for path in paths {
        let (reader, count) = jsonfile::open(path)?;
        let mut batch: Option<Batch> = None;
        // The first CSV header goes out before the first row; later files must agree.
        let mut header = None;
        input::for_each_record(path, reader, pointer, |item| {
            let (key, bytes) = match item {
                Item::Header(h) => {
                    match &first_header {
                        None => {
                            first_header = Some(h.to_vec());
                            header = Some(h.to_vec());
                        }
                        Some(first) if first != h => {
                            return Err(format!(
                                "{}: its CSV header differs from the first left file's",
                                path.display()
                            ))
                        }
                        Some(_) => {}
                    }
                    return Ok(());
                }
                Item::Record(key, bytes) => (key, bytes),
            };
            let b = batch.get_or_insert_with(|| Batch {
                header: header.take(),
                ..Batch::new(key.clone())
            });
            let start = b.data.len();
            b.data.extend_from_slice(bytes);
            b.records.push((start, b.data.len()));
            if b.data.len() >= BATCH_BYTES {
                progress.bytes(done_bytes + count.get());
                if let Some(full) = batch.take() {
                    send(full)?;
                }
            }
            Ok(())
        })?;
        // The file's last batch, or its header alone when it has no rows.
        let last = batch.or_else(|| {
            header.map(|h| Batch {
                header: Some(h),
                // No records to key: any key will do.
                ..Batch::new(KeyOf::Column(0))
            })
        });
        if let Some(b) = last {
            send(b).map_err(AntijoinError::Worker)?;
        }
        done_bytes += count.get();
        progress.bytes(done_bytes);
    }
    Ok(())
}

fn probe(batch: Batch, right: &RightSet, keys_only: bool) -> Done {
    let mut done = Done {
        header: batch.header,
        out: Vec::with_capacity(if keys_only { 0 } else { batch.data.len() / 4 }),
        missing_keys: Vec::new(),
        records: batch.records.len() as u64,
        emitted: 0,
        rejected: BTreeMap::new(),
    };
    for &(s, e) in &batch.records {
        let Some(rec) = batch.data.get(s..e) else {
            continue;
        };
        match batch.key.extract(rec) {
            Err(reason) => *done.rejected.entry(reason).or_default() += 1,
            Ok(k) => match right.contains(&k) {
                Ok(true) => {}
                Ok(false) => {
                    done.emitted += 1;
                    if keys_only {
                        done.missing_keys.push(k);
                    } else {
                        done.out.extend_from_slice(rec);
                        done.out.push(b'\n');
                    }
                }
                Err(_) => *done.rejected.entry("store_error").or_default() += 1,
            },
        }
    }
    done
}

/// Counts per missing key: a hash map within its budget, then RocksDB on disk.
struct KeyCounts {
    mem: HashMap<Vec<u8>, u64, ahash::RandomState>,
    mem_bytes: u64,
    budget: u64,
    spill_dir: PathBuf,
    spilled: Option<(rocksdb::DB, tempfile::TempDir)>,
}

impl KeyCounts {
    fn new(budget: u64, spill_dir: &Path) -> Self {
        KeyCounts {
            mem: HashMap::default(),
            mem_bytes: 0,
            budget,
            spill_dir: spill_dir.to_path_buf(),
            spilled: None,
        }
    }

    fn add(&mut self, key: &[u8]) -> Result<()> {
        match self.mem.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                self.mem_bytes += key.len() as u64 + 48;
                self.mem.insert(key.to_vec(), 1);
            }
        }
        // The map and, once it has flushed, the store each have half of the budget.
        if self.mem_bytes > self.budget / 2 {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds the in-memory counts to the on-disk ones and empties the map.
    fn flush(&mut self) -> Result<()> {
        if self.spilled.is_none() {
            let dir = tempfile::tempdir_in(&self.spill_dir)?;
            let opts = crate::right::spill_options(self.budget / 2);
            let db = rocksdb::DB::open(&opts, dir.path()).map_err(AntijoinError::store)?;
            self.spilled = Some((db, dir));
        }
        let Some((db, _)) = &self.spilled else {
            return Ok(());
        };
        let mut batch = rocksdb::WriteBatch::default();
        for (k, n) in self.mem.drain() {
            let prev = db
                .get(&k)
                .map_err(AntijoinError::store)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            batch.put(&k, (prev + n).to_be_bytes());
            if batch.len() >= 10_000 {
                db.write(std::mem::take(&mut batch))
                    .map_err(AntijoinError::store)?;
            }
        }
        db.write(batch).map_err(AntijoinError::store)?;
        self.mem_bytes = 0;
        Ok(())
    }

    /// Writes `{"key":…,"count":n}` lines sorted by key; returns the number of keys.
    fn write_sorted(&mut self, out: &mut dyn Write) -> Result<u64> {
        let line = |out: &mut dyn Write, k: &[u8], n: u64| -> Result<()> {
            let key = String::from_utf8_lossy(k);
            serde_json::to_writer(&mut *out, &serde_json::json!({ "key": key, "count": n }))
                .map_err(|e| AntijoinError::Worker(e.to_string()))?;
            out.write_all(b"\n")?;
            Ok(())
        };
        let mut written = 0;
        if self.spilled.is_some() {
            self.flush()?;
            if let Some((db, _)) = &self.spilled {
                for item in db.iterator(rocksdb::IteratorMode::Start) {
                    let (k, v) = item.map_err(AntijoinError::store)?;
                    let n = <[u8; 8]>::try_from(&*v)
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    line(out, &k, n)?;
                    written += 1;
                }
            }
        } else {
            let mut keys: Vec<(&Vec<u8>, &u64)> = self.mem.iter().collect();
            keys.sort();
            for (k, n) in keys {
                line(out, k, *n)?;
                written += 1;
            }
        }
        Ok(written)
    }
}

/// A progress bar on a terminal, a log line every 10 s otherwise, nothing with --quiet.
struct Progress {
    bar: Option<ProgressBar>,
    log_every: Option<std::sync::Mutex<Instant>>,
    started: Instant,
}

impl Progress {
    fn new(total_bytes: u64, quiet: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let b = ProgressBar::new(total_bytes);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            ) {
                b.set_style(style);
            }
            b
        });
        Progress {
            bar,
            log_every: (!quiet && !terminal).then(|| std::sync::Mutex::new(Instant::now())),
            started: Instant::now(),
        }
    }

    fn bytes(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.set_position(n);
        }
    }

    fn records(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{n} left records"));
        }
        if let Some(last) = &self.log_every {
            if let Ok(mut last) = last.lock() {
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    let rate = n as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
                    tracing::info!(left_records = n, rate = rate as u64, "anti-join progress");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
