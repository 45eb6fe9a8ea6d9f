//! The operator API: what a service implements to run on the engine ([`crate::engine`]).
//! An operator sees one input partition at a time through a [`Ctx`]: its state, with the
//! batch's own writes visible, and a place to put outputs.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::OwnedMessage;

use crate::dlq::{Reason, Rejected};
use crate::error::{CoreError, Result};
use crate::record::Output;
use crate::side::SideTable;
use crate::store::{Changes, PartitionStore};

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
    /// Sends `rec` to `dlq_topic` for `rejected`'s reason, counted per stage and reason.
    pub fn dead_letter<R: Reason>(
        &mut self,
        rec: &OwnedMessage,
        dlq_topic: &str,
        rejected: &Rejected<R>,
    ) {
        self.emit(rejected.dead_letter(rec, dlq_topic))
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

/// Lets the operator write its caches into `changes`, as before every commit.
pub(crate) fn flush<O: Operator>(
    op: &mut O,
    store: &PartitionStore,
    changes: &mut Changes,
    closing: bool,
) -> Result<()> {
    let mut outputs = Vec::new();
    op.flush(&mut Ctx::new(store, changes, &mut outputs, false), closing)?;
    if outputs.is_empty() {
        Ok(())
    } else {
        Err(CoreError::Operator(
            "flush emitted outputs; only process may".into(),
        ))
    }
}
