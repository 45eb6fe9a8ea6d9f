//! Committing one input partition's progress: its state changes and meta go to the local
//! store in one RocksDB batch and, as one changelog group, to the changelog partition of the
//! same number. The commit id in the meta lets a later open see whether the group reached
//! the changelog before a crash (`PartitionMeta::is_current`).

use futures::executor::block_on;
use futures::future::join_all;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::changelog;
use crate::error::Result;
use crate::failpoint;
use crate::produce::{delivered, enqueue};
use crate::store::{Changes, PartitionMeta, PartitionStore};
use crate::topic_partition::TopicPartition;

/// Commits `changes` and `meta` under a fresh commit id to the local store, then queues the
/// same as a changelog group. `failpoint` names the moment in between, where a kill leaves
/// the store ahead of the changelog.
pub(crate) fn commit_logged(
    producer: &FutureProducer,
    group: &str,
    tp: &TopicPartition,
    store: &mut PartitionStore,
    changes: &Changes,
    meta: &mut PartitionMeta,
    failpoint: &str,
) -> Result<Vec<DeliveryFuture>> {
    meta.new_commit();
    let entries = changelog::encode(changes, meta)?;
    store.commit(changes, meta)?;
    failpoint::hit(failpoint);
    send_entries(producer, group, tp, &entries)
}

/// Queues the changelog group of one batch of input partition `tp` without a local commit
/// (a replay's wipe, whose local store is deleted next).
pub(crate) fn send_changelog_group(
    producer: &FutureProducer,
    group: &str,
    tp: &TopicPartition,
    changes: &Changes,
    meta: &mut PartitionMeta,
) -> Result<Vec<DeliveryFuture>> {
    let entries = changelog::encode(changes, meta)?;
    send_entries(producer, group, tp, &entries)
}

fn send_entries(
    producer: &FutureProducer,
    group: &str,
    tp: &TopicPartition,
    entries: &[changelog::Entry],
) -> Result<Vec<DeliveryFuture>> {
    let topic = changelog::topic_name(group, &tp.topic);
    entries
        .iter()
        .map(|(k, v)| {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&topic)
                .key(k)
                .partition(tp.partition);
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
