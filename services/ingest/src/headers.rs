//! Header names every ingest record carries (accepted and DLQ copies alike).
//! `idempotency-key` is what dedup reads.

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const STREAM: &str = "sieve-ingest-stream";
pub const TENANT: &str = "sieve-ingest-tenant";
pub const SOURCE: &str = "sieve-ingest-source";
/// The salt bucket appended to a hot key (`key~N`); absent when the key is not salted.
pub const SALT: &str = "sieve-salt";
