//! The partition-aware consume → process → produce loop, exactly-once without broker
//! transactions.
//!
//! Per batch and input partition:
//! 1. the operator turns each input record into outputs and state changes; every output
//!    carries the deterministic id `topic/partition/offset/n` (see [`crate::record`]);
//! 2. outputs are produced and the loop waits until the broker acknowledged all of them;
//! 3. one RocksDB write batch stores the state changes, the next input offset and, per output
//!    partition, the position after the highest acknowledged output;
//! 4. the same changes and meta go to the changelog topic, and the offset is committed to the
//!    consumer group (for lag tools; the store is the source of truth).
//!
//! A crash between 2 and 3 leaves outputs on the broker that the store does not know about.
//! On the next open the partition is not marked clean, so the runner reads every output
//! partition from the stored positions to its end, collects the ids this input partition
//! already wrote, and while re-processing produces only the missing ones.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};

use crate::changelog;
use crate::config::{Guarantee, ServiceArgs};
use crate::error::{CoreError, Result};
use crate::failpoint;
use crate::group_watch::GroupWatch;
use crate::kafka::{retry_transient, Clients};
use crate::priority::Scheduler;
use crate::record::{Output, OutputId, ID_HEADER};
use crate::replay::{self, Replay};
use crate::side::{self, tp_key, SideReader, SideTable, Tp};
use crate::store::{Changes, PartitionMeta, PartitionStore};
use crate::telemetry::{names, Health};

/// Business logic of one input partition. Must be deterministic: the same record and state
/// give the same outputs in the same order, which is what makes re-processing safe.
pub trait Operator: Send {
    fn process(&mut self, record: &OwnedMessage, ctx: &mut Ctx<'_>) -> Result<()>;

    /// Called once per batch before its commit, and with `closing` when the partition is
    /// revoked or the process stops: the place to write caches such as Bloom snapshots.
    /// Must not emit outputs.
    fn flush(&mut self, _ctx: &mut Ctx<'_>, _closing: bool) -> Result<()> {
        Ok(())
    }

    /// Side-table records that concern this partition, after the factory's table applied
    /// them (or, when the partition opened behind its table, again from the side topic).
    /// Outputs made here are at-least-once and must be idempotent (see `side.rs`).
    fn on_side(&mut self, _records: &[OwnedMessage], _ctx: &mut Ctx<'_>) -> Result<()> {
        Ok(())
    }
}

/// Creates one operator per assigned input partition and declares the topics it uses.
pub trait OperatorFactory: Send + 'static {
    type Op: Operator;
    /// Topics consumed by the group.
    fn inputs(&self) -> Vec<String>;
    /// Every topic the operator may emit to; recovery scans their tails.
    fn outputs(&self) -> Vec<String>;
    /// Opens the operator of one partition, after its state was restored.
    fn open(&self, topic: &str, partition: i32, store: &PartitionStore) -> Result<Self::Op>;
    /// A table read from side topics by every instance for itself (see `side.rs`).
    fn side_table(&mut self) -> Option<&mut dyn SideTable> {
        None
    }
    /// Priority of each input topic (0 highest) and the starvation guard, for services
    /// whose inputs must not wait behind each other (see `priority.rs`).
    fn priorities(&self) -> Option<(BTreeMap<String, u8>, Duration)> {
        None
    }
    /// How much input before a replay offset rebuilds the state a replay wiped (dedup: its
    /// TTL); `None` replays from empty state (see `replay.rs`).
    fn warmup(&self) -> Option<Duration> {
        None
    }
}

/// What an operator sees while processing one record: its partition's state (with the
/// batch's own writes visible) and a place to put outputs.
pub struct Ctx<'a> {
    store: &'a PartitionStore,
    changes: &'a mut Changes,
    outputs: &'a mut Vec<Output>,
    recovering: bool,
}

impl<'a> Ctx<'a> {
    /// A context over a partition's state whose outputs the caller owns.
    pub(crate) fn new(
        store: &'a PartitionStore,
        changes: &'a mut Changes,
        outputs: &'a mut Vec<Output>,
        recovering: bool,
    ) -> Self {
        Ctx {
            store,
            changes,
            outputs,
            recovering,
        }
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.store.get(self.changes, cf, key)
    }
    pub fn put(&mut self, cf: &str, key: &[u8], value: &[u8]) {
        self.changes.put(cf, key, value)
    }
    pub fn delete(&mut self, cf: &str, key: &[u8]) {
        self.changes.delete(cf, key)
    }
    pub fn drop_bucket(&mut self, bucket: &str) {
        self.changes.drop_bucket(bucket)
    }
    /// A write to local-only storage, committed with the batch, never in the changelog.
    pub fn put_local(&mut self, key: &[u8], value: Vec<u8>) {
        self.changes.put_local(key, value)
    }
    pub fn store(&self) -> &PartitionStore {
        self.store
    }
    pub fn emit(&mut self, output: Output) {
        self.outputs.push(output)
    }
    /// True while re-processing records whose outputs a crash may have left on the broker
    /// without the state that explains them. An operator whose decisions depend on data
    /// outside its partition (a side table) may decide differently now and must then undo
    /// what the earlier attempt wrote: an output with the same id but the other kind (value
    /// versus tombstone) is produced, an identical one is not.
    pub fn recovering(&self) -> bool {
        self.recovering
    }
}

/// One assigned input partition.
struct Partition<O> {
    store: PartitionStore,
    op: O,
    meta: PartitionMeta,
    changes: Changes,
    /// Outputs found by the recovery scan, as (input offset, output index) → tombstone.
    already_written: HashMap<(i64, u32), bool>,
    already_written_max: i64,
    /// Changelog writes of the last committed batch, awaited with the next batch.
    pending_changelog: Vec<DeliveryFuture>,
    /// Highest acknowledged offset per output partition in the current batch.
    acked: BTreeMap<String, i64>,
}

/// The (topic, partition) pairs of a rebalance list.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

struct Engine<F: OperatorFactory> {
    factory: F,
    producer: FutureProducer,
    reader: BaseConsumer,
    group: String,
    state_dir: PathBuf,
    guarantee: Guarantee,
    output_tps: Vec<Tp>,
    partitions: HashMap<Tp, Partition<F::Op>>,
    health: Arc<Health>,
    side: Option<SideReader>,
    replay: Replay,
    /// An error raised inside a rebalance callback, returned by the loop.
    fatal: Option<CoreError>,
}

struct RunnerContext<F: OperatorFactory> {
    engine: Arc<Mutex<Engine<F>>>,
    watch: Arc<GroupWatch>,
}

fn lock<F: OperatorFactory>(m: &Mutex<Engine<F>>) -> MutexGuard<'_, Engine<F>> {
    // A panic while holding the lock leaves the engine mid-batch; its state on disk is still
    // consistent (commits are atomic), so continuing to shut down is safe.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<F: OperatorFactory> ClientContext for RunnerContext<F> {
    fn stats(&self, stats: Statistics) {
        if let Some(cgrp) = &stats.cgrp {
            self.watch.observe(cgrp, Instant::now());
        }
        let mut prefetched = 0;
        for (topic, t) in &stats.topics {
            for (p, s) in &t.partitions {
                if *p >= 0 && s.desired && s.consumer_lag >= 0 {
                    metrics::gauge!(names::CONSUMER_LAG, "topic" => topic.clone(), "partition" => p.to_string())
                        .set(s.consumer_lag as f64);
                }
                prefetched += s.fetchq_size;
            }
        }
        metrics::gauge!(names::PREFETCH_BYTES).set(prefetched as f64);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        metrics::counter!(names::ERRORS, "kind" => "kafka_client").increment(1);
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl<F: OperatorFactory> ConsumerContext for RunnerContext<F> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let mut engine = lock(&self.engine);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let tps = partitions_of(tpl);
                match engine.open_partitions(&tps) {
                    Ok(starts) => {
                        for ((t, p), off) in starts {
                            if let Some(off) = off {
                                let _ = tpl.set_partition_offset(&t, p, Offset::Offset(off));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "opening assigned partitions failed");
                        engine.fatal.get_or_insert(e);
                    }
                }
                let res = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = res {
                    engine.fatal.get_or_insert(CoreError::kafka("assign", e));
                }
                metrics::gauge!(names::ASSIGNED_PARTITIONS).set(engine.partitions.len() as f64);
                engine.health.set_joined(true);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                let tps = partitions_of(tpl);
                let commits = engine.close_partitions(&tps, !lost);
                match commits {
                    Ok(c) if !lost && c.count() > 0 => {
                        if let Err(e) = consumer.commit(&c, CommitMode::Sync) {
                            tracing::warn!(error = %e, "offset commit on revoke failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        engine.fatal.get_or_insert(e);
                    }
                }
                let res = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, "unassign failed");
                }
                metrics::gauge!(names::ASSIGNED_PARTITIONS).set(engine.partitions.len() as f64);
            }
            other => {
                metrics::counter!(names::ERRORS, "kind" => "rebalance").increment(1);
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

impl<F: OperatorFactory> Engine<F> {
    fn store_path(&self, topic: &str, partition: i32) -> PathBuf {
        self.state_dir
            .join(&self.group)
            .join(format!("{topic}-{partition}"))
    }

    fn exactly_once(&self) -> bool {
        self.guarantee == Guarantee::ExactlyOnce
    }

    /// Opens, restores and recovers newly assigned partitions; returns where each starts.
    fn open_partitions(&mut self, tps: &[Tp]) -> Result<Vec<(Tp, Option<i64>)>> {
        self.follow_side(tps)?;
        let mut opened = Vec::new();
        for tp in tps {
            if self.partitions.contains_key(tp) {
                continue;
            }
            self.health.restore_started();
            let res = self.open_partition(&tp.0, tp.1);
            self.health.restore_finished();
            let part = res?;
            self.partitions.insert(tp.clone(), part);
            opened.push(tp.clone());
        }
        if self.exactly_once() {
            self.recover(&opened)?;
        }
        self.reconcile_side(&opened)?;
        Ok(tps
            .iter()
            .map(|tp| {
                let start = self
                    .partitions
                    .get(tp)
                    .map(|p| p.meta.next_offset)
                    .filter(|o| *o >= 0);
                (tp.clone(), start)
            })
            .collect())
    }

    fn open_partition(&mut self, topic: &str, partition: i32) -> Result<Partition<F::Op>> {
        let started = Instant::now();
        let path = self.store_path(topic, partition);
        let cl_topic = changelog::topic_name(&self.group, topic);
        let (_, cl_end) = retry_transient("changelog watermarks", || {
            self.reader
                .fetch_watermarks(&cl_topic, partition, Duration::from_secs(10))
        })
        .map_err(|e| CoreError::kafka(format!("watermarks of {cl_topic}/{partition}"), e))?;
        let mut store = PartitionStore::open(&path)?;
        let local = store.meta()?;
        // The local store is a cache: rebuild it when it is missing, when another instance
        // committed the partition since, or when it is ahead of the changelog (a crash between
        // its commit and the changelog write).
        let rebuild = match &local {
            None => cl_end > 0,
            Some(l) => {
                let head = changelog::head_meta(
                    &self.reader,
                    &cl_topic,
                    partition,
                    l.changelog_pos,
                    cl_end,
                )?;
                !l.is_current(head.as_ref())
            }
        };
        if rebuild {
            drop(store);
            PartitionStore::destroy(&path)?;
            store = PartitionStore::open(&path)?;
            let (records, _) = changelog::restore(
                &self.reader,
                &mut store,
                &cl_topic,
                partition,
                cl_end,
                |n| metrics::counter!(names::RESTORE_RECORDS).increment(n),
            )?;
            tracing::info!(
                topic,
                partition,
                records,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "state restored from changelog"
            );
        }
        let mut meta = store.meta()?.unwrap_or(PartitionMeta {
            next_offset: -1,
            clean: true,
            ..Default::default()
        });
        meta.changelog_pos = meta.changelog_pos.max(cl_end);
        let io = replay::Io {
            reader: &self.reader,
            producer: &self.producer,
            group: &self.group,
            topic,
            partition,
        };
        let (store, replayed) = self.replay.honour(&self.factory, &io, store, &mut meta)?;
        let op = match replayed {
            Some(op) => op,
            None => self.factory.open(topic, partition, &store)?,
        };
        metrics::gauge!(names::STATE_BYTES, "topic" => topic.to_string(), "partition" => partition.to_string())
            .set(store.approximate_bytes() as f64);
        tracing::info!(
            topic,
            partition,
            next_offset = meta.next_offset,
            clean = meta.clean,
            rebuilt = rebuild,
            "partition opened"
        );
        Ok(Partition {
            store,
            op,
            meta,
            changes: Changes::default(),
            already_written: HashMap::new(),
            already_written_max: -1,
            pending_changelog: Vec::new(),
            acked: BTreeMap::new(),
        })
    }

    /// Finds outputs written by the opened partitions after their last commit, then records
    /// scan positions (durably, in the store and the changelog) before any new output.
    fn recover(&mut self, opened: &[Tp]) -> Result<()> {
        if opened.is_empty() {
            return Ok(());
        }
        let mut ends = BTreeMap::new();
        for (t, p) in &self.output_tps {
            let (low, high) = retry_transient("output watermarks", || {
                self.reader.fetch_watermarks(t, *p, Duration::from_secs(10))
            })
            .map_err(|e| CoreError::kafka(format!("watermarks of {t}/{p}"), e))?;
            ends.insert(tp_key(t, *p), (t.clone(), *p, low, high));
        }
        let dirty: Vec<&Tp> = opened
            .iter()
            .filter(|tp| self.partitions.get(*tp).is_some_and(|p| !p.meta.clean))
            .collect();
        if !dirty.is_empty() {
            let started = Instant::now();
            let mut scanned = 0u64;
            for (key, (t, p, low, high)) in &ends {
                // One read per output partition serves every dirty input partition.
                let from = dirty
                    .iter()
                    .filter_map(|tp| self.partitions.get(*tp))
                    .map(|part| part.meta.out_pos.get(key).copied().unwrap_or(*low))
                    .min()
                    .unwrap_or(*high)
                    .max(*low);
                let parts = &mut self.partitions;
                changelog::read_range(
                    &self.reader,
                    t,
                    *p,
                    from,
                    *high,
                    Duration::from_secs(30),
                    |m| {
                        scanned += 1;
                        if let Some(id) = OutputId::of(m) {
                            if let Some(part) = parts.get_mut(&(id.topic.clone(), id.partition)) {
                                let start = part.meta.out_pos.get(key).copied().unwrap_or(*low);
                                if !part.meta.clean
                                    && m.offset() >= start
                                    && id.offset >= part.meta.next_offset
                                {
                                    part.already_written
                                        .insert((id.offset, id.index), m.payload().is_none());
                                    part.already_written_max =
                                        part.already_written_max.max(id.offset);
                                }
                            }
                        }
                        Ok(())
                    },
                )?;
            }
            metrics::counter!(names::RECOVERY_SCANNED).increment(scanned);
            let found: usize = dirty
                .iter()
                .filter_map(|tp| self.partitions.get(*tp))
                .map(|p| p.already_written.len())
                .sum();
            tracing::info!(
                partitions = dirty.len(),
                scanned,
                found,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "recovery scan done"
            );
        }
        // Record scan positions for every output partition. Positions only move forward once
        // the outputs found by the scan have been re-encountered, so a second crash before
        // that still finds them.
        let mut pending = Vec::new();
        for tp in opened {
            let Some(part) = self.partitions.get_mut(tp) else {
                continue;
            };
            for (key, (_, _, low, high)) in &ends {
                if part.already_written.is_empty() || !part.meta.out_pos.contains_key(key) {
                    let pos = if part.already_written.is_empty() {
                        *high
                    } else {
                        *low
                    };
                    part.meta.out_pos.insert(key.clone(), pos);
                }
            }
            part.meta.clean = false;
            pending.extend(commit_logged(
                &self.producer,
                &self.group,
                tp,
                &mut part.store,
                &Changes::default(),
                &mut part.meta,
                "after_recovery_committed",
            )?);
        }
        settle_changelog(pending)?;
        Ok(())
    }

    /// Finishes revoked partitions: waits for their changelog, marks them clean, returns the
    /// offsets to commit. `graceful` is false when the assignment was lost to another member.
    fn close_partitions(&mut self, tps: &[Tp], graceful: bool) -> Result<TopicPartitionList> {
        let mut commits = TopicPartitionList::new();
        for tp in tps {
            let Some(mut part) = self.partitions.remove(tp) else {
                continue;
            };
            if !graceful {
                tracing::warn!(
                    topic = tp.0,
                    partition = tp.1,
                    "partition lost: closing without commit"
                );
                continue;
            }
            if let Some(pos) = settle_changelog(std::mem::take(&mut part.pending_changelog))? {
                part.meta.changelog_pos = pos;
            }
            flush_operator(&mut part, true)?;
            // Outputs found by a recovery scan but not re-encountered yet keep the partition
            // dirty, so the next owner scans for them again.
            part.meta.clean = part.already_written.is_empty();
            if self.exactly_once() {
                let pending = commit_logged(
                    &self.producer,
                    &self.group,
                    tp,
                    &mut part.store,
                    &part.changes,
                    &mut part.meta,
                    "after_close_committed",
                )?;
                if let Some(pos) = settle_changelog(pending)? {
                    part.meta.changelog_pos = pos;
                }
                part.store.commit(&Changes::default(), &part.meta)?;
            } else {
                part.store.commit(&part.changes, &part.meta)?;
            }
            part.changes.clear();
            part.store.flush()?;
            if part.meta.next_offset >= 0 {
                commits
                    .add_partition_offset(&tp.0, tp.1, Offset::Offset(part.meta.next_offset))
                    .map_err(|e| CoreError::kafka("commit list", e))?;
            }
            tracing::info!(
                topic = tp.0,
                partition = tp.1,
                next_offset = part.meta.next_offset,
                "partition closed"
            );
        }
        Ok(commits)
    }

    /// Processes one batch to completion; returns the offsets to commit to the group.
    fn process_batch(&mut self, batch: &mut Vec<OwnedMessage>) -> Result<TopicPartitionList> {
        let started = Instant::now();
        let mut futures: Vec<((Tp, String), DeliveryFuture)> = Vec::with_capacity(batch.len());
        let mut touched: Vec<Tp> = Vec::new();
        let mut outputs = Vec::new();
        let mut in_counts: HashMap<String, u64> = HashMap::new();
        let (mut skipped_processed, mut skipped_written) = (0u64, 0u64);
        for msg in batch.drain(..) {
            let tp = (msg.topic().to_string(), msg.partition());
            let Some(part) = self.partitions.get_mut(&tp) else {
                continue;
            };
            if part.meta.next_offset >= 0 && msg.offset() < part.meta.next_offset {
                skipped_processed += 1;
                continue;
            }
            *in_counts.entry(tp.0.clone()).or_default() += 1;
            let recovering =
                !part.already_written.is_empty() && msg.offset() <= part.already_written_max;
            let mut ctx = Ctx::new(&part.store, &mut part.changes, &mut outputs, recovering);
            part.op.process(&msg, &mut ctx)?;
            for (i, out) in outputs.drain(..).enumerate() {
                let index = i as u32;
                if let Some(tombstone) = part.already_written.remove(&(msg.offset(), index)) {
                    if tombstone == out.payload.is_none() {
                        skipped_written += 1;
                        continue;
                    }
                }
                let id = OutputId {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    offset: msg.offset(),
                    index,
                };
                let fut = send_output(&self.producer, &out, Some(&id))?;
                futures.push(((tp.clone(), out.topic), fut));
            }
            part.meta.next_offset = msg.offset() + 1;
            if touched.last() != Some(&tp) && !touched.contains(&tp) {
                touched.push(tp);
            }
        }
        failpoint::hit("after_produce");
        let commits = self.finish_batch(futures, &touched)?;
        for (t, n) in in_counts {
            metrics::counter!(names::RECORDS_IN, "topic" => t).increment(n);
        }
        if skipped_processed > 0 {
            metrics::counter!(names::RECORDS_SKIPPED, "reason" => "already_processed")
                .increment(skipped_processed);
        }
        if skipped_written > 0 {
            metrics::counter!(names::RECORDS_SKIPPED, "reason" => "already_written")
                .increment(skipped_written);
        }
        metrics::histogram!(names::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(commits)
    }

    /// Waits for a batch's outputs (and the touched partitions' previous changelog), then
    /// commits each touched partition; returns the offsets to commit to the group.
    fn finish_batch(
        &mut self,
        futures: Vec<((Tp, String), DeliveryFuture)>,
        touched: &[Tp],
    ) -> Result<TopicPartitionList> {
        let mut out_counts: HashMap<String, u64> = HashMap::new();
        let (dests, futs): (Vec<(Tp, String)>, Vec<DeliveryFuture>) = futures.into_iter().unzip();
        let results = block_on(join_all(futs));
        for ((tp, out_topic), r) in dests.into_iter().zip(results) {
            let (out_partition, out_offset) = delivered(r)?;
            if let Some(part) = self.partitions.get_mut(&tp) {
                let e = part
                    .acked
                    .entry(tp_key(&out_topic, out_partition))
                    .or_insert(-1);
                *e = (*e).max(out_offset);
            }
            *out_counts.entry(out_topic).or_default() += 1;
        }
        for tp in touched {
            if let Some(part) = self.partitions.get_mut(tp) {
                if let Some(pos) = settle_changelog(std::mem::take(&mut part.pending_changelog))? {
                    part.meta.changelog_pos = pos;
                }
            }
        }
        failpoint::hit("after_outputs_acked");
        // Every output of the next batch lands after every output acked now, whichever
        // partition wrote it: a scan floor for all touched partitions, so output partitions a
        // partition never writes to (with key-preserving partitioning, most of them) do not
        // keep the floor of its first open and make its recovery scan read their whole history.
        let mut floors: BTreeMap<String, i64> = BTreeMap::new();
        for tp in touched {
            for (k, off) in self.partitions.get(tp).into_iter().flat_map(|p| &p.acked) {
                let f = floors.entry(k.clone()).or_insert(-1);
                *f = (*f).max(off + 1);
            }
        }
        let mut commits = TopicPartitionList::new();
        let exactly_once = self.exactly_once();
        for tp in touched {
            let Some(part) = self.partitions.get_mut(tp) else {
                continue;
            };
            if !part.already_written.is_empty() && part.already_written_max < part.meta.next_offset
            {
                // Every input whose outputs the scan found has been re-processed.
                part.already_written.clear();
            }
            flush_operator(part, false)?;
            part.acked.clear();
            if part.already_written.is_empty() {
                for (k, floor) in &floors {
                    let pos = part.meta.out_pos.entry(k.clone()).or_insert(*floor);
                    *pos = (*pos).max(*floor);
                }
            }
            if exactly_once || !part.changes.is_empty() {
                part.pending_changelog = commit_logged(
                    &self.producer,
                    &self.group,
                    tp,
                    &mut part.store,
                    &part.changes,
                    &mut part.meta,
                    "after_state_committed",
                )?;
            } else {
                part.store.commit(&part.changes, &part.meta)?;
            }
            part.changes.clear();
            if part.meta.next_offset >= 0 {
                commits
                    .add_partition_offset(&tp.0, tp.1, Offset::Offset(part.meta.next_offset))
                    .map_err(|e| CoreError::kafka("commit list", e))?;
            }
        }
        for (t, n) in out_counts {
            metrics::counter!(names::RECORDS_OUT, "topic" => t).increment(n);
        }
        Ok(commits)
    }

    /// In co-partitioned mode, catches up and follows the side partitions that the open
    /// partitions and `new` ones need; in broadcast mode the side is followed from the start.
    fn follow_side(&mut self, new: &[Tp]) -> Result<()> {
        let (Some(side), Some(table)) = (self.side.as_mut(), self.factory.side_table()) else {
            return Ok(());
        };
        let inputs = self.partitions.keys().chain(new).map(|(_, p)| *p).collect();
        self.health.restore_started();
        let res = side.catch_up_and_follow(&self.reader, table, &inputs);
        self.health.restore_finished();
        res.map(|_| ())
    }

    /// Shows each opened partition the side records between where it last saw the side and
    /// where the table stands, then commits it. A partition with no state starts level.
    fn reconcile_side(&mut self, opened: &[Tp]) -> Result<()> {
        let (Some(side), Some(table)) = (self.side.as_ref(), self.factory.side_table()) else {
            return Ok(());
        };
        let positions = table.positions();
        let mut futures = Vec::new();
        for tp in opened {
            let Some(part) = self.partitions.get_mut(tp) else {
                continue;
            };
            let fresh = part.meta.next_offset < 0;
            for (st, sp) in side.serving(tp.1) {
                let key = tp_key(st, *sp);
                let Some(&to) = positions.get(&key) else {
                    continue;
                };
                let from = match part.meta.side_pos.get(&key) {
                    Some(f) => *f,
                    None if fresh => to,
                    None => 0,
                };
                if from < to {
                    side::replay(&self.reader, st, *sp, from, to, |chunk| {
                        metrics::counter!(names::SIDE_REPLAYED).increment(chunk.len() as u64);
                        show_side(&self.producer, tp, part, chunk, &mut futures)
                    })?;
                }
                part.meta.side_pos.insert(key, to);
            }
        }
        self.finish_batch(futures, opened).map(|_| ())
    }

    /// Applies side records to the table, then shows them to every open partition they
    /// concern; returns the offsets to commit to the group.
    fn process_side(&mut self, records: Vec<OwnedMessage>) -> Result<TopicPartitionList> {
        let (Some(side), Some(table)) = (self.side.as_ref(), self.factory.side_table()) else {
            return Ok(TopicPartitionList::new());
        };
        table.apply(&records)?;
        metrics::counter!(names::SIDE_RECORDS).increment(records.len() as u64);
        let mut futures = Vec::new();
        let mut touched = Vec::new();
        for (tp, part) in self.partitions.iter_mut() {
            let serving: Vec<&Tp> = side.serving(tp.1).collect();
            let mine: Vec<OwnedMessage> = records
                .iter()
                .filter(|m| {
                    serving
                        .iter()
                        .any(|(t, p)| m.topic() == t && m.partition() == *p)
                })
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            for m in &mine {
                part.meta
                    .side_pos
                    .insert(tp_key(m.topic(), m.partition()), m.offset() + 1);
            }
            show_side(&self.producer, tp, part, &mine, &mut futures)?;
            touched.push(tp.clone());
        }
        self.finish_batch(futures, &touched)
    }

    /// Each assigned partition with its next offset to process.
    fn positions(&self) -> Vec<(Tp, i64)> {
        self.partitions
            .iter()
            .map(|(tp, p)| (tp.clone(), p.meta.next_offset))
            .collect()
    }

    fn update_state_gauges(&self) {
        for ((t, p), part) in &self.partitions {
            metrics::gauge!(names::STATE_BYTES, "topic" => t.clone(), "partition" => p.to_string())
                .set(part.store.approximate_bytes() as f64);
        }
    }
}

/// Shows side records to one partition's operator and queues what it emits (without ids:
/// side outputs are at-least-once).
fn show_side<O: Operator>(
    producer: &FutureProducer,
    tp: &Tp,
    part: &mut Partition<O>,
    records: &[OwnedMessage],
    futures: &mut Vec<((Tp, String), DeliveryFuture)>,
) -> Result<()> {
    let mut outputs = Vec::new();
    let mut ctx = Ctx::new(&part.store, &mut part.changes, &mut outputs, false);
    part.op.on_side(records, &mut ctx)?;
    for out in outputs {
        let fut = send_output(producer, &out, None)?;
        futures.push(((tp.clone(), out.topic), fut));
    }
    Ok(())
}

/// Lets the operator write its caches into the partition's pending changes.
fn flush_operator<O: Operator>(part: &mut Partition<O>, closing: bool) -> Result<()> {
    let mut outputs = Vec::new();
    let mut ctx = Ctx::new(&part.store, &mut part.changes, &mut outputs, false);
    part.op.flush(&mut ctx, closing)?;
    if outputs.is_empty() {
        Ok(())
    } else {
        Err(CoreError::Operator(
            "flush emitted outputs; only process may".into(),
        ))
    }
}

fn headers_with_id(out: &Output, id: Option<&str>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(out.headers.len() + 1);
    // An id inherited from an upstream stage would be mistaken for this stage's own.
    for (k, v) in out.headers.iter().filter(|(k, _)| k != ID_HEADER) {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    match id {
        Some(id) => h.insert(Header {
            key: ID_HEADER,
            value: Some(id),
        }),
        None => h,
    }
}

/// Queues a record, waiting while librdkafka's queue is full (backpressure, not an error).
fn enqueue(
    producer: &FutureProducer,
    mut rec: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture> {
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, r)) => return Err(CoreError::kafka(format!("produce to {}", r.topic), e)),
        }
    }
}

fn send_output(
    producer: &FutureProducer,
    out: &Output,
    id: Option<&OutputId>,
) -> Result<DeliveryFuture> {
    let id = id.map(OutputId::encode);
    let mut rec =
        FutureRecord::<[u8], [u8]>::to(&out.topic).headers(headers_with_id(out, id.as_deref()));
    if let Some(k) = &out.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &out.payload {
        rec = rec.payload(v.as_slice());
    }
    if let Some(p) = out.partition {
        rec = rec.partition(p);
    }
    enqueue(producer, rec)
}

/// Commits `changes` and `meta` under a fresh commit id to the local store, then queues the
/// same as a changelog group. The id lets a later open see whether the group reached the
/// changelog before a crash (`PartitionMeta::is_current`). `failpoint` names the moment in
/// between, where a kill leaves the store ahead of the changelog.
pub(crate) fn commit_logged(
    producer: &FutureProducer,
    group: &str,
    tp: &Tp,
    store: &mut PartitionStore,
    changes: &Changes,
    meta: &mut PartitionMeta,
    failpoint: &str,
) -> Result<Vec<DeliveryFuture>> {
    meta.new_commit();
    let entries = changelog::encode(changes, meta)?;
    store.commit(changes, meta)?;
    failpoint::hit(failpoint);
    send_changelog_entries(producer, group, tp, &entries)
}

/// Queues the changelog group of one batch of input partition `tp`: its changes, then its
/// meta, to the changelog partition of the same number.
pub(crate) fn send_changelog_group(
    producer: &FutureProducer,
    group: &str,
    tp: &Tp,
    changes: &Changes,
    meta: &mut PartitionMeta,
) -> Result<Vec<DeliveryFuture>> {
    let entries = changelog::encode(changes, meta)?;
    send_changelog_entries(producer, group, tp, &entries)
}

fn send_changelog_entries(
    producer: &FutureProducer,
    group: &str,
    tp: &Tp,
    entries: &[changelog::Entry],
) -> Result<Vec<DeliveryFuture>> {
    let topic = changelog::topic_name(group, &tp.0);
    entries
        .iter()
        .map(|(k, v)| {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&topic)
                .key(k)
                .partition(tp.1);
            if let Some(v) = v {
                rec = rec.payload(v);
            }
            enqueue(producer, rec)
        })
        .collect()
}

/// Waits for changelog writes; returns the changelog position after the last one.
pub(crate) fn settle_changelog(pending: Vec<DeliveryFuture>) -> Result<Option<i64>> {
    let mut pos = None;
    for r in block_on(join_all(pending)) {
        pos = Some(delivered(r)?.1 + 1);
    }
    Ok(pos)
}

type DeliveryOutcome = std::result::Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

/// Partition and offset of an acknowledged record; a failed delivery is fatal for the batch.
fn delivered(r: DeliveryOutcome) -> Result<(i32, i64)> {
    match r {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, m))) => {
            metrics::counter!(names::ERRORS, "kind" => "produce").increment(1);
            Err(CoreError::kafka(format!("deliver to {}", m.topic()), e))
        }
        Err(_) => Err(CoreError::kafka("deliver", KafkaError::Canceled)),
    }
}

/// Runs `factory`'s operator over its input topics until `shutdown` is set, then commits
/// what was processed and closes every partition.
pub fn run<F: OperatorFactory>(
    factory: F,
    clients: &Clients,
    args: &ServiceArgs,
    health: Arc<Health>,
    shutdown: Arc<AtomicBool>,
) -> Result<()> {
    clients.check_reachable()?;
    crate::store::set_memory_budget(args.state_memory_mb << 20);
    let reader = clients.reader()?;
    let inputs = factory.inputs();
    let mut output_tps = Vec::new();
    for t in factory.outputs() {
        for p in 0..clients.partition_count(&reader, &t)? {
            output_tps.push((t.clone(), p));
        }
    }
    for t in &inputs {
        let n = clients.partition_count(&reader, t)?;
        let cl = changelog::topic_name(&args.group, t);
        // As many copies of the state as of its input: losing a broker must not lose either.
        let replication = clients.replication_of(&reader, t)?;
        block_on(clients.ensure_topic(
            &cl,
            n,
            Some(replication),
            &[("cleanup.policy", "compact"), ("retention.ms", "-1")],
        ))?;
    }
    let mut factory = factory;
    let mut scheduler = factory
        .priorities()
        .map(|(of_topic, guard)| Scheduler::new(of_topic, guard));
    let side = match factory.side_table() {
        Some(table) => Some(SideReader::new(clients, &reader, table)?),
        None => None,
    };
    let engine = Arc::new(Mutex::new(Engine {
        factory,
        producer: clients.producer()?,
        reader,
        group: args.group.clone(),
        state_dir: args.state_dir.clone(),
        guarantee: args.guarantee,
        output_tps,
        partitions: HashMap::new(),
        health: health.clone(),
        side,
        replay: Replay::new(clients, &args.group)?,
        fatal: None,
    }));
    // Broadcast side tables are loaded to their end before any input is judged.
    lock(&engine).follow_side(&[])?;
    let watch = Arc::new(GroupWatch::new(args.group_stall));
    let subscribe = || -> Result<BaseConsumer<RunnerContext<F>>> {
        let consumer = clients.consumer(
            &args.group,
            RunnerContext {
                engine: engine.clone(),
                watch: watch.clone(),
            },
        )?;
        let topics: Vec<&str> = inputs.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| CoreError::kafka("subscribe", e))?;
        Ok(consumer)
    };
    let mut consumer = subscribe()?;
    health.set_live(true);
    metrics::gauge!(names::PAUSED_PARTITIONS).set(0.0);
    metrics::gauge!(names::ASSIGNED_PARTITIONS).set(0.0);
    tracing::info!(group = args.group, inputs = ?inputs, guarantee = ?args.guarantee, "processing");

    let linger = args.batch_linger;
    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(args.batch_records);
    let mut last_gauges = Instant::now();
    let result = loop {
        if shutdown.load(Ordering::SeqCst) {
            break Ok(());
        }
        if watch.stalled(Instant::now()) && lock(&engine).partitions.is_empty() {
            tracing::warn!(
                group = args.group,
                stall_s = args.group_stall.as_secs(),
                "never settled back into the consumer group: replacing the consumer"
            );
            metrics::counter!(names::ERRORS, "kind" => "group_stalled").increment(1);
            match subscribe() {
                // The old consumer closes (leaves the group) as it is dropped.
                Ok(fresh) => drop(std::mem::replace(&mut consumer, fresh)),
                Err(e) => break Err(e),
            }
            watch.reset();
        }
        if let Some(s) = scheduler.as_mut() {
            let assigned = lock(&engine).positions();
            s.schedule(&consumer, &assigned);
        }
        let deadline = Instant::now() + linger;
        while batch.len() < args.batch_records {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.poll(left) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => {
                    metrics::counter!(names::ERRORS, "kind" => "consume").increment(1);
                    tracing::warn!(error = %e, "consume error");
                }
                None => break,
            }
        }
        let mut engine = lock(&engine);
        if let Some(e) = engine.fatal.take() {
            break Err(e);
        }
        let side_records = engine
            .side
            .as_ref()
            .map(|s| s.poll(args.batch_records))
            .unwrap_or_default();
        let mut commits = Vec::new();
        if !side_records.is_empty() {
            match engine.process_side(side_records) {
                Ok(c) => commits.push(c),
                Err(e) => break Err(e),
            }
        }
        if !batch.is_empty() {
            match engine.process_batch(&mut batch) {
                Ok(c) => commits.push(c),
                Err(e) => break Err(e),
            }
        }
        if last_gauges.elapsed() > Duration::from_secs(5) {
            engine.update_state_gauges();
            last_gauges = Instant::now();
        }
        drop(engine);
        for c in commits.iter().filter(|c| c.count() > 0) {
            if let Err(e) = consumer.commit(c, CommitMode::Async) {
                tracing::debug!(error = %e, "async offset commit failed; the next one supersedes it");
            }
        }
    };
    health.set_live(false);
    // Graceful: close every partition (changelog flushed, clean meta), commit, leave the group.
    let tps: Vec<Tp> = lock(&engine).partitions.keys().cloned().collect();
    let closed = lock(&engine).close_partitions(&tps, result.is_ok());
    if result.is_ok() {
        if let Some(table) = lock(&engine).factory.side_table() {
            if let Err(e) = table.close() {
                tracing::warn!(error = %e, "closing the side table failed");
            }
        }
    }
    if let Ok(c) = &closed {
        if c.count() > 0 {
            if let Err(e) = consumer.commit(c, CommitMode::Sync) {
                tracing::warn!(error = %e, "final offset commit failed");
            }
        }
    }
    drop(consumer);
    tracing::info!("stopped");
    result.and(closed.map(|_| ()))
}
