//! The right side as this instance holds it: keys in RocksDB with a Bloom filter in front,
//! and how far each right partition has been applied, committed atomically with the keys.
//! A side table of the core runtime (see `sieve_core::side`), so it is loaded to the end of
//! the right topic before any left record is judged, then followed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::message::{Message, OwnedMessage};
use sieve_core::bloom::KeyBloom;
use sieve_core::side::{SideMode, SideTable};
use sieve_core::store::{Changes, PartitionMeta, PartitionStore, DEFAULT_CF};
use sieve_core::topic_partition::TopicPartition;
use sieve_core::Result;

use super::metrics as m;

/// Right keys live under this prefix; nothing else is in the default column family.
const KEY_PREFIX: u8 = b'k';
const BLOOM_LOCAL_KEY: &[u8] = b"antijoin.right.bloom";
const BLOOM_CLEAN_KEY: &[u8] = b"antijoin.right.bloom.clean";

fn stored_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(KEY_PREFIX);
    k.extend_from_slice(key);
    k
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    bloom: KeyBloom,
    keys: u64,
}

pub struct RightView {
    topic: String,
    mode: SideMode,
    store: PartitionStore,
    meta: PartitionMeta,
    bloom: KeyBloom,
    bloom_fp: f64,
    keys: u64,
    /// Deleted keys still set in the Bloom filter; past the live key count it is rebuilt.
    stale: u64,
    snapshot_valid_on_disk: bool,
}

impl RightView {
    pub fn open(path: &Path, topic: &str, mode: SideMode, bloom_fp: f64) -> Result<Self> {
        let store = PartitionStore::open(path)?;
        let meta = store.meta()?.unwrap_or_default();
        let clean = store.get_local(BLOOM_CLEAN_KEY)?.as_deref() == Some(&[1u8][..]);
        let saved = match store.get_local(BLOOM_LOCAL_KEY)? {
            Some(bytes) if clean => Some(sieve_core::bloom::decode::<Snapshot>(&bytes)?),
            _ => None,
        };
        let mut view = RightView {
            topic: topic.to_string(),
            mode,
            store,
            meta,
            bloom: KeyBloom::new(bloom_fp, 1_000_000),
            bloom_fp,
            keys: 0,
            stale: 0,
            snapshot_valid_on_disk: clean,
        };
        match saved {
            Some(s) => {
                view.bloom = s.bloom;
                view.keys = s.keys;
            }
            None => view.rebuild_bloom()?,
        }
        m::right_keys(view.keys);
        Ok(view)
    }

    fn rebuild_bloom(&mut self) -> Result<()> {
        let mut bloom = KeyBloom::new(self.bloom_fp, (self.keys as usize).max(1_000_000));
        let mut keys = 0u64;
        self.store
            .for_each_prefix(DEFAULT_CF, &[KEY_PREFIX], |k, _| {
                bloom.insert(&k[1..]);
                keys += 1;
                Ok(())
            })?;
        self.bloom = bloom;
        self.keys = keys;
        self.stale = 0;
        tracing::info!(keys, "right-side Bloom filter built from RocksDB");
        Ok(())
    }

    /// Whether `key` is on the right; RocksDB is read only when the Bloom filter says maybe.
    pub fn contains(&mut self, key: &[u8]) -> Result<bool> {
        if !self.bloom.may_contain(key) {
            m::bloom_negative();
            return Ok(false);
        }
        let present = self
            .store
            .get(&Changes::default(), DEFAULT_CF, &stored_key(key))?
            .is_some();
        self.bloom.record_store_answer(present);
        if !present {
            m::bloom_false_positive();
        }
        Ok(present)
    }

    pub fn keys(&self) -> u64 {
        self.keys
    }

    fn apply(&mut self, records: &[OwnedMessage]) -> Result<()> {
        let mut changes = Changes::default();
        for rec in records {
            self.meta
                .side_pos
                .insert(TopicPartition::of(rec), rec.offset() + 1);
            let Some(key) = rec.key() else {
                m::right_unkeyed();
                continue;
            };
            let k = stored_key(key);
            let existed = self.store.get(&changes, DEFAULT_CF, &k)?.is_some();
            match (rec.payload().is_some(), existed) {
                (true, false) => {
                    changes.put(DEFAULT_CF, &k, b"");
                    self.bloom.insert(key);
                    self.keys += 1;
                }
                (false, true) => {
                    changes.delete(DEFAULT_CF, &k);
                    self.keys = self.keys.saturating_sub(1);
                    self.stale += 1;
                }
                _ => {}
            }
        }
        if self.snapshot_valid_on_disk {
            changes.put_local(BLOOM_CLEAN_KEY, vec![0]);
            self.snapshot_valid_on_disk = false;
        }
        self.store.commit(&changes, &self.meta)?;
        if self.stale > self.keys.max(100_000) {
            self.rebuild_bloom()?;
        }
        m::right_keys(self.keys);
        self.bloom.publish("antijoin_right");
        Ok(())
    }

    /// Saves the Bloom filter so a clean restart does not rescan the keys.
    fn save_snapshot(&mut self) -> Result<()> {
        let snap = Snapshot {
            bloom: self.bloom.clone(),
            keys: self.keys,
        };
        let mut changes = Changes::default();
        changes.put_local(BLOOM_LOCAL_KEY, sieve_core::bloom::encode(&snap)?);
        changes.put_local(BLOOM_CLEAN_KEY, vec![1]);
        self.store.commit(&changes, &self.meta)?;
        self.snapshot_valid_on_disk = true;
        self.store.flush()
    }
}

/// The view shared by the runtime (which feeds it) and every partition's operator (which
/// reads it). All of them run on the runtime's one processing thread; the lock is never
/// contended.
#[derive(Clone)]
pub struct SharedView(Arc<Mutex<RightView>>);

impl SharedView {
    pub fn new(view: RightView) -> Self {
        SharedView(Arc::new(Mutex::new(view)))
    }

    pub fn lock(&self) -> MutexGuard<'_, RightView> {
        // A panic while holding the lock cannot leave RocksDB half-written (commits are
        // atomic); at worst the Bloom filter has extra keys, which only costs reads.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SideTable for SharedView {
    fn topics(&self) -> Vec<String> {
        vec![self.lock().topic.clone()]
    }

    fn mode(&self) -> SideMode {
        self.lock().mode
    }

    fn positions(&self) -> BTreeMap<TopicPartition, i64> {
        self.lock().meta.side_pos.clone()
    }

    fn apply(&mut self, records: &[OwnedMessage]) -> Result<()> {
        self.lock().apply(records)
    }

    fn close(&mut self) -> Result<()> {
        self.lock().save_snapshot()
    }
}
