//! Replays requested with `sieve ctl replay`: the runtime side.
//!
//! `sieve ctl replay --execute` commits the group's new offsets with the commit metadata
//! `sieve-replay:<id>`. An ordinary commit by the runtime carries no metadata, so the
//! metadata is what tells a requested rewind from a committed offset that merely lags the
//! store (the store, not the group, is where processing resumes; docs/exactly-once.md).
//! Kafka keeps a commit's metadata with the offset and returns it in OffsetFetch.
//!
//! On partition open, a request whose id the partition has not honoured yet:
//! 1. wipes the state: the changelog receives a drop for every time bucket and a tombstone
//!    for every other key, then the local store is deleted and recreated, so no later restore
//!    from the changelog can bring pre-replay state back;
//! 2. warms the state up when the operator asks for it ([`OperatorFactory::warmup`]): the
//!    input from `offsets_for_times(timestamp at the replay offset − warmup)` up to the replay
//!    offset is processed again with its outputs discarded, so dedup still knows the keys it
//!    had seen before the replay point;
//! 3. writes the rebuilt state, the replay offset and the honoured id through the normal
//!    commit and changelog path.
//!
//! A crash anywhere before step 3 leaves the id unhonoured and the request standing, so the
//! next open starts the replay over; state written by the interrupted attempt is wiped again.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::commit::{commit_logged, send_changelog_group, settle_changelog};
use crate::error::{CoreError, Result};
use crate::kafka::Clients;
use crate::metrics;
use crate::operator::{self, Ctx, Operator, OperatorFactory};
use crate::read;
use crate::store::{bucket_of, Changes, PartitionMeta, PartitionStore};
use crate::topic_partition::TopicPartition;

/// Prefix of the commit metadata that marks a requested replay.
pub const METADATA_PREFIX: &str = "sieve-replay:";

/// Replay ids a partition remembers as honoured (a newer request replaces the oldest).
const HONOURED_KEPT: usize = 16;

/// Changes per changelog group while wiping and warming up: bounds memory, whatever the
/// size of the state.
const CHUNK: usize = 10_000;

const TIMEOUT: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(30);
/// Longest wait for a stable committed offset in one request (a broker that is away is
/// waited out on top): an undecided transaction of a crashed or frozen instance is aborted
/// by the broker after `transaction.timeout.ms` (60 s by default).
const STABLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The commit metadata of replay `id`.
pub fn metadata(id: &str) -> String {
    format!("{METADATA_PREFIX}{id}")
}

/// The replay id in commit metadata, if it is a replay request.
pub fn id_in(metadata: &str) -> Option<&str> {
    metadata
        .strip_prefix(METADATA_PREFIX)
        .filter(|id| !id.is_empty())
}

/// A rewind of one partition to `offset`, named `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: String,
    pub offset: i64,
}

/// Where and what the partition being opened is.
pub(crate) struct Io<'a> {
    pub reader: &'a BaseConsumer,
    pub producer: &'a FutureProducer,
    pub group: &'a str,
    pub tp: &'a TopicPartition,
}

/// Finds and honours replay requests when partitions open.
pub(crate) struct Replay {
    /// A consumer of the group that never subscribes: it only reads committed offsets.
    probe: BaseConsumer,
}

impl Replay {
    pub(crate) fn new(clients: &Clients, group: &str) -> Result<Self> {
        Ok(Replay {
            probe: clients.consumer(group, DefaultConsumerContext)?,
        })
    }

    /// Honours the replay request `committed` (the partition's offset in the group) carries,
    /// unless the partition honoured it already; returns the store to use and, when it
    /// replayed, the operator already opened (and warmed up) on it.
    pub(crate) fn honour<F: OperatorFactory>(
        &mut self,
        factory: &F,
        io: &Io<'_>,
        store: PartitionStore,
        meta: &mut PartitionMeta,
        committed: Option<&GroupOffset>,
    ) -> Result<(PartitionStore, Option<F::Op>)> {
        let Some(req) = committed.and_then(|c| c.replay_request(&meta.replays)) else {
            return Ok((store, None));
        };
        let (low, high) = read::watermarks(io.reader, io.tp)?;
        // Retention may have moved the start since the request was made.
        let start = req.offset.clamp(low, high);
        tracing::info!(
            topic = io.tp.topic,
            partition = io.tp.partition,
            id = req.id,
            from = meta.next_offset,
            to = start,
            "replay requested: wiping state"
        );
        let mut fresh = PartitionMeta {
            next_offset: start,
            changelog_pos: meta.changelog_pos,
            clean: true,
            // The side table is shared by the process and not rewound; the partition keeps
            // its place in it.
            side_pos: meta.side_pos.clone(),
            replays: meta.replays.clone(),
            // The wipe tombstones the packs of every bucket it drops.
            packs: meta.packs.clone(),
            ..Default::default()
        };
        wipe_changelog(io, &store, &mut fresh)?;
        let path = store.path().to_path_buf();
        drop(store);
        PartitionStore::destroy(&path)?;
        let mut store = PartitionStore::open(&path)?;
        let mut op = factory.open(&io.tp.topic, io.tp.partition, &store)?;
        let mut pending = Vec::new();
        if let Some(window) = factory.warmup() {
            let from = warmup_start(io, window, low, start, high)?;
            let warmed = warm_up(
                io,
                &mut op,
                &mut store,
                &mut fresh,
                from,
                start,
                &mut pending,
            )?;
            metrics::replay_warmup_records(warmed);
            tracing::info!(
                topic = io.tp.topic,
                partition = io.tp.partition,
                from,
                to = start,
                records = warmed,
                "replay warm-up done"
            );
        }
        fresh.replays.push(req.id);
        let excess = fresh.replays.len().saturating_sub(HONOURED_KEPT);
        fresh.replays.drain(..excess);
        let mut last = Changes::default();
        operator::flush(&mut op, &store, &mut last, false)?;
        pending.extend(commit_logged(
            io.producer,
            io.group,
            io.tp,
            &mut store,
            &last,
            &mut fresh,
            "after_replay_committed",
        )?);
        if let Some(pos) = settle_changelog(pending)? {
            fresh.changelog_pos = pos;
        }
        store.commit(&Changes::default(), &fresh)?;
        metrics::replay();
        *meta = fresh;
        Ok((store, Some(op)))
    }

    /// The partition's committed offset in the group and its commit metadata. A
    /// `read_committed` probe asks for stable offsets (KIP-447): while a transaction that
    /// carries offsets of the partition is undecided, this waits for its outcome.
    pub(crate) fn committed(&self, tp: &TopicPartition) -> Result<Option<GroupOffset>> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        let committed = crate::kafka::retry_transient("committed offsets", || {
            self.probe.committed_offsets(tpl.clone(), STABLE_TIMEOUT)
        })
        .map_err(|e| CoreError::kafka(format!("committed offset of {tp}"), e))?;
        let Some(elem) = committed.find_partition(&tp.topic, tp.partition) else {
            return Ok(None);
        };
        Ok(elem
            .offset()
            .to_raw()
            .filter(|o| *o >= 0)
            .map(|offset| GroupOffset {
                offset,
                metadata: elem.metadata().to_string(),
            }))
    }
}

/// A partition's committed offset in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupOffset {
    pub offset: i64,
    pub metadata: String,
}

impl GroupOffset {
    /// The replay request this commit is, unless it is none or was honoured already.
    pub(crate) fn replay_request(&self, honoured: &[String]) -> Option<Request> {
        let id = id_in(&self.metadata)?;
        (!honoured.iter().any(|h| h == id)).then(|| Request {
            id: id.to_string(),
            offset: self.offset,
        })
    }
}

/// Sends, as changelog groups, a drop for every time bucket and a tombstone for every other
/// key of `store`, so that a restore from the changelog ends with nothing of it.
fn wipe_changelog(io: &Io<'_>, store: &PartitionStore, meta: &mut PartitionMeta) -> Result<()> {
    let mut pending = Vec::new();
    let mut changes = Changes::default();
    for bucket in store.buckets() {
        changes.drop_bucket(&bucket);
    }
    // Packs of a bucket this store lacks would otherwise never be tombstoned.
    for bucket in meta.packs.keys().filter_map(|cf| bucket_of(cf)) {
        changes.drop_bucket(bucket);
    }
    for cf in store.state_cfs() {
        store.for_each_prefix(&cf, b"", |k, _| {
            changes.delete(&cf, k);
            if changes.len() >= CHUNK {
                pending.extend(send_changelog_group(
                    io.producer,
                    io.group,
                    io.tp,
                    &changes,
                    meta,
                )?);
                changes.clear();
            }
            Ok(())
        })?;
    }
    pending.extend(send_changelog_group(
        io.producer,
        io.group,
        io.tp,
        &changes,
        meta,
    )?);
    settle_changelog(pending).map(|_| ())
}

/// The first input offset to warm up from: where records of `window` before the replay
/// offset's record begin (by the broker's timestamp index).
fn warmup_start(io: &Io<'_>, window: Duration, low: i64, start: i64, high: i64) -> Result<i64> {
    // The replay offset's record, or the last one when replaying from the end.
    let at = if start < high { start } else { start - 1 };
    if at < low {
        return Ok(start);
    }
    let mut ts = None;
    read::read_range(
        io.reader,
        &io.tp.topic,
        io.tp.partition,
        at,
        at + 1,
        IDLE,
        |m| {
            ts = m.timestamp().to_millis();
            Ok(())
        },
    )?;
    let Some(ts) = ts else {
        return Ok(low);
    };
    let target = ts.saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&io.tp.topic, io.tp.partition, Offset::Offset(target.max(0)))
        .map_err(|e| CoreError::kafka("offsets for times", e))?;
    let found = io
        .reader
        .offsets_for_times(tpl, TIMEOUT)
        .map_err(|e| CoreError::kafka(format!("offsets for times of {}", io.tp), e))?;
    let from = match found
        .find_partition(&io.tp.topic, io.tp.partition)
        .map(|e| e.offset())
    {
        Some(Offset::Offset(o)) => o,
        // No record at or after the target time: nothing of the window is left to read.
        _ => start,
    };
    Ok(from.clamp(low, start))
}

/// Processes `[from, to)` with outputs discarded, committing the state in chunks (locally
/// and to the changelog, with `meta`, whose id is not honoured yet). Returns records read.
fn warm_up<O: Operator>(
    io: &Io<'_>,
    op: &mut O,
    store: &mut PartitionStore,
    meta: &mut PartitionMeta,
    from: i64,
    to: i64,
    pending: &mut Vec<DeliveryFuture>,
) -> Result<u64> {
    let mut changes = Changes::default();
    let mut outputs = Vec::new();
    let mut read = 0u64;
    // Flushes the operator's caches into `changes` and commits them as one chunk.
    let mut commit = |op: &mut O, store: &mut PartitionStore, changes: &mut Changes| {
        operator::flush(op, store, changes, false)?;
        pending.extend(commit_logged(
            io.producer,
            io.group,
            io.tp,
            store,
            changes,
            meta,
            "after_warmup_committed",
        )?);
        changes.clear();
        Ok::<_, CoreError>(())
    };
    read::read_range(
        io.reader,
        &io.tp.topic,
        io.tp.partition,
        from,
        to,
        IDLE,
        |m| {
            read += 1;
            op.process(m, &mut Ctx::new(store, &mut changes, &mut outputs, false))?;
            outputs.clear();
            if changes.len() >= CHUNK {
                commit(op, store, &mut changes)?;
            }
            Ok(())
        },
    )?;
    commit(op, store, &mut changes)?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_ordinary_commits_are_not_requests() {
        assert_eq!(id_in(&metadata("r-1")), Some("r-1"));
        assert_eq!(id_in(""), None);
        assert_eq!(id_in("sieve-replay:"), None);
        assert_eq!(id_in("something else"), None);
    }
}
