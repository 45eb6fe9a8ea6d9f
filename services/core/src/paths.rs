//! The layout of `--state-dir`: a directory per consumer group (two services sharing a state
//! directory never open each other's RocksDB), in it one store per input partition
//! (`<topic>-<partition>`) and one per side table. All of it is a cache of what Kafka holds:
//! deleting it costs a restore from the changelog, never data.

use std::path::{Path, PathBuf};

/// The directory of consumer group `group` under `state_dir`.
pub fn group_dir(state_dir: &Path, group: &str) -> PathBuf {
    state_dir.join(group)
}

/// The RocksDB store of one input partition of `group`.
pub fn partition_store(state_dir: &Path, group: &str, topic: &str, partition: i32) -> PathBuf {
    group_dir(state_dir, group).join(format!("{topic}-{partition}"))
}
