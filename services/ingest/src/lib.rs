//! sieve's ingest: an HTTP API (`sieve ingest serve`) and a bulk file loader
//! (`sieve ingest file`) that validate records against the stream's JSON Schema, give each
//! an idempotency key that dedup recognises, and count a record as accepted only once the
//! broker acknowledged it. Docs: docs/ingest.md.

pub mod auth;
pub mod body;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod file;
pub mod headers;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod problem;
pub mod producer;
pub mod reject;
pub mod serve;
pub mod streams;
pub mod validate;

pub use config::{FileArgs, ServeArgs};
pub use error::{IngestError, Result};
