//! A Bloom filter in front of a state store: "certainly absent" answers skip the store read.
//! Growable, so the key count need not be known in advance; serialisable, so it is saved with
//! the state instead of being rebuilt at every start; its real false-positive rate is measured.

use growable_bloom_filter::{GrowableBloom, GrowableBloomBuilder};

use crate::error::{CoreError, Result};
use crate::metrics;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KeyBloom {
    bloom: GrowableBloom,
    /// Lookups answered "maybe", and how many of those the store refuted.
    maybes: u64,
    false_positives: u64,
}

impl KeyBloom {
    /// `fp_rate` is the target false-positive probability (for example 0.01); `expected` the
    /// first capacity step.
    pub fn new(fp_rate: f64, expected: usize) -> Self {
        // Each growth step adds a slice with its own error; with slice errors p/2, p/4, …
        // the total stays within p however far the filter grows.
        let bloom = GrowableBloomBuilder::new()
            .estimated_insertions(expected.max(1))
            .desired_error_ratio(fp_rate / 2.0)
            .tightening_ratio(0.5)
            .build();
        KeyBloom {
            bloom,
            maybes: 0,
            false_positives: 0,
        }
    }

    pub fn insert(&mut self, key: &[u8]) {
        self.bloom.insert(key);
    }

    /// False means certainly absent.
    pub fn may_contain(&mut self, key: &[u8]) -> bool {
        let maybe = self.bloom.contains(key);
        if maybe {
            self.maybes += 1;
        }
        maybe
    }

    /// Records the store's answer after a "maybe", feeding the observed FP rate.
    pub fn record_store_answer(&mut self, present: bool) {
        if !present {
            self.false_positives += 1;
        }
    }

    pub fn observed_fp_rate(&self) -> f64 {
        if self.maybes == 0 {
            0.0
        } else {
            self.false_positives as f64 / self.maybes as f64
        }
    }

    pub fn len(&self) -> usize {
        self.bloom.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bloom.is_empty()
    }

    /// Publishes the observed FP rate under `name` (for example the operator's name).
    pub fn publish(&self, name: &str) {
        metrics::bloom_false_positive_ratio(name, self.observed_fp_rate());
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        decode(bytes)
    }
}

/// Compact binary encoding for filters and collections of them (fixed-width words: Bloom
/// bits do not shrink under varints).
pub fn encode<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    bincode::serialize(v).map_err(|e| CoreError::Corrupt(format!("encode bloom: {e}")))
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    bincode::deserialize(bytes).map_err(|e| CoreError::Corrupt(format!("decode bloom: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_fp_rate_near_target_and_survives_serialisation() {
        let mut b = KeyBloom::new(0.01, 1000);
        for i in 0..50_000u32 {
            b.insert(format!("key-{i}").as_bytes());
        }
        let mut b = KeyBloom::from_bytes(&b.to_bytes().unwrap()).unwrap();
        for i in 0..50_000u32 {
            assert!(b.may_contain(format!("key-{i}").as_bytes()));
        }
        let fps = (0..50_000u32)
            .filter(|i| b.may_contain(format!("other-{i}").as_bytes()))
            .count();
        // Grown 50x past its first capacity, the filter still meets its 1 % target.
        assert!(fps < 50_000 / 100, "false positives {fps} above 1%");
    }
}
