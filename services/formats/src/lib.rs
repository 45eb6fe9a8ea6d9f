//! Decoders of untrusted bytes with no Kafka or RocksDB in them, re-exported by sieve-core.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod jsonfile;
pub mod jsonkey;
