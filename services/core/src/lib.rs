//! sieve's shared runtime. Every service is an [`operator::Operator`] (or an HTTP front end)
//! on top of these pieces; the `sieve` binary, the tests and the benchmarks drive the same code.

pub mod bloom;
pub mod changelog;
mod commit;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod group_watch;
pub mod kafka;
pub mod metrics;
pub mod operator;
pub mod paths;
pub mod priority;
mod produce;
pub mod read;
pub mod record;
pub mod replay;
pub mod service;
pub mod side;
pub mod signal;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod topic_partition;
pub mod topics;
pub mod transaction;

pub use error::{CoreError, Result};
