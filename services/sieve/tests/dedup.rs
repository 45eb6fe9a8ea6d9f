//! `sieve dedup` end to end: the real binary as a child process, Apache Kafka started by the harness,
//! RocksDB on disk. Expected answers come from the deterministic generator.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{ensure, Result};
use rdkafka::message::Message;
use sieve::gen::{self, Event, EventKind, EventSpec};
use sieve_tests::{header_str, wait_for, Service, TestRecord};

mod common;

/// The shared dedup pipeline; this file adds its dedup-specific checks.
type Setup = common::Pipeline;

impl Setup {
    fn wait_for_outputs(&self, svc: &mut Service, unique: i64, dlq: i64) -> Result<()> {
        let mut exited = None;
        wait_for("dedup outputs", Duration::from_secs(300), || {
            if let Some(code) = svc.exited() {
                exited = Some(code);
                return Some(());
            }
            let u = self.broker.count(&self.uniq).ok()?;
            let d = self.broker.count(&self.dlq).ok()?;
            (u >= unique && d >= dlq).then_some(())
        })?;
        ensure!(
            exited.is_none(),
            "dedup exited with {exited:?}:\n{}",
            svc.logs()
        );
        Ok(())
    }

    /// The output holds exactly the first occurrence of every key, in input order per
    /// partition; the DLQ holds exactly the conflicts.
    fn check(&self, events: &[Event]) -> Result<()> {
        let input = self.broker.read_all(&self.raw)?;
        let kinds: BTreeMap<(i32, i64), EventKind> = {
            // Input records are in production order per partition; map them to kinds by
            // walking the events in order with one cursor per key.
            let mut first_payload: std::collections::HashMap<&[u8], &[u8]> = Default::default();
            for e in events {
                first_payload.entry(e.key.as_bytes()).or_insert(&e.payload);
            }
            let mut seen: HashSet<Vec<u8>> = HashSet::new();
            input
                .iter()
                .map(|m| {
                    let k = m.key().unwrap_or_default();
                    let kind = if seen.insert(k.to_vec()) {
                        EventKind::New
                    } else if first_payload.get(k).copied() == m.payload() {
                        EventKind::Retry
                    } else {
                        EventKind::Conflict
                    };
                    ((m.partition(), m.offset()), kind)
                })
                .collect()
        };
        let mut expected: BTreeMap<i32, Vec<Vec<u8>>> = BTreeMap::new();
        for m in &input {
            if kinds[&(m.partition(), m.offset())] == EventKind::New {
                expected
                    .entry(m.partition())
                    .or_default()
                    .push(m.key().unwrap_or_default().to_vec());
            }
        }
        let mut got: BTreeMap<i32, Vec<Vec<u8>>> = BTreeMap::new();
        for m in self.broker.read_all(&self.uniq)? {
            got.entry(m.partition())
                .or_default()
                .push(m.key().unwrap_or_default().to_vec());
        }
        let want_unique = events.iter().filter(|e| e.kind == EventKind::New).count();
        let got_unique: usize = got.values().map(Vec::len).sum();
        ensure!(
            got_unique == want_unique,
            "unique output {got_unique}, expected {want_unique}"
        );
        ensure!(
            got == expected,
            "unique output differs from the first occurrences in input order"
        );
        let dlq = self.broker.read_all(&self.dlq)?;
        let conflicts = events
            .iter()
            .filter(|e| e.kind == EventKind::Conflict)
            .count();
        ensure!(
            dlq.len() == conflicts,
            "dlq {} records, expected {conflicts} conflicts",
            dlq.len()
        );
        for m in &dlq {
            ensure!(header_str(m, "sieve-dlq-reason").as_deref() == Some("idempotency_conflict"));
            ensure!(header_str(m, "sieve-dedup-first-hash").is_some());
            ensure!(
                header_str(m, "sieve-dedup-payload-hash")
                    != header_str(m, "sieve-dedup-first-hash")
            );
            ensure!(header_str(m, "sieve-dlq-source-topic").as_deref() == Some(self.raw.as_str()));
        }
        Ok(())
    }
}

fn generated(count: u64, seed: u64) -> Vec<Event> {
    gen::events(EventSpec {
        count,
        retry_rate: 0.2,
        conflict_rate: 0.01,
        seed,
        ..Default::default()
    })
    .collect()
}

fn expected_counts(events: &[Event]) -> (i64, i64, i64) {
    let n = |k| events.iter().filter(|e| e.kind == k).count() as i64;
    (
        n(EventKind::New),
        n(EventKind::Retry),
        n(EventKind::Conflict),
    )
}

#[test]
fn dedup_200k_with_retries_and_conflicts_reconciles() -> Result<()> {
    let s = Setup::new(4)?;
    let events = generated(200_000, 7);
    let (new, retries, conflicts) = expected_counts(&events);
    s.produce(&events)?;
    let mut svc = s.spawn()?;
    s.wait_for_outputs(&mut svc, new, conflicts)?;
    let m = |name: &str| svc.metric(name, &[]).unwrap_or(-1.0) as i64;
    wait_for("all input counted", Duration::from_secs(30), || {
        (m("sieve_records_in_total") == 200_000).then_some(())
    })?;
    let (inn, uniq, dups, dlq) = (
        m("sieve_records_in_total"),
        m("sieve_dedup_unique_total"),
        m("sieve_dedup_duplicates_total"),
        svc.metric("sieve_dlq_records_total", &["stage=\"dedup\""])
            .unwrap_or(-1.0) as i64,
    );
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    assert_eq!((uniq, dups, dlq), (new, retries, conflicts));
    assert_eq!(inn, uniq + dups + dlq, "in = out + duplicates + dlq");
    s.check(&events)
}

#[test]
fn keys_pass_again_after_the_ttl_and_buckets_are_dropped() -> Result<()> {
    let s = Setup::new(1)?;
    // In the past: Kafka refuses records stamped more than
    // `log.message.timestamp.after.max.ms` (1 h by default) ahead of its clock.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 86_400_000;
    let rec = |key: &'static str, value: &'static str, ts: i64| TestRecord {
        key: key.as_bytes(),
        value: value.as_bytes(),
        headers: vec![("idempotency-key", key.as_bytes())],
        timestamp_ms: Some(ts),
    };
    s.broker.produce_records(
        &s.raw,
        [
            rec("a", "1", t0),
            rec("a", "1", t0 + 1_500), // inside 2 s: duplicate
            rec("b", "1", t0 + 2_500),
            rec("a", "1", t0 + 6_000), // 6 s later: window passed, new again
            rec("b", "1", t0 + 6_100), // 3.6 s after b: new again
            rec("b", "1", t0 + 6_200), // duplicate of the line above
        ],
    )?;
    let mut svc = s.spawn_with(&["--ttl", "2s", "--buckets", "2"])?;
    s.wait_for_outputs(&mut svc, 4, 0)?;
    let drops = wait_for("bucket drops", Duration::from_secs(30), || {
        svc.metric("sieve_dedup_bucket_drops_total", &[])
            .filter(|d| *d > 0.0)
    })?;
    let dups = svc
        .metric("sieve_dedup_duplicates_total", &[])
        .unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let keys: Vec<String> = s
        .broker
        .read_all(&s.uniq)?
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(keys, ["a", "b", "a", "b"]);
    assert_eq!(dups, 2.0);
    ensure!(drops >= 1.0);
    Ok(())
}

#[test]
fn sigkill_mid_run_gives_exactly_once_output() -> Result<()> {
    let s = Setup::new(3)?;
    let events = generated(60_000, 11);
    let (new, _, conflicts) = expected_counts(&events);
    s.produce(&events)?;
    for fp in [
        "after_outputs_acked@2",
        "after_produce@4",
        "after_state_committed@3",
    ] {
        let mut svc = s.spawn_env(&["--batch-records", "2000"], &[("SIEVE_FAILPOINT", fp)])?;
        svc.wait_exit(&format!("crash at {fp}"), Duration::from_secs(120))?;
    }
    let mut svc = s.spawn()?;
    s.wait_for_outputs(&mut svc, new, conflicts)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    s.check(&events)
}

/// A zombie: instance A freezes (SIGSTOP) with a batch's outputs and changelog in an open
/// transaction, past its session; B takes every partition and decides the first half; A
/// resumes, is fenced and rejoins; both decide the second half, whose retries repeat keys of
/// the first. Every event is decided once, as a clean run decides it.
#[test]
fn a_zombie_instance_is_fenced_and_each_event_is_decided_once() -> Result<()> {
    let s = Setup::new(4)?;
    let events = generated(40_000, 17);
    let (first, second) = events.split_at(20_000);
    s.produce(first)?;
    let txn = ["--guarantee", "exactly-once"];
    let mut a = s.spawn_instance(
        "a",
        &[
            "--guarantee",
            "exactly-once",
            "--batch-records",
            "2000",
            // The broker aborts the frozen transaction after 10 s (60 s by default).
            "-X",
            "transaction.timeout.ms=10000",
        ],
        &[("SIEVE_FAILPOINT", "before_commit@3:stop")],
    )?;
    wait_for("A frozen mid-batch", Duration::from_secs(120), || {
        a.is_stopped().then_some(())
    })?;
    let mut b = s.spawn_instance("b", &txn, &[])?;
    let (new1, _, conf1) = expected_counts(first);
    s.wait_for_outputs(&mut b, new1, conf1)?;
    a.resume()?;
    s.produce(second)?;
    let (new, _, conflicts) = expected_counts(&events);
    s.wait_for_outputs(&mut b, new, conflicts)?;
    let a_log = a.logs();
    ensure!(
        a_log.contains("transaction failed"),
        "A resumed without its transaction failing:\n{a_log}"
    );
    assert_eq!(a.terminate(Duration::from_secs(30))?, 0);
    assert_eq!(b.terminate(Duration::from_secs(30))?, 0);
    s.check(&events)
}

#[test]
fn deleted_state_dir_is_restored_and_decides_the_same() -> Result<()> {
    let s = Setup::new(2)?;
    let events = generated(40_000, 13);
    let (first, second) = events.split_at(20_000);
    s.produce(first)?;
    let (new1, _, conf1) = expected_counts(first);
    let mut svc = s.spawn()?;
    s.wait_for_outputs(&mut svc, new1, conf1)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    std::fs::remove_dir_all(s.dir.path().join("state"))?;
    // Retries in the second half of keys from the first half must still be duplicates.
    s.produce(second)?;
    let (new, _, conflicts) = expected_counts(&events);
    let mut svc = s.spawn()?;
    s.wait_for_outputs(&mut svc, new, conflicts)?;
    let restored = svc
        .metric("sieve_restore_records_total", &[])
        .unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    ensure!(restored > 0.0, "no restore happened");
    s.check(&events)
}

#[test]
fn bloom_filters_skip_store_reads_for_new_keys() -> Result<()> {
    let s = Setup::new(2)?;
    let events: Vec<Event> = gen::events(EventSpec {
        count: 50_000,
        retry_rate: 0.0,
        conflict_rate: 0.0,
        seed: 3,
        ..Default::default()
    })
    .collect();
    s.produce(&events)?;
    let mut svc = s.spawn()?;
    s.wait_for_outputs(&mut svc, 50_000, 0)?;
    let neg = svc
        .metric("sieve_dedup_bloom_negatives_total", &[])
        .unwrap_or(0.0);
    let maybe = svc
        .metric("sieve_dedup_bloom_maybes_total", &[])
        .unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let skipped = neg / (neg + maybe);
    ensure!(
        skipped >= 0.95,
        "only {:.1}% of lookups skipped RocksDB",
        skipped * 100.0
    );
    Ok(())
}
