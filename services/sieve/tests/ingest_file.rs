//! `sieve ingest file` end to end: the real binary as a child process, generated files,
//! Apache Kafka started by the harness. The topic is compared with the input record by record.

mod ingest_common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ingest_common::{schemas, BIN};
use rdkafka::message::Message;
use sieve_tests::{header_str, unique, wait_for, Broker};

struct Setup {
    broker: Broker,
    topic: String,
    dlq: String,
    dir: tempfile::TempDir,
    streams: PathBuf,
}

impl Setup {
    fn new(partitions: i32) -> Result<Setup> {
        let broker = Broker::start()?;
        let (topic, dlq) = (unique("users"), unique("dlq-ingest"));
        broker.create_topic(&topic, partitions)?;
        broker.create_topic(&dlq, 1)?;
        let dir = tempfile::tempdir()?;
        let streams = dir.path().join("streams.toml");
        std::fs::write(
            &streams,
            format!(
                "[streams.users]\ntopic = \"{topic}\"\nschema = \"user.schema.json\"\nidempotency_field = \"/id\"\n\n\
                 [streams.anon]\ntopic = \"{topic}\"\nschema = \"user.schema.json\"\n"
            ),
        )?;
        Ok(Setup {
            broker,
            topic,
            dlq,
            dir,
            streams,
        })
    }

    fn command(&self, stream: &str, files: &[&Path], extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["ingest", "file", "--stream", stream, "--brokers"])
            .arg(self.broker.addr())
            .arg("--schemas")
            .arg(schemas())
            .arg("--streams")
            .arg(&self.streams)
            .arg("--dlq")
            .arg(&self.dlq)
            .arg("--checkpoint-dir")
            .arg(self.dir.path().join("checkpoints"))
            .args(files)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    fn run(
        &self,
        stream: &str,
        files: &[&Path],
        extra: &[&str],
    ) -> Result<(i32, serde_json::Value, String)> {
        let out: Output = self.command(stream, files, extra).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let summary = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("summary on stdout; stderr:\n{stderr}"))?;
        Ok((out.status.code().unwrap_or(-1), summary, stderr))
    }
}

/// A user record; every `bad_every`-th has no id (a schema violation).
fn user(i: u64, bad_every: u64, pad: usize) -> String {
    if bad_every > 0 && i.is_multiple_of(bad_every) {
        format!(r#"{{"email":"no-id-{i}@example.com"}}"#)
    } else {
        format!(
            r#"{{"id":"user-{i}","email":"u{i}@example.com","seq":{i},"pad":"{}"}}"#,
            "p".repeat(pad)
        )
    }
}

/// Writes `n` users (1-based) as one JSON array, streaming.
fn write_array(path: &Path, n: u64, bad_every: u64, pad: usize) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    w.write_all(b"[\n")?;
    for i in 1..=n {
        if i > 1 {
            w.write_all(b",\n")?;
        }
        w.write_all(user(i, bad_every, pad).as_bytes())?;
    }
    w.write_all(b"\n]\n")?;
    w.flush()?;
    Ok(())
}

#[test]
fn files_load_exactly_with_bad_records_in_the_dlq_and_reruns_add_nothing() -> Result<()> {
    let s = Setup::new(4)?;
    let n = 20_000u64;
    let array = s.dir.path().join("users.json");
    write_array(&array, n, 1000, 0)?;
    let (code, summary, stderr) = s.run("users", &[&array], &[])?;
    ensure!(code == 0, "exit {code}: {stderr}");
    let bad = n / 1000;
    ensure!(
        summary["read"] == n && summary["accepted"] == n - bad,
        "{summary}"
    );
    ensure!(
        summary["rejected_by_reason"]["schema_violation"] == bad,
        "{summary}"
    );

    // Exactly the good records, keyed by their id, and the bad ones in the DLQ with where.
    let on_topic = s.broker.read_all(&s.topic)?;
    ensure!(
        on_topic.len() as u64 == n - bad,
        "topic holds {}",
        on_topic.len()
    );
    let keys: BTreeSet<Vec<u8>> = on_topic
        .iter()
        .filter_map(|m| m.key().map(<[u8]>::to_vec))
        .collect();
    let expected: BTreeSet<Vec<u8>> = (1..=n)
        .filter(|i| !i.is_multiple_of(1000))
        .map(|i| format!("user-{i}").into_bytes())
        .collect();
    ensure!(keys == expected, "keys differ");
    for m in &on_topic {
        ensure!(
            header_str(m, "idempotency-key").map(String::into_bytes) == m.key().map(<[u8]>::to_vec)
        );
    }
    let dlq = s.broker.read_all(&s.dlq)?;
    ensure!(dlq.len() as u64 == bad);
    let first = &dlq[0];
    ensure!(header_str(first, "sieve-dlq-reason").as_deref() == Some("schema_violation"));
    let source = header_str(first, "sieve-ingest-source").unwrap_or_default();
    ensure!(
        source.contains("element 1000") && source.contains("byte"),
        "{source}"
    );

    // The same command again: the checkpoint says complete, nothing is produced.
    let (code, summary, _) = s.run("users", &[&array], &[])?;
    ensure!(code == 0 && summary["read"] == n, "{summary}");
    ensure!(s.broker.count(&s.topic)? as u64 == n - bad);

    // NDJSON, zstd-compressed, in a dry run: validated and counted, nothing produced. With
    // a zero error budget the exit code says so.
    let nd: String = (1..=500).map(|i| user(i, 100, 0) + "\n").collect();
    let zst = s.dir.path().join("more.ndjson.zst");
    std::fs::write(&zst, zstd::encode_all(nd.as_bytes(), 3)?)?;
    let (code, summary, stderr) =
        s.run("anon", &[&zst], &["--dry-run", "--max-error-rate", "0"])?;
    ensure!(code == 2, "exit {code}: {stderr}");
    ensure!(
        summary["read"] == 500 && summary["rejected"] == 5 && summary["dry_run"] == true,
        "{summary}"
    );
    ensure!(
        s.broker.count(&s.topic)? as u64 == n - bad,
        "a dry run produces nothing"
    );
    Ok(())
}

fn checkpoint_done(dir: &Path) -> Option<(u64, bool)> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))?;
    let cp: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
    Some((cp["done"].as_u64()?, cp["complete"].as_bool()?))
}

/// SIGKILL mid-file, rerun: the union on the topic, deduplicated by idempotency key,
/// is exactly the input, each key with its own record.
#[test]
fn killed_loader_resumes_and_the_topic_deduplicated_equals_the_input() -> Result<()> {
    let s = Setup::new(4)?;
    let n = 150_000u64;
    let array = s.dir.path().join("big.json");
    write_array(&array, n, 0, 0)?;
    let cps = s.dir.path().join("checkpoints");
    let mut child = s
        // Kafka takes 150 000 records in about a second: few records in flight and a
        // checkpoint every 10 ms leave seconds between the first checkpoint and the end.
        .command(
            "anon",
            &[&array],
            &["--inflight-records", "200", "--checkpoint-every", "10ms"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut exited = None;
    let at = wait_for(
        "a checkpoint a fifth of the way in",
        Duration::from_secs(120),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return Some(0);
            }
            checkpoint_done(&cps)
                .filter(|(done, _)| *done >= n / 5)
                .map(|c| c.0)
        },
    )?;
    ensure!(
        exited.is_none(),
        "the loader ended before it was killed: {exited:?}"
    );
    child.kill()?;
    child.wait()?;
    let (done, complete) = checkpoint_done(&cps).context("checkpoint after the kill")?;
    ensure!(
        !complete && done >= at && done < n,
        "killed mid-file: done {done}"
    );
    let before = s.broker.count(&s.topic)?;
    ensure!(
        before as u64 >= done,
        "the checkpoint never runs ahead of the topic"
    );

    let (code, summary, stderr) = s.run("anon", &[&array], &[])?;
    ensure!(code == 0, "exit {code}: {stderr}");
    ensure!(
        summary["read"] == n && summary["accepted"] == n,
        "{summary}"
    );
    ensure!(summary["skipped"].as_u64() == Some(done), "{summary}");

    let on_topic = s.broker.read_all(&s.topic)?;
    let mut by_key: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for m in &on_topic {
        let k = header_str(m, "idempotency-key").context("idempotency-key header")?;
        let payload = m.payload().unwrap_or_default().to_vec();
        if let Some(old) = by_key.insert(k.clone(), payload.clone()) {
            ensure!(old == payload, "key {k} carries two different records");
        }
    }
    ensure!(
        by_key.len() as u64 == n,
        "{} distinct keys for {n} records",
        by_key.len()
    );
    let prefix = by_key
        .keys()
        .next()
        .and_then(|k| k.split_once(':'))
        .map(|(p, _)| p.to_string())
        .context("a key")?;
    for i in 1..=n {
        let payload = by_key
            .get(&format!("{prefix}:{i}"))
            .with_context(|| format!("record {i} missing"))?;
        ensure!(*payload == user(i, 0, 0).into_bytes(), "record {i} differs");
    }
    eprintln!(
        "killed at checkpoint {done}; topic holds {} records for {n} keys ({} repeats)",
        on_topic.len(),
        on_topic.len() as u64 - n
    );
    Ok(())
}

/// The issue's size: a generated 2 GB JSON array read, parsed and validated (`--dry-run`: the
/// whole reading path, without a broker that would take most of an hour for it) in a peak RSS
/// under 200 MB. The test above covers the producing path at a tenth of the size.
#[test]
fn a_2_gb_json_array_validates_with_peak_rss_under_200_mb() -> Result<()> {
    let s = Setup::new(1)?;
    let n = 2_000_000u64;
    let array = s.dir.path().join("two-gb.json");
    write_array(&array, n, 0, 1000)?;
    let size = std::fs::metadata(&array)?.len();
    ensure!(size >= 2_000_000_000, "{size} B");
    let (code, summary, stderr) = s.run("anon", &[&array], &["--dry-run"])?;
    std::fs::remove_file(&array)?;
    ensure!(code == 0, "exit {code}: {stderr}");
    ensure!(summary["accepted"] == n, "{summary}");
    let rss = summary["peak_rss_bytes"].as_u64().unwrap_or(u64::MAX);
    let secs = summary["seconds"].as_f64().unwrap_or(0.0);
    eprintln!(
        "validated {} MB ({n} records) in {secs:.1} s ({:.0} MB/s), peak RSS {} MiB",
        size / 1_000_000,
        size as f64 / secs / 1e6,
        rss >> 20
    );
    ensure!(rss > 0 && rss < 200 << 20, "peak RSS {} MiB", rss >> 20);
    Ok(())
}

/// A file far larger than the loader's memory bound loads completely with a flat peak RSS.
#[test]
fn a_large_json_array_loads_with_peak_rss_under_200_mb() -> Result<()> {
    let s = Setup::new(8)?;
    // ~193 MB of 1 KB records: large next to the bound, small enough for a 2-core CI run.
    let n = 180_000u64;
    let array = s.dir.path().join("huge.json");
    write_array(&array, n, 0, 1000)?;
    let size = std::fs::metadata(&array)?.len();
    let (code, summary, stderr) = s.run("anon", &[&array], &[])?;
    ensure!(code == 0, "exit {code}: {stderr}");
    ensure!(summary["accepted"] == n, "{summary}");
    ensure!(s.broker.count(&s.topic)? as u64 == n);
    let rss = summary["peak_rss_bytes"].as_u64().unwrap_or(u64::MAX);
    let secs = summary["seconds"].as_f64().unwrap_or(0.0);
    eprintln!(
        "loaded {} MB ({n} records) in {secs:.1} s: {:.0} records/s, {:.1} MB/s, peak RSS {} MiB",
        size / 1_000_000,
        n as f64 / secs,
        size as f64 / secs / 1e6,
        rss >> 20
    );
    ensure!(rss > 0 && rss < 200 << 20, "peak RSS {} MiB", rss >> 20);
    ensure!(
        size > 2 * rss,
        "the file ({size} B) is much larger than the memory used"
    );
    Ok(())
}
