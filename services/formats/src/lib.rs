//! Decoders of untrusted bytes with no Kafka or RocksDB in them: JSON pointer keys and the
//! streaming bulk-file readers (JSON, CSV), imported by the services that read records and files.

pub mod csvfile;
pub mod jsonfile;
pub mod jsonkey;
