//! The engine's error type.

use crate::storage::StorageError;

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
    /// The engine is shutting down and takes no new work.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A build went past one of its limits (see [`BuildLimits`](crate::executor::BuildLimits));
    /// the build ends as EXCEPTION with this reason.
    #[error("{0}")]
    LimitExceeded(String),
    /// The build has ended: it can write nothing more.
    #[error("build {0} has ended; it can write nothing more")]
    BuildEnded(crate::model::BuildId),
}

/// The result type of the embedding API.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
