//! The dedup operator in-process (`sieve_core::testing`): every rule of `operator.rs` with
//! exact outputs, no broker. The broker tests (`services/sieve/tests/dedup.rs`) keep the
//! exactly-once and crash behaviour.

// Test helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use sieve_core::dlq;
use sieve_core::record::Output;
use sieve_core::store::bucket_name;
use sieve_core::testing::{dlq_detail, dlq_reason, header, Input, OperatorHarness};
use sieve_dedup::config::TimeSource;
use sieve_dedup::operator::{FIRST_HASH_HEADER, PAYLOAD_HASH_HEADER};
use sieve_dedup::{Dedup, DedupArgs, DedupFactory};
use xxhash_rust::xxh3::xxh3_64;

const IN: &str = "events.raw";
const OUT: &str = "events.unique";
const DLQ: &str = "dlq.dedup";
const KEY: &str = "idempotency-key";
const MIN: i64 = 60_000;
/// A TTL of one hour in four buckets of 15 minutes.
const TTL: i64 = 60 * MIN;
const BUCKET: i64 = 15 * MIN;
/// The start of a bucket, so bucket arithmetic in the tests is exact.
const T0: i64 = 1_800_000_000_000 / BUCKET * BUCKET;

fn args(key_pointer: Option<&str>) -> DedupArgs {
    DedupArgs {
        input: IN.into(),
        output: OUT.into(),
        dlq: DLQ.into(),
        ttl: Duration::from_millis(TTL as u64),
        buckets: 4,
        key_header: KEY.into(),
        key_pointer: key_pointer.map(str::to_string),
        time: TimeSource::Event,
        bloom_fp: 0.01,
        max_key_bytes: 16,
    }
}

fn open(key_pointer: Option<&str>) -> (DedupFactory, OperatorHarness<Dedup>) {
    let factory = DedupFactory::new(args(key_pointer));
    let harness = OperatorHarness::open(&factory, IN, 0).unwrap();
    (factory, harness)
}

/// A record with idempotency key `key` (header) and `payload`, at `t` ms.
fn rec(key: &str, payload: &str, t: i64) -> Input {
    Input::new(format!("k-{key}"), payload)
        .header(KEY, key)
        .at(t)
}

/// The output a unique record becomes: itself, unchanged, on the output topic.
fn passed(key: &str, payload: &str) -> Output {
    Output::new(OUT)
        .key(format!("k-{key}"))
        .payload(payload)
        .header(KEY, key)
}

#[test]
fn first_record_passes_unchanged_and_a_retry_inside_the_ttl_is_dropped() {
    let (_f, mut p) = open(None);
    let out = p.process([rec("a", r#"{"n":1}"#, T0)]).unwrap();
    assert_eq!(out, vec![passed("a", r#"{"n":1}"#)]);
    // A retry in a later batch, and twice more inside one batch (the batch's own writes count).
    assert_eq!(
        p.process([rec("a", r#"{"n":1}"#, T0 + MIN)]).unwrap(),
        vec![]
    );
    let out = p
        .process([
            rec("b", "x", T0 + 2 * MIN),
            rec("b", "x", T0 + 2 * MIN),
            rec("a", r#"{"n":1}"#, T0 + 59 * MIN),
        ])
        .unwrap();
    assert_eq!(out, vec![passed("b", "x")]);
}

#[test]
fn same_key_with_another_payload_is_an_idempotency_conflict_with_both_hashes() {
    let (_f, mut p) = open(None);
    p.process([rec("a", "first", T0)]).unwrap();
    let out = p.process([rec("a", "second", T0 + MIN)]).unwrap();
    let (first, this) = (
        format!("{:016x}", xxh3_64(b"first")),
        format!("{:016x}", xxh3_64(b"second")),
    );
    let detail =
        format!("same idempotency key, different payload: first hash {first}, this hash {this}");
    let expected = Output::new(DLQ)
        .key("k-a")
        .payload("second")
        .header(KEY, "a")
        .header(dlq::STAGE, "dedup")
        .header(dlq::REASON, "idempotency_conflict")
        .header(dlq::DETAIL, detail)
        .header(dlq::SOURCE_TOPIC, IN)
        .header(dlq::SOURCE_PARTITION, "0")
        .header(dlq::SOURCE_OFFSET, "1")
        .header(FIRST_HASH_HEADER, first.as_str())
        .header(PAYLOAD_HASH_HEADER, this.as_str());
    assert_eq!(out, vec![expected]);
    // The conflict is not remembered: the first payload is still the one that counts.
    assert_eq!(
        p.process([rec("a", "first", T0 + 2 * MIN)]).unwrap(),
        vec![]
    );
    let again = p.process([rec("a", "second", T0 + 3 * MIN)]).unwrap();
    assert_eq!(dlq_reason(&again[0]), Some("idempotency_conflict"));
}

#[test]
fn a_record_without_a_usable_key_goes_to_the_dlq_with_its_reason() {
    // Header only.
    let (_f, mut p) = open(None);
    let out = p
        .process([
            Input::new("k", "{}").at(T0),
            Input::new("k", "{}").header(KEY, "").at(T0),
            Input::new("k", "{}").header(KEY, "x".repeat(17)).at(T0),
            Input::new("k", "{}").header(KEY, "x".repeat(16)).at(T0),
        ])
        .unwrap();
    let reasons: Vec<_> = out
        .iter()
        .map(|o| (o.topic.as_str(), dlq_reason(o)))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (DLQ, Some("missing_idempotency_key")),
            (DLQ, Some("missing_idempotency_key")),
            (DLQ, Some("key_too_long")),
            (OUT, None),
        ]
    );
    assert_eq!(
        dlq_detail(&out[0]),
        Some("no idempotency key: header idempotency-key absent and no --key-pointer configured")
    );
    assert_eq!(
        dlq_detail(&out[2]),
        Some("idempotency key of 17 bytes exceeds the limit of 16")
    );
    // The DLQ record is the original: key, payload and headers, plus where it came from.
    assert_eq!(out[2].payload.as_deref(), Some(&b"{}"[..]));
    assert_eq!(header(&out[2], KEY), Some("x".repeat(17).as_str()));
    assert_eq!(header(&out[2], dlq::SOURCE_OFFSET), Some("2"));

    // Header, else a JSON pointer into the payload.
    let (_f, mut p) = open(Some("/id"));
    let out = p
        .process([
            Input::new("k", "not json").at(T0),
            Input::new("k", r#"{"other":1}"#).at(T0),
            Input::new("k", r#"{"id":{"a":1}}"#).at(T0),
            Input::new("k", r#"{"id":"p1"}"#).at(T0),
            Input::new("k", r#"{"id":"p1"}"#).at(T0),
            // The header wins over the pointer.
            Input::new("k", r#"{"id":"p1"}"#).header(KEY, "h1").at(T0),
        ])
        .unwrap();
    let reasons: Vec<_> = out
        .iter()
        .map(|o| (o.topic.as_str(), dlq_reason(o)))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (DLQ, Some("bad_json")),
            (DLQ, Some("missing_idempotency_key")),
            (DLQ, Some("missing_idempotency_key")),
            (OUT, None),
            (OUT, None),
        ]
    );
}

#[test]
fn a_key_is_remembered_for_the_ttl_plus_at_most_one_bucket_then_passes_again() {
    let (_f, mut p) = open(None);
    assert_eq!(p.process([rec("a", "v", T0)]).unwrap().len(), 1);
    // The key's bucket [T0, T0 + 15 min) is dropped once the watermark is a TTL past its end.
    let last_remembered = T0 + BUCKET + TTL - 1;
    assert_eq!(p.process([rec("a", "v", last_remembered)]).unwrap(), vec![]);
    // Another key moves the watermark a TTL past the bucket's end: the bucket is dropped.
    let first_bucket = bucket_name(T0 / BUCKET);
    assert!(p.store().buckets().contains(&first_bucket));
    let out = p.process([rec("b", "w", T0 + BUCKET + TTL)]).unwrap();
    assert_eq!(out, vec![passed("b", "w")]);
    assert!(!p.store().buckets().contains(&first_bucket));
    // Forgotten: passes again, and a new payload is no conflict any more.
    let out = p
        .process([
            rec("a", "new", T0 + BUCKET + TTL + 1),
            rec("a", "new", T0 + BUCKET + TTL + 2),
        ])
        .unwrap();
    assert_eq!(out, vec![passed("a", "new")]);
}

#[test]
fn a_late_record_is_judged_against_the_watermark_not_its_own_time() {
    let (_f, mut p) = open(None);
    p.process([rec("a", "v", T0), rec("b", "v", T0 + 2 * TTL)])
        .unwrap();
    // `a` is forgotten: its bucket fell out of the window when the watermark moved.
    assert_eq!(
        p.process([rec("a", "v", T0)]).unwrap(),
        vec![passed("a", "v")]
    );
    // And it is remembered from now on, in the watermark's bucket.
    assert_eq!(p.process([rec("a", "v", T0)]).unwrap(), vec![]);
}

#[test]
fn keys_and_the_watermark_survive_a_clean_reopen_and_a_crash() {
    let (f, mut p) = open(None);
    p.process([rec("a", "v", T0), rec("b", "v", T0 + MIN)])
        .unwrap();
    // Clean close: the Bloom snapshot is saved and used.
    p.reopen(&f).unwrap();
    assert_eq!(p.process([rec("a", "v", T0 + 2 * MIN)]).unwrap(), vec![]);
    let out = p.process([rec("b", "other", T0 + 3 * MIN)]).unwrap();
    assert_eq!(dlq_reason(&out[0]), Some("idempotency_conflict"));
    p.process([rec("c", "v", T0 + 4 * MIN)]).unwrap();
    // Crash after that batch: the snapshot is stale, the filters are rebuilt from RocksDB.
    p.reopen_after_crash(&f).unwrap();
    let out = p
        .process([
            rec("a", "v", T0 + 5 * MIN),
            rec("c", "v", T0 + 5 * MIN),
            rec("c", "changed", T0 + 5 * MIN),
            rec("d", "v", T0 + 5 * MIN),
        ])
        .unwrap();
    let got: Vec<_> = out
        .iter()
        .map(|o| (o.topic.as_str(), dlq_reason(o)))
        .collect();
    assert_eq!(got, vec![(DLQ, Some("idempotency_conflict")), (OUT, None)]);
    // The stored watermark still expires buckets after the restarts.
    p.reopen(&f).unwrap();
    assert_eq!(
        p.process([rec("z", "v", T0 + BUCKET + TTL)]).unwrap(),
        vec![passed("z", "v")]
    );
    assert_eq!(
        p.process([rec("a", "v", T0 + BUCKET + TTL)]).unwrap(),
        vec![passed("a", "v")]
    );
}

/// A small deterministic generator (PCG-style LCG); no dependency for a test.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn counts_reconcile_in_equals_out_plus_duplicates_plus_dlq_over_a_mixed_input() {
    let (f, mut p) = open(None);
    let mut rng = Lcg(20);
    // Model: the first payload of each key inside one TTL (all records are within 40 min).
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    let (mut want_out, mut want_dup, mut want_dlq) = (0usize, 0usize, BTreeMap::new());
    let (mut got_out, mut got_dlq) = (0usize, BTreeMap::<String, usize>::new());
    let mut total = 0usize;
    let mut t = T0;
    for batch in 0..40 {
        let mut inputs = Vec::new();
        for _ in 0..=rng.below(60) {
            t += i64::try_from(rng.below(1_000)).unwrap();
            let payload = format!("p{}", rng.below(3));
            let input = match rng.below(20) {
                0 => Input::new("k", payload.clone()).at(t),
                1 => Input::new("k", payload.clone())
                    .header(KEY, "x".repeat(20))
                    .at(t),
                _ => rec(&format!("key{}", rng.below(150)), &payload, t),
            };
            let key = match rng_key(&input) {
                None => {
                    *want_dlq.entry("missing_idempotency_key").or_insert(0) += 1;
                    None
                }
                Some(k) if k.len() > 16 => {
                    *want_dlq.entry("key_too_long").or_insert(0) += 1;
                    None
                }
                Some(k) => Some(k),
            };
            if let Some(k) = key {
                match first.get(&k) {
                    None => {
                        first.insert(k, payload);
                        want_out += 1;
                    }
                    Some(p) if *p == payload => want_dup += 1,
                    Some(_) => *want_dlq.entry("idempotency_conflict").or_insert(0) += 1,
                }
            }
            inputs.push(input);
        }
        total += inputs.len();
        for o in p.process(inputs).unwrap() {
            match dlq_reason(&o) {
                Some(r) => *got_dlq.entry(r.to_string()).or_insert(0) += 1,
                None => {
                    assert_eq!(o.topic, OUT);
                    got_out += 1;
                }
            }
        }
        if batch == 13 {
            p.reopen(&f).unwrap();
        }
        if batch == 27 {
            p.reopen_after_crash(&f).unwrap();
        }
    }
    assert!(t - T0 < TTL, "the generated input stays inside one TTL");
    let want_dlq: BTreeMap<String, usize> = want_dlq
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(got_out, want_out);
    assert_eq!(got_dlq, want_dlq);
    let dlq_total: usize = got_dlq.values().sum();
    // Every record is exactly one of: passed, dropped as a duplicate, dead-lettered.
    assert_eq!(total, got_out + want_dup + dlq_total);
    assert!(
        want_dup > 100 && dlq_total > 50,
        "the mix exercises every outcome"
    );
}

/// The idempotency key a generated input carries (its header).
fn rng_key(input: &Input) -> Option<String> {
    let m = input.clone().message(IN, 0, 0);
    sieve_core::record::header(&m, KEY).map(|k| String::from_utf8_lossy(k).into_owned())
}
