//! Structured log records kept per build.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{BuildId, Timestamp};

/// How important a log record is; numbered as Python's `logging`, as jobcontrol does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Detail for whoever debugs the job.
    Debug,
    /// Normal progress.
    Info,
    /// Something unexpected that did not stop the job.
    Warning,
    /// Something failed.
    Error,
    /// Something failed badly.
    Critical,
}

impl LogLevel {
    /// Every level, least important first.
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warning,
        LogLevel::Error,
        LogLevel::Critical,
    ];

    /// The stored number (Python's: 10, 20, 30, 40, 50).
    pub fn number(self) -> i32 {
        match self {
            LogLevel::Debug => 10,
            LogLevel::Info => 20,
            LogLevel::Warning => 30,
            LogLevel::Error => 40,
            LogLevel::Critical => 50,
        }
    }

    /// The level with the given stored number.
    pub fn from_number(n: i64) -> Option<LogLevel> {
        LogLevel::ALL
            .into_iter()
            .find(|l| i64::from(l.number()) == n)
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no log level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log level {0:?}: expected debug, info, warning, error or critical")]
pub struct UnknownLevel(pub String);

impl FromStr for LogLevel {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s_lower = s.to_ascii_lowercase();
        let wanted = if s_lower == "warn" {
            "warning"
        } else {
            s_lower.as_str()
        };
        LogLevel::ALL
            .into_iter()
            .find(|l| l.name() == wanted)
            .ok_or_else(|| UnknownLevel(s.to_owned()))
    }
}

/// One structured log record as a job writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When it was written.
    pub at: Timestamp,
    /// Its level.
    pub level: LogLevel,
    /// The human message.
    pub message: String,
    /// Structured key/value fields (a JSON object; empty when there are none).
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// A stored log record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Its id, increasing in the order records were stored.
    pub id: i64,
    /// The build that wrote it.
    pub build_id: BuildId,
    /// The record.
    #[serde(flatten)]
    pub record: LogRecord,
}

/// Which log records to read back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogQuery {
    /// Only this build's records.
    pub build_id: Option<BuildId>,
    /// Only records at this level or above.
    pub min_level: Option<LogLevel>,
    /// Only records written at or after this time.
    pub since: Option<Timestamp>,
    /// Only records written before this time.
    pub until: Option<Timestamp>,
    /// Only records with an id above this one (for tailing).
    pub after_id: Option<i64>,
    /// At most this many records, oldest first.
    pub limit: Option<u32>,
}
