//! Reading a range of one partition with a plain (assign, not subscribe) consumer: restores,
//! recovery scans, side catch-ups, replays and the `ctl` tools all read this way.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{CoreError, Result};
use crate::topic_partition::TopicPartition;

/// Reads `[from, to)` of one partition, calling `f` for each record in order.
/// Gives up when no record arrives for `idle_timeout` (a stuck broker), never silently.
pub fn read_range(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    idle_timeout: Duration,
    mut f: impl FnMut(&OwnedMessage) -> Result<()>,
) -> Result<()> {
    read_range_while(reader, topic, partition, from, to, idle_timeout, |m| {
        f(m).map(|()| ControlFlow::Continue(()))
    })
}

/// Low and high watermark of `tp` (the high one as a `read_committed` reader sees it),
/// waiting out a broker that is away (`kafka::retry_transient`).
pub fn watermarks(reader: &BaseConsumer, tp: &TopicPartition) -> Result<(i64, i64)> {
    crate::kafka::retry_transient(&format!("watermarks of {tp}"), || {
        reader.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10))
    })
    .map_err(|e| CoreError::kafka(format!("watermarks of {tp}"), e))
}

/// The records a `read_committed` reader reads in `[from, to)`: fewer than `to - from` on a
/// partition written with transactions, whose commit markers take offsets and whose aborted
/// records are skipped.
pub fn count_range(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    idle_timeout: Duration,
) -> Result<i64> {
    let mut n = 0;
    read_range(reader, topic, partition, from, to, idle_timeout, |_| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// [`read_range`] that stops early when `f` breaks (a reader with a limit).
pub fn read_range_while(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    idle_timeout: Duration,
    mut f: impl FnMut(&OwnedMessage) -> Result<ControlFlow<()>>,
) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(|e| CoreError::kafka("assign reader", e))?;
    reader
        .assign(&tpl)
        .map_err(|e| CoreError::kafka(format!("assign reader to {topic}/{partition}"), e))?;
    let mut last_progress = Instant::now();
    let result = loop {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                if m.offset() >= to {
                    break Ok(());
                }
                match f(&m.detach()) {
                    Ok(ControlFlow::Continue(())) => {}
                    Ok(ControlFlow::Break(())) => break Ok(()),
                    Err(e) => break Err(e),
                }
                if m.offset() + 1 >= to {
                    break Ok(());
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break Ok(()),
            Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetOutOfRange) => {
                continue
            }
            // The broker restarting or unreachable for a while: librdkafka reconnects by
            // itself, and the idle timeout still bounds the wait.
            Some(Err(e)) if crate::kafka::is_transient(&e) => {
                tracing::debug!(error = %e, topic, partition, "read: waiting for the broker");
            }
            Some(Err(e)) => break Err(CoreError::kafka(format!("read {topic}/{partition}"), e)),
            None if last_progress.elapsed() > idle_timeout => {
                break Err(CoreError::kafka(
                    format!(
                        "read {topic}/{partition} [{from}, {to}): no data for {idle_timeout:?}"
                    ),
                    KafkaError::NoMessageReceived,
                ))
            }
            None => {}
        }
    };
    let _ = reader.unassign();
    result
}
