//! `sieve dedup`: drops retries and replays by idempotency key inside a TTL window, exactly
//! once, with state in RocksDB and a Bloom filter per time bucket in front of it.
//!
//! Same key and same payload inside the TTL → counted duplicate, dropped. Same key and a
//! different payload → `idempotency_conflict` in the DLQ with both hashes. Everything else
//! passes to the output. Exactly-once comes from the core runner (docs/exactly-once.md).

pub mod config;
pub mod metrics;
pub mod operator;

use std::sync::Arc;

use sieve_core::config::{KafkaArgs, ServiceArgs};
use sieve_core::operator::OperatorFactory;
use sieve_core::store::PartitionStore;

pub use config::DedupArgs;
pub use operator::Dedup;

pub struct DedupFactory {
    cfg: Arc<DedupArgs>,
}

impl DedupFactory {
    pub fn new(cfg: DedupArgs) -> Self {
        metrics::describe();
        DedupFactory { cfg: Arc::new(cfg) }
    }
}

impl OperatorFactory for DedupFactory {
    type Op = Dedup;

    fn inputs(&self) -> Vec<String> {
        vec![self.cfg.input.clone()]
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.cfg.output.clone(), self.cfg.dlq.clone()]
    }

    fn open(
        &self,
        _topic: &str,
        partition: i32,
        store: &PartitionStore,
    ) -> sieve_core::Result<Dedup> {
        Dedup::open(self.cfg.clone(), partition, store)
    }

    /// A replay must still know the keys of the TTL window before its offset; one bucket
    /// more covers keys whose bucket outlives the TTL by its width.
    fn warmup(&self) -> Option<std::time::Duration> {
        let ms = self.cfg.ttl_ms().saturating_add(self.cfg.bucket_ms());
        Some(std::time::Duration::from_millis(
            u64::try_from(ms).unwrap_or(0),
        ))
    }
}

/// Runs dedup until SIGTERM/SIGINT.
pub fn run(kafka: &KafkaArgs, service: &ServiceArgs, args: DedupArgs) -> sieve_core::Result<()> {
    sieve_core::service::run_processor(DedupFactory::new(args), kafka, service, axum::Router::new())
}
