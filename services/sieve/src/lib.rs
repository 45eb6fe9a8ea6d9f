//! Parts of the `sieve` binary that tests and benchmarks reuse.

pub mod all;
pub mod ctl;
pub mod dlq;
pub mod gen;
pub mod replay;
