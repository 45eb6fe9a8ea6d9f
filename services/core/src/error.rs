//! Typed errors of the runtime, each tagged with what the caller should do next.

use rdkafka::error::KafkaError;

/// What a caller should do with an error: route user data to a DLQ, retry an external
/// dependency, or stop loudly because the process can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDomain {
    /// The input is bad: send it to the DLQ with the reason and go on.
    User,
    /// A dependency (broker, network) failed: retry with backoff.
    External,
    /// sieve's own state is broken: stop, a restart recovers from Kafka.
    Internal,
}

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
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl CoreError {
    pub fn kafka(context: impl Into<String>, source: KafkaError) -> Self {
        CoreError::Kafka {
            context: context.into(),
            source,
        }
    }

    pub fn domain(&self) -> ErrorDomain {
        match self {
            CoreError::Config(_) => ErrorDomain::User,
            CoreError::Kafka { .. } | CoreError::Unreachable { .. } | CoreError::Io(_) => {
                ErrorDomain::External
            }
            CoreError::Store { .. } | CoreError::Corrupt(_) | CoreError::Operator(_) => {
                ErrorDomain::Internal
            }
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
