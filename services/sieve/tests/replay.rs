//! `sieve ctl replay` of `sieve dedup` end to end, on Apache Kafka started by the harness: a replay re-emits
//! exactly what the first run emitted for the replayed range (same ids, keys and order per
//! output partition), retries of keys seen before the replay point are still duplicates, a
//! dry run changes nothing, and a group with a running member is refused.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use common::{count, generated, Out, Pipeline};
use rdkafka::message::Message;
use sieve::gen::{Event, EventKind};
use sieve_core::changelog;
use sieve_core::paths;
use sieve_core::store::{bucket_cf, PartitionStore, DEFAULT_CF};
use sieve_tests::{wait_for, Broker};

/// (id, key) per output topic and partition and input partition, in order: the order of
/// outputs of one input partition is defined, their interleaving with another's is not.
type Streams = BTreeMap<(String, i32, i32), Vec<((i32, i64, u32), Vec<u8>)>>;

fn streams<'a>(outs: impl Iterator<Item = &'a Out>) -> Streams {
    let mut s = Streams::new();
    for o in outs {
        s.entry((o.topic.clone(), o.partition, o.id.0))
            .or_default()
            .push((o.id, o.key.clone()));
    }
    s
}

/// The first run's outputs of inputs at or after each replayed partition's offset, and the
/// outputs written after the first run: they must be the same streams.
fn check_replayed(first: &[Out], now: &[Out], from: &BTreeMap<i32, i64>) -> Result<()> {
    let expected = streams(
        first
            .iter()
            .filter(|o| from.get(&o.id.0).is_some_and(|f| o.id.1 >= *f)),
    );
    let seen: HashSet<(String, i32, i64)> = first
        .iter()
        .map(|o| (o.topic.clone(), o.partition, o.offset))
        .collect();
    let replayed = streams(
        now.iter()
            .filter(|o| !seen.contains(&(o.topic.clone(), o.partition, o.offset))),
    );
    let n: usize = expected.values().map(Vec::len).sum();
    ensure!(n > 0, "nothing to replay: the test proves nothing");
    ensure!(
        replayed == expected,
        "replayed outputs differ from the first run's: expected {n} records, got {}",
        replayed.values().map(Vec::len).sum::<usize>()
    );
    Ok(())
}

/// Records at or after `from` in a partition whose key first appeared before it: retries
/// that only a warmed-up state recognises.
fn retries_across(broker: &Broker, topic: &str, partition: i32, from: i64) -> Result<usize> {
    let mut before = HashSet::new();
    let mut across = 0;
    for m in broker.read_all(topic)? {
        if m.partition() != partition {
            continue;
        }
        let k = m.key().unwrap_or_default().to_vec();
        if m.offset() < from {
            before.insert(k);
        } else if before.contains(&k) {
            across += 1;
        }
    }
    Ok(across)
}

#[test]
fn replay_to_offset_and_to_earliest_give_the_first_runs_output_again() -> Result<()> {
    let p = Pipeline::new(2)?;
    let events = generated(6_000, 21);
    let (new, conflicts) = (
        count(&events, EventKind::New),
        count(&events, EventKind::Conflict),
    );
    p.produce(&events)?;
    let mut svc = p.spawn()?;
    p.wait_for_counts(&mut svc, new, conflicts)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let first = p.outputs()?;
    ensure!(
        first.len() == new + conflicts,
        "first run: {} outputs",
        first.len()
    );
    let committed = p.broker.committed(&p.group, &p.raw)?;

    // A dry run prints the plan and changes nothing.
    let (code, out) = p.replay(&["--to-offset", "1000", "--dry-run"])?;
    ensure!(
        code == 0 && out.contains("dry run") && out.contains("1000"),
        "{out}"
    );
    ensure!(
        p.broker.committed(&p.group, &p.raw)? == committed,
        "dry run moved offsets"
    );

    let (code, out) = p.replay(&["--partitions", "0", "--to-earliest", "--execute"])?;
    ensure!(code == 0, "{out}");
    let (code, out) = p.replay(&["--partitions", "1", "--to-offset", "1000", "--execute"])?;
    ensure!(code == 0, "{out}");
    let from = BTreeMap::from([(0, 0), (1, 1000)]);
    ensure!(
        p.broker.committed(&p.group, &p.raw)? == from,
        "offsets not reset"
    );
    ensure!(
        retries_across(&p.broker, &p.raw, 1, 1000)? > 0,
        "no retry crosses the replay point"
    );

    let expected_again = first.iter().filter(|o| o.id.1 >= from[&o.id.0]).count();
    let mut svc = p.spawn()?;
    wait_for("replayed outputs", Duration::from_secs(180), || {
        (p.outputs().ok()?.len() >= first.len() + expected_again).then_some(())
    })?;
    // Retries after the replay are still duplicates: nothing more is emitted.
    let retries: Vec<Event> = events
        .iter()
        .filter(|e| e.kind == EventKind::New)
        .take(300)
        .cloned()
        .collect();
    p.produce(&retries)?;
    let reprocessed: i64 = committed.values().sum::<i64>() - 1000 + retries.len() as i64;
    wait_for(
        "replay and retries processed",
        Duration::from_secs(120),
        || {
            let n = svc.metric("sieve_records_in_total", &[])?;
            (n as i64 >= reprocessed).then_some(())
        },
    )?;
    let replays = svc.metric("sieve_replays_total", &[]).unwrap_or(0.0);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    ensure!(replays == 2.0, "{replays} partitions replayed");
    let now = p.outputs()?;
    ensure!(
        now.len() == first.len() + expected_again,
        "{} outputs after the replay, expected {}",
        now.len(),
        first.len() + expected_again
    );
    check_replayed(&first, &now, &from)
}

#[test]
fn replay_to_a_datetime_between_two_phases() -> Result<()> {
    let p = Pipeline::new(2)?;
    let events = generated(4_000, 31);
    let (phase1, phase2) = events.split_at(2_000);
    p.produce(phase1)?;
    let ends1 = p.broker.end_offsets(&p.raw)?;
    // Every phase-1 record was stored before `between`, every phase-2 record is created
    // after it: the split holds whether the broker indexes record or storage time.
    let between = SystemTime::now();
    wait_for(
        "the clock to pass the split",
        Duration::from_secs(5),
        || (between.elapsed().ok()? >= Duration::from_millis(20)).then_some(()),
    )?;
    p.produce(phase2)?;
    let (new, conflicts) = (
        count(&events, EventKind::New),
        count(&events, EventKind::Conflict),
    );
    let mut svc = p.spawn()?;
    p.wait_for_counts(&mut svc, new, conflicts)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let first = p.outputs()?;

    let at = humantime::format_rfc3339_millis(between).to_string();
    let (code, out) = p.replay(&["--to-datetime", &at, "--execute"])?;
    ensure!(code == 0, "{out}");
    ensure!(
        p.broker.committed(&p.group, &p.raw)? == ends1,
        "--to-datetime {at} did not land on the phase boundary:\n{out}"
    );
    for (part, end) in &ends1 {
        ensure!(retries_across(&p.broker, &p.raw, *part, *end)? > 0);
    }
    let expected_again = first.iter().filter(|o| o.id.1 >= ends1[&o.id.0]).count();
    let mut svc = p.spawn()?;
    wait_for("replayed outputs", Duration::from_secs(180), || {
        (p.outputs().ok()?.len() >= first.len() + expected_again).then_some(())
    })?;
    let total: i64 = p.broker.end_offsets(&p.raw)?.values().sum();
    let reprocessed = total - ends1.values().sum::<i64>();
    wait_for("phase 2 reprocessed", Duration::from_secs(120), || {
        (svc.metric("sieve_records_in_total", &[])? as i64 >= reprocessed).then_some(())
    })?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let now = p.outputs()?;
    ensure!(now.len() == first.len() + expected_again);
    check_replayed(&first, &now, &ends1)
}

#[test]
fn replay_is_refused_while_a_member_is_active() -> Result<()> {
    let p = Pipeline::new(1)?;
    let events = generated(200, 41);
    p.produce(&events)?;
    let mut svc = p.spawn()?;
    p.wait_for_counts(&mut svc, count(&events, EventKind::New), 0)?;
    let committed = p.broker.committed(&p.group, &p.raw)?;
    let pid = svc.pid().unwrap_or_default();
    let (code, out) = p.replay(&["--to-earliest", "--execute"])?;
    ensure!(code != 0, "replay ran beside a member:\n{out}");
    ensure!(
        out.contains("active member") && out.contains(&format!("/pid={pid}")),
        "the refusal does not name member pid {pid}:\n{out}"
    );
    ensure!(p.broker.committed(&p.group, &p.raw)? == committed);
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    // A member that stopped is no longer one.
    let (code, out) = p.replay(&["--to-earliest", "--dry-run"])?;
    ensure!(code == 0, "{out}");
    Ok(())
}

/// Every state key of a store: (column family, key).
fn state_keys(store: &PartitionStore) -> Result<BTreeSet<(String, Vec<u8>)>> {
    let mut cfs: Vec<String> = store.buckets().iter().map(|b| bucket_cf(b)).collect();
    cfs.push(DEFAULT_CF.to_string());
    let mut keys = BTreeSet::new();
    for cf in cfs {
        for (k, _) in store.scan_prefix(&cf, b"")? {
            keys.insert((cf.clone(), k));
        }
    }
    Ok(keys)
}

#[test]
fn a_restore_after_a_replay_brings_no_pre_replay_state_back() -> Result<()> {
    let p = Pipeline::new(1)?;
    let events = generated(3_000, 61);
    let (phase1, phase2) = events.split_at(1_500);
    p.produce(phase1)?;
    let split = SystemTime::now();
    wait_for("phase 1 to age", Duration::from_secs(10), || {
        (split.elapsed().ok()? >= Duration::from_secs(3)).then_some(())
    })?;
    p.produce(phase2)?;
    let mut svc = p.spawn()?;
    let (new, conflicts) = (
        count(&events, EventKind::New),
        count(&events, EventKind::Conflict),
    );
    p.wait_for_counts(&mut svc, new, conflicts)?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    // A copy of the pre-replay store: an instance that kept its volume while another one
    // honoured the replay.
    let state = p.dir.path().join("state");
    let stale = p.dir.path().join("stale-state");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&state)
        .arg(&stale)
        .status()?;
    ensure!(copied.success(), "copying the state dir");

    // Replay to the end with a TTL that only covers phase 2: the warm-up rebuilds phase 2's
    // keys, and phase 1's keys must be gone from the local store and from the changelog.
    let (code, out) = p.replay(&["--to-latest", "--execute"])?;
    ensure!(code == 0, "{out}");
    let mut svc = p.spawn_with(&["--ttl", "1s", "--buckets", "1"])?;
    wait_for("replay honoured", Duration::from_secs(120), || {
        (svc.metric("sieve_replays_total", &[])? >= 1.0).then_some(())
    })?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);

    let local_path = paths::partition_store(&p.dir.path().join("state"), &p.group, &p.raw, 0);
    let local = state_keys(&PartitionStore::open(&local_path)?)?;
    let restored_dir = tempfile::tempdir()?;
    let mut restored = PartitionStore::open(restored_dir.path())?;
    let clients = p.broker.clients();
    let reader = clients.reader()?;
    let cl = changelog::topic_name(&p.group, &p.raw);
    let cl_end = p.broker.end_offsets(&cl)?[&0];
    changelog::restore(&reader, &mut restored, &cl, 0, cl_end, |_| {})?;
    let restored = state_keys(&restored)?;
    let phase1_only: HashSet<&[u8]> = {
        let later: HashSet<&[u8]> = phase2.iter().map(|e| e.key.as_bytes()).collect();
        phase1
            .iter()
            .map(|e| e.key.as_bytes())
            .filter(|k| !later.contains(k))
            .collect()
    };
    let is_phase1 = |(_, k): &(String, Vec<u8>)| phase1_only.contains(k.as_slice());
    ensure!(!local.is_empty(), "the warm-up rebuilt nothing");
    ensure!(
        !local.iter().any(is_phase1),
        "the replay kept phase-1 keys locally"
    );
    ensure!(
        !restored.iter().any(is_phase1),
        "a restore from the changelog brought back {} phase-1 keys",
        restored.iter().filter(|k| is_phase1(k)).count()
    );
    ensure!(
        restored == local,
        "restored state differs from the local state"
    );

    // The stale store is ahead of nothing, yet it missed the replay: it must be rebuilt.
    std::fs::remove_dir_all(&state)?;
    std::fs::rename(&stale, &state)?;
    let mut svc = p.spawn_with(&["--ttl", "1s", "--buckets", "1"])?;
    wait_for("the stale store rebuilt", Duration::from_secs(120), || {
        (svc.metric("sieve_restore_records_total", &[])? > 0.0
            && svc.metric("sieve_ready", &[])? == 1.0)
            .then_some(())
    })?;
    assert_eq!(svc.terminate(Duration::from_secs(30))?, 0);
    let rebuilt = state_keys(&PartitionStore::open(&local_path)?)?;
    ensure!(
        rebuilt == restored,
        "the stale store was used instead of the changelog"
    );
    Ok(())
}
