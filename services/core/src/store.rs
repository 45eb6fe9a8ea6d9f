//! RocksDB state of one input partition: point reads and writes, prefix scans, time buckets
//! that are dropped whole, and the partition's progress (`PartitionMeta`) written in the same
//! atomic batch as the state it describes.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBatch, WriteBufferManager, DB,
};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::topic_partition::TopicPartition;

/// Column family of the operator's main state.
pub const DEFAULT_CF: &str = "default";
/// Column family of sieve's bookkeeping; never part of the changelog.
const META_CF: &str = "sieve.meta";
/// Column family of local caches (Bloom snapshots…): committed atomically with the state but
/// never sent to the changelog, because they can be rebuilt from the state.
pub const LOCAL_CF: &str = "sieve.local";
const META_KEY: &[u8] = b"meta";
const BUCKET_PREFIX: &str = "bucket.";

/// Where processing of one input partition stands. Stored atomically with the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// The next input offset to process.
    pub next_offset: i64,
    /// Per output partition, the offset from which a recovery scan must
    /// look for outputs of this input partition that were written but not yet recorded here.
    pub out_pos: BTreeMap<TopicPartition, i64>,
    /// Changelog offset up to which this store reflects the changelog.
    pub changelog_pos: i64,
    /// True when the partition was closed cleanly: nothing can be in flight.
    pub clean: bool,
    /// Buckets whose drop was decided; dropped again at open if a crash interrupted it.
    #[serde(default)]
    pub drop_pending: Vec<String>,
    /// Per side partition, the next side offset this store has seen
    /// (see `side.rs`).
    #[serde(default)]
    pub side_pos: BTreeMap<TopicPartition, i64>,
    /// Ids of the replays (`sieve ctl replay`) this partition has honoured, oldest first
    /// (see `replay.rs`).
    #[serde(default)]
    pub replays: Vec<String>,
    /// A random id of the last commit that was also sent to the changelog: a store is
    /// current only when the changelog's last group carries the same id (see
    /// [`PartitionMeta::is_current`]). 0 for a store that never sent a group.
    #[serde(default)]
    pub commit: u64,
    /// Per time-bucket column family, how many changelog packs hold its writes (their keys
    /// are numbered from 0): the tombstones its drop must send (see `changelog.rs`).
    #[serde(default)]
    pub packs: BTreeMap<String, u64>,
}

impl PartitionMeta {
    /// Gives the meta a fresh commit id, for a commit that is about to be sent to the changelog.
    pub fn new_commit(&mut self) {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // Random keys per process, a counter within it: distinct across instances and restarts.
        let id = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
        self.commit = id.max(1);
    }

    /// Whether a local store with this meta may be used as is, given `head`, the meta of the
    /// changelog's last complete group. It may not when another instance advanced or rewound
    /// the partition since (the head is a later commit), nor when a crash lost the group of the
    /// store's own last commit (the store is ahead of anything another instance could restore,
    /// and staying ahead would leave those changes out of the changelog for good).
    pub fn is_current(&self, head: Option<&PartitionMeta>) -> bool {
        match head {
            Some(h) => h.commit == self.commit,
            None => self.commit == 0,
        }
    }
}

/// The net write set of one batch, with read-your-writes through `PartitionStore::get`.
#[derive(Debug, Default)]
pub struct Changes {
    writes: BTreeMap<(String, Vec<u8>), Option<Vec<u8>>>,
    drops: BTreeSet<String>,
    local: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Changes {
    pub fn put(&mut self, cf: &str, key: &[u8], value: &[u8]) {
        self.writes
            .insert((cf.to_string(), key.to_vec()), Some(value.to_vec()));
    }

    /// A local-only write (see [`LOCAL_CF`]).
    pub fn put_local(&mut self, key: &[u8], value: Vec<u8>) {
        self.local.insert(key.to_vec(), value);
    }

    pub fn delete(&mut self, cf: &str, key: &[u8]) {
        self.writes.insert((cf.to_string(), key.to_vec()), None);
    }

    /// Drops a whole bucket, including writes to it earlier in this batch.
    pub fn drop_bucket(&mut self, bucket: &str) {
        let cf = bucket_cf(bucket);
        self.writes.retain(|(c, _), _| c != &cf);
        self.drops.insert(cf);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.drops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.writes.len() + self.drops.len()
    }

    pub fn clear(&mut self) {
        self.writes.clear();
        self.drops.clear();
        self.local.clear();
    }

    pub(crate) fn writes(&self) -> impl Iterator<Item = (&str, &[u8], Option<&[u8]>)> {
        self.writes
            .iter()
            .map(|((cf, k), v)| (cf.as_str(), k.as_slice(), v.as_deref()))
    }

    pub(crate) fn drops(&self) -> impl Iterator<Item = &str> {
        self.drops.iter().map(String::as_str)
    }

    fn lookup(&self, cf: &str, key: &[u8]) -> Option<Option<&[u8]>> {
        if self.drops.contains(cf) {
            return Some(None);
        }
        // BTreeMap lookup with a borrowed tuple key needs an owned key; batches are small.
        self.writes
            .get(&(cf.to_string(), key.to_vec()))
            .map(|v| v.as_deref())
    }
}

/// Column family name of a time bucket.
pub fn bucket_cf(bucket: &str) -> String {
    format!("{BUCKET_PREFIX}{bucket}")
}

/// Name of the bucket with numeric id `id` (a time window's number), fixed width so that
/// the names of non-negative ids sort as the ids do.
pub fn bucket_name(id: i64) -> String {
    format!("{id:020}")
}

/// A big-endian i64 as operators store them (watermarks, clocks, hashes).
pub fn i64_of(v: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(v).ok().map(i64::from_be_bytes)
}

/// The bucket whose column family `cf` is, if it is one: written while its time is live,
/// then dropped whole.
pub fn bucket_of(cf: &str) -> Option<&str> {
    cf.strip_prefix(BUCKET_PREFIX)
}

/// RocksDB memory shared by every store of the process: one block cache, and memtables
/// charged to it by a write-buffer manager, so state memory is bounded by one number however
/// many partitions (and column families) a process holds.
struct SharedMemory {
    cache: Cache,
    write_buffers: WriteBufferManager,
}

static MEMORY_BUDGET: OnceLock<u64> = OnceLock::new();
static SHARED: OnceLock<Mutex<SharedMemory>> = OnceLock::new();

/// Default state memory budget of a process (block cache plus memtables).
pub const DEFAULT_MEMORY_BUDGET: u64 = 64 << 20;

/// Sets the process-wide RocksDB memory budget; the first call wins, later calls and calls
/// after the first store opened are ignored.
pub fn set_memory_budget(bytes: u64) {
    let _ = MEMORY_BUDGET.set(bytes.max(8 << 20));
}

fn options() -> Options {
    let shared = SHARED.get_or_init(|| {
        let budget = *MEMORY_BUDGET.get_or_init(|| DEFAULT_MEMORY_BUDGET) as usize;
        let cache = Cache::new_lru_cache(budget);
        // Memtables may use up to half of the budget before writers flush.
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            budget / 2,
            false,
            cache.clone(),
        );
        Mutex::new(SharedMemory {
            cache,
            write_buffers,
        })
    });
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_write_buffer_size(4 << 20);
    opts.set_max_write_buffer_number(2);
    if let Ok(shared) = shared.lock() {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&shared.cache);
        // Index and filter blocks grow with the data; charge them to the bounded cache.
        table.set_cache_index_and_filter_blocks(true);
        opts.set_block_based_table_factory(&table);
        opts.set_write_buffer_manager(&shared.write_buffers);
    }
    opts
}

pub struct PartitionStore {
    db: DB,
    path: PathBuf,
}

impl PartitionStore {
    /// Opens (or creates) the store at `path` with every column family it already has.
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        let opts = options();
        let mut cfs: BTreeSet<String> = DB::list_cf(&opts, path)
            .unwrap_or_default()
            .into_iter()
            .collect();
        cfs.insert(DEFAULT_CF.to_string());
        cfs.insert(META_CF.to_string());
        cfs.insert(LOCAL_CF.to_string());
        let descs = cfs
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(n, opts.clone()));
        let db = DB::open_cf_descriptors(&opts, path, descs).map_err(|e| store_err(path, e))?;
        let mut store = PartitionStore {
            db,
            path: path.to_path_buf(),
        };
        if let Some(meta) = store.meta()? {
            for cf in &meta.drop_pending {
                store.drop_cf_if_exists(cf)?;
            }
        }
        Ok(store)
    }

    /// Deletes the store at `path` completely (used before a full restore).
    pub fn destroy(path: &Path) -> Result<()> {
        if path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: rocksdb::Error) -> CoreError {
        store_err(&self.path, e)
    }

    pub fn meta(&self) -> Result<Option<PartitionMeta>> {
        let cf = self.cf(META_CF)?;
        match self.db.get_cf(cf, META_KEY).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CoreError::Corrupt(format!("{}: meta: {e}", self.path.display()))),
        }
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| {
            CoreError::Corrupt(format!(
                "{}: missing column family {name}",
                self.path.display()
            ))
        })
    }

    /// Reads a value, seeing `pending` writes of the current batch first.
    pub fn get(&self, pending: &Changes, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = pending.lookup(cf, key) {
            return Ok(v.map(<[u8]>::to_vec));
        }
        match self.db.cf_handle(cf) {
            None => Ok(None),
            Some(h) => self.db.get_cf(h, key).map_err(|e| self.err(e)),
        }
    }

    /// A local-only value (see [`LOCAL_CF`]).
    pub fn get_local(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(LOCAL_CF)?, key)
            .map_err(|e| self.err(e))
    }

    /// Visits committed entries whose key starts with `prefix`, in key order, without
    /// collecting them. Does not see the current batch's writes.
    pub fn for_each_prefix(
        &self,
        cf: &str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let Some(h) = self.db.cf_handle(cf) else {
            return Ok(());
        };
        for item in self.db.prefix_iterator_cf(h, prefix) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Visits committed entries with `prefix` from key `from` on, in key order, while `f`
    /// returns true.
    pub fn scan_from(
        &self,
        cf: &str,
        prefix: &[u8],
        from: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let Some(h) = self.db.cf_handle(cf) else {
            return Ok(());
        };
        let start = if from < prefix { prefix } else { from };
        let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(h, mode) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Committed entries whose key starts with `prefix`, in key order (small ranges only).
    pub fn scan_prefix(&self, cf: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.for_each_prefix(cf, prefix, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Names of the time buckets that exist, oldest name first.
    pub fn buckets(&self) -> Vec<String> {
        let opts = Options::default();
        let mut names: Vec<String> = DB::list_cf(&opts, &self.path)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| bucket_of(&n).map(str::to_string))
            .filter(|n| self.db.cf_handle(&bucket_cf(n)).is_some())
            .collect();
        names.sort();
        names
    }

    /// Column families of operator state other than time buckets (the changelog's contents
    /// besides buckets).
    pub fn state_cfs(&self) -> Vec<String> {
        DB::list_cf(&Options::default(), &self.path)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n != META_CF && n != LOCAL_CF && bucket_of(n).is_none())
            .filter(|n| self.db.cf_handle(n).is_some())
            .collect()
    }

    /// Applies one batch's changes and the new meta atomically, then drops whole buckets.
    pub fn commit(&mut self, changes: &Changes, meta: &PartitionMeta) -> Result<()> {
        let mut meta = meta.clone();
        meta.drop_pending = changes.drops().map(str::to_string).collect();
        for (cf, _, _) in changes.writes() {
            if self.db.cf_handle(cf).is_none() {
                self.db
                    .create_cf(cf, &options())
                    .map_err(|e| store_err(&self.path, e))?;
            }
        }
        let mut batch = WriteBatch::default();
        for (cf, k, v) in changes.writes() {
            let h = self.cf(cf)?;
            match v {
                Some(v) => batch.put_cf(h, k, v),
                None => batch.delete_cf(h, k),
            }
        }
        for (k, v) in &changes.local {
            batch.put_cf(self.cf(LOCAL_CF)?, k, v);
        }
        let meta_bytes = serde_json::to_vec(&meta)
            .map_err(|e| CoreError::Corrupt(format!("encode meta: {e}")))?;
        batch.put_cf(self.cf(META_CF)?, META_KEY, meta_bytes);
        self.db.write(batch).map_err(|e| self.err(e))?;
        for cf in &meta.drop_pending {
            self.drop_cf_if_exists(cf)?;
        }
        Ok(())
    }

    fn drop_cf_if_exists(&mut self, cf: &str) -> Result<()> {
        if self.db.cf_handle(cf).is_some() {
            self.db.drop_cf(cf).map_err(|e| store_err(&self.path, e))?;
        }
        Ok(())
    }

    /// Estimated live bytes of the state, for the state-size gauge.
    pub fn approximate_bytes(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.estimate-live-data-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Flushes memtables so a clean close leaves nothing to replay from the WAL.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(|e| self.err(e))
    }
}

fn store_err(path: &Path, e: rocksdb::Error) -> CoreError {
    CoreError::Store {
        path: path.display().to_string(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_current_only_when_the_changelog_ends_with_its_last_commit() {
        let mut local = PartitionMeta::default();
        assert!(local.is_current(None), "nothing ever sent, nothing to miss");
        local.new_commit();
        let mut head = local.clone();
        assert!(local.is_current(Some(&head)));
        // The group of the store's own last commit was lost in a crash.
        assert!(!local.is_current(None));
        let mut older = local.clone();
        older.new_commit();
        local.new_commit();
        assert!(!local.is_current(Some(&older)));
        // Another instance committed after it (advanced, or rewound by a replay).
        head.new_commit();
        assert_ne!(head.commit, local.commit);
        assert!(!local.is_current(Some(&head)));
    }

    #[test]
    fn batch_reads_its_own_writes_and_commits_atomically_with_meta() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PartitionStore::open(dir.path()).unwrap();
        let mut c = Changes::default();
        c.put(DEFAULT_CF, b"a", b"1");
        assert_eq!(
            s.get(&c, DEFAULT_CF, b"a").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(s.get(&Changes::default(), DEFAULT_CF, b"a").unwrap(), None);
        let meta = PartitionMeta {
            next_offset: 7,
            ..Default::default()
        };
        s.commit(&c, &meta).unwrap();
        drop(s);
        let s = PartitionStore::open(dir.path()).unwrap();
        assert_eq!(s.meta().unwrap().unwrap().next_offset, 7);
        assert_eq!(
            s.get(&Changes::default(), DEFAULT_CF, b"a")
                .unwrap()
                .as_deref(),
            Some(&b"1"[..])
        );
    }

    #[test]
    fn buckets_are_created_on_write_and_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PartitionStore::open(dir.path()).unwrap();
        let mut c = Changes::default();
        c.put(&bucket_cf("0001"), b"k1", b"v");
        c.put(&bucket_cf("0002"), b"k2", b"v");
        s.commit(&c, &PartitionMeta::default()).unwrap();
        assert_eq!(s.buckets(), vec!["0001", "0002"]);
        let mut c = Changes::default();
        c.drop_bucket("0001");
        assert_eq!(s.get(&c, &bucket_cf("0001"), b"k1").unwrap(), None);
        s.commit(&c, &PartitionMeta::default()).unwrap();
        assert_eq!(s.buckets(), vec!["0002"]);
        drop(s);
        let s = PartitionStore::open(dir.path()).unwrap();
        assert_eq!(s.buckets(), vec!["0002"]);
        assert_eq!(s.scan_prefix(&bucket_cf("0002"), b"k").unwrap().len(), 1);
    }
}
