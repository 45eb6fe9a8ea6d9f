//! Opening an assigned partition (restore from the changelog when the local store is not
//! current, honour a replay request, recovery scan, side catch-up) and closing a revoked one.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;

use super::{add_commit, Engine, Partition};
use crate::changelog;
use crate::error::Result;
use crate::failpoint;
use crate::metrics;
use crate::operator::{self, OperatorFactory};
use crate::paths;
use crate::read;
use crate::replay;
use crate::store::{Changes, PartitionMeta, PartitionStore};
use crate::topic_partition::TopicPartition;

/// Longest wait for the commit marker of a changelog group whose offsets are committed.
const MARKER_WAIT: Duration = Duration::from_secs(30);

impl<F: OperatorFactory> Engine<F> {
    fn store_path(&self, tp: &TopicPartition) -> PathBuf {
        paths::partition_store(&self.state_dir, &self.group, &tp.topic, tp.partition)
    }

    /// Opens, restores and recovers newly assigned partitions; returns where each starts.
    pub(super) fn open_partitions(
        &mut self,
        tps: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, Option<i64>)>> {
        self.follow_side(tps)?;
        let mut opened = Vec::new();
        for tp in tps {
            if self.partitions.contains_key(tp) {
                continue;
            }
            self.health.restore_started();
            let res = self.open_partition(tp);
            self.health.restore_finished();
            self.partitions.insert(tp.clone(), res?);
            opened.push(tp.clone());
        }
        if self.ids_mode() {
            self.recover(&opened)?;
        } else if self.txn.is_some() {
            for tp in &opened {
                if self.partitions.get(tp).is_some_and(|p| !p.meta.clean) {
                    // Outputs of a crashed exactly-once-ids batch are not transactional: no
                    // abort hides them, and no scan looks for them in this mode.
                    tracing::warn!(topic = tp.topic, partition = tp.partition,
                        "opened a partition left unclean by exactly-once-ids: outputs of its last batch may repeat");
                }
            }
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

    /// The end of `tp`'s changelog as a `read_committed` reader sees it.
    fn changelog_end(&self, tp: &TopicPartition, cl_topic: &str) -> Result<i64> {
        let (_, end) =
            read::watermarks(&self.reader, &TopicPartition::new(cl_topic, tp.partition))?;
        Ok(end)
    }

    /// The changelog's end and its last complete group's meta, once that group reaches
    /// `committed` (the input offset Kafka committed for the partition, under `exactly-once`).
    /// Every transaction carrying a partition's offsets also carries a changelog group that
    /// ends at them, but the broker writes the commit markers partition by partition: the
    /// group's offsets can be stable before the changelog's marker lands, and a store restored
    /// in between would lack the last transaction's changes while its input is skipped.
    fn changelog_head(
        &self,
        tp: &TopicPartition,
        cl_topic: &str,
        hint: i64,
        committed: Option<i64>,
    ) -> Result<(i64, Option<PartitionMeta>)> {
        let deadline = Instant::now() + MARKER_WAIT;
        loop {
            let end = self.changelog_end(tp, cl_topic)?;
            let head = changelog::head_meta(&self.reader, cl_topic, tp.partition, hint, end)?;
            let reached = head.as_ref().map_or(-1, |h| h.next_offset);
            let Some(c) = committed.filter(|c| *c > reached) else {
                return Ok((end, head));
            };
            if Instant::now() >= deadline {
                // Not a marker in flight: the group's offset was moved forward outside sieve.
                tracing::warn!(
                    topic = tp.topic,
                    partition = tp.partition,
                    committed = c,
                    changelog_at = reached,
                    "the group's committed offset is ahead of the changelog: starting from it"
                );
                return Ok((end, head));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn open_partition(&mut self, tp: &TopicPartition) -> Result<Partition<F::Op>> {
        let started = Instant::now();
        let path = self.store_path(tp);
        let cl_topic = changelog::topic_name(&self.group, &tp.topic);
        let mut store = PartitionStore::open(&path)?;
        let local = store.meta()?;
        let committed = self.replay.committed(tp)?;
        // Under `exactly-once` the group's offset is the truth the transactions committed;
        // the other modes commit it after the store, so it lags, and the store leads.
        let txn_offset = committed
            .as_ref()
            .filter(|c| self.txn.is_some() && replay::id_in(&c.metadata).is_none())
            .map(|c| c.offset);
        let hint = local.as_ref().map_or(0, |l| l.changelog_pos);
        let (cl_end, head) = match (&local, txn_offset) {
            (None, None) => (self.changelog_end(tp, &cl_topic)?, None),
            _ => self.changelog_head(tp, &cl_topic, hint, txn_offset)?,
        };
        // The local store is a cache: rebuild it when it is missing, when another instance
        // committed the partition since, or when it is ahead of the changelog (a crash between
        // its commit and the changelog write).
        let rebuild = match &local {
            None => cl_end > 0,
            Some(l) => !l.is_current(head.as_ref()),
        };
        if rebuild {
            drop(store);
            PartitionStore::destroy(&path)?;
            store = PartitionStore::open(&path)?;
            let (records, _) = changelog::restore(
                &self.reader,
                &mut store,
                &cl_topic,
                tp.partition,
                cl_end,
                metrics::restore_records,
            )?;
            tracing::info!(
                topic = tp.topic,
                partition = tp.partition,
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
        if let Some(c) = txn_offset.filter(|c| *c > meta.next_offset) {
            meta.next_offset = c;
        }
        let io = replay::Io {
            reader: &self.reader,
            producer: &self.plain,
            group: &self.group,
            tp,
        };
        let (store, replayed) =
            self.replay
                .honour(&self.factory, &io, store, &mut meta, committed.as_ref())?;
        let op = match replayed {
            Some(op) => op,
            None => self.factory.open(&tp.topic, tp.partition, &store)?,
        };
        metrics::state_bytes(tp, store.approximate_bytes());
        tracing::info!(
            topic = tp.topic,
            partition = tp.partition,
            next_offset = meta.next_offset,
            committed = committed.as_ref().map_or(-1, |c| c.offset),
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

    /// Finishes revoked partitions: waits for their changelog, marks them clean, returns the
    /// offsets to commit. `graceful` is false when the assignment was lost to another member.
    pub(super) fn close_partitions(
        &mut self,
        tps: &[TopicPartition],
        graceful: bool,
    ) -> Result<TopicPartitionList> {
        let mut commits = TopicPartitionList::new();
        for tp in tps {
            let Some(mut part) = self.partitions.remove(tp) else {
                continue;
            };
            if !graceful {
                tracing::warn!(
                    topic = tp.topic,
                    partition = tp.partition,
                    "partition lost: closing without commit"
                );
                continue;
            }
            part.settle_changelog()?;
            operator::flush(&mut part.op, &part.store, &mut part.changes, true)?;
            // Outputs found by a recovery scan but not re-encountered yet keep the partition
            // dirty, so the next owner scans for them again.
            part.meta.clean = part.already_written.is_empty();
            if self.txn.is_some() {
                if let Err(e) = self.close_in_transaction(tp, &mut part) {
                    // The last batch's commit stands; only the final flush is lost.
                    tracing::warn!(error = %e, topic = tp.topic, partition = tp.partition,
                        "closing commit failed: aborted");
                    if let Some(t) = self.txn.as_mut() {
                        t.abort()?;
                    }
                    continue;
                }
            } else if self.ids_mode() {
                part.commit_logged(&self.plain, &self.group, tp, "after_close_committed")?;
                part.settle_changelog()?;
                part.store.commit(&Changes::default(), &part.meta)?;
            } else {
                part.store.commit(&part.changes, &part.meta)?;
            }
            part.changes.clear();
            part.store.flush()?;
            add_commit(&mut commits, tp, part.meta.next_offset)?;
            tracing::info!(
                topic = tp.topic,
                partition = tp.partition,
                next_offset = part.meta.next_offset,
                "partition closed"
            );
        }
        Ok(commits)
    }

    /// Commits a closing partition's final changes in a transaction of their own.
    fn close_in_transaction(
        &mut self,
        tp: &TopicPartition,
        part: &mut Partition<F::Op>,
    ) -> Result<()> {
        self.begin()?;
        part.log_changes(&self.producer(), &self.group, tp)?;
        let mut offsets = TopicPartitionList::new();
        add_commit(&mut offsets, tp, part.meta.next_offset)?;
        self.commit_transaction(&offsets)?;
        failpoint::hit("after_close_committed");
        part.commit_local()
    }
}
