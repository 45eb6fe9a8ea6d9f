//! `sieve antijoin stream` end to end: the real binary, Apache Kafka started by the harness, RocksDB on disk.
//! A fixture with a known answer: a hot `guest` key (5 % of the left side), right keys that
//! exist before the left records, right keys that arrive after their left records were
//! emitted (retractions), right deletes (re-emits), right keys no left record has, and bad
//! left records. The output topic, read to the end as a compacted view, must equal the
//! exact expected set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use rdkafka::message::Message;
use sieve_tests::{http_get, service_args, unique, wait_for, Broker, Service, FAST_COMPACTION};

const BIN: &str = env!("CARGO_BIN_EXE_sieve");

/// (Kafka key, payload) of a left record.
type LeftRecord = (String, String);

/// Left records and right-side changes with a known answer.
struct Scenario {
    /// (Kafka key, payload) of every left record, bad ones included, in production order.
    left: Vec<LeftRecord>,
    bad: usize,
    right_initial: Vec<String>,
    right_added: Vec<String>,
    right_deleted: Vec<String>,
}

impl Scenario {
    /// `n` valid left records over `n / 3` user ids plus `guest`; `by_id` keys left records
    /// by their join key (co-partitioned) instead of by record number (spread).
    fn new(n: usize, by_id: bool) -> Scenario {
        let users = n / 3;
        let mut left = Vec::new();
        for i in 0..n {
            let id = if i % 20 == 0 {
                "guest".to_string()
            } else {
                format!("u{}", (i * 7919) % users)
            };
            let key = if by_id { id.clone() } else { format!("r{i}") };
            left.push((key, format!(r#"{{"id":"{id}","n":{i}}}"#)));
            if i % 500 == 0 {
                let bad = [
                    "not json {".to_string(),
                    format!(r#"{{"n":{i}}}"#),
                    format!(r#"{{"id":{{"nested":{i}}},"n":{i}}}"#),
                    r#"{"id":null}"#.to_string(),
                ][(i / 500) % 4]
                    .clone();
                left.push((format!("bad{i}"), bad));
            }
        }
        let bad = left.len() - n;
        let uid = |i: usize| format!("u{i}");
        Scenario {
            left,
            bad,
            // A third of the users are current before any left record is judged.
            right_initial: (0..users)
                .filter(|i| i % 3 == 0)
                .map(uid)
                .chain((0..500).map(|i| format!("only-right-{i}")))
                .collect(),
            // Keys that gain a match after being emitted, guest among them.
            right_added: (0..users)
                .filter(|i| i % 3 == 1 && i % 5 == 0)
                .map(uid)
                .chain(["guest".to_string()])
                .collect(),
            // Matches that disappear: their left records must come back.
            right_deleted: (0..users).filter(|i| i % 21 == 0).map(uid).collect(),
        }
    }

    fn left_halves(&self) -> (&[LeftRecord], &[LeftRecord]) {
        self.left.split_at(self.left.len() / 2)
    }

    /// Left join keys with no match in the final right side.
    fn expected(&self) -> BTreeSet<Vec<u8>> {
        let deleted: BTreeSet<&String> = self.right_deleted.iter().collect();
        let right: BTreeSet<&String> = self
            .right_initial
            .iter()
            .chain(&self.right_added)
            .filter(|k| !deleted.contains(k))
            .collect();
        self.left
            .iter()
            .filter_map(|(_, v)| join_key(v))
            .filter(|k| !right.contains(k))
            .map(String::into_bytes)
            .collect()
    }
}

fn join_key(payload: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    v.get("id")?.as_str().map(str::to_string)
}

struct Setup {
    broker: Broker,
    left: String,
    right: String,
    out: String,
    dlq: String,
    group: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(left_partitions: i32, right_partitions: i32) -> Result<Setup> {
        Self::with_output(left_partitions, right_partitions, &[("retention.ms", "-1")])
    }

    /// With these configs on the output topic (such as [`FAST_COMPACTION`]).
    fn with_output(
        left_partitions: i32,
        right_partitions: i32,
        out_configs: &[(&str, &str)],
    ) -> Result<Setup> {
        let broker = Broker::start()?;
        let s = Setup {
            left: unique("legacy"),
            right: unique("current"),
            out: unique("missing"),
            dlq: unique("dlq"),
            group: unique("antijoin"),
            dir: tempfile::tempdir()?,
            broker,
        };
        s.broker.create_topic(&s.left, left_partitions)?;
        s.broker.create_topic(&s.right, right_partitions)?;
        s.broker.create_topic_with(&s.out, 3, out_configs)?;
        s.broker.create_topic(&s.dlq, 1)?;
        Ok(s)
    }

    fn spawn(&self, extra: &[&str], env: &[(&str, &str)]) -> Result<Service> {
        let mut args: Vec<String> = [
            "antijoin",
            "stream",
            "--left",
            &self.left,
            "--right",
            &self.right,
            "--key",
            "/id",
            "--out",
            &self.out,
            "--dlq",
            &self.dlq,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(service_args(
            &self.broker,
            &self.group,
            &self.dir.path().join("state"),
        ));
        args.extend(extra.iter().map(|s| s.to_string()));
        Service::spawn(Path::new(BIN), &args, env, self.dir.path())
    }

    fn produce_left(&self, records: &[LeftRecord]) -> Result<()> {
        self.broker
            .produce(&self.left, records.iter().map(|(k, v)| (k, v)))?;
        Ok(())
    }

    fn produce_right(&self, keys: &[String]) -> Result<()> {
        self.broker.produce(
            &self.right,
            keys.iter().map(|k| (k, format!(r#"{{"id":"{k}"}}"#))),
        )?;
        Ok(())
    }

    fn apply_right_changes(&self, sc: &Scenario) -> Result<()> {
        self.produce_right(&sc.right_added)?;
        let deletes: Vec<(&String, Option<&str>)> =
            sc.right_deleted.iter().map(|k| (k, None)).collect();
        self.broker.produce_changes(&self.right, &deletes)?;
        Ok(())
    }

    /// Waits until the compacted output equals `expected`; checks every value is a left
    /// record of its key.
    fn wait_for_view(&self, svc: &mut Service, expected: &BTreeSet<Vec<u8>>) -> Result<()> {
        let mut last = BTreeMap::new();
        let res = wait_for(
            "the expected anti-join view",
            Duration::from_secs(240),
            || {
                if svc.exited().is_some() {
                    return Some(());
                }
                last = self.broker.compacted_view(&self.out).ok()?;
                last.keys()
                    .cloned()
                    .eq(expected.iter().cloned())
                    .then_some(())
            },
        );
        ensure!(
            svc.exited().is_none(),
            "antijoin exited:\n{}",
            svc.log_tail(40)
        );
        if res.is_err() {
            let got: BTreeSet<Vec<u8>> = last.keys().cloned().collect();
            let missing: Vec<String> = expected
                .difference(&got)
                .take(10)
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let extra: Vec<String> = got
                .difference(expected)
                .take(10)
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            anyhow::bail!(
                "view differs: {} keys, expected {}; missing {missing:?}, extra {extra:?}\n{}",
                got.len(),
                expected.len(),
                svc.log_tail(30)
            );
        }
        for (k, v) in &last {
            let v = std::str::from_utf8(v)?;
            ensure!(
                join_key(v).as_deref().map(str::as_bytes) == Some(k.as_slice()),
                "value {v} under key {}",
                String::from_utf8_lossy(k)
            );
        }
        Ok(())
    }

    /// The scenario's run: the initial right side, the service (`extra` flags) ready, the first
    /// left half taken in, the right side's changes, the second half; returns the service
    /// once the output equals the expected view.
    fn run_to_expected_view(&self, sc: &Scenario, extra: &[&str]) -> Result<Service> {
        self.produce_right(&sc.right_initial)?;
        let mut svc = self.spawn(extra, &[])?;
        svc.wait_ready(Duration::from_secs(60))?;
        let (first, second) = sc.left_halves();
        self.produce_left(first)?;
        self.wait_for_in(&svc, first.len())?;
        self.apply_right_changes(sc)?;
        self.produce_left(second)?;
        self.wait_for_view(&mut svc, &sc.expected())?;
        Ok(svc)
    }

    fn wait_for_in(&self, svc: &Service, n: usize) -> Result<()> {
        wait_for("left records taken in", Duration::from_secs(120), || {
            (svc.metric("sieve_records_in_total", &[]).unwrap_or(0.0) as usize >= n).then_some(())
        })
        .map(|_| ())
    }
}

/// Retractions and re-emits with the right side broadcast and the left side spread over
/// partitions by record number (so `guest` is on every partition).
fn retractions_reach_the_exact_expected_set(by_id: bool, extra: &[&str]) -> Result<()> {
    let s = Setup::new(4, if by_id { 4 } else { 2 })?;
    let sc = Scenario::new(12_000, by_id);
    let mut svc = s.run_to_expected_view(&sc, extra)?;
    // Counters move after the batch's outputs are visible.
    s.wait_for_in(&svc, sc.left.len())?;

    let m = |name: &str| svc.metric(name, &[]).unwrap_or(-1.0) as usize;
    let (inn, emitted, matched, dlq) = (
        m("sieve_records_in_total"),
        m("sieve_antijoin_emitted_total"),
        m("sieve_antijoin_matched_total"),
        svc.metric("sieve_dlq_records_total", &["stage=\"antijoin\""])
            .unwrap_or(-1.0) as usize,
    );
    let (retractions, reemits) = (
        m("sieve_antijoin_retractions_total"),
        m("sieve_antijoin_reemits_total"),
    );
    let skew = http_get(&format!("http://127.0.0.1:{}/skew", svc.metrics_port));
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    assert_eq!(inn, sc.left.len());
    assert_eq!(inn, emitted + matched + dlq, "in = emitted + matched + dlq");
    assert_eq!(dlq, sc.bad);
    assert_eq!(s.broker.count(&s.dlq)? as usize, sc.bad);
    ensure!(
        retractions > 0 && reemits > 0,
        "retractions {retractions}, re-emits {reemits}"
    );
    let (code, body) = skew.unwrap_or_default();
    ensure!(
        code == 200 && body.contains("guest"),
        "/skew names the hot key: {code} {body}"
    );
    Ok(())
}

#[test]
fn broadcast_retractions_reach_the_exact_expected_set() -> Result<()> {
    retractions_reach_the_exact_expected_set(false, &[])
}

#[test]
fn co_partitioned_retractions_reach_the_exact_expected_set() -> Result<()> {
    retractions_reach_the_exact_expected_set(true, &["--placement", "co-partitioned"])
}

/// Kafka's log cleaner really compacts the output: read from the start after cleaning, it
/// holds one record per missing key, the left record of that key, and no superseded value and
/// no tombstone (retractions' tombstones go after `delete.retention.ms`).
#[test]
fn the_output_after_kafka_compacted_it_is_the_expected_view() -> Result<()> {
    let s = Setup::with_output(4, 2, FAST_COMPACTION)?;
    let sc = Scenario::new(3_000, false);
    let mut svc = s.run_to_expected_view(&sc, &[])?;
    let retractions = svc
        .metric("sieve_antijoin_retractions_total", &[])
        .unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    ensure!(
        retractions > 0.0,
        "no retraction: nothing for the cleaner to remove"
    );
    let records = s.broker.wait_compacted(&s.out, Duration::from_secs(180))?;
    let keys: BTreeSet<Vec<u8>> = records
        .iter()
        .filter_map(|m| m.key().map(<[u8]>::to_vec))
        .collect();
    ensure!(
        keys == sc.expected(),
        "after cleaning: {} keys, expected {}",
        keys.len(),
        sc.expected().len()
    );
    for m in &records {
        let v = std::str::from_utf8(m.payload().unwrap_or_default())?;
        ensure!(join_key(v).map(String::into_bytes).as_deref() == m.key());
    }
    Ok(())
}

#[test]
fn sigkill_at_every_stage_and_a_lost_state_dir_give_the_same_view() -> Result<()> {
    let s = Setup::new(3, 2)?;
    let sc = Scenario::new(9_000, false);
    s.produce_right(&sc.right_initial)?;
    let (first, second) = sc.left_halves();
    s.produce_left(first)?;
    let crash = |fp: &str| -> Result<()> {
        let mut svc = s.spawn(&["--batch-records", "500"], &[("SIEVE_FAILPOINT", fp)])?;
        svc.wait_exit(&format!("crash at {fp}"), Duration::from_secs(120))?;
        ensure!(
            svc.logs().contains("failpoint reached"),
            "{fp}: exited without reaching the failpoint:\n{}",
            svc.log_tail(20)
        );
        Ok(())
    };
    crash("after_produce@3")?;
    crash("after_outputs_acked@2")?;
    // Right changes land while nothing runs; the next instances see them first at catch-up,
    // after partitions that emitted keys now matched were committed.
    s.apply_right_changes(&sc)?;
    crash("after_state_committed@2")?;
    s.produce_left(second)?;
    crash("after_produce@2")?;
    std::fs::remove_dir_all(s.dir.path().join("state"))?;
    crash("after_outputs_acked@3")?;
    let mut svc = s.spawn(&[], &[])?;
    s.wait_for_view(&mut svc, &sc.expected())?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    Ok(())
}

#[test]
fn append_mode_judges_only_after_the_right_side_is_loaded() -> Result<()> {
    let s = Setup::new(4, 3)?;
    let sc = Scenario::new(12_000, false);
    // A right side large enough that judging before it is loaded would emit matched keys.
    let mut right = sc.right_initial.clone();
    right.extend((0..40_000).map(|i| format!("filler-{i}")));
    s.produce_right(&right)?;
    s.produce_left(&sc.left)?;
    let current: BTreeSet<&str> = right.iter().map(String::as_str).collect();
    let mut expected: Vec<(String, String)> = sc
        .left
        .iter()
        .filter_map(|(_, v)| join_key(v).map(|k| (k, v.clone())))
        .filter(|(k, _)| !current.contains(k.as_str()))
        .collect();
    expected.sort();
    let mut svc = s.spawn(&["--output-mode", "append"], &[])?;
    wait_for("append output", Duration::from_secs(240), || {
        if svc.exited().is_some() {
            return Some(());
        }
        let n = s.broker.count(&s.out).ok()? as usize;
        let d = s.broker.count(&s.dlq).ok()? as usize;
        (n >= expected.len() && d >= sc.bad).then_some(())
    })?;
    ensure!(
        svc.exited().is_none(),
        "antijoin exited:\n{}",
        svc.log_tail(30)
    );
    let caught_up = svc
        .metric("sieve_side_catch_up_records_total", &[])
        .unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let mut got: Vec<(String, String)> = s
        .broker
        .read_all(&s.out)?
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got.len(), expected.len());
    ensure!(
        got == expected,
        "append output differs from the expected records"
    );
    assert_eq!(s.broker.count(&s.dlq)? as usize, sc.bad);
    assert_eq!(caught_up as usize, right.len());
    Ok(())
}

/// One step of a generated history.
#[derive(Debug, Clone)]
enum Op {
    Left(u8),
    RightInsert(u8),
    RightDelete(u8),
}

/// Property: for random histories over a small key space (so keys collide, reappear and
/// get deleted), the final compacted output equals the naive set difference. Many cases
/// share one broker and one service, each in its own key namespace; each history is fed
/// in three rounds with the left side judged between rounds, so left records meet the
/// right side in different states.
#[test]
fn property_final_view_equals_naive_set_difference() -> Result<()> {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let op = prop_oneof![
        3 => (0u8..12).prop_map(Op::Left),
        2 => (0u8..12).prop_map(Op::RightInsert),
        1 => (0u8..12).prop_map(Op::RightDelete),
    ];
    let history = proptest::collection::vec(op, 1..40);
    let mut runner = TestRunner::deterministic();
    let cases: Vec<Vec<Op>> = (0..48)
        .map(|_| history.new_tree(&mut runner).map(|t| t.current()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("generating cases: {e}"))?;
    let key = |case: usize, k: u8| format!("c{case}-k{k}");

    let s = Setup::new(3, 2)?;
    let mut svc = s.spawn(&[], &[])?;
    let mut left_total = 0usize;
    for round in 0..3 {
        let mut left = Vec::new();
        let mut right: Vec<(String, Option<String>)> = Vec::new();
        for (c, ops) in cases.iter().enumerate() {
            let third = ops.len().div_ceil(3);
            for (i, op) in ops.iter().enumerate().skip(round * third).take(third) {
                match op {
                    Op::Left(k) => left.push((
                        format!("c{c}-{i}"),
                        format!(r#"{{"id":"{}","i":{i}}}"#, key(c, *k)),
                    )),
                    Op::RightInsert(k) => right.push((key(c, *k), Some("{}".into()))),
                    Op::RightDelete(k) => right.push((key(c, *k), None)),
                }
            }
        }
        s.broker.produce_changes(&s.right, &right)?;
        s.produce_left(&left)?;
        left_total += left.len();
        s.wait_for_in(&svc, left_total)?;
    }

    let mut expected = BTreeSet::new();
    for (c, ops) in cases.iter().enumerate() {
        let mut right = BTreeSet::new();
        let mut lefts = BTreeSet::new();
        for op in ops {
            match op {
                Op::Left(k) => {
                    lefts.insert(*k);
                }
                Op::RightInsert(k) => {
                    right.insert(*k);
                }
                Op::RightDelete(k) => {
                    right.remove(k);
                }
            }
        }
        expected.extend(lefts.difference(&right).map(|k| key(c, *k).into_bytes()));
    }
    s.wait_for_view(&mut svc, &expected)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    Ok(())
}
