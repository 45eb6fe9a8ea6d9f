//! Skew detection: the heaviest left keys of each partition, found with the Space-Saving
//! algorithm (Metwally et al.) in a fixed number of counters, so a key such as `guest` with
//! billions of rows is named without keeping a counter per key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::metrics as m;

/// Counts of at most `capacity` keys. A key not tracked replaces the smallest counter and
/// inherits its count as the error bound; every key above total/capacity is tracked.
pub struct TopKeys {
    capacity: usize,
    counts: HashMap<Vec<u8>, u64, ahash::RandomState>,
    total: u64,
}

impl TopKeys {
    pub fn new(capacity: usize) -> Self {
        TopKeys {
            capacity: capacity.max(1),
            counts: HashMap::default(),
            total: 0,
        }
    }

    pub fn observe(&mut self, key: &[u8]) {
        self.total += 1;
        if let Some(c) = self.counts.get_mut(key) {
            *c += 1;
            return;
        }
        if self.counts.len() < self.capacity {
            self.counts.insert(key.to_vec(), 1);
            return;
        }
        let Some((min_key, min)) = self
            .counts
            .iter()
            .min_by_key(|(_, c)| **c)
            .map(|(k, c)| (k.clone(), *c))
        else {
            return;
        };
        self.counts.remove(&min_key);
        self.counts.insert(key.to_vec(), min + 1);
    }

    /// The heaviest keys, heaviest first, with their (over-)estimated counts.
    pub fn top(&self, n: usize) -> Vec<(Vec<u8>, u64)> {
        let mut v: Vec<(Vec<u8>, u64)> = self.counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// One partition's heaviest keys, as served at `/skew`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HotKey {
    pub key: String,
    pub records: u64,
    pub share: f64,
}

/// The latest top keys of every partition of this instance.
#[derive(Clone, Default)]
pub struct SkewBoard(Arc<Mutex<BTreeMap<i32, Vec<HotKey>>>>);

impl SkewBoard {
    /// Publishes a partition's top keys (gauges by rank; names on the board).
    pub fn publish(&self, partition: i32, top: &TopKeys) {
        let total = top.total().max(1) as f64;
        let hot: Vec<HotKey> = top
            .top(5)
            .into_iter()
            .map(|(k, records)| HotKey {
                key: String::from_utf8_lossy(&k).into_owned(),
                records,
                share: records as f64 / total,
            })
            .collect();
        for (rank, h) in hot.iter().enumerate() {
            m::hot_key_ratio(partition, rank + 1, h.share);
        }
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition, hot);
    }

    pub fn snapshot(&self) -> BTreeMap<i32, Vec<HotKey>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_five_percent_key_is_found_among_uniform_ones() {
        let mut t = TopKeys::new(64);
        for i in 0..100_000u32 {
            if i % 20 == 0 {
                t.observe(b"guest");
            } else {
                t.observe(format!("user-{i}").as_bytes());
            }
        }
        let top = t.top(1);
        assert_eq!(top[0].0, b"guest");
        // Space-Saving over-estimates by at most total/capacity.
        assert!(top[0].1 >= 5_000 && top[0].1 <= 5_000 + 100_000 / 64);
    }
}
