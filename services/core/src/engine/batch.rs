//! One batch: each record through its partition's operator, outputs produced with their ids
//! (skipping those a recovery scan found already written), then each touched partition
//! committed: in one Kafka transaction with the outputs and then locally (`exactly-once`),
//! or locally and then to the changelog once every output is acknowledged (the other modes).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::future::join_all;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, Producer};
use rdkafka::TopicPartitionList;

use super::{add_commit, Engine, Queued};
use crate::error::{CoreError, Result};
use crate::failpoint;
use crate::metrics::{self, Skipped};
use crate::operator::{self, Ctx, Operator, OperatorFactory};
use crate::produce::{delivered, send_output};
use crate::record::OutputId;
use crate::topic_partition::TopicPartition;

impl<F: OperatorFactory> Engine<F> {
    /// Processes what one poll brought: side records first, then the batch. Returns the
    /// offsets to commit to the group (none under `exactly-once`: transactions commit them).
    pub(super) fn process_polled(
        &mut self,
        side_records: Vec<OwnedMessage>,
        batch: &mut Vec<OwnedMessage>,
    ) -> Result<Vec<TopicPartitionList>> {
        let mut commits = Vec::new();
        if !side_records.is_empty() {
            commits.push(self.process_side(side_records)?);
        }
        if !batch.is_empty() {
            commits.push(self.process_batch(batch)?);
        }
        Ok(commits)
    }

    /// Processes one batch to completion; returns the offsets to commit to the group.
    fn process_batch(&mut self, batch: &mut Vec<OwnedMessage>) -> Result<TopicPartitionList> {
        let started = Instant::now();
        self.begin()?;
        let producer = self.producer();
        let mut queued: Queued = Vec::with_capacity(batch.len());
        let mut touched: Vec<TopicPartition> = Vec::new();
        let mut outputs = Vec::new();
        let mut in_counts: HashMap<String, u64> = HashMap::new();
        let (mut skipped_processed, mut skipped_written) = (0u64, 0u64);
        for msg in batch.drain(..) {
            let tp = TopicPartition::of(&msg);
            let Some(part) = self.partitions.get_mut(&tp) else {
                continue;
            };
            if part.meta.next_offset >= 0 && msg.offset() < part.meta.next_offset {
                skipped_processed += 1;
                continue;
            }
            *in_counts.entry(tp.topic.clone()).or_default() += 1;
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
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    offset: msg.offset(),
                    index,
                };
                let fut = send_output(&producer, &out, Some(&id))?;
                queued.push(((tp.clone(), out.topic), fut));
            }
            part.meta.next_offset = msg.offset() + 1;
            if touched.last() != Some(&tp) && !touched.contains(&tp) {
                touched.push(tp);
            }
        }
        failpoint::hit("after_produce");
        let commits = self.finish_batch(queued, &touched)?;
        for (t, n) in in_counts {
            metrics::records_in(t, n);
        }
        if skipped_processed > 0 {
            metrics::records_skipped(Skipped::AlreadyProcessed, skipped_processed);
        }
        if skipped_written > 0 {
            metrics::records_skipped(Skipped::AlreadyWritten, skipped_written);
        }
        metrics::batch_duration(started.elapsed().as_secs_f64());
        Ok(commits)
    }

    /// Commits a batch whose outputs are queued; returns the offsets to commit to the group.
    pub(super) fn finish_batch(
        &mut self,
        queued: Queued,
        touched: &[TopicPartition],
    ) -> Result<TopicPartitionList> {
        if self.txn.is_some() {
            self.finish_transaction(queued, touched)?;
            return Ok(TopicPartitionList::new());
        }
        self.finish_acknowledged(queued, touched)
    }

    /// `exactly-once`: each touched partition's changelog group joins the outputs in the open
    /// transaction, with the input offsets; once Kafka committed it, the stores follow. A
    /// crash before the local commit leaves a store behind the changelog, which the next open
    /// rebuilds; a failure before Kafka's commit is undone by the abort.
    fn finish_transaction(&mut self, queued: Queued, touched: &[TopicPartition]) -> Result<()> {
        let producer = self.producer();
        let mut offsets = TopicPartitionList::new();
        for tp in touched {
            let Some(part) = self.partitions.get_mut(tp) else {
                continue;
            };
            operator::flush(&mut part.op, &part.store, &mut part.changes, false)?;
            part.log_changes(&producer, &self.group, tp)?;
            add_commit(&mut offsets, tp, part.meta.next_offset)?;
        }
        // Every record of the transaction reaches the broker first (commit would flush them
        // too), so a crash here leaves them in the log, for the abort to hide.
        producer
            .flush(Duration::from_secs(30))
            .map_err(|e| CoreError::Transaction {
                context: "flush".into(),
                source: e,
            })?;
        failpoint::hit("before_commit");
        self.commit_transaction(&offsets)?;
        tracing::debug!(offsets = ?offsets_of(&offsets), "transaction committed");
        // Flushed and committed: every delivery future is resolved.
        let mut out_counts: HashMap<String, u64> = HashMap::new();
        for ((_, out_topic), r) in queued.into_iter().map(|(dest, fut)| (dest, block_on(fut))) {
            delivered(r)?;
            *out_counts.entry(out_topic).or_default() += 1;
        }
        failpoint::hit("after_outputs_acked");
        for tp in touched {
            if let Some(part) = self.partitions.get_mut(tp) {
                part.commit_local()?;
            }
        }
        failpoint::hit("after_state_committed");
        for (t, n) in out_counts {
            metrics::records_out(t, n);
        }
        Ok(())
    }

    /// The other modes: waits for a batch's outputs (and the touched partitions' previous
    /// changelog), then commits each touched partition; returns the offsets to commit.
    fn finish_acknowledged(
        &mut self,
        queued: Queued,
        touched: &[TopicPartition],
    ) -> Result<TopicPartitionList> {
        let mut out_counts: HashMap<String, u64> = HashMap::new();
        let (dests, futs): (Vec<(TopicPartition, String)>, Vec<DeliveryFuture>) =
            queued.into_iter().unzip();
        let results = block_on(join_all(futs));
        for ((tp, out_topic), r) in dests.into_iter().zip(results) {
            let (out_partition, out_offset) = delivered(r)?;
            if let Some(part) = self.partitions.get_mut(&tp) {
                let acked = part
                    .acked
                    .entry(TopicPartition::new(out_topic.as_str(), out_partition))
                    .or_insert(-1);
                *acked = (*acked).max(out_offset);
            }
            *out_counts.entry(out_topic).or_default() += 1;
        }
        for tp in touched {
            if let Some(part) = self.partitions.get_mut(tp) {
                part.settle_changelog()?;
            }
        }
        failpoint::hit("after_outputs_acked");
        // Every output of the next batch lands after every output acked now, whichever
        // partition wrote it: a scan floor for all touched partitions, so output partitions a
        // partition never writes to (with key-preserving partitioning, most of them) do not
        // keep the floor of its first open and make its recovery scan read their whole history.
        let mut floors: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for tp in touched {
            for (out, off) in self.partitions.get(tp).into_iter().flat_map(|p| &p.acked) {
                let f = floors.entry(out.clone()).or_insert(-1);
                *f = (*f).max(off + 1);
            }
        }
        let mut commits = TopicPartitionList::new();
        let ids_mode = self.ids_mode();
        let producer = self.producer();
        for tp in touched {
            let Some(part) = self.partitions.get_mut(tp) else {
                continue;
            };
            if !part.already_written.is_empty() && part.already_written_max < part.meta.next_offset
            {
                // Every input whose outputs the scan found has been re-processed.
                part.already_written.clear();
            }
            operator::flush(&mut part.op, &part.store, &mut part.changes, false)?;
            part.acked.clear();
            if part.already_written.is_empty() {
                for (out, floor) in &floors {
                    let pos = part.meta.out_pos.entry(out.clone()).or_insert(*floor);
                    *pos = (*pos).max(*floor);
                }
            }
            if ids_mode || !part.changes.is_empty() {
                part.commit_logged(&producer, &self.group, tp, "after_state_committed")?;
            } else {
                part.store.commit(&part.changes, &part.meta)?;
            }
            part.changes.clear();
            add_commit(&mut commits, tp, part.meta.next_offset)?;
        }
        for (t, n) in out_counts {
            metrics::records_out(t, n);
        }
        Ok(commits)
    }
}

/// `topic/partition@offset` of each element, for the log.
fn offsets_of(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset().to_raw()))
        .collect()
}
