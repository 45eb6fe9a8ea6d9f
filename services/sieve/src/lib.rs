//! The `sieve` binary's command line and the parts of it that tests and benchmarks reuse.

pub mod all;
pub mod cli;
pub mod ctl;
pub mod gen;
pub mod metrics;
pub mod service;
