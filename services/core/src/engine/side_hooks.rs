//! Side tables on the engine: followed as partitions open, applied as records arrive, and
//! shown to the operators of the partitions they concern (see `side.rs`).

use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::TopicPartitionList;

use super::{Engine, Partition, Queued};
use crate::error::Result;
use crate::metrics;
use crate::operator::{Ctx, Operator, OperatorFactory};
use crate::produce::send_output;
use crate::side;
use crate::topic_partition::TopicPartition;

impl<F: OperatorFactory> Engine<F> {
    /// In co-partitioned mode, catches up and follows the side partitions that the open
    /// partitions and `new` ones need; in broadcast mode the side is followed from the start.
    pub(super) fn follow_side(&mut self, new: &[TopicPartition]) -> Result<()> {
        let (Some(side), Some(table)) = (self.side.as_mut(), self.factory.side_table()) else {
            return Ok(());
        };
        let inputs = self
            .partitions
            .keys()
            .chain(new)
            .map(|tp| tp.partition)
            .collect();
        self.health.restore_started();
        let res = side.catch_up_and_follow(&self.reader, table, &inputs);
        self.health.restore_finished();
        res.map(|_| ())
    }

    /// Shows each opened partition the side records between where it last saw the side and
    /// where the table stands, then commits it. A partition with no state starts level.
    pub(super) fn reconcile_side(&mut self, opened: &[TopicPartition]) -> Result<()> {
        let (Some(side), Some(table)) = (self.side.as_ref(), self.factory.side_table()) else {
            return Ok(());
        };
        let positions = table.positions();
        let producer = self.producer();
        if let Some(t) = self.txn.as_mut() {
            t.begin()?;
        }
        let mut queued: Queued = Vec::new();
        for tp in opened {
            let Some(part) = self.partitions.get_mut(tp) else {
                continue;
            };
            let fresh = part.meta.next_offset < 0;
            for stp in side.serving(tp.partition) {
                let Some(&to) = positions.get(stp) else {
                    continue;
                };
                let from = match part.meta.side_pos.get(stp) {
                    Some(f) => *f,
                    None if fresh => to,
                    None => 0,
                };
                if from < to {
                    side::replay(&self.reader, stp, from, to, |chunk| {
                        metrics::side_replayed_records(chunk.len());
                        show_side(&producer, tp, part, chunk, &mut queued)
                    })?;
                }
                part.meta.side_pos.insert(stp.clone(), to);
            }
        }
        self.finish_batch(queued, opened).map(|_| ())
    }

    /// Applies side records to the table, then shows them to every open partition they
    /// concern; returns the offsets to commit to the group.
    pub(super) fn process_side(
        &mut self,
        records: Vec<OwnedMessage>,
    ) -> Result<TopicPartitionList> {
        let (Some(side), Some(table)) = (self.side.as_ref(), self.factory.side_table()) else {
            return Ok(TopicPartitionList::new());
        };
        table.apply(&records)?;
        metrics::side_records(records.len());
        let producer = self.producer();
        if let Some(t) = self.txn.as_mut() {
            t.begin()?;
        }
        let mut queued: Queued = Vec::new();
        let mut touched = Vec::new();
        for (tp, part) in self.partitions.iter_mut() {
            let serving: Vec<&TopicPartition> = side.serving(tp.partition).collect();
            let mine: Vec<OwnedMessage> = records
                .iter()
                .filter(|m| serving.iter().any(|stp| stp.holds(*m)))
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            for m in &mine {
                part.meta
                    .side_pos
                    .insert(TopicPartition::of(m), m.offset() + 1);
            }
            show_side(&producer, tp, part, &mine, &mut queued)?;
            touched.push(tp.clone());
        }
        self.finish_batch(queued, &touched)
    }
}

/// Shows side records to one partition's operator and queues what it emits (without ids: side
/// outputs are exactly-once only in a transaction, at-least-once in the other modes).
fn show_side<O: Operator>(
    producer: &FutureProducer,
    tp: &TopicPartition,
    part: &mut Partition<O>,
    records: &[OwnedMessage],
    queued: &mut Queued,
) -> Result<()> {
    let mut outputs = Vec::new();
    let mut ctx = Ctx::new(&part.store, &mut part.changes, &mut outputs, false);
    part.op.on_side(records, &mut ctx)?;
    for out in outputs {
        let fut = send_output(producer, &out, None)?;
        queued.push(((tp.clone(), out.topic), fut));
    }
    Ok(())
}
