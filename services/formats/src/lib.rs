//! Decoders of untrusted bytes with no Kafka or RocksDB in them, re-exported by sieve-core.

pub mod jsonfile;
pub mod jsonkey;
