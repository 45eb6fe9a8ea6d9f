//! The changelog: a compacted topic per input topic, partition for partition, from which a
//! missing or stale local store is rebuilt.
//!
//! A batch's state changes are produced only after the batch's outputs were acknowledged and
//! its local commit is written, and they end with a meta record. Restore applies whole groups
//! (up to and including a meta record) and discards a trailing partial group, so restored
//! state always matches the input offset in the meta it restored.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{CoreError, Result};
use crate::store::{Changes, PartitionMeta, PartitionStore};

const TAG_STATE: u8 = 1;
const TAG_META: u8 = 2;
const TAG_DROP: u8 = 3;

/// Name of the changelog topic of `group` for `input_topic`.
pub fn topic_name(group: &str, input_topic: &str) -> String {
    format!("{group}.{input_topic}.changelog")
}

/// One changelog record: key and value (None is a tombstone).
pub type Entry = (Vec<u8>, Option<Vec<u8>>);

/// Changelog entries of one committed batch, meta last.
pub fn encode(changes: &Changes, meta: &PartitionMeta) -> Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(changes.len() + 1);
    for cf in changes.drops() {
        let mut k = vec![TAG_DROP];
        k.extend_from_slice(cf.as_bytes());
        out.push((k, Some(Vec::new())));
    }
    for (cf, key, value) in changes.writes() {
        let cf_len = u8::try_from(cf.len())
            .map_err(|_| CoreError::Corrupt(format!("column family name too long: {cf}")))?;
        let mut k = Vec::with_capacity(2 + cf.len() + key.len());
        k.push(TAG_STATE);
        k.push(cf_len);
        k.extend_from_slice(cf.as_bytes());
        k.extend_from_slice(key);
        out.push((k, value.map(<[u8]>::to_vec)));
    }
    out.push((vec![TAG_META], Some(encode_meta(meta)?)));
    Ok(out)
}

pub fn encode_meta(meta: &PartitionMeta) -> Result<Vec<u8>> {
    serde_json::to_vec(meta).map_err(|e| CoreError::Corrupt(format!("encode meta: {e}")))
}

enum Decoded<'a> {
    State { cf: &'a str, key: &'a [u8] },
    Drop(&'a str),
    Meta,
}

fn decode_key(k: &[u8]) -> Result<Decoded<'_>> {
    let bad = || CoreError::Corrupt(format!("changelog key {k:?}"));
    let (&tag, rest) = k.split_first().ok_or_else(bad)?;
    match tag {
        TAG_META => Ok(Decoded::Meta),
        TAG_DROP => Ok(Decoded::Drop(std::str::from_utf8(rest).map_err(|_| bad())?)),
        TAG_STATE => {
            let (&n, rest) = rest.split_first().ok_or_else(bad)?;
            let n = n as usize;
            let cf = rest.get(..n).ok_or_else(bad)?;
            let key = rest.get(n..).ok_or_else(bad)?;
            Ok(Decoded::State {
                cf: std::str::from_utf8(cf).map_err(|_| bad())?,
                key,
            })
        }
        _ => Err(bad()),
    }
}

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
                f(&m.detach())?;
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

/// The meta of the last complete group in `[from, to)`, if any.
pub fn last_meta(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<Option<PartitionMeta>> {
    let mut last = None;
    read_range(reader, topic, partition, from, to, IDLE, |m| {
        if let (Some(k), Some(v)) = (m.key(), m.payload()) {
            if let Decoded::Meta = decode_key(k)? {
                last = Some(decode_meta(v)?);
            }
        }
        Ok(())
    })?;
    Ok(last)
}

/// The meta of the changelog partition's last complete group in `[0, end)`. A group ends
/// with its meta, so the last record is usually it; `hint`, a position at or before that
/// group when known, bounds the search when a partial group trails.
pub fn head_meta(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    hint: i64,
    end: i64,
) -> Result<Option<PartitionMeta>> {
    if end <= 0 {
        return Ok(None);
    }
    // Disjoint ranges from the end backwards: each record is read at most once.
    let hint = hint.clamp(0, end - 1);
    for (from, to) in [(end - 1, end), (hint, end - 1), (0, hint)] {
        if let Some(m) = last_meta(reader, topic, partition, from, to)? {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

const IDLE: Duration = Duration::from_secs(30);

fn decode_meta(v: &[u8]) -> Result<PartitionMeta> {
    serde_json::from_slice(v).map_err(|e| CoreError::Corrupt(format!("changelog meta: {e}")))
}

/// Rebuilds an empty `store` from the changelog range `[0, to)`, applying whole groups only.
/// `progress` receives the number of records read since its previous call.
/// Returns the number of records read and the meta of the last applied group.
pub fn restore(
    reader: &BaseConsumer,
    store: &mut PartitionStore,
    topic: &str,
    partition: i32,
    to: i64,
    mut progress: impl FnMut(u64),
) -> Result<(u64, Option<PartitionMeta>)> {
    let mut group = Changes::default();
    let mut last_meta = None;
    let mut read = 0u64;
    read_range(reader, topic, partition, 0, to, IDLE, |m| {
        read += 1;
        if read.is_multiple_of(10_000) {
            progress(10_000);
        }
        let Some(k) = m.key() else { return Ok(()) };
        match decode_key(k)? {
            Decoded::State { cf, key } => match m.payload() {
                Some(v) => group.put(cf, key, v),
                None => group.delete(cf, key),
            },
            Decoded::Drop(cf) => {
                let bucket = cf.strip_prefix("bucket.").unwrap_or(cf).to_string();
                group.drop_bucket(&bucket);
            }
            Decoded::Meta => {
                let meta = decode_meta(m.payload().unwrap_or_default())?;
                store.commit(&group, &meta)?;
                group.clear();
                last_meta = Some(meta);
            }
        }
        Ok(())
    })?;
    progress(read % 10_000);
    Ok((read, last_meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{bucket_cf, DEFAULT_CF};

    #[test]
    fn keys_decode_to_what_was_encoded() {
        let mut c = Changes::default();
        c.put(DEFAULT_CF, b"k", b"v");
        c.delete(&bucket_cf("7"), b"gone");
        c.drop_bucket("3");
        let entries = encode(&c, &PartitionMeta::default()).unwrap();
        assert_eq!(entries.len(), 4);
        let kinds: Vec<String> = entries
            .iter()
            .map(|(k, _)| match decode_key(k).unwrap() {
                Decoded::State { cf, key } => format!("{cf}:{}", String::from_utf8_lossy(key)),
                Decoded::Drop(cf) => format!("drop {cf}"),
                Decoded::Meta => "meta".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            ["drop bucket.3", "bucket.7:gone", "default:k", "meta"]
        );
        assert!(decode_key(&[9]).is_err());
        assert!(decode_key(&[TAG_STATE, 200, b'a']).is_err());
    }
}
