//! The end of a chaos run: wait (with a deadline) until lag is zero and the topics agree with
//! the workload, reading them with a plain consumer; the verdict lists every difference.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::message::{Message, OwnedMessage};
use sieve_core::record::OutputId;

use super::fleet::Fleet;
use super::workload::{Event, Posted, Topics, CHANNELS};
use super::Faults;
use crate::Broker;

/// What the topics must hold.
pub struct Expected<'a> {
    pub posted: &'a Posted,
    /// The anti-join's right side after every change.
    pub right: BTreeSet<String>,
    /// (notification id, user) owed exactly one in-app delivery.
    pub notifications: BTreeSet<(String, String)>,
}

/// Counts read from the topics and every difference from the expected answer.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub seed: u64,
    pub faults: Faults,
    pub accepted: usize,
    pub raw: usize,
    pub unique: usize,
    pub duplicates: usize,
    pub dlq: usize,
    pub antijoin: (usize, usize),
    pub notifications: (usize, usize),
    pub lag: i64,
    pub differences: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.differences.is_empty()
    }

    pub fn with_faults(mut self, seed: u64, faults: &Faults) -> Verdict {
        self.seed = seed;
        self.faults = faults.clone();
        self.differences
            .extend(faults.unexpected_exits.iter().cloned());
        self
    }

    /// The one-line verdict.
    pub fn line(&self) -> String {
        let f = &self.faults;
        format!(
            "chaos: {} seed={} kills={} restarts={} state_wipes={} rebalances={} broker_kills={} \
             zombies={} accepted={} in={} unique={} duplicates={} dlq={} antijoin={}/{} \
             notifications={}/{} lag={}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.seed,
            f.kills,
            f.restarts,
            f.state_wipes,
            f.rebalances,
            f.broker_kills,
            f.zombies,
            self.accepted,
            self.raw,
            self.unique,
            self.duplicates,
            self.dlq,
            self.antijoin.0,
            self.antijoin.1,
            self.notifications.0,
            self.notifications.1,
            self.lag,
        )
    }
}

/// Polls the reconciliation until it finds no difference or `timeout` passes; the last
/// verdict is returned either way.
pub fn drain(
    broker: &Broker,
    t: &Topics,
    fleet: &mut Fleet,
    expected: &Expected,
    faults: &mut Faults,
    timeout: Duration,
) -> Result<Verdict> {
    let deadline = Instant::now() + timeout;
    loop {
        fleet.watch(faults)?;
        let verdict = reconcile(broker, t, expected).unwrap_or_else(|e| Verdict {
            differences: vec![format!("reading the topics: {e:#}")],
            ..Verdict::default()
        });
        if verdict.passed() || Instant::now() > deadline {
            return Ok(verdict);
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Reads every topic once and compares with the workload.
pub fn reconcile(broker: &Broker, t: &Topics, expected: &Expected) -> Result<Verdict> {
    let mut v = Verdict {
        accepted: expected.posted.accepted.len(),
        ..Verdict::default()
    };
    let d = &mut v.differences;
    for role in ["dedup", "antijoin", "planner", "deliver"] {
        let group = format!("{}-{role}", t.ns);
        for topic in t.inputs(role) {
            let lag = broker.lag(&group, &topic)?;
            if lag != 0 {
                d.push(format!("lag {role} {topic}: {lag}"));
            }
            v.lag += lag;
        }
    }
    let posted = expected.posted;
    if posted.abandoned > 0 {
        d.push(format!(
            "{} batches never answered 202 in time",
            posted.abandoned
        ));
    }
    d.extend(
        posted
            .unexpected
            .iter()
            .take(5)
            .map(|a| format!("ingest answered {a}")),
    );

    let dedup = check_dedup(broker, t, posted, d)?;
    v.raw = dedup.raw;
    v.unique = dedup.unique.len();
    v.duplicates = dedup.duplicates;
    v.dlq = dedup.dlq;
    let users: BTreeSet<String> = dedup.unique.iter().map(|e| e.user.clone()).collect();
    v.antijoin = check_antijoin(broker, t, &users, &expected.right, d)?;
    v.notifications = check_notify(broker, t, &expected.notifications, d)?;
    Ok(v)
}

/// Where an input record went.
struct Dedup {
    raw: usize,
    unique: Vec<Event>,
    duplicates: usize,
    dlq: usize,
}

/// An output or DLQ record of dedup as the reconciliation sees it.
#[derive(Debug, Clone)]
struct OutRec {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    /// (partition, offset) of the input record, from its `sieve-id`.
    source: Option<(i32, i64)>,
}

impl OutRec {
    fn of(m: &OwnedMessage) -> OutRec {
        OutRec {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().unwrap_or_default().to_vec(),
            source: OutputId::of(m).map(|id| (id.partition, id.offset)),
        }
    }
}

/// Reads dedup's input, output and DLQ and judges them.
fn check_dedup(broker: &Broker, t: &Topics, posted: &Posted, d: &mut Vec<String>) -> Result<Dedup> {
    let mut raw: BTreeMap<(i32, i64), Event> = BTreeMap::new();
    for m in broker.read_all(&t.raw)? {
        match m.payload().and_then(Event::parse) {
            Some(e) => {
                raw.insert((m.partition(), m.offset()), e);
            }
            None => d.push(format!(
                "unreadable input record at {}/{}",
                m.partition(),
                m.offset()
            )),
        }
    }
    let read = |topic: &str| -> Result<Vec<OutRec>> {
        Ok(broker.read_all(topic)?.iter().map(OutRec::of).collect())
    };
    let (unique, dlq) = (read(&t.unique)?, read(&t.dedup_dlq)?);
    Ok(judge_dedup(&posted.accepted, &raw, &unique, &dlq, d))
}

/// Ingest and dedup: every accepted event is on the input; every input record is in exactly
/// one of output / counted duplicate / DLQ; the output holds each event once, from the first
/// record of its id, in per-key input order.
fn judge_dedup(
    accepted: &BTreeSet<Event>,
    raw: &BTreeMap<(i32, i64), Event>,
    uniq: &[OutRec],
    dlq: &[OutRec],
    d: &mut Vec<String>,
) -> Dedup {
    let on_input: BTreeSet<&Event> = raw.values().collect();
    let lost: Vec<&Event> = accepted.iter().filter(|e| !on_input.contains(e)).collect();
    if !lost.is_empty() {
        d.push(format!(
            "{} events answered 202 but not on the input topic, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(3)]
        ));
    }
    // The first input record of each event id is the one dedup must pass on.
    let mut first: BTreeMap<&str, (i32, i64)> = BTreeMap::new();
    for (at, e) in raw {
        first.entry(e.id.as_str()).or_insert(*at);
    }

    let mut outputs: BTreeMap<(i32, i64), &'static str> = BTreeMap::new();
    let mut unique = Vec::new();
    let mut per_key: BTreeMap<&[u8], (i32, (i32, i64))> = BTreeMap::new();
    let mut seen_ids = BTreeSet::new();
    for m in uniq {
        let Some(src) = m.source else {
            d.push(format!(
                "output without a sieve-id at {}/{}",
                m.partition, m.offset
            ));
            continue;
        };
        if outputs.insert(src, "output").is_some() {
            d.push(format!("input {src:?} written twice to the output"));
        }
        let Some(e) = raw.get(&src) else {
            d.push(format!("output {src:?} has no input record"));
            continue;
        };
        if !seen_ids.insert(e.id.clone()) {
            d.push(format!("event {} twice in the output", e.id));
        }
        if first.get(e.id.as_str()) != Some(&src) {
            d.push(format!(
                "event {} passed on from {src:?}, not its first record",
                e.id
            ));
        }
        // Per-key order: a key stays on one output partition, its inputs in offset order.
        if let Some((part, prev)) = per_key.insert(&m.key, (m.partition, src)) {
            if part != m.partition || prev.0 != src.0 || prev.1 >= src.1 {
                d.push(format!(
                    "key {} out of order: {prev:?} then {src:?}",
                    String::from_utf8_lossy(&m.key)
                ));
            }
        }
        unique.push(e.clone());
    }
    for m in dlq {
        match m.source {
            Some(src) => {
                if let Some(was) = outputs.insert(src, "dlq") {
                    d.push(format!("input {src:?} in the DLQ and in the {was}"));
                }
            }
            None => d.push(format!(
                "DLQ record without a sieve-id at offset {}",
                m.offset
            )),
        }
    }
    let missing_ids: Vec<&&str> = first.keys().filter(|id| !seen_ids.contains(**id)).collect();
    if !missing_ids.is_empty() {
        d.push(format!(
            "{} event ids on the input never reached the output, e.g. {:?}",
            missing_ids.len(),
            &missing_ids[..missing_ids.len().min(3)]
        ));
    }
    // A record not passed on is a duplicate (same content as the first) or a conflict
    // (other content), and conflicts go to the DLQ.
    let mut duplicates = 0;
    for (at, e) in raw {
        let kept = first.get(e.id.as_str()).and_then(|f| raw.get(f));
        let conflict = kept.is_some_and(|k| k != e);
        match (outputs.get(at), conflict) {
            (Some(&"output"), _) | (Some(_), true) => {}
            (None, false) => duplicates += 1,
            (Some(_), false) => d.push(format!("repeat {at:?} of {} sent to the DLQ", e.id)),
            (None, true) => d.push(format!("conflicting {at:?} of {} not in the DLQ", e.id)),
        }
    }
    if raw.len() != uniq.len() + duplicates + dlq.len() {
        d.push(format!(
            "in {} != out {} + duplicates {duplicates} + dlq {}",
            raw.len(),
            uniq.len(),
            dlq.len()
        ));
    }
    Dedup {
        raw: raw.len(),
        unique,
        duplicates,
        dlq: dlq.len(),
    }
}

/// The anti-join's output, read to the end as a compacted view, is exactly the users with
/// events and no right-side key; returns (got, expected) key counts.
fn check_antijoin(
    broker: &Broker,
    t: &Topics,
    users: &BTreeSet<String>,
    right: &BTreeSet<String>,
    d: &mut Vec<String>,
) -> Result<(usize, usize)> {
    let expected: BTreeSet<&String> = users.difference(right).collect();
    let view = broker.compacted_view(&t.missing)?;
    let got: BTreeSet<String> = view
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let missing: Vec<&&String> = expected.iter().filter(|k| !got.contains(**k)).collect();
    let extra: Vec<&String> = got.iter().filter(|k| !expected.contains(k)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        d.push(format!(
            "anti-join: {} keys missing (e.g. {:?}), {} extra (e.g. {:?})",
            missing.len(),
            &missing[..missing.len().min(3)],
            extra.len(),
            &extra[..extra.len().min(3)]
        ));
    }
    for (k, payload) in &view {
        if Event::parse(payload).is_none_or(|e| e.user.as_bytes() != k.as_slice()) {
            d.push(format!(
                "anti-join value of {} is not an event of that user",
                String::from_utf8_lossy(k)
            ));
            break;
        }
    }
    let dlq = broker.count(&t.antijoin_dlq)?;
    if dlq != 0 {
        d.push(format!("anti-join DLQ holds {dlq} records"));
    }
    Ok((got.len(), expected.len()))
}

/// Every owed in-app delivery exactly once, nothing on other channels; returns (delivered,
/// expected).
fn check_notify(
    broker: &Broker,
    t: &Topics,
    expected: &BTreeSet<(String, String)>,
    d: &mut Vec<String>,
) -> Result<(usize, usize)> {
    let mut delivered: BTreeMap<(String, String), u32> = BTreeMap::new();
    for m in broker.read_all(&t.notify("out.inapp"))? {
        let v: serde_json::Value =
            serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
        let field = |f: &str| v[f].as_str().unwrap_or_default().to_string();
        *delivered
            .entry((field("notification_id"), field("user_id")))
            .or_default() += 1;
    }
    let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    if !twice.is_empty() {
        d.push(format!(
            "{} (notification, user, inapp) delivered more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(3)]
        ));
    }
    let missing = expected
        .iter()
        .filter(|k| !delivered.contains_key(*k))
        .count();
    let extra = delivered.keys().filter(|k| !expected.contains(*k)).count();
    if missing + extra > 0 {
        d.push(format!(
            "notify: {missing} deliveries missing, {extra} not owed"
        ));
    }
    for c in CHANNELS.iter().filter(|c| **c != "inapp") {
        let n = broker.count(&t.notify(&format!("out.{c}")))?;
        if n != 0 {
            d.push(format!("notify: {n} records on out.{c}, none owed"));
        }
    }
    Ok((delivered.len(), expected.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, amount: u64) -> Event {
        Event {
            id: id.into(),
            user: "u1".into(),
            amount,
        }
    }

    fn out(offset: i64, source: i64) -> OutRec {
        OutRec {
            partition: 0,
            offset,
            key: b"u1".to_vec(),
            source: Some((0, source)),
        }
    }

    /// Input: e1, e2, a repeat of e1, a conflicting e1. Dedup's answer: e1 and e2 out, the
    /// repeat counted, the conflict in the DLQ.
    fn input() -> (BTreeSet<Event>, BTreeMap<(i32, i64), Event>) {
        let raw: BTreeMap<(i32, i64), Event> =
            [ev("e1", 100), ev("e2", 5), ev("e1", 100), ev("e1", 101)]
                .into_iter()
                .enumerate()
                .map(|(i, e)| ((0, i as i64), e))
                .collect();
        (raw.values().cloned().collect(), raw)
    }

    fn judge(accepted: &BTreeSet<Event>, uniq: &[OutRec], dlq: &[OutRec]) -> (Dedup, Vec<String>) {
        let (_, raw) = input();
        let mut d = Vec::new();
        let dedup = judge_dedup(accepted, &raw, uniq, dlq, &mut d);
        (dedup, d)
    }

    #[test]
    fn the_right_answer_passes_with_its_counts() {
        let (accepted, _) = input();
        let (dedup, d) = judge(&accepted, &[out(0, 0), out(1, 1)], &[out(0, 3)]);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(
            (dedup.raw, dedup.unique.len(), dedup.duplicates, dedup.dlq),
            (4, 2, 1, 1)
        );
    }

    #[test]
    fn loss_duplicates_order_and_misrouting_are_each_found() {
        let (accepted, _) = input();
        let found = |uniq: &[OutRec], dlq: &[OutRec], accepted: &BTreeSet<Event>, what: &str| {
            let (_, d) = judge(accepted, uniq, dlq);
            assert!(d.iter().any(|x| x.contains(what)), "{what} not in {d:?}");
        };
        let dlq = [out(0, 3)];
        let mut more = accepted.clone();
        more.insert(ev("e9", 1));
        found(
            &[out(0, 0), out(1, 1)],
            &dlq,
            &more,
            "answered 202 but not on the input",
        );
        found(
            &[out(0, 0), out(1, 1), out(2, 0)],
            &dlq,
            &accepted,
            "written twice",
        );
        found(
            &[out(0, 0), out(1, 1), out(2, 2)],
            &dlq,
            &accepted,
            "twice in the output",
        );
        found(&[out(0, 1), out(1, 0)], &dlq, &accepted, "out of order");
        found(&[out(0, 0)], &dlq, &accepted, "never reached the output");
        found(&[out(0, 0), out(1, 1)], &[], &accepted, "not in the DLQ");
        found(
            &[out(0, 0), out(1, 1)],
            &[out(0, 3), out(1, 2)],
            &accepted,
            "repeat",
        );
        found(
            &[out(0, 0), out(1, 1)],
            &[out(0, 3), out(1, 1)],
            &accepted,
            "in the DLQ and in the output",
        );
    }
}
