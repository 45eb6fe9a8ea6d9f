//! Stream anti-join metrics, named and described in one place.

pub const EMITTED: &str = "sieve_antijoin_emitted_total";
pub const MATCHED: &str = "sieve_antijoin_matched_total";
pub const RETRACTIONS: &str = "sieve_antijoin_retractions_total";
pub const REEMITS: &str = "sieve_antijoin_reemits_total";
pub const BLOOM_NEGATIVES: &str = "sieve_antijoin_bloom_negatives_total";
pub const BLOOM_FALSE_POSITIVES: &str = "sieve_antijoin_bloom_false_positives_total";
pub const RIGHT_KEYS: &str = "sieve_antijoin_right_keys";
pub const RIGHT_BAD: &str = "sieve_antijoin_right_unkeyed_total";
pub const HOT_KEY_SHARE: &str = "sieve_antijoin_hot_key_share";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
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
        HOT_KEY_SHARE,
        "Share of a partition's recent left records taken by its heaviest keys, by rank (names at /skew)."
    );
}
