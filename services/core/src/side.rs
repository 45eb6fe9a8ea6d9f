//! Side tables: topics an instance reads for itself, outside its consumer group, next to the
//! group's inputs. The right side of a broadcast anti-join is one: every instance holds all
//! of it, so the left side needs no co-partitioning and a hot left key spreads over every
//! partition. In co-partitioned mode an instance reads only the side partitions whose number
//! matches an input partition it owns.
//!
//! The table (owned by the operator factory) applies records and stores how far it got.
//! Each input partition also stores how far it has *seen* the side (`PartitionMeta::side_pos`):
//! when a partition opens behind its table (another instance owned it, or a crash fell between
//! the table's commit and the partition's), the missed side range is read again from Kafka and
//! shown to the operator, which reconciles against the table's current content. Outputs made
//! from side records therefore are at-least-once; operators make them idempotent (a tombstone
//! or a re-emitted value for a key on a compacted topic).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{CoreError, Result};
use crate::kafka::Clients;
use crate::metrics::{self, ErrorKind};
use crate::read;
use crate::store::{Changes, PartitionMeta, PartitionStore, DEFAULT_CF};
use crate::topic_partition::TopicPartition;

/// Which side partitions an instance reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SideMode {
    /// Every partition of the side topics, on every instance.
    Broadcast,
    /// Only the side partitions numbered like an assigned input partition.
    CoPartitioned,
}

/// A table materialised from side topics.
pub trait SideTable: Send {
    fn topics(&self) -> Vec<String>;
    fn mode(&self) -> SideMode;
    /// Next offset to read per side partition; absent means the start.
    fn positions(&self) -> BTreeMap<TopicPartition, i64>;
    /// Applies records (in offset order per partition) and durably stores the new positions.
    fn apply(&mut self, records: &[OwnedMessage]) -> Result<()>;
    /// Called once at a graceful stop: the place to save caches.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Records applied per call to [`SideTable::apply`] while catching up.
const CATCH_UP_CHUNK: usize = 5_000;

/// The consumer that follows side partitions after their catch-up.
pub(crate) struct SideReader {
    consumer: BaseConsumer,
    mode: SideMode,
    /// Every partition of the side topics.
    all: Vec<TopicPartition>,
    assigned: BTreeSet<TopicPartition>,
}

impl SideReader {
    pub(crate) fn new(
        clients: &Clients,
        reader: &BaseConsumer,
        table: &dyn SideTable,
    ) -> Result<Self> {
        let mut all = Vec::new();
        for t in table.topics() {
            for p in 0..clients.partition_count(reader, &t)? {
                all.push(TopicPartition::new(t.clone(), p));
            }
        }
        // End-of-partition events mean nothing to a reader that follows forever.
        let consumer = clients
            .reader_config()
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| CoreError::kafka("create side reader", e))?;
        Ok(SideReader {
            consumer,
            mode: table.mode(),
            all,
            assigned: BTreeSet::new(),
        })
    }

    /// Side partitions an input partition depends on.
    pub(crate) fn serving(&self, input_partition: i32) -> impl Iterator<Item = &TopicPartition> {
        let mode = self.mode;
        self.all
            .iter()
            .filter(move |tp| mode == SideMode::Broadcast || tp.partition == input_partition)
    }

    /// Reads what the table misses of the side partitions needed by `input_partitions` (every
    /// partition in broadcast mode), up to their current end, then follows them from there.
    /// Returns the number of records applied.
    pub(crate) fn catch_up_and_follow(
        &mut self,
        reader: &BaseConsumer,
        table: &mut dyn SideTable,
        input_partitions: &BTreeSet<i32>,
    ) -> Result<u64> {
        let wanted: BTreeSet<TopicPartition> = match self.mode {
            SideMode::Broadcast => self.all.iter().cloned().collect(),
            SideMode::CoPartitioned => self
                .all
                .iter()
                .filter(|tp| input_partitions.contains(&tp.partition))
                .cloned()
                .collect(),
        };
        let mut applied = 0u64;
        for tp in wanted.difference(&self.assigned) {
            applied += catch_up(reader, table, tp)?;
        }
        if wanted != self.assigned {
            let positions = table.positions();
            let mut tpl = TopicPartitionList::new();
            for tp in &wanted {
                let off = positions
                    .get(tp)
                    .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                tpl.add_partition_offset(&tp.topic, tp.partition, off)
                    .map_err(|e| CoreError::kafka("side assignment", e))?;
            }
            self.consumer
                .assign(&tpl)
                .map_err(|e| CoreError::kafka("assign side reader", e))?;
            self.assigned = wanted;
        }
        Ok(applied)
    }

    /// Records already fetched, without waiting; at most `max`.
    pub(crate) fn poll(&self, max: usize) -> Vec<OwnedMessage> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => out.push(m.detach()),
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    metrics::error(ErrorKind::SideConsume);
                    tracing::warn!(error = %e, "side table consume error");
                    break;
                }
                None => break,
            }
        }
        out
    }
}

/// Applies one side partition from the table's position to the partition's current end.
fn catch_up(reader: &BaseConsumer, table: &mut dyn SideTable, tp: &TopicPartition) -> Result<u64> {
    let (low, high) = crate::read::watermarks(reader, tp)?;
    let from = table.positions().get(tp).copied().unwrap_or(low).max(low);
    let mut applied = 0u64;
    replay(reader, tp, from, high, |chunk| {
        applied += chunk.len() as u64;
        metrics::side_catch_up_records(chunk.len());
        table.apply(chunk)
    })?;
    tracing::info!(
        topic = tp.topic,
        partition = tp.partition,
        from,
        to = high,
        applied,
        "side table caught up"
    );
    Ok(applied)
}

/// Reads `[from, to)` of a side partition again in chunks, for a partition that opened
/// behind its table.
pub(crate) fn replay(
    reader: &BaseConsumer,
    tp: &TopicPartition,
    from: i64,
    to: i64,
    mut f: impl FnMut(&[OwnedMessage]) -> Result<()>,
) -> Result<()> {
    let mut chunk = Vec::new();
    read::read_range(
        reader,
        &tp.topic,
        tp.partition,
        from,
        to,
        Duration::from_secs(30),
        |m| {
            chunk.push(m.clone());
            if chunk.len() >= CATCH_UP_CHUNK {
                f(&std::mem::take(&mut chunk))?;
            }
            Ok(())
        },
    )?;
    if !chunk.is_empty() {
        f(&chunk)?;
    }
    Ok(())
}

/// Turns one side record into key writes (`None` deletes the key).
pub type Mapper = Box<dyn Fn(&OwnedMessage) -> Vec<(Vec<u8>, Option<Vec<u8>>)> + Send>;

/// A side table that is a plain key-value view of its topics, in its own RocksDB store,
/// shared by the runtime (which feeds it) and the operators (which read it) on the one
/// processing thread.
#[derive(Clone)]
pub struct KvTable(Arc<Mutex<KvInner>>);

struct KvInner {
    store: PartitionStore,
    meta: PartitionMeta,
    topics: Vec<String>,
    mode: SideMode,
    map: Mapper,
}

impl KvTable {
    pub fn open(path: &Path, topics: Vec<String>, mode: SideMode, map: Mapper) -> Result<Self> {
        let store = PartitionStore::open(path)?;
        let meta = store.meta()?.unwrap_or_default();
        Ok(KvTable(Arc::new(Mutex::new(KvInner {
            store,
            meta,
            topics,
            mode,
            map,
        }))))
    }

    fn lock(&self) -> MutexGuard<'_, KvInner> {
        // Commits are atomic: a panic elsewhere cannot leave the store half-written.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.lock().store.get(&Changes::default(), DEFAULT_CF, key)
    }

    /// Visits entries with `prefix` from `from` on while `f` returns true.
    pub fn scan_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        self.lock().store.scan_from(DEFAULT_CF, prefix, from, f)
    }
}

impl SideTable for KvTable {
    fn topics(&self) -> Vec<String> {
        self.lock().topics.clone()
    }

    fn mode(&self) -> SideMode {
        self.lock().mode
    }

    fn positions(&self) -> BTreeMap<TopicPartition, i64> {
        self.lock().meta.side_pos.clone()
    }

    fn apply(&mut self, records: &[OwnedMessage]) -> Result<()> {
        let mut inner = self.lock();
        let mut changes = Changes::default();
        for rec in records {
            for (k, v) in (inner.map)(rec) {
                match v {
                    Some(v) => changes.put(DEFAULT_CF, &k, &v),
                    None => changes.delete(DEFAULT_CF, &k),
                }
            }
            inner
                .meta
                .side_pos
                .insert(TopicPartition::of(rec), rec.offset() + 1);
        }
        let meta = inner.meta.clone();
        inner.store.commit(&changes, &meta)
    }
}
