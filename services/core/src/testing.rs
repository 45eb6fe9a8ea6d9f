//! Operators in-process, without a broker (feature `test-util`): one input partition over a
//! temporary RocksDB store, each batch committed to it as the engine would, outputs captured.
//! A rule change is then checked in seconds; the broker tests stay as integration tests.
//!
//! ```ignore
//! let mut p = OperatorHarness::open(&factory, "events", 0)?;
//! let out = p.process([Input::new("k", r#"{"id":"k"}"#).at(1_000)])?;
//! ```

use rdkafka::message::{OwnedHeaders, OwnedMessage, Timestamp};
use tempfile::TempDir;

use crate::error::Result;
use crate::operator::{self, Ctx, Operator, OperatorFactory};
use crate::record::Output;
use crate::store::{Changes, PartitionMeta, PartitionStore};
use crate::topic_partition::TopicPartition;

/// An input record to feed an operator; the harness numbers offsets.
#[derive(Debug, Clone, Default)]
pub struct Input {
    topic: Option<String>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Input {
    pub fn new(key: impl Into<Vec<u8>>, payload: impl Into<Vec<u8>>) -> Self {
        Input {
            key: Some(key.into()),
            payload: Some(payload.into()),
            ..Default::default()
        }
    }

    /// A record without a key.
    pub fn keyless(payload: impl Into<Vec<u8>>) -> Self {
        Input {
            payload: Some(payload.into()),
            ..Default::default()
        }
    }

    /// A record without a payload: a delete on a compacted topic.
    pub fn tombstone(key: impl Into<Vec<u8>>) -> Self {
        Input {
            key: Some(key.into()),
            ..Default::default()
        }
    }

    /// The record's create time, in milliseconds since the epoch.
    pub fn at(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Read from `topic` instead of the harness's partition topic (an operator that consumes
    /// several topics).
    pub fn on(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The record as a consumer would hand it over, from `partition` at `offset`.
    pub fn message(self, default_topic: &str, partition: i32, offset: i64) -> OwnedMessage {
        let headers = (!self.headers.is_empty()).then(|| {
            self.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v),
                })
            })
        });
        OwnedMessage::new(
            self.payload,
            self.key,
            self.topic.unwrap_or_else(|| default_topic.to_string()),
            self.timestamp_ms
                .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
            partition,
            offset,
            headers,
        )
    }
}

/// One input partition's operator over a temporary store.
pub struct OperatorHarness<O> {
    // Declared before `dir` so the store closes before its directory goes.
    store: PartitionStore,
    op: O,
    tp: TopicPartition,
    meta: PartitionMeta,
    _dir: TempDir,
}

impl<O: Operator> OperatorHarness<O> {
    /// Opens `factory`'s operator of `topic`/`partition` on an empty store.
    pub fn open<F>(factory: &F, topic: &str, partition: i32) -> Result<Self>
    where
        F: OperatorFactory<Op = O>,
    {
        let dir = tempfile::tempdir()?;
        let store = PartitionStore::open(&dir.path().join("state"))?;
        let op = factory.open(topic, partition, &store)?;
        Ok(OperatorHarness {
            store,
            op,
            tp: TopicPartition::new(topic, partition),
            meta: PartitionMeta::default(),
            _dir: dir,
        })
    }

    /// Processes `inputs` as one batch at the next offsets and commits it; returns the outputs
    /// in the order the operator emitted them.
    pub fn process(&mut self, inputs: impl IntoIterator<Item = Input>) -> Result<Vec<Output>> {
        let messages: Vec<OwnedMessage> = inputs
            .into_iter()
            .map(|input| {
                let m = input.message(&self.tp.topic, self.tp.partition, self.meta.next_offset);
                self.meta.next_offset += 1;
                m
            })
            .collect();
        self.batch(|op, ctx| messages.iter().try_for_each(|m| op.process(m, ctx)))
    }

    /// Shows side records to the operator (after the caller applied them to its factory's
    /// table, as the engine does) and commits; returns what it emitted.
    pub fn on_side(&mut self, records: &[OwnedMessage]) -> Result<Vec<Output>> {
        self.batch(|op, ctx| op.on_side(records, ctx))
    }

    /// Closes the partition as a revocation would (final flush and commit) and opens a new
    /// operator on the same store: what survives is what the store holds.
    pub fn reopen<F>(&mut self, factory: &F) -> Result<()>
    where
        F: OperatorFactory<Op = O>,
    {
        let mut changes = Changes::default();
        operator::flush(&mut self.op, &self.store, &mut changes, true)?;
        self.store.commit(&changes, &self.meta)?;
        self.op = factory.open(&self.tp.topic, self.tp.partition, &self.store)?;
        Ok(())
    }

    pub fn store(&self) -> &PartitionStore {
        &self.store
    }

    pub fn operator(&mut self) -> &mut O {
        &mut self.op
    }

    fn batch(&mut self, f: impl FnOnce(&mut O, &mut Ctx<'_>) -> Result<()>) -> Result<Vec<Output>> {
        let mut changes = Changes::default();
        let mut outputs = Vec::new();
        f(
            &mut self.op,
            &mut Ctx::new(&self.store, &mut changes, &mut outputs, false),
        )?;
        operator::flush(&mut self.op, &self.store, &mut changes, false)?;
        self.store.commit(&changes, &self.meta)?;
        Ok(outputs)
    }
}
