//! The recovery scan: after a crash between producing a batch's outputs and committing it,
//! finds the outputs an input partition already wrote, so re-processing produces only the
//! missing ones; then records scan positions before any new output.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::message::Message;

use super::Engine;
use crate::commit::{commit_logged, settle_changelog};
use crate::error::Result;
use crate::metrics;
use crate::operator::OperatorFactory;
use crate::read;
use crate::record::OutputId;
use crate::store::Changes;
use crate::topic_partition::TopicPartition;

impl<F: OperatorFactory> Engine<F> {
    /// Finds outputs written by the opened partitions after their last commit, then records
    /// scan positions (durably, in the store and the changelog) before any new output.
    pub(super) fn recover(&mut self, opened: &[TopicPartition]) -> Result<()> {
        if opened.is_empty() {
            return Ok(());
        }
        // Low and high watermark of every output partition.
        let mut ends: BTreeMap<TopicPartition, (i64, i64)> = BTreeMap::new();
        for out in &self.output_tps {
            ends.insert(out.clone(), read::watermarks(&self.reader, out)?);
        }
        let dirty: Vec<&TopicPartition> = opened
            .iter()
            .filter(|tp| self.partitions.get(*tp).is_some_and(|p| !p.meta.clean))
            .collect();
        if !dirty.is_empty() {
            let started = Instant::now();
            let mut scanned = 0u64;
            for (out, (low, high)) in &ends {
                // One read per output partition serves every dirty input partition.
                let from = dirty
                    .iter()
                    .filter_map(|tp| self.partitions.get(*tp))
                    .map(|part| part.meta.out_pos.get(out).copied().unwrap_or(*low))
                    .min()
                    .unwrap_or(*high)
                    .max(*low);
                let parts = &mut self.partitions;
                read::read_range(
                    &self.reader,
                    &out.topic,
                    out.partition,
                    from,
                    *high,
                    Duration::from_secs(30),
                    |m| {
                        scanned += 1;
                        let Some(id) = OutputId::of(m) else {
                            return Ok(());
                        };
                        let Some(part) =
                            parts.get_mut(&TopicPartition::new(id.topic, id.partition))
                        else {
                            return Ok(());
                        };
                        let start = part.meta.out_pos.get(out).copied().unwrap_or(*low);
                        if !part.meta.clean
                            && m.offset() >= start
                            && id.offset >= part.meta.next_offset
                        {
                            part.already_written
                                .insert((id.offset, id.index), m.payload().is_none());
                            part.already_written_max = part.already_written_max.max(id.offset);
                        }
                        Ok(())
                    },
                )?;
            }
            metrics::recovery_scanned_records(scanned);
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
            for (out, (low, high)) in &ends {
                if part.already_written.is_empty() || !part.meta.out_pos.contains_key(out) {
                    let pos = if part.already_written.is_empty() {
                        *high
                    } else {
                        *low
                    };
                    part.meta.out_pos.insert(out.clone(), pos);
                }
            }
            part.meta.clean = false;
            pending.extend(commit_logged(
                &self.plain,
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
}
