//! `sieve dedup` settings.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Which clock places a record in the TTL window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeSource {
    /// The record's Kafka timestamp: deterministic, so re-processing after a crash or a
    /// replay decides exactly as the first run did.
    Event,
    /// The wall clock when the record is processed. Not deterministic under re-processing:
    /// records near the window's edge may be decided differently after a crash.
    Processing,
}

#[derive(Debug, Clone, Args)]
pub struct DedupArgs {
    #[arg(long, env = "SIEVE_DEDUP_INPUT", default_value = "events.raw")]
    pub input: String,
    #[arg(long, env = "SIEVE_DEDUP_OUTPUT", default_value = "events.unique")]
    pub output: String,
    #[arg(long, env = "SIEVE_DEDUP_DLQ", default_value = "dlq.dedup")]
    pub dlq: String,
    /// How long a key is remembered (for example 24h, 15m, 2s).
    #[arg(long, env = "SIEVE_DEDUP_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Number of time buckets the TTL is split into; expiry drops a whole bucket, so a key is
    /// remembered for between TTL and TTL + TTL/buckets.
    #[arg(long, env = "SIEVE_DEDUP_BUCKETS", default_value_t = 24)]
    pub buckets: u32,
    /// Header holding the idempotency key (set by ingest from `Idempotency-Key`).
    #[arg(
        long,
        env = "SIEVE_DEDUP_KEY_HEADER",
        default_value = "idempotency-key"
    )]
    pub key_header: String,
    /// JSON pointer of the key in the payload, used when the header is absent (e.g. /id).
    #[arg(long, env = "SIEVE_DEDUP_KEY_POINTER")]
    pub key_pointer: Option<String>,
    #[arg(long, env = "SIEVE_DEDUP_TIME", value_enum, default_value_t = TimeSource::Event)]
    pub time: TimeSource,
    /// Target false-positive rate of each bucket's Bloom filter.
    #[arg(long, env = "SIEVE_DEDUP_BLOOM_FP", default_value_t = 0.01)]
    pub bloom_fp: f64,
    /// Keys longer than this go to the DLQ (`key_too_long`).
    #[arg(long, env = "SIEVE_DEDUP_MAX_KEY_BYTES", default_value_t = 1024)]
    pub max_key_bytes: usize,
}

impl DedupArgs {
    /// Width of one bucket in milliseconds (at least 1).
    pub fn bucket_ms(&self) -> i64 {
        ((self.ttl.as_millis() as i64) / i64::from(self.buckets.max(1))).max(1)
    }

    pub fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis() as i64
    }
}
