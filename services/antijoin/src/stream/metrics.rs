//! Stream anti-join metrics: named, described and recorded here and nowhere else.

// The one module of this crate allowed to call the `metrics` macros (clippy.toml bans them
// elsewhere).
#![allow(clippy::disallowed_macros)]

use ::metrics::{counter, describe_counter, describe_gauge, gauge};

pub const EMITTED: &str = "sieve_antijoin_emitted_total";
pub const MATCHED: &str = "sieve_antijoin_matched_total";
pub const RETRACTIONS: &str = "sieve_antijoin_retractions_total";
pub const REEMITS: &str = "sieve_antijoin_reemits_total";
pub const BLOOM_NEGATIVES: &str = "sieve_antijoin_bloom_negatives_total";
pub const BLOOM_FALSE_POSITIVES: &str = "sieve_antijoin_bloom_false_positives_total";
pub const RIGHT_KEYS: &str = "sieve_antijoin_right_keys";
pub const RIGHT_BAD: &str = "sieve_antijoin_right_unkeyed_total";
pub const HOT_KEY_RATIO: &str = "sieve_antijoin_hot_key_ratio";

pub fn describe() {
    describe_counter!(
        EMITTED,
        "Left records written to the output: no right match when judged."
    );
    describe_counter!(MATCHED, "Left records suppressed by a right match.");
    describe_counter!(
        RETRACTIONS,
        "Tombstones written for keys that gained a right match after being emitted."
    );
    describe_counter!(
        REEMITS,
        "Left records written again because their right match was deleted."
    );
    describe_counter!(
        BLOOM_NEGATIVES,
        "Right-side lookups answered by the Bloom filter alone: RocksDB reads skipped."
    );
    describe_counter!(
        BLOOM_FALSE_POSITIVES,
        "Right-side lookups the Bloom filter answered maybe and RocksDB refuted."
    );
    describe_gauge!(RIGHT_KEYS, "Keys in this instance's right-side table.");
    describe_counter!(
        RIGHT_BAD,
        "Right records without a Kafka key, ignored (the right side is keyed by record key)."
    );
    describe_gauge!(
        HOT_KEY_RATIO,
        "Share (0..1) of a partition's recent left records taken by its heaviest keys, by rank (names at /skew)."
    );
}

pub fn emitted() {
    counter!(EMITTED).increment(1);
}

pub fn matched() {
    counter!(MATCHED).increment(1);
}

pub fn retraction() {
    counter!(RETRACTIONS).increment(1);
}

pub fn reemit() {
    counter!(REEMITS).increment(1);
}

pub fn bloom_negative() {
    counter!(BLOOM_NEGATIVES).increment(1);
}

pub fn bloom_false_positive() {
    counter!(BLOOM_FALSE_POSITIVES).increment(1);
}

pub fn right_keys(keys: u64) {
    gauge!(RIGHT_KEYS).set(keys as f64);
}

pub fn right_unkeyed() {
    counter!(RIGHT_BAD).increment(1);
}

/// `rank` counts from 1 (the heaviest key).
pub fn hot_key_ratio(partition: i32, rank: usize, ratio: f64) {
    gauge!(HOT_KEY_RATIO, "partition" => partition.to_string(), "rank" => rank.to_string())
        .set(ratio);
}
