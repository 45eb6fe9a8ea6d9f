//! Decoders of untrusted bytes with no Kafka or RocksDB in them: JSON pointer keys and the
//! streaming bulk-file reader, imported by the services that read records and files.

pub mod jsonfile;
pub mod jsonkey;
