//! Operators in-process, without a broker (feature `test-util`): one input partition over a
//! temporary RocksDB store, each batch committed to it as the engine would, outputs captured.
//! A rule change is then checked in seconds; the broker tests stay as integration tests.
//!
//! ```ignore
//! let mut p = OperatorHarness::open(&factory, "events", 0)?;
//! let out = p.process([Input::new("k", r#"{"id":"k"}"#).at(1_000)])?;
//! assert_eq!(dlq_reason(&out[0]), Some("bad_json"));
//! ```
//!
//! A factory that keeps a side table under the service's state directory opens over
//! [`temp_service`]; [`OperatorHarness::side`] feeds that table and shows the records to the
//! operator, as the engine does.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{OwnedHeaders, OwnedMessage, Timestamp};
use tempfile::TempDir;

use crate::config::{Guarantee, LogFormat, ServiceArgs};
use crate::dlq;
use crate::error::{CoreError, Result};
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
    /// Next offset of each side topic's partition 0, for [`OperatorHarness::side`].
    side_offsets: BTreeMap<String, i64>,
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
            side_offsets: BTreeMap::new(),
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

    /// Applies `inputs` to `factory`'s side table as records of partition 0 of their topic
    /// (`Input::on`; default: the table's first topic) at the next offsets, then shows them
    /// to the operator as [`Self::on_side`] does; returns what it emitted.
    pub fn side<F>(
        &mut self,
        factory: &mut F,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Result<Vec<Output>>
    where
        F: OperatorFactory<Op = O>,
    {
        let table = factory
            .side_table()
            .ok_or_else(|| CoreError::Operator("the factory has no side table".into()))?;
        let default_topic = table.topics().into_iter().next().unwrap_or_default();
        let records: Vec<OwnedMessage> = inputs
            .into_iter()
            .map(|input| {
                let topic = input.topic.clone().unwrap_or_else(|| default_topic.clone());
                let next = self.side_offsets.entry(topic.clone()).or_insert(0);
                let m = input.message(&topic, 0, *next);
                *next += 1;
                m
            })
            .collect();
        table.apply(&records)?;
        self.on_side(&records)
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

    /// Opens a new operator on the same store without closing the old one, as a restart
    /// after a crash would: what survives is what the last batch committed, and no
    /// close-time cache (a Bloom snapshot) was written since.
    pub fn reopen_after_crash<F>(&mut self, factory: &F) -> Result<()>
    where
        F: OperatorFactory<Op = O>,
    {
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

/// Service settings over a fresh temporary state directory, for factories that keep side
/// tables under it; keep the directory alive as long as the factory.
pub fn temp_service(group: &str) -> Result<(TempDir, ServiceArgs)> {
    let dir = tempfile::tempdir()?;
    let args = ServiceArgs {
        group: group.to_string(),
        state_dir: dir.path().to_path_buf(),
        metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        log_format: LogFormat::Text,
        guarantee: Guarantee::ExactlyOnce,
        instance_id: None,
        batch_records: 5_000,
        batch_linger: Duration::from_millis(50),
        state_memory_mb: 64,
        group_stall: Duration::from_secs(60),
    };
    Ok((dir, args))
}

/// First value of an output's header, as text.
pub fn header<'o>(out: &'o Output, name: &str) -> Option<&'o str> {
    out.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The DLQ reason of an output (`sieve-dlq-reason`), `None` for anything but a DLQ record.
pub fn dlq_reason(out: &Output) -> Option<&str> {
    header(out, dlq::REASON)
}

/// The DLQ detail of an output (`sieve-dlq-detail`).
pub fn dlq_detail(out: &Output) -> Option<&str> {
    header(out, dlq::DETAIL)
}

/// An output's key as text (empty when it has none).
pub fn key_str(out: &Output) -> &str {
    out.key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
        .unwrap_or_default()
}

/// An output's payload parsed as JSON (`Null` for a tombstone or bytes that are not JSON).
pub fn json(out: &Output) -> serde_json::Value {
    out.payload
        .as_deref()
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or_default()
}
