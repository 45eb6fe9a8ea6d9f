use sieve_formats::jsonfile::ReadError;

#[derive(Debug, thiserror::Error)]
pub enum AntijoinError {
    #[error(transparent)]
    Read(#[from] ReadError),
    /// An input that cannot be read as asked (a missing CSV column, mixed formats).
    #[error("{0}")]
    Input(String),
    #[error("spill store: {0}")]
    Store(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker failed: {0}")]
    Worker(String),
    #[error(transparent)]
    Core(#[from] sieve_core::CoreError),
}

impl AntijoinError {
    pub fn store(e: rocksdb::Error) -> Self {
        AntijoinError::Store(e.to_string())
    }
}

pub type Result<T, E = AntijoinError> = std::result::Result<T, E>;
