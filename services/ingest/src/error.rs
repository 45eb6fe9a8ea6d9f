//! Errors of the ingest library that stop a command (bad configuration, an unreadable
//! file); problems with one record or one request are answers, not errors (see `reject`).

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Core(#[from] sieve_core::CoreError),
    #[error(transparent)]
    Read(#[from] sieve_formats::jsonfile::ReadError),
    #[error("Kafka: {0}")]
    Kafka(String),
}

impl IngestError {
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        IngestError::Io {
            path: path.to_string(),
            source,
        }
    }
}

pub type Result<T, E = IngestError> = std::result::Result<T, E>;
