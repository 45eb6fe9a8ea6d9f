//! Kafka transactions for the `exactly-once` guarantee: one transactional producer per
//! instance, and one transaction per batch holding its outputs, DLQ records, changelog groups
//! and input offsets. Offsets go with the consumer group metadata (KIP-447), so a member that
//! lost its partitions (a zombie, frozen past its session) cannot commit: the group
//! coordinator refuses its generation, and the transaction coordinator aborts what it left
//! open once `transaction.timeout.ms` passed. A restarted instance, with the same
//! `transactional.id`, fences its former self at start.

use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use crate::error::{CoreError, Result};
use crate::kafka::{host_name, Clients};
use crate::metrics::{self, TxnOutcome};

/// Longest wait of a transaction call; librdkafka retries inside it.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `sieve.<group>.<instance>`; the instance is `--instance-id`, or the host name and a hash
/// of the state directory (two instances on one host have two state directories).
pub fn transactional_id(group: &str, instance: Option<&str>, state_dir: &Path) -> String {
    let instance = match instance {
        Some(i) => i.to_string(),
        None => {
            let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
            let hash = xxhash_rust::xxh3::xxh3_64(dir.as_os_str().as_encoded_bytes());
            format!("{}-{:08x}", host_name(), hash as u32)
        }
    };
    format!("sieve.{group}.{instance}")
}

pub(crate) struct Transactions {
    clients: Clients,
    id: String,
    producer: FutureProducer,
    open: bool,
}

impl Transactions {
    /// Creates the producer and fences earlier producers of the same id (aborting what they
    /// left open). `Ok(None)` when the broker does not offer transactions.
    pub(crate) fn start(clients: &Clients, id: &str) -> Result<Option<Self>> {
        let producer = clients.transactional_producer(id)?;
        // Said before the call: it waits for the coordinator and for any transaction an
        // earlier producer of this id left open.
        tracing::info!(transactional_id = id, "initialising transactions");
        match producer.init_transactions(TIMEOUT) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                tracing::warn!(error = %e, "the brokers do not offer transactions");
                return Ok(None);
            }
            Err(e) => return Err(CoreError::kafka(format!("init transactions of {id}"), e)),
        }
        tracing::info!(transactional_id = id, "transactional producer ready");
        Ok(Some(Transactions {
            clients: clients.clone(),
            id: id.to_string(),
            producer,
            open: false,
        }))
    }

    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Opens a transaction unless one is open.
    pub(crate) fn begin(&mut self) -> Result<()> {
        if !self.open {
            self.producer
                .begin_transaction()
                .map_err(|e| txn_error("begin", e))?;
            self.open = true;
        }
        Ok(())
    }

    /// Adds `offsets` (when any) as the group's, then commits everything sent since `begin`.
    pub(crate) fn commit(
        &mut self,
        offsets: &TopicPartitionList,
        group: Option<&ConsumerGroupMetadata>,
    ) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        if offsets.count() > 0 {
            let group = group.ok_or_else(|| CoreError::Transaction {
                context: "send offsets".into(),
                source: KafkaError::Canceled,
            })?;
            self.producer
                .send_offsets_to_transaction(offsets, group, TIMEOUT)
                .map_err(|e| txn_error("send offsets", e))?;
        }
        self.producer
            .commit_transaction(TIMEOUT)
            .map_err(|e| txn_error("commit", e))?;
        self.open = false;
        metrics::transaction(TxnOutcome::Committed);
        Ok(())
    }

    /// After a failure: aborts the open transaction. A producer that was fenced, failed
    /// fatally or cannot abort is replaced: the new one's `init_transactions` aborts what the
    /// old one left open.
    pub(crate) fn abort(&mut self) -> Result<()> {
        let fatal = self.producer.client().fatal_error().is_some();
        if !self.open && !fatal {
            return Ok(());
        }
        if !fatal {
            match self.producer.abort_transaction(TIMEOUT) {
                Ok(()) => {
                    self.open = false;
                    metrics::transaction(TxnOutcome::Aborted);
                    return Ok(());
                }
                Err(e) => tracing::warn!(error = %e, "abort failed: replacing the producer"),
            }
        }
        metrics::transaction(TxnOutcome::Fenced);
        tracing::warn!(
            transactional_id = self.id,
            "replacing the transactional producer"
        );
        let producer = self.clients.transactional_producer(&self.id)?;
        producer
            .init_transactions(TIMEOUT)
            .map_err(|e| CoreError::kafka(format!("init transactions of {}", self.id), e))?;
        self.producer = producer;
        self.open = false;
        Ok(())
    }
}

fn txn_error(context: &str, e: KafkaError) -> CoreError {
    CoreError::Transaction {
        context: context.into(),
        source: e,
    }
}

/// The broker lacks the transaction APIs (Azure Event Hubs' Standard tier, old brokers).
fn unsupported(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::UnsupportedVersion | C::UnsupportedFeature | C::UnsupportedForMessageFormat)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_names_group_and_instance_and_differs_by_state_dir() {
        assert_eq!(
            transactional_id("dedup", Some("dedup-0"), Path::new("/s")),
            "sieve.dedup.dedup-0"
        );
        let a = transactional_id("g", None, Path::new("/var/a"));
        let b = transactional_id("g", None, Path::new("/var/b"));
        assert!(a.starts_with("sieve.g.") && a != b, "{a} {b}");
        assert_eq!(a, transactional_id("g", None, Path::new("/var/a")));
    }
}
