//! The dedup operator of one input partition.
//!
//! State: per time bucket a column family `bucket.<id>` mapping idempotency key → xxh3 hash
//! of the payload; the partition's watermark (highest record time seen) in the default
//! column family. In memory: one Bloom filter per bucket, saved at a clean close and rebuilt
//! from RocksDB otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::message::{Message, OwnedMessage};
use sieve_core::bloom::KeyBloom;
use sieve_core::dlq::{Reason, Rejected};
use sieve_core::operator::{Ctx, Operator};
use sieve_core::record::{header, Output};
use sieve_core::store::{bucket_cf, bucket_name, i64_of, PartitionStore, DEFAULT_CF};
use sieve_core::Result;
use sieve_formats::jsonkey;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{DedupArgs, TimeSource};
use crate::metrics as m;

const WATERMARK_KEY: &[u8] = b"\0watermark";
const BLOOMS_LOCAL_KEY: &[u8] = b"dedup.blooms";
const BLOOMS_CLEAN_KEY: &[u8] = b"dedup.blooms.clean";
pub const FIRST_HASH_HEADER: &str = "sieve-dedup-first-hash";
pub const PAYLOAD_HASH_HEADER: &str = "sieve-dedup-payload-hash";

/// Why a record cannot be deduplicated; it goes to the DLQ with this reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("no idempotency key: header {0} absent and no --key-pointer configured")]
    NoHeader(String),
    #[error("no idempotency key: header absent and {0}")]
    Pointer(#[from] jsonkey::KeyError),
    #[error("idempotency key of {0} bytes exceeds the limit of {1}")]
    TooLong(usize, usize),
}

impl KeyError {
    pub fn reason(&self) -> Reject {
        match self {
            KeyError::NoHeader(_) => Reject::MissingIdempotencyKey,
            KeyError::Pointer(jsonkey::KeyError::BadJson(_)) => Reject::BadJson,
            KeyError::Pointer(_) => Reject::MissingIdempotencyKey,
            KeyError::TooLong(..) => Reject::KeyTooLong,
        }
    }
}

/// Why dedup sends a record to its DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    MissingIdempotencyKey,
    BadJson,
    KeyTooLong,
    /// The same key with a different payload inside the TTL.
    IdempotencyConflict,
}

impl Reason for Reject {
    const STAGE: &'static str = "dedup";
    fn as_str(self) -> &'static str {
        match self {
            Reject::MissingIdempotencyKey => "missing_idempotency_key",
            Reject::BadJson => "bad_json",
            Reject::KeyTooLong => "key_too_long",
            Reject::IdempotencyConflict => "idempotency_conflict",
        }
    }
}

/// The idempotency key of a record: the header, else the JSON pointer into the payload.
pub fn idempotency_key(
    rec: &OwnedMessage,
    cfg: &DedupArgs,
) -> std::result::Result<Vec<u8>, KeyError> {
    let key = match (header(rec, &cfg.key_header), &cfg.key_pointer) {
        (Some(k), _) if !k.is_empty() => k.to_vec(),
        (_, Some(pointer)) => jsonkey::extract(rec.payload().unwrap_or_default(), pointer)?,
        (_, None) => return Err(KeyError::NoHeader(cfg.key_header.clone())),
    };
    if key.is_empty() {
        return Err(KeyError::NoHeader(cfg.key_header.clone()));
    }
    if key.len() > cfg.max_key_bytes {
        return Err(KeyError::TooLong(key.len(), cfg.max_key_bytes));
    }
    Ok(key)
}

struct Bucket {
    bloom: KeyBloom,
    keys: u64,
    bytes: u64,
}

pub struct Dedup {
    cfg: Arc<DedupArgs>,
    partition: String,
    buckets: BTreeMap<i64, Bucket>,
    watermark: i64,
    /// The on-disk Bloom snapshot is marked valid and must be invalidated with the next commit.
    snapshot_valid_on_disk: bool,
}

impl Dedup {
    pub fn open(cfg: Arc<DedupArgs>, partition: i32, store: &PartitionStore) -> Result<Self> {
        let none = Default::default();
        let watermark = store
            .get(&none, DEFAULT_CF, WATERMARK_KEY)?
            .as_deref()
            .and_then(i64_of)
            .unwrap_or(i64::MIN);
        let snapshot_valid = store.get_local(BLOOMS_CLEAN_KEY)?.as_deref() == Some(&[1u8][..]);
        let mut saved: BTreeMap<i64, KeyBloom> = BTreeMap::new();
        if snapshot_valid {
            if let Some(bytes) = store.get_local(BLOOMS_LOCAL_KEY)? {
                saved = sieve_core::bloom::decode(&bytes)?;
            }
        }
        let mut buckets = BTreeMap::new();
        for name in store.buckets() {
            let Ok(id) = name.parse::<i64>() else {
                continue;
            };
            let (mut keys, mut bytes) = (0u64, 0u64);
            let saved_bloom = saved.remove(&id);
            let rebuild = saved_bloom.is_none();
            let mut bloom = saved_bloom.unwrap_or_else(|| KeyBloom::new(cfg.bloom_fp, 100_000));
            store.for_each_prefix(&bucket_cf(&name), b"", |k, v| {
                keys += 1;
                bytes += (k.len() + v.len()) as u64;
                if rebuild {
                    bloom.insert(k);
                }
                Ok(())
            })?;
            if rebuild {
                m::bloom_rebuild();
            }
            buckets.insert(id, Bucket { bloom, keys, bytes });
        }
        Ok(Dedup {
            cfg,
            partition: partition.to_string(),
            buckets,
            watermark,
            snapshot_valid_on_disk: snapshot_valid,
        })
    }

    fn record_time(&self, rec: &OwnedMessage) -> i64 {
        match self.cfg.time {
            TimeSource::Event => rec.timestamp().to_millis().unwrap_or(self.watermark.max(0)),
            TimeSource::Processing => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        }
    }

    /// Drops every bucket that ended at least a TTL before the watermark.
    fn expire(&mut self, ctx: &mut Ctx<'_>) {
        let width = self.cfg.bucket_ms();
        let horizon = self.watermark.saturating_sub(self.cfg.ttl_ms());
        let expired: Vec<i64> = self
            .buckets
            .keys()
            .copied()
            .take_while(|b| b.saturating_add(1).saturating_mul(width) <= horizon)
            .collect();
        for b in expired {
            ctx.drop_bucket(&bucket_name(b));
            self.buckets.remove(&b);
            m::bucket_drop();
        }
    }

    /// The stored payload hash of `key` in a live bucket, reading RocksDB only on a Bloom maybe.
    fn lookup(&mut self, ctx: &Ctx<'_>, key: &[u8]) -> Result<Option<u64>> {
        let mut asked_store = false;
        for (b, bucket) in self.buckets.iter_mut().rev() {
            if !bucket.bloom.may_contain(key) {
                continue;
            }
            asked_store = true;
            m::bloom_maybe();
            let stored = ctx.get(&bucket_cf(&bucket_name(*b)), key)?;
            bucket.bloom.record_store_answer(stored.is_some());
            match stored.as_deref().and_then(i64_of) {
                Some(h) => return Ok(Some(h as u64)),
                None => m::bloom_false_positive(),
            }
        }
        if !asked_store {
            m::bloom_negative();
        }
        Ok(None)
    }

    fn remember(&mut self, ctx: &mut Ctx<'_>, key: &[u8], hash: u64) {
        let b = self.watermark.max(0) / self.cfg.bucket_ms();
        ctx.put(&bucket_cf(&bucket_name(b)), key, &hash.to_be_bytes());
        let fp = self.cfg.bloom_fp;
        let bucket = self.buckets.entry(b).or_insert_with(|| Bucket {
            bloom: KeyBloom::new(fp, 100_000),
            keys: 0,
            bytes: 0,
        });
        bucket.bloom.insert(key);
        bucket.keys += 1;
        bucket.bytes += key.len() as u64 + 8;
    }
}

impl Operator for Dedup {
    fn process(&mut self, rec: &OwnedMessage, ctx: &mut Ctx<'_>) -> Result<()> {
        let key = match idempotency_key(rec, &self.cfg) {
            Ok(k) => k,
            Err(e) => {
                ctx.dead_letter(
                    rec,
                    &self.cfg.dlq,
                    &Rejected::new(e.reason(), e.to_string()),
                );
                return Ok(());
            }
        };
        let t = self.record_time(rec);
        if t > self.watermark {
            self.watermark = t;
            ctx.put(DEFAULT_CF, WATERMARK_KEY, &t.to_be_bytes());
            self.expire(ctx);
        }
        let hash = xxh3_64(rec.payload().unwrap_or_default());
        match self.lookup(ctx, &key)? {
            Some(first) if first == hash => {
                m::duplicate();
            }
            Some(first) => {
                let detail = format!("same idempotency key, different payload: first hash {first:016x}, this hash {hash:016x}");
                let out = Rejected::new(Reject::IdempotencyConflict, detail)
                    .dead_letter(rec, &self.cfg.dlq)
                    .header(FIRST_HASH_HEADER, format!("{first:016x}"))
                    .header(PAYLOAD_HASH_HEADER, format!("{hash:016x}"));
                ctx.emit(out);
            }
            None => {
                self.remember(ctx, &key, hash);
                m::unique();
                ctx.emit(Output::copy_of(&self.cfg.output, rec));
            }
        }
        Ok(())
    }

    fn flush(&mut self, ctx: &mut Ctx<'_>, closing: bool) -> Result<()> {
        if closing {
            let blooms: BTreeMap<i64, &KeyBloom> =
                self.buckets.iter().map(|(b, k)| (*b, &k.bloom)).collect();
            ctx.put_local(BLOOMS_LOCAL_KEY, sieve_core::bloom::encode(&blooms)?);
            ctx.put_local(BLOOMS_CLEAN_KEY, vec![1]);
        } else if self.snapshot_valid_on_disk {
            // State changes from now on are not in the snapshot.
            ctx.put_local(BLOOMS_CLEAN_KEY, vec![0]);
            self.snapshot_valid_on_disk = false;
        }
        let p = self.partition.clone();
        let keys: u64 = self.buckets.values().map(|b| b.keys).sum();
        let bytes: u64 = self.buckets.values().map(|b| b.bytes).sum();
        m::keys(&p, keys);
        m::key_bytes(&p, bytes);
        m::buckets(&p, self.buckets.len());
        Ok(())
    }
}
