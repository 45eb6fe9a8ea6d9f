//! The right side of an anti-join as a set of keys: a hash set while it fits its memory
//! budget, RocksDB with a Bloom filter in front once it does not.

use std::collections::HashSet;
use std::path::Path;

use growable_bloom_filter::GrowableBloom;
use rocksdb::{BlockBasedOptions, Cache, Options, WriteBatch, DB};

use crate::error::{AntijoinError, Result};

/// Rough bytes a key costs in the hash set: its bytes, the box, the table slot.
fn cost(key: &[u8]) -> u64 {
    key.len() as u64 + 40
}

/// Options for a spill store that lives within `bytes`: two write buffers of a quarter each
/// and a block cache of half that holds the index and filter blocks too, so the store's
/// memory does not grow with its data.
pub fn spill_options(bytes: u64) -> Options {
    let quarter = usize::try_from(bytes / 4)
        .unwrap_or(usize::MAX)
        .max(1 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&Cache::new_lru_cache(quarter * 2));
    table.set_cache_index_and_filter_blocks(true);
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_block_based_table_factory(&table);
    opts.set_write_buffer_size(quarter);
    opts.set_max_write_buffer_number(2);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts
}

pub enum RightSet {
    Memory {
        keys: HashSet<Box<[u8]>, ahash::RandomState>,
        bytes: u64,
    },
    Spilled {
        db: DB,
        bloom: GrowableBloom,
        /// Keys not yet written (a WriteBatch is not Sync; the set is shared by workers).
        pending: Vec<Box<[u8]>>,
        keys: u64,
        _dir: tempfile::TempDir,
    },
}

impl RightSet {
    pub fn new() -> Self {
        RightSet::Memory {
            keys: HashSet::default(),
            bytes: 0,
        }
    }

    /// Adds a key, moving the set to RocksDB under `spill_dir` once it exceeds `budget` bytes.
    pub fn insert(&mut self, key: &[u8], budget: u64, spill_dir: &Path) -> Result<()> {
        match self {
            RightSet::Memory { keys, bytes } => {
                if keys.insert(key.into()) {
                    *bytes += cost(key);
                }
                if *bytes > budget {
                    self.spill(budget, spill_dir)?;
                }
            }
            RightSet::Spilled {
                db,
                bloom,
                pending,
                keys,
                ..
            } => {
                bloom.insert(key);
                pending.push(key.into());
                *keys += 1;
                if pending.len() >= 10_000 {
                    write_keys(db, pending.drain(..))?;
                }
            }
        }
        Ok(())
    }

    /// Moves the set to RocksDB, which then lives within the `budget` the set had.
    fn spill(&mut self, budget: u64, spill_dir: &Path) -> Result<()> {
        let RightSet::Memory { keys, .. } = self else {
            return Ok(());
        };
        let dir = tempfile::tempdir_in(spill_dir)?;
        let opts = spill_options(budget);
        let db = DB::open(&opts, dir.path()).map_err(AntijoinError::store)?;
        let mut bloom = GrowableBloom::new(0.01, keys.len() * 4);
        for k in keys.iter() {
            bloom.insert(&**k);
        }
        write_keys(&db, keys.drain())?;
        let n = db
            .property_int_value("rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0);
        tracing::info!(keys = n, dir = %dir.path().display(), "right side exceeds its memory budget: moved to RocksDB");
        *self = RightSet::Spilled {
            db,
            bloom,
            pending: Vec::new(),
            keys: n,
            _dir: dir,
        };
        Ok(())
    }

    /// Makes pending writes visible to lookups.
    pub fn seal(&mut self) -> Result<()> {
        if let RightSet::Spilled { db, pending, .. } = self {
            write_keys(db, pending.drain(..))?;
        }
        Ok(())
    }

    /// Bloom "no" answers without touching RocksDB.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        match self {
            RightSet::Memory { keys, .. } => Ok(keys.contains(key)),
            RightSet::Spilled { db, bloom, .. } => {
                if !bloom.contains(key) {
                    return Ok(false);
                }
                Ok(db.get_pinned(key).map_err(AntijoinError::store)?.is_some())
            }
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            RightSet::Memory { keys, .. } => keys.len() as u64,
            RightSet::Spilled { keys, .. } => *keys,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn mode(&self) -> &'static str {
        match self {
            RightSet::Memory { .. } => "memory",
            RightSet::Spilled { .. } => "rocksdb+bloom",
        }
    }
}

fn write_keys(db: &DB, keys: impl Iterator<Item = Box<[u8]>>) -> Result<()> {
    let mut batch = WriteBatch::default();
    for k in keys {
        batch.put(&k, []);
        if batch.len() >= 10_000 {
            db.write(std::mem::take(&mut batch))
                .map_err(AntijoinError::store)?;
        }
    }
    db.write(batch).map_err(AntijoinError::store)
}

impl Default for RightSet {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_set_answers_like_the_memory_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut small = RightSet::new();
        let mut spilled = RightSet::new();
        for i in 0..5_000u32 {
            let k = format!("user-{}", i * 2);
            small.insert(k.as_bytes(), u64::MAX, dir.path()).unwrap();
            spilled.insert(k.as_bytes(), 10_000, dir.path()).unwrap();
        }
        spilled.seal().unwrap();
        assert_eq!(small.mode(), "memory");
        assert_eq!(spilled.mode(), "rocksdb+bloom");
        for i in 0..10_000u32 {
            let k = format!("user-{i}");
            assert_eq!(small.contains(k.as_bytes()).unwrap(), i % 2 == 0, "{k}");
            assert_eq!(spilled.contains(k.as_bytes()).unwrap(), i % 2 == 0, "{k}");
        }
    }
}
