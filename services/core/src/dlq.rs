//! Dead-letter records: the original bytes and headers, plus headers that say which stage
//! rejected the record, why, and where it came from. One shape for every stage's DLQ, so
//! `sieve ctl dlq` can list, show and redrive any of them.

use rdkafka::message::{Message, OwnedMessage};

use crate::record::Output;

pub const STAGE: &str = "sieve-dlq-stage";
pub const REASON: &str = "sieve-dlq-reason";
pub const DETAIL: &str = "sieve-dlq-detail";
pub const SOURCE_TOPIC: &str = "sieve-dlq-source-topic";
pub const SOURCE_PARTITION: &str = "sieve-dlq-source-partition";
pub const SOURCE_OFFSET: &str = "sieve-dlq-source-offset";

/// A DLQ record for `rec`: same key, payload and headers; reason, detail and origin added.
pub fn dead_letter(
    rec: &OwnedMessage,
    dlq_topic: &str,
    stage: &str,
    reason: &str,
    detail: &str,
) -> Output {
    Output::copy_of(dlq_topic, rec)
        .header(STAGE, stage)
        .header(REASON, reason)
        .header(DETAIL, detail)
        .header(SOURCE_TOPIC, rec.topic())
        .header(SOURCE_PARTITION, rec.partition().to_string())
        .header(SOURCE_OFFSET, rec.offset().to_string())
}
