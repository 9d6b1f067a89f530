//! The engine's error type.

use kiln_job::JobError;
use kiln_storage::StorageError;

/// What can go wrong in the embedding API.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The storage layer refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A builder name that this database (or engine) does not know.
    #[error("unknown builder {0:?}")]
    UnknownBuilder(String),
    /// A builder registered twice on one engine.
    #[error("builder {0:?} is already registered on this engine")]
    DuplicateBuilder(String),
    /// Input that breaks a rule (bad priority, empty name, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Something the engine cannot explain to the caller went wrong (a bug, not input).
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine cannot do its work now (its master is not active).
    #[error("not ready: {0}")]
    NotReady(String),
    /// The engine is shutting down and takes no new work.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// The result type of the embedding API.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl From<EngineError> for JobError {
    /// An engine call that failed, for a job that gives up with `?`.
    fn from(e: EngineError) -> Self {
        JobError::new(e.to_string())
    }
}
