//! The stream anti-join operator in-process (`sieve_core::testing`): retract and append
//! mode, right-side changes and bad left records, with exact outputs and no broker. The
//! broker tests (`services/sieve/tests/antijoin_stream.rs`) keep the crash and placement
//! behaviour.

// Test helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used)]

use sieve_antijoin::stream::operator::{AntiJoin, REEMIT_HEADER};
use sieve_antijoin::stream::{OutputMode, StreamArgs, StreamFactory};
use sieve_core::dlq;
use sieve_core::record::Output;
use sieve_core::side::SideMode;
use sieve_core::testing::{dlq_detail, dlq_reason, temp_service, Input, OperatorHarness};
use tempfile::TempDir;

const LEFT: &str = "users.legacy";
const RIGHT: &str = "users.current";
const OUT: &str = "antijoin.out";
const DLQ: &str = "dlq.antijoin";

struct Setup {
    factory: StreamFactory,
    p: OperatorHarness<AntiJoin>,
    _state: TempDir,
}

fn open(mode: OutputMode) -> Setup {
    let args = StreamArgs {
        left: LEFT.into(),
        right: RIGHT.into(),
        key: "/id".into(),
        out: OUT.into(),
        dlq: DLQ.into(),
        output_mode: mode,
        placement: SideMode::Broadcast,
        bloom_fp: 0.01,
        max_key_bytes: 8,
        hot_keys: 4,
    };
    let (state, service) = temp_service("antijoin-test").unwrap();
    let factory = StreamFactory::open(args, &service).unwrap();
    let p = OperatorHarness::open(&factory, LEFT, 0).unwrap();
    Setup {
        factory,
        p,
        _state: state,
    }
}

impl Setup {
    fn left(&mut self, inputs: impl IntoIterator<Item = Input>) -> Vec<Output> {
        self.p.process(inputs).unwrap()
    }

    /// Right keys added (`Some`) or deleted (`None`), applied and shown to the operator.
    fn right(&mut self, changes: &[(&str, bool)]) -> Vec<Output> {
        let inputs = changes.iter().map(|(k, present)| {
            if *present {
                Input::new(*k, "{}")
            } else {
                Input::tombstone(*k)
            }
        });
        self.p.side(&mut self.factory, inputs).unwrap()
    }
}

fn left(id: &str, n: u32) -> Input {
    Input::new(format!("row-{n}"), format!(r#"{{"id":"{id}","n":{n}}}"#)).header("trace", "t1")
}

/// The output of an unmatched left record: the record, keyed by its join key.
fn value(id: &str, n: u32) -> Output {
    Output::new(OUT)
        .key(id)
        .payload(format!(r#"{{"id":"{id}","n":{n}}}"#))
        .header("trace", "t1")
}

fn tombstone(id: &str) -> Output {
    Output::new(OUT).key(id)
}

fn reemit(id: &str, n: u32) -> Output {
    Output::new(OUT)
        .key(id)
        .payload(format!(r#"{{"id":"{id}","n":{n}}}"#))
        .header(REEMIT_HEADER, "1")
}

#[test]
fn an_unmatched_left_record_is_emitted_and_a_matched_one_is_not() {
    let mut s = open(OutputMode::Retract);
    assert_eq!(s.right(&[("bob", true)]), vec![]);
    let out = s.left([left("alice", 1), left("bob", 2), left("carol", 3)]);
    assert_eq!(out, vec![value("alice", 1), value("carol", 3)]);
}

#[test]
fn a_later_right_key_retracts_and_its_delete_brings_back_the_latest_left_record() {
    let mut s = open(OutputMode::Retract);
    assert_eq!(
        s.left([left("alice", 1), left("alice", 2), left("carol", 3)]),
        vec![value("alice", 1), value("alice", 2), value("carol", 3)]
    );
    // A right key with left records → one tombstone; right-only keys → nothing.
    assert_eq!(
        s.right(&[("alice", true), ("dave", true)]),
        vec![tombstone("alice")]
    );
    // Seen again (a replayed side range): the state already says so, nothing more.
    assert_eq!(s.right(&[("alice", true)]), vec![]);
    // A matched left record updates the kept payload without output.
    assert_eq!(s.left([left("alice", 4)]), vec![]);
    // Deleted on the right: the latest left record comes back, marked as re-emitted.
    assert_eq!(
        s.right(&[("alice", false), ("dave", false)]),
        vec![reemit("alice", 4)]
    );
    assert_eq!(s.right(&[("alice", false)]), vec![]);
    // And from now on it is unmatched again.
    assert_eq!(s.left([left("alice", 5)]), vec![value("alice", 5)]);
    // Added and deleted in one side batch: judged against the table's current content
    // (absent), which agrees with the emitted value, so nothing changes.
    assert_eq!(s.right(&[("carol", true), ("carol", false)]), vec![]);
}

#[test]
fn retract_state_survives_a_reopen() {
    let mut s = open(OutputMode::Retract);
    s.left([left("alice", 1)]);
    s.p.reopen(&s.factory).unwrap();
    assert_eq!(s.right(&[("alice", true)]), vec![tombstone("alice")]);
    s.p.reopen_after_crash(&s.factory).unwrap();
    assert_eq!(s.right(&[("alice", false)]), vec![reemit("alice", 1)]);
}

#[test]
fn append_mode_emits_unmatched_records_and_never_retracts() {
    let mut s = open(OutputMode::Append);
    s.right(&[("bob", true)]);
    assert_eq!(
        s.left([left("alice", 1), left("bob", 2), left("alice", 3)]),
        vec![value("alice", 1), value("alice", 3)]
    );
    assert_eq!(s.right(&[("alice", true), ("bob", false)]), vec![]);
    assert_eq!(
        s.left([left("alice", 4), left("bob", 5)]),
        vec![value("bob", 5)]
    );
}

#[test]
fn bad_left_records_and_left_tombstones_go_to_the_dlq_with_their_reason() {
    let mut s = open(OutputMode::Retract);
    let out = s.left([
        // A left tombstone carries no join key (it is in the payload): `no_payload`.
        Input::tombstone("row-1"),
        Input::new("row-2", "not json"),
        Input::new("row-3", r#"{"name":"x"}"#),
        Input::new("row-4", r#"{"id":["x"]}"#),
        Input::new("row-5", r#"{"id":"123456789"}"#),
        Input::new("row-6", r#"{"id":"12345678"}"#),
        Input::new("row-7", r#"{"id":42}"#),
    ]);
    let got: Vec<_> = out
        .iter()
        .map(|o| (o.topic.as_str(), dlq_reason(o)))
        .collect();
    assert_eq!(
        got,
        vec![
            (DLQ, Some("no_payload")),
            (DLQ, Some("bad_json")),
            (DLQ, Some("missing_key")),
            (DLQ, Some("key_not_scalar")),
            (DLQ, Some("key_too_long")),
            (OUT, None),
            (OUT, None),
        ]
    );
    assert_eq!(dlq_detail(&out[0]), Some("left record has no payload"));
    assert_eq!(
        dlq_detail(&out[4]),
        Some("join key of 9 bytes exceeds the limit of 8")
    );
    // The DLQ record is the original record, with where it came from.
    assert_eq!(out[1].key.as_deref(), Some(&b"row-2"[..]));
    assert_eq!(out[1].payload.as_deref(), Some(&b"not json"[..]));
    let origin: Vec<_> = [
        dlq::STAGE,
        dlq::SOURCE_TOPIC,
        dlq::SOURCE_PARTITION,
        dlq::SOURCE_OFFSET,
    ]
    .iter()
    .map(|h| sieve_core::testing::header(&out[1], h))
    .collect();
    assert_eq!(
        origin,
        vec![Some("antijoin"), Some(LEFT), Some("0"), Some("1")]
    );
    // A number is a scalar key, as its JSON text.
    assert_eq!(out[6].key.as_deref(), Some(&b"42"[..]));
    // A left tombstone does not retract the key's earlier output.
    assert_eq!(s.left([left("alice", 1)]), vec![value("alice", 1)]);
    let out = s.left([Input::tombstone("row-1")]);
    assert_eq!(dlq_reason(&out[0]), Some("no_payload"));
    assert_eq!(s.right(&[("alice", true)]), vec![tombstone("alice")]);
}
