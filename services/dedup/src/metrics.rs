//! Dedup's metrics, named and described in one place.

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
    use metrics::{describe_counter, describe_gauge, Unit};
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
