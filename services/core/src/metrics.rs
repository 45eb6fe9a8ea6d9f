//! Every metric sieve's runtime emits: named, described and recorded here and nowhere else.
//!
//! The rest of the crate calls the functions below; `clippy.toml` refuses the `metrics`
//! macros anywhere else, so each name has one spelling and one description, and dashboards
//! and alerts have one list to follow. Names follow the Prometheus conventions: `sieve_`
//! prefix, base units (`_seconds`, `_bytes`), `_total` on counters, `_duration_seconds` on
//! duration histograms, `_ratio` on 0..1 gauges.

// The one module allowed to call the `metrics` macros (clippy.toml bans them elsewhere).
#![allow(clippy::disallowed_macros)]

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

use crate::topic_partition::TopicPartition;

/// The runtime's metric names.
pub mod names {
    pub const RECORDS_IN: &str = "sieve_records_in_total";
    pub const RECORDS_OUT: &str = "sieve_records_out_total";
    pub const RECORDS_SKIPPED: &str = "sieve_records_skipped_total";
    pub const DLQ_RECORDS: &str = "sieve_dlq_records_total";
    pub const BATCH_DURATION: &str = "sieve_batch_duration_seconds";
    pub const CONSUMER_LAG: &str = "sieve_consumer_lag";
    pub const PREFETCH_BYTES: &str = "sieve_consumer_prefetch_bytes";
    pub const PAUSED_PARTITIONS: &str = "sieve_paused_partitions";
    pub const ASSIGNED_PARTITIONS: &str = "sieve_assigned_partitions";
    pub const RESTORING_PARTITIONS: &str = "sieve_restoring_partitions";
    pub const STATE_BYTES: &str = "sieve_state_bytes";
    pub const RESTORE_RECORDS: &str = "sieve_restore_records_total";
    pub const RECOVERY_SCANNED_RECORDS: &str = "sieve_recovery_scanned_records_total";
    pub const ERRORS: &str = "sieve_errors_total";
    pub const READY: &str = "sieve_ready";
    pub const BLOOM_FALSE_POSITIVE_RATIO: &str = "sieve_bloom_false_positive_ratio";
    pub const SIDE_CATCH_UP_RECORDS: &str = "sieve_side_catch_up_records_total";
    pub const SIDE_RECORDS: &str = "sieve_side_records_total";
    pub const SIDE_REPLAYED_RECORDS: &str = "sieve_side_replayed_records_total";
    pub const STARVATION_GUARD: &str = "sieve_starvation_guard_total";
    pub const REPLAYS: &str = "sieve_replays_total";
    pub const REPLAY_WARMUP_RECORDS: &str = "sieve_replay_warmup_records_total";
    pub const TRANSACTIONS: &str = "sieve_transactions_total";
}

use names::*;

/// Describes every runtime metric to the installed recorder.
pub(crate) fn describe() {
    describe_counter!(
        REPLAYS,
        "Partition replays requested with `sieve ctl replay` and honoured (state wiped and rebuilt)."
    );
    describe_counter!(
        REPLAY_WARMUP_RECORDS,
        "Input records re-read before a replay offset to rebuild state, outputs discarded."
    );
    describe_counter!(
        TRANSACTIONS,
        "Kafka transactions of the exactly-once mode by outcome: committed, aborted (a failure; the batch is processed again), fenced (the producer was replaced)."
    );
    describe_counter!(RECORDS_IN, "Input records taken into processing, by topic.");
    describe_counter!(
        DLQ_RECORDS,
        "Records sent to a dead-letter topic, by stage and reason (each stage's reasons: ops/runbooks/dlq.md)."
    );
    describe_counter!(
        RECORDS_OUT,
        "Output records acknowledged by the broker, by topic."
    );
    describe_counter!(
        RECORDS_SKIPPED,
        "Records not processed or not produced again: already_processed (input before the stored offset), already_written (output found in the recovery scan)."
    );
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time from the start of a batch's processing to its commit."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records between the consumer position and the end of the partition."
    );
    describe_gauge!(
        PREFETCH_BYTES,
        Unit::Bytes,
        "Fetched input waiting in librdkafka's queues; fetching pauses at queued.max.messages.kbytes, which bounds it."
    );
    describe_gauge!(
        PAUSED_PARTITIONS,
        "Input partitions paused by priority scheduling (0 for services without priorities)."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        "Input partitions assigned to this process."
    );
    describe_gauge!(
        STATE_BYTES,
        Unit::Bytes,
        "Estimated live bytes of local state, by partition."
    );
    describe_counter!(
        RESTORE_RECORDS,
        "Changelog records read while restoring state."
    );
    describe_gauge!(
        RESTORING_PARTITIONS,
        "Partitions whose state is being restored (not ready while > 0)."
    );
    describe_counter!(
        RECOVERY_SCANNED_RECORDS,
        "Output records read by recovery scans after an unclean stop."
    );
    describe_counter!(ERRORS, "Errors by kind.");
    describe_gauge!(
        READY,
        "1 when every assigned partition is restored and processing."
    );
    describe_gauge!(
        BLOOM_FALSE_POSITIVE_RATIO,
        "Observed Bloom filter false-positive ratio, 0..1 (maybe answers that the store refuted)."
    );
    describe_counter!(
        SIDE_CATCH_UP_RECORDS,
        "Side-table records applied while catching up to the side topics' end (not ready meanwhile)."
    );
    describe_counter!(
        SIDE_RECORDS,
        "Side-table records applied while following the side topics."
    );
    describe_counter!(
        STARVATION_GUARD,
        "Times lower priorities were let through for one batch after being paused longer than the starvation guard."
    );
    describe_counter!(
        SIDE_REPLAYED_RECORDS,
        "Side records shown again to a partition that opened behind its side table."
    );
}

/// Where an error counted in `sieve_errors_total` came from (its `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    Consume,
    GroupStalled,
    KafkaClient,
    Rebalance,
    Produce,
    SideConsume,
    Transaction,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Consume => "consume",
            ErrorKind::GroupStalled => "group_stalled",
            ErrorKind::KafkaClient => "kafka_client",
            ErrorKind::Rebalance => "rebalance",
            ErrorKind::Produce => "produce",
            ErrorKind::SideConsume => "side_consume",
            ErrorKind::Transaction => "transaction",
        }
    }
}

/// How a transaction ended (the `outcome` label of `sieve_transactions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnOutcome {
    Committed,
    Aborted,
    Fenced,
}

pub(crate) fn transaction(outcome: TxnOutcome) {
    let outcome = match outcome {
        TxnOutcome::Committed => "committed",
        TxnOutcome::Aborted => "aborted",
        TxnOutcome::Fenced => "fenced",
    };
    counter!(TRANSACTIONS, "outcome" => outcome).increment(1);
}

/// Why records counted in `sieve_records_skipped_total` were skipped (its `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skipped {
    /// Input before the stored offset.
    AlreadyProcessed,
    /// Output found in the recovery scan.
    AlreadyWritten,
}

pub(crate) fn error(kind: ErrorKind) {
    counter!(ERRORS, "kind" => kind.as_str()).increment(1);
}

pub(crate) fn dlq_record(stage: &'static str, reason: &'static str) {
    counter!(DLQ_RECORDS, "stage" => stage, "reason" => reason).increment(1);
}

pub(crate) fn records_in(topic: String, n: u64) {
    counter!(RECORDS_IN, "topic" => topic).increment(n);
}

pub(crate) fn records_out(topic: String, n: u64) {
    counter!(RECORDS_OUT, "topic" => topic).increment(n);
}

pub(crate) fn records_skipped(why: Skipped, n: u64) {
    let reason = match why {
        Skipped::AlreadyProcessed => "already_processed",
        Skipped::AlreadyWritten => "already_written",
    };
    counter!(RECORDS_SKIPPED, "reason" => reason).increment(n);
}

pub(crate) fn batch_duration(seconds: f64) {
    histogram!(BATCH_DURATION).record(seconds);
}

pub(crate) fn consumer_lag(topic: &str, partition: i32, records: i64) {
    gauge!(CONSUMER_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(records as f64);
}

pub(crate) fn prefetch_bytes(bytes: u64) {
    gauge!(PREFETCH_BYTES).set(bytes as f64);
}

pub(crate) fn paused_partitions(n: usize) {
    gauge!(PAUSED_PARTITIONS).set(n as f64);
}

pub(crate) fn assigned_partitions(n: usize) {
    gauge!(ASSIGNED_PARTITIONS).set(n as f64);
}

pub(crate) fn state_bytes(tp: &TopicPartition, bytes: u64) {
    gauge!(STATE_BYTES, "topic" => tp.topic.clone(), "partition" => tp.partition.to_string())
        .set(bytes as f64);
}

pub(crate) fn restore_records(n: u64) {
    counter!(RESTORE_RECORDS).increment(n);
}

pub(crate) fn recovery_scanned_records(n: u64) {
    counter!(RECOVERY_SCANNED_RECORDS).increment(n);
}

pub(crate) fn readiness(ready: bool, restoring: usize) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
    gauge!(RESTORING_PARTITIONS).set(restoring as f64);
}

pub(crate) fn bloom_false_positive_ratio(filter: &str, ratio: f64) {
    gauge!(BLOOM_FALSE_POSITIVE_RATIO, "filter" => filter.to_string()).set(ratio);
}

pub(crate) fn side_catch_up_records(n: usize) {
    counter!(SIDE_CATCH_UP_RECORDS).increment(n as u64);
}

pub(crate) fn side_records(n: usize) {
    counter!(SIDE_RECORDS).increment(n as u64);
}

pub(crate) fn side_replayed_records(n: usize) {
    counter!(SIDE_REPLAYED_RECORDS).increment(n as u64);
}

pub(crate) fn starvation_guard() {
    counter!(STARVATION_GUARD).increment(1);
}

pub(crate) fn replay_warmup_records(n: u64) {
    counter!(REPLAY_WARMUP_RECORDS).increment(n);
}

pub(crate) fn replay() {
    counter!(REPLAYS).increment(1);
}
