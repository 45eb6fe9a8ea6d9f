//! Dedup's metrics: named, described and recorded here and nowhere else.

// The one module of this crate allowed to call the `metrics` macros (clippy.toml bans them
// elsewhere).
#![allow(clippy::disallowed_macros)]

use ::metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

pub const DUPLICATES: &str = "sieve_dedup_duplicates_total";
pub const UNIQUE: &str = "sieve_dedup_unique_total";
pub const BLOOM_NEGATIVES: &str = "sieve_dedup_bloom_negatives_total";
pub const BLOOM_FALSE_POSITIVES: &str = "sieve_dedup_bloom_false_positives_total";
pub const BLOOM_MAYBES: &str = "sieve_dedup_bloom_maybes_total";
pub const KEYS: &str = "sieve_dedup_keys";
pub const BYTES: &str = "sieve_dedup_key_bytes";
pub const BUCKETS: &str = "sieve_dedup_buckets";
pub const BUCKET_DROPS: &str = "sieve_dedup_bucket_drops_total";
pub const BLOOM_REBUILDS: &str = "sieve_dedup_bloom_rebuilds_total";

pub fn describe() {
    describe_counter!(
        DUPLICATES,
        "Records dropped as exact retries (same key, same payload) inside the TTL."
    );
    describe_counter!(
        UNIQUE,
        "Records passed on as the first of their key inside the TTL."
    );
    describe_counter!(
        BLOOM_NEGATIVES,
        "Lookups answered by the Bloom filters alone: RocksDB reads skipped."
    );
    describe_counter!(
        BLOOM_MAYBES,
        "Lookups where a Bloom filter said maybe and RocksDB was read."
    );
    describe_counter!(BLOOM_FALSE_POSITIVES, "Bloom maybes that RocksDB refuted.");
    describe_gauge!(KEYS, "Keys remembered in the TTL window, by partition.");
    describe_gauge!(
        BYTES,
        Unit::Bytes,
        "Bytes of keys and hashes remembered, by partition."
    );
    describe_gauge!(BUCKETS, "Live time buckets, by partition.");
    describe_counter!(
        BUCKET_DROPS,
        "Time buckets dropped whole after the TTL passed."
    );
    describe_counter!(
        BLOOM_REBUILDS,
        "Bloom filters rebuilt from RocksDB at open (after a crash or a restore)."
    );
}

pub fn duplicate() {
    counter!(DUPLICATES).increment(1);
}

pub fn unique() {
    counter!(UNIQUE).increment(1);
}

pub fn bloom_negative() {
    counter!(BLOOM_NEGATIVES).increment(1);
}

pub fn bloom_maybe() {
    counter!(BLOOM_MAYBES).increment(1);
}

pub fn bloom_false_positive() {
    counter!(BLOOM_FALSE_POSITIVES).increment(1);
}

pub fn bloom_rebuild() {
    counter!(BLOOM_REBUILDS).increment(1);
}

pub fn bucket_drop() {
    counter!(BUCKET_DROPS).increment(1);
}

pub fn keys(partition: &str, keys: u64) {
    gauge!(KEYS, "partition" => partition.to_string()).set(keys as f64);
}

pub fn key_bytes(partition: &str, bytes: u64) {
    gauge!(BYTES, "partition" => partition.to_string()).set(bytes as f64);
}

pub fn buckets(partition: &str, buckets: usize) {
    gauge!(BUCKETS, "partition" => partition.to_string()).set(buckets as f64);
}
