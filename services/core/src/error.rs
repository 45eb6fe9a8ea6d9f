//! Typed errors of the runtime.

use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("Kafka {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot reach Kafka brokers at {brokers} within {timeout_ms} ms: {reason}")]
    Unreachable {
        brokers: String,
        timeout_ms: u64,
        reason: String,
    },
    #[error("state store at {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("operator failed: {0}")]
    Operator(String),
    /// A transaction of the exactly-once mode failed and was aborted (or its producer
    /// fenced): the batch is undone, and the instance drops its partitions and rejoins.
    #[error("transaction aborted ({context}): {source}")]
    Transaction {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl CoreError {
    /// Whether aborting the transaction undoes the failure: Kafka refused or lost part of
    /// the batch. Store, operator and configuration errors are not Kafka's to undo.
    pub fn undone_by_abort(&self) -> bool {
        matches!(
            self,
            CoreError::Transaction { .. } | CoreError::Kafka { .. }
        )
    }

    pub fn kafka(context: impl Into<String>, source: KafkaError) -> Self {
        CoreError::Kafka {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
