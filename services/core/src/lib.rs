//! sieve's shared runtime. Every service is an [`runner::Operator`] (or an HTTP front end)
//! on top of these pieces; the `sieve` binary, the tests and the benchmarks drive the same code.

pub mod bloom;
pub mod changelog;
pub mod config;
pub mod dlq;
pub mod error;
pub mod failpoint;
pub mod group_watch;
pub mod kafka;
pub mod paths;
pub mod priority;
pub mod record;
pub mod replay;
pub mod runner;
pub mod service;
pub mod side;
pub mod signal;
pub mod store;
pub mod telemetry;
pub mod topics;

pub use error::{CoreError, Result};
