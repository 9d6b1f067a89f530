//! Retention (jobcontrol's prune, Copr's delete): what of finished work an engine keeps.
//!
//! A builder's [`RetentionPolicy`] keeps its newest `keep_last` builds and everything
//! that finished within `keep_for`; the rest goes, with logs, progress, properties,
//! artifacts and result directories, then the requests left without builds and the
//! buildsets left without requests. A background task of each engine applies the
//! policies in bounded batches every [`EngineConfig::retention_interval`](crate::EngineConfig),
//! one master at a time on PostgreSQL. [`LogRetention`] prunes log records below a
//! level once they are old.

use std::time::Duration;

use kiln_model::LogLevel;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// How often an engine applies retention.
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// The most builds (and the most requests) one retention batch deletes: one batch is
/// one transaction, and a short one, so that claims and finishes never wait long.
pub const DEFAULT_RETENTION_BATCH: u32 = 500;
/// The most batches one builder's retention runs per round: a long backlog is worked
/// off over several rounds.
pub const MAX_RETENTION_BATCHES: u32 = 20;

/// What of a builder's finished work is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Work that finished within this long is kept.
    pub keep_for: Duration,
    /// The builder's newest builds (and requests) are kept, however old.
    pub keep_last: u32,
}

/// Log records below `below` are deleted once older than `keep_for`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRetention {
    /// How long records are kept.
    pub keep_for: Duration,
    /// Records at this level and above are kept however old.
    pub below: LogLevel,
}

impl RetentionPolicy {
    /// Checks the policy: something must be kept for some time.
    pub fn check(&self) -> Result<()> {
        if self.keep_for.is_zero() && self.keep_last == 0 {
            return Err(EngineError::Invalid(
                "retention keeps nothing: give keep_for (keep_days) or keep_last".into(),
            ));
        }
        Ok(())
    }
}

/// What one round of retention deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundOutcome {
    /// Builds, with their outputs and result directories.
    pub builds: u64,
    /// Requests.
    pub requests: u64,
    /// Buildsets.
    pub buildsets: u64,
    /// Source stamps no buildset left names.
    pub sourcestamps: u64,
    /// Log records pruned.
    pub log_records: u64,
}
