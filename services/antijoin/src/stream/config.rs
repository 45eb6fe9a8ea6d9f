//! `sieve antijoin stream` settings.

use clap::{Args, ValueEnum};
use sieve_core::side::SideMode;

/// What the output topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputMode {
    /// A compacted view keyed by the join key: tombstones retract keys that gained a right
    /// match, values come back when the match is deleted. Keeps the latest left record per
    /// key and partition in state.
    Retract,
    /// Every left record that had no match when it was judged, never retracted. No state.
    Append,
}

#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// Left topic: the records to judge.
    #[arg(long, env = "SIEVE_ANTIJOIN_LEFT", default_value = "users.legacy")]
    pub left: String,
    /// Right topic: the keys to match, one per Kafka record key (compacted; a tombstone
    /// deletes its key).
    #[arg(long, env = "SIEVE_ANTIJOIN_RIGHT", default_value = "users.current")]
    pub right: String,
    /// The join key in left records: a field name (`id`) or a JSON pointer (`/user/id`).
    #[arg(long, env = "SIEVE_ANTIJOIN_KEY", default_value = "id", value_parser = sieve_formats::jsonkey::key_pointer)]
    pub key: String,
    #[arg(long, env = "SIEVE_ANTIJOIN_OUT", default_value = "antijoin.out")]
    pub out: String,
    #[arg(long, env = "SIEVE_ANTIJOIN_DLQ", default_value = "dlq.antijoin")]
    pub dlq: String,
    #[arg(long, env = "SIEVE_ANTIJOIN_OUTPUT_MODE", value_enum, default_value_t = OutputMode::Retract)]
    pub output_mode: OutputMode,
    /// broadcast: every instance holds the whole right side, the left side needs no
    /// co-partitioning. co-partitioned: left and right have the same partition count and
    /// key, each instance holds the right partitions of its left partitions.
    #[arg(long, env = "SIEVE_ANTIJOIN_PLACEMENT", value_enum, default_value_t = SideMode::Broadcast)]
    pub placement: SideMode,
    /// Target false-positive rate of the right side's Bloom filter.
    #[arg(long, env = "SIEVE_ANTIJOIN_BLOOM_FP", default_value_t = 0.01)]
    pub bloom_fp: f64,
    /// Left keys longer than this go to the DLQ (`key_too_long`).
    #[arg(long, env = "SIEVE_ANTIJOIN_MAX_KEY_BYTES", default_value_t = 1024)]
    pub max_key_bytes: usize,
    /// Counters per partition for skew detection: every key above 1/N of the partition's
    /// records is found.
    #[arg(long, env = "SIEVE_ANTIJOIN_HOT_KEYS", default_value_t = 64)]
    pub hot_keys: usize,
}
