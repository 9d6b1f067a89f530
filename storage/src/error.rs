//! The storage seam's error type.

use kiln_model::{BuildId, MasterId, RequestId};

/// What can go wrong behind the storage seam. Domain rule violations have their own
/// variants so that callers can act on them; database failures keep their cause but
/// their message never carries SQL.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Claiming failed because at least one request is already claimed (by anyone,
    /// including the caller) or complete; nothing was claimed.
    #[error("build requests already claimed or complete: {}", join_ids(.0))]
    AlreadyClaimed(Vec<RequestId>),
    /// Completing failed because at least one request is missing or already complete;
    /// nothing was completed.
    #[error("build requests missing or already complete: {}", join_ids(.0))]
    NotClaimed(Vec<RequestId>),
    /// An entity does not exist.
    #[error("{entity} {id} not found")]
    NotFound {
        /// What kind of entity ("buildset", "build", ...).
        entity: &'static str,
        /// How it was looked up.
        id: String,
    },
    /// A builder name is not registered in this database.
    #[error("unknown builder {0:?}")]
    UnknownBuilder(String),
    /// A build was finished or changed by a master that does not own it, or after it
    /// had already finished (for example because its master was expired meanwhile).
    #[error("build {build} is not running on master {master}: the write was refused")]
    NotOwner {
        /// The build.
        build: BuildId,
        /// The master that tried to write.
        master: MasterId,
    },
    /// A build was started for a request the master does not hold a claim on.
    #[error("build request {request} is not claimed by master {master}")]
    ClaimLost {
        /// The request.
        request: RequestId,
        /// The master that tried to start a build.
        master: MasterId,
    },
    /// Another master holds the reporter's delivery lease now.
    #[error("reporter {reporter:?} is not leased to master {master}: the write was refused")]
    LeaseLost {
        /// The reporter.
        reporter: String,
        /// The master that tried to write.
        master: MasterId,
    },
    /// The master was expired by another master (or shut down) and must re-register.
    #[error("master {0} is no longer active (it was expired or shut down)")]
    MasterInactive(MasterId),
    /// The input breaks a rule of the data model.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The database exists but is not a Kiln database, or was written by a newer Kiln.
    #[error("{0}")]
    NotKilnDatabase(String),
    /// There is no database at the given place and creating one was not asked for.
    #[error("no Kiln database at {0}")]
    Missing(String),
    /// The database URL is malformed or names an unsupported backend.
    #[error("bad database URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The SQLite writer's synchronous connection failed.
    #[error("database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// The store's own machinery failed (a writer task that panicked): a bug, not the
    /// input's fault nor the database's.
    #[error("internal storage error: {0}")]
    Internal(String),
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded (corruption or a foreign writer).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl StorageError {
    /// A not-found error for the given entity.
    pub fn not_found(entity: &'static str, id: impl ToString) -> Self {
        StorageError::NotFound {
            entity,
            id: id.to_string(),
        }
    }
}

impl StorageError {
    /// A foreign-key violation as "the referenced entity is not found"; other errors as
    /// they are.
    pub(crate) fn fk_not_found(self, entity: &'static str, id: impl ToString) -> StorageError {
        match self {
            StorageError::Database(e) => fk_to_not_found(e, entity, Some(id)),
            StorageError::Sqlite(e) if is_foreign_key_violation(&e) => {
                StorageError::not_found(entity, id.to_string())
            }
            other => other,
        }
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Sqlite(e)
    }
}

/// Whether SQLite refused a write for a foreign key.
pub(crate) fn is_foreign_key_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        StorageError::Database(e)
    }
}

fn join_ids(ids: &[RequestId]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result type of the storage seam.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Not found when a write touched no row.
pub(crate) fn found_or(rows: u64, entity: &'static str, id: impl ToString) -> Result<()> {
    if rows == 0 {
        Err(StorageError::not_found(entity, id))
    } else {
        Ok(())
    }
}

/// Progress counts beyond a signed 64-bit integer are clamped.
pub(crate) fn clamp_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Turns a foreign-key violation into a not-found error for the referenced entity.
pub(crate) fn fk_to_not_found<I: ToString>(
    e: sqlx::Error,
    entity: &'static str,
    id: Option<I>,
) -> StorageError {
    if let sqlx::Error::Database(db) = &e
        && db.is_foreign_key_violation()
    {
        return StorageError::not_found(
            entity,
            id.map_or_else(|| "?".to_string(), |i| i.to_string()),
        );
    }
    StorageError::Database(e)
}
