//! The engine: the partition-aware consume → process → produce loop that runs an
//! [`OperatorFactory`]'s operators.
//!
//! Under `exactly-once` (Kafka transactions, [`crate::transaction`]) a batch's outputs, its
//! partitions' changelog groups and their input offsets are one transaction; once Kafka
//! committed it, each partition's changes and next offset go to RocksDB in one batch. A
//! failed transaction is aborted and the instance drops its partitions and rejoins, so they
//! reopen from what Kafka committed.
//!
//! Under `exactly-once-ids` (no broker transactions), per batch and input partition:
//! 1. the operator turns each input record into outputs and state changes; every output
//!    carries the deterministic id `topic/partition/offset/n` (see [`crate::record`]);
//! 2. outputs are produced and the loop waits until the broker acknowledged all of them;
//! 3. one RocksDB write batch stores the state changes, the next input offset and, per output
//!    partition, the position after the highest acknowledged output ([`crate::commit`]);
//! 4. the same changes and meta go to the changelog topic, and the offset is committed to the
//!    consumer group (for lag tools; the store is the source of truth).
//!
//! A crash between 2 and 3 leaves outputs on the broker that the store does not know about.
//! On the next open the partition is not marked clean, so the engine reads every output
//! partition from the stored positions to its end, collects the ids this input partition
//! already wrote, and while re-processing produces only the missing ones (`recovery.rs`).
//!
//! Modules: `rebalance` (the consumer's callbacks), `partitions` (open with restore and
//! replay, close), `recovery` (the scan), `batch` (process and commit a batch), `side_hooks`
//! (side tables shown to operators).

mod batch;
mod partitions;
mod rebalance;
mod recovery;
mod side_hooks;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerGroupMetadata};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{DeliveryFuture, FutureProducer};

use crate::changelog;
use crate::commit;
use crate::config::{Guarantee, ServiceArgs};
use crate::error::{CoreError, Result};
use crate::group_watch::GroupWatch;
use crate::kafka::Clients;
use crate::metrics::{self, ErrorKind};
use crate::operator::OperatorFactory;
use crate::priority::Scheduler;
use crate::replay::Replay;
use crate::side::SideReader;
use crate::store::{Changes, PartitionMeta, PartitionStore};
use crate::telemetry::Health;
use crate::topic_partition::TopicPartition;
use crate::transaction::{self, Transactions};
use rebalance::{lock, RunnerContext};

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
    acked: BTreeMap<TopicPartition, i64>,
}

impl<O> Partition<O> {
    /// Commits the pending changes under a fresh commit id, locally and as a changelog group
    /// whose writes the next settle waits for (see `commit.rs`).
    fn commit_logged(
        &mut self,
        producer: &FutureProducer,
        group: &str,
        tp: &TopicPartition,
        failpoint: &str,
    ) -> Result<()> {
        self.pending_changelog = commit::commit_logged(
            producer,
            group,
            tp,
            &mut self.store,
            &self.changes,
            &mut self.meta,
            failpoint,
        )?;
        Ok(())
    }

    /// Sends the pending changes under a fresh commit id as a changelog group into the open
    /// transaction; [`Partition::commit_local`] follows once Kafka committed it.
    fn log_changes(
        &mut self,
        producer: &FutureProducer,
        group: &str,
        tp: &TopicPartition,
    ) -> Result<()> {
        self.meta.new_commit();
        self.pending_changelog =
            commit::send_changelog_group(producer, group, tp, &self.changes, &mut self.meta)?;
        Ok(())
    }

    /// Writes the changes of a committed transaction and the meta to the local store.
    fn commit_local(&mut self) -> Result<()> {
        self.settle_changelog()?;
        self.store.commit(&self.changes, &self.meta)?;
        self.changes.clear();
        Ok(())
    }

    /// Waits for the changelog writes of the last commit; the store then reflects the
    /// changelog up to after them.
    fn settle_changelog(&mut self) -> Result<()> {
        if let Some(pos) = commit::settle_changelog(std::mem::take(&mut self.pending_changelog))? {
            self.meta.changelog_pos = pos;
        }
        Ok(())
    }
}

/// Outputs queued in a batch: which input partition made each, to which topic.
type Queued = Vec<((TopicPartition, String), DeliveryFuture)>;

struct Engine<F: OperatorFactory> {
    factory: F,
    /// The transactional producer under `exactly-once`; `None` in the other modes.
    txn: Option<Transactions>,
    /// The consumer's group and generation, sent with a transaction's offsets.
    group_meta: Option<ConsumerGroupMetadata>,
    /// An idempotent producer outside transactions: every output in the other modes, and
    /// the changelog writes of a replay (which commits through its own commit ids).
    plain: FutureProducer,
    reader: BaseConsumer,
    group: String,
    state_dir: PathBuf,
    guarantee: Guarantee,
    output_tps: Vec<TopicPartition>,
    partitions: HashMap<TopicPartition, Partition<F::Op>>,
    health: Arc<Health>,
    side: Option<SideReader>,
    replay: Replay,
    /// An error raised inside a rebalance callback, returned by the loop.
    fatal: Option<CoreError>,
}

impl<F: OperatorFactory> Engine<F> {
    /// `exactly-once-ids`: recovery scans and commit ids instead of transactions.
    fn ids_mode(&self) -> bool {
        self.txn.is_none() && self.guarantee != Guarantee::AtLeastOnce
    }

    /// The producer outputs and changelog groups go through.
    fn producer(&self) -> FutureProducer {
        match &self.txn {
            Some(t) => t.producer().clone(),
            None => self.plain.clone(),
        }
    }

    /// Opens a transaction (under `exactly-once`) before anything is sent.
    fn begin(&mut self) -> Result<()> {
        match self.txn.as_mut() {
            Some(t) => t.begin(),
            None => Ok(()),
        }
    }

    /// Commits the open transaction with `offsets` as the group's (under `exactly-once`).
    fn commit_transaction(&mut self, offsets: &rdkafka::TopicPartitionList) -> Result<()> {
        match self.txn.as_mut() {
            Some(t) => t.commit(offsets, self.group_meta.as_ref()),
            None => Ok(()),
        }
    }

    /// After a failed transaction: aborts it and drops every partition without committing;
    /// they reopen from what Kafka committed once the consumer rejoins.
    fn abandon(&mut self, cause: &CoreError) -> Result<()> {
        tracing::warn!(error = %cause, partitions = self.partitions.len(),
            "transaction failed: aborting, dropping the partitions and rejoining the group");
        if let Some(t) = self.txn.as_mut() {
            t.abort()?;
        }
        self.partitions.clear();
        metrics::assigned_partitions(0);
        Ok(())
    }

    /// Each assigned partition with its next offset to process.
    fn positions(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .map(|(tp, p)| (tp.clone(), p.meta.next_offset))
            .collect()
    }

    fn update_state_gauges(&self) {
        for (tp, part) in &self.partitions {
            metrics::state_bytes(tp, part.store.approximate_bytes());
        }
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
            output_tps.push(TopicPartition::new(t.clone(), p));
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
    let txn = match args.guarantee {
        Guarantee::ExactlyOnce => {
            let id = transaction::transactional_id(
                &args.group,
                args.instance_id.as_deref(),
                &args.state_dir,
            );
            let txn = Transactions::start(clients, &id)?;
            if txn.is_none() {
                tracing::warn!(
                    "exactly-once falls back to exactly-once-ids (no broker transactions)"
                );
            }
            txn
        }
        Guarantee::ExactlyOnceIds | Guarantee::AtLeastOnce => None,
    };
    let transactional = txn.is_some();
    let engine = Arc::new(Mutex::new(Engine {
        factory,
        txn,
        group_meta: None,
        plain: clients.producer()?,
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
    metrics::paused_partitions(0);
    metrics::assigned_partitions(0);
    tracing::info!(group = args.group, inputs = ?inputs, guarantee = ?args.guarantee, transactional, "processing");

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
            metrics::error(ErrorKind::GroupStalled);
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
                    metrics::error(ErrorKind::Consume);
                    tracing::warn!(error = %e, "consume error");
                }
                None => break,
            }
        }
        let mut engine = lock(&engine);
        // A failure in a rebalance callback (a partition's opening transaction) or in the
        // batch: one that an abort undoes makes the instance rejoin, any other stops it.
        let outcome = match engine.fatal.take() {
            Some(e) => Err(e),
            None => {
                let side_records = engine
                    .side
                    .as_ref()
                    .map(|s| s.poll(args.batch_records))
                    .unwrap_or_default();
                engine.group_meta = consumer.group_metadata();
                engine.process_polled(side_records, &mut batch)
            }
        };
        let commits = match outcome {
            Ok(c) => c,
            Err(e) if transactional && e.undone_by_abort() => {
                batch.clear();
                if let Err(e) = engine.abandon(&e) {
                    break Err(e);
                }
                drop(engine);
                metrics::error(ErrorKind::Transaction);
                // A fresh consumer rejoins the group; the partitions it gets open from what
                // Kafka committed. The old one leaves as it is dropped.
                match subscribe() {
                    Ok(fresh) => drop(std::mem::replace(&mut consumer, fresh)),
                    Err(e) => break Err(e),
                }
                watch.reset();
                continue;
            }
            Err(e) => break Err(e),
        };
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
    let tps: Vec<TopicPartition> = lock(&engine).partitions.keys().cloned().collect();
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

/// Adds `tp` at `next_offset` to a list of offsets to commit to the group.
fn add_commit(
    commits: &mut rdkafka::TopicPartitionList,
    tp: &TopicPartition,
    next_offset: i64,
) -> Result<()> {
    if next_offset >= 0 {
        commits
            .add_partition_offset(
                &tp.topic,
                tp.partition,
                rdkafka::Offset::Offset(next_offset),
            )
            .map_err(|e| CoreError::kafka("commit list", e))?;
    }
    Ok(())
}
