//! Dead-letter records: the original bytes and headers, plus headers that say which stage
//! rejected the record, why, and where it came from. One shape for every stage's DLQ, so
//! `sieve ctl dlq` can list, show and redrive any of them, and one metric,
//! `sieve_dlq_records_total{stage,reason}`, so one alert rule covers every stage.

use rdkafka::message::{Message, OwnedMessage};

use crate::metrics;
use crate::record::Output;

pub const STAGE: &str = "sieve-dlq-stage";
pub const REASON: &str = "sieve-dlq-reason";
pub const DETAIL: &str = "sieve-dlq-detail";
pub const SOURCE_TOPIC: &str = "sieve-dlq-source-topic";
pub const SOURCE_PARTITION: &str = "sieve-dlq-source-partition";
pub const SOURCE_OFFSET: &str = "sieve-dlq-source-offset";

/// The closed set of reasons one stage rejects a record for. The strings are the
/// `sieve-dlq-reason` header and the metric's `reason` label: stable, never renamed.
pub trait Reason: Copy {
    /// The stage these reasons belong to: the `sieve-dlq-stage` header and `stage` label.
    const STAGE: &'static str;
    fn as_str(self) -> &'static str;
}

/// Why a record goes to the DLQ: a reason of the stage's set and a detail for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected<R> {
    pub reason: R,
    pub detail: String,
}

impl<R: Reason> Rejected<R> {
    pub fn new(reason: R, detail: impl Into<String>) -> Self {
        Rejected {
            reason,
            detail: detail.into(),
        }
    }

    /// The DLQ record for `rec` (same key, payload and headers; stage, reason, detail and
    /// origin added), counted.
    pub fn dead_letter(&self, rec: &OwnedMessage, dlq_topic: &str) -> Output {
        count(self.reason);
        Output::copy_of(dlq_topic, rec)
            .header(STAGE, R::STAGE)
            .header(REASON, self.reason.as_str())
            .header(DETAIL, self.detail.as_str())
            .header(SOURCE_TOPIC, rec.topic())
            .header(SOURCE_PARTITION, rec.partition().to_string())
            .header(SOURCE_OFFSET, rec.offset().to_string())
    }
}

/// Counts one record written to a DLQ by a stage that builds its DLQ records itself
/// (ingest, whose records are not consumed messages).
pub fn count<R: Reason>(reason: R) {
    metrics::dlq_record(R::STAGE, reason.as_str());
}
