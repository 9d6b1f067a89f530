//! Decoding SQLite rows into model types, and encoding values for binding.

use serde::Deserialize;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::model::{
    Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId, LogEntry, LogLevel,
    LogRecord, Master, MasterId, ProgressRecord, ProgressReport, Properties, Property, RequestId,
    ResultCode, SourceStamp, Timestamp,
};
use crate::storage::{BuildsetContext, Result, StorageError};

/// The columns of a build, with `b` as the table alias.
pub(super) const BUILD_COLUMNS: &str = "b.id, b.number, b.builder_id, b.buildrequest_id, b.master_id, b.worker_slot, \
     b.started_at, b.complete_at, b.state_string, b.locks_duration_s, b.results, b.return_value, b.error, b.traceback";

/// A request joined with its claim.
pub(super) const REQUEST_FROM: &str = "SELECT r.id, r.buildset_id, r.builder_id, r.priority, r.submitted_at, \
     r.waited_for, r.complete, r.complete_at, r.results, r.cancel_requested, c.master_id AS claimed_by, c.claimed_at \
     FROM buildrequests r LEFT JOIN buildrequest_claims c ON c.request_id = r.id";

/// A timestamp as stored: microseconds since the Unix epoch.
pub(super) fn us(t: Timestamp) -> i64 {
    t.timestamp_micros()
}

fn ts(v: i64) -> Result<Timestamp> {
    chrono::DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StorageError::Corrupt(format!("timestamp {v} is out of range")))
}

fn opt_ts(v: Option<i64>) -> Result<Option<Timestamp>> {
    v.map(ts).transpose()
}

pub(super) fn result_code(v: Option<i64>) -> Result<Option<ResultCode>> {
    v.map(|n| {
        ResultCode::from_code(n).ok_or_else(|| StorageError::Corrupt(format!("result code {n}")))
    })
    .transpose()
}

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| StorageError::Corrupt(format!("stored JSON: {e}")))
}

/// A JSON array of ids, for `json_each(?)`.
pub(super) fn json_ids(ids: impl IntoIterator<Item = i64>) -> String {
    let ids: Vec<i64> = ids.into_iter().collect();
    serde_json::Value::from(ids).to_string()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn master_from_row(row: &SqliteRow) -> Result<Master> {
    Ok(Master {
        id: MasterId(row.try_get("id")?),
        name: row.try_get("name")?,
        active: row.try_get("active")?,
        last_active: ts(row.try_get("last_active")?)?,
    })
}

pub(super) fn builder_from_row(row: &SqliteRow) -> Result<Builder> {
    Ok(Builder {
        id: BuilderId(row.try_get("id")?),
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        depends_on: from_json(&row.try_get::<String, _>("depends_on")?)?,
    })
}

pub(super) fn sourcestamp_from_row(row: &SqliteRow) -> Result<SourceStamp> {
    Ok(sourcestamp(
        row.try_get("codebase")?,
        row.try_get("repository")?,
        row.try_get("branch")?,
        row.try_get("revision")?,
        row.try_get("project")?,
    ))
}

pub(super) fn buildset_from_row(row: &SqliteRow) -> Result<Buildset> {
    Ok(Buildset {
        id: BuildsetId(row.try_get("id")?),
        reason: row.try_get("reason")?,
        external_idstring: row.try_get("external_idstring")?,
        submitted_at: ts(row.try_get("submitted_at")?)?,
        complete: row.try_get("complete")?,
        complete_at: opt_ts(row.try_get("complete_at")?)?,
        results: result_code(row.try_get("results")?)?,
        parent_buildid: row
            .try_get::<Option<i64>, _>("parent_buildid")?
            .map(BuildId),
        parent_relationship: row.try_get("parent_relationship")?,
        rebuilt_buildid: row
            .try_get::<Option<i64>, _>("rebuilt_buildid")?
            .map(BuildId),
    })
}

/// A request as stored, filled from a row of [`REQUEST_FROM`] or from a JSON object made
/// with [`REQUEST_JSON`]; one conversion serves both.
#[derive(Deserialize)]
struct RawRequest {
    id: i64,
    buildset_id: i64,
    builder_id: i64,
    priority: i32,
    submitted_at: i64,
    waited_for: i64,
    complete: i64,
    complete_at: Option<i64>,
    results: Option<i64>,
    cancel_requested: i64,
    claimed_by: Option<i64>,
    claimed_at: Option<i64>,
}

/// A request joined with its claim, as one JSON object (`r` and `c` as in [`REQUEST_FROM`]).
pub(super) const REQUEST_JSON: &str = "json_object('id', r.id, 'buildset_id', r.buildset_id, \
     'builder_id', r.builder_id, 'priority', r.priority, 'submitted_at', r.submitted_at, 'waited_for', r.waited_for, \
     'complete', r.complete, 'complete_at', r.complete_at, 'results', r.results, 'cancel_requested', r.cancel_requested, \
     'claimed_by', c.master_id, 'claimed_at', c.claimed_at)";

impl RawRequest {
    fn from_row(row: &SqliteRow) -> Result<Self> {
        Ok(RawRequest {
            id: row.try_get("id")?,
            buildset_id: row.try_get("buildset_id")?,
            builder_id: row.try_get("builder_id")?,
            priority: row.try_get("priority")?,
            submitted_at: row.try_get("submitted_at")?,
            waited_for: row.try_get("waited_for")?,
            complete: row.try_get("complete")?,
            complete_at: row.try_get("complete_at")?,
            results: row.try_get("results")?,
            cancel_requested: row.try_get("cancel_requested")?,
            claimed_by: row.try_get("claimed_by")?,
            claimed_at: row.try_get("claimed_at")?,
        })
    }

    fn into_model(self) -> Result<BuildRequest> {
        Ok(BuildRequest {
            id: RequestId(self.id),
            buildset_id: BuildsetId(self.buildset_id),
            builder_id: BuilderId(self.builder_id),
            priority: self.priority,
            submitted_at: ts(self.submitted_at)?,
            waited_for: self.waited_for != 0,
            complete: self.complete != 0,
            complete_at: opt_ts(self.complete_at)?,
            results: result_code(self.results)?,
            claimed_by: self.claimed_by.map(MasterId),
            claimed_at: opt_ts(self.claimed_at)?,
            cancel_requested: self.cancel_requested != 0,
        })
    }
}

pub(super) fn request_from_row(row: &SqliteRow) -> Result<BuildRequest> {
    RawRequest::from_row(row)?.into_model()
}

/// A build as stored, filled from a row of [`BUILD_COLUMNS`] or from a JSON object made
/// with [`BUILD_JSON`]; one conversion serves both.
#[derive(Deserialize)]
struct RawBuild {
    id: i64,
    number: i64,
    builder_id: i64,
    buildrequest_id: i64,
    master_id: i64,
    worker_slot: Option<i64>,
    started_at: i64,
    complete_at: Option<i64>,
    state_string: String,
    locks_duration_s: f64,
    results: Option<i64>,
    return_value: Option<String>,
    error: Option<String>,
    traceback: Option<String>,
}

/// A build as one JSON object, with `b` as the table alias.
pub(super) const BUILD_JSON: &str = "json_object('id', b.id, 'number', b.number, 'builder_id', b.builder_id, \
     'buildrequest_id', b.buildrequest_id, 'master_id', b.master_id, 'worker_slot', b.worker_slot, \
     'started_at', b.started_at, 'complete_at', b.complete_at, 'state_string', b.state_string, \
     'locks_duration_s', b.locks_duration_s, 'results', b.results, 'return_value', b.return_value, \
     'error', b.error, 'traceback', b.traceback)";

impl RawBuild {
    fn from_row(row: &SqliteRow) -> Result<Self> {
        Ok(RawBuild {
            id: row.try_get("id")?,
            number: row.try_get("number")?,
            builder_id: row.try_get("builder_id")?,
            buildrequest_id: row.try_get("buildrequest_id")?,
            master_id: row.try_get("master_id")?,
            worker_slot: row.try_get("worker_slot")?,
            started_at: row.try_get("started_at")?,
            complete_at: row.try_get("complete_at")?,
            state_string: row.try_get("state_string")?,
            locks_duration_s: row.try_get("locks_duration_s")?,
            results: row.try_get("results")?,
            return_value: row.try_get("return_value")?,
            error: row.try_get("error")?,
            traceback: row.try_get("traceback")?,
        })
    }

    fn into_model(self) -> Result<Build> {
        Ok(Build {
            id: BuildId(self.id),
            number: self.number,
            builder_id: BuilderId(self.builder_id),
            request_id: RequestId(self.buildrequest_id),
            master_id: MasterId(self.master_id),
            worker_slot: self.worker_slot,
            started_at: ts(self.started_at)?,
            complete_at: opt_ts(self.complete_at)?,
            state_string: self.state_string,
            locks_duration_s: self.locks_duration_s,
            results: result_code(self.results)?,
            return_value: self.return_value.as_deref().map(json).transpose()?,
            error: self.error,
            traceback: self.traceback,
        })
    }
}

pub(super) fn build_from_row(row: &SqliteRow) -> Result<Build> {
    RawBuild::from_row(row)?.into_model()
}

/// A buildset's reason, properties and stamps as one JSON array, with `bs` as the alias
/// of `buildsets`.
pub(super) const CONTEXT_JSON: &str = "json_array(bs.reason, \
     json((SELECT json_group_array(json_array(p.name, p.value, p.source)) \
           FROM buildset_properties p WHERE p.buildset_id = bs.id)), \
     json((SELECT json_group_array(json_array(s.codebase, s.repository, s.branch, s.revision, s.project)) \
           FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id \
           WHERE bss.buildset_id = bs.id)))";

/// name, JSON value, source
type RawProperty = (String, String, String);
/// codebase, repository, branch, revision, project
type RawStamp = (String, String, String, String, String);

fn context_from_raw(
    (reason, properties, stamps): (String, Vec<RawProperty>, Vec<RawStamp>),
) -> Result<BuildsetContext> {
    let properties = properties
        .into_iter()
        .map(|(name, value, source)| property(name, &value, source))
        .collect::<Result<_>>()?;
    let mut sourcestamps: Vec<SourceStamp> = stamps
        .into_iter()
        .map(|(c, r, b, rev, p)| sourcestamp(c, r, b, rev, p))
        .collect();
    sourcestamps.sort();
    Ok(BuildsetContext {
        reason,
        properties,
        sourcestamps,
    })
}

/// Started builds from a JSON array of `[BUILD_JSON, REQUEST_JSON, CONTEXT_JSON]`.
pub(super) fn started_from_json(text: &str) -> Result<Vec<(Build, BuildRequest, BuildsetContext)>> {
    type Raw = (
        RawBuild,
        RawRequest,
        (String, Vec<RawProperty>, Vec<RawStamp>),
    );
    let raw: Vec<Raw> = serde_json::from_str(text)
        .map_err(|e| StorageError::Corrupt(format!("started builds: {e}")))?;
    raw.into_iter()
        .map(|(b, r, c)| Ok((b.into_model()?, r.into_model()?, context_from_raw(c)?)))
        .collect()
}

/// Decodes a JSON value made by SQLite's JSON functions.
pub(super) fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StorageError::Corrupt(format!("aggregated rows: {e}")))
}

/// A property from its stored parts.
pub(super) fn property(name: String, value: &str, source: String) -> Result<(String, Property)> {
    Ok((
        name,
        Property {
            value: json(value)?,
            source,
        },
    ))
}

/// A sourcestamp from its stored columns (absent branch and revision are stored as '').
pub(super) fn sourcestamp(
    codebase: String,
    repository: String,
    branch: String,
    revision: String,
    project: String,
) -> SourceStamp {
    SourceStamp {
        codebase,
        repository,
        branch: non_empty(branch),
        revision: non_empty(revision),
        project,
    }
}

pub(super) fn property_from_row(row: &SqliteRow) -> Result<(String, Property)> {
    let value: String = row.try_get("value")?;
    property(row.try_get("name")?, &value, row.try_get("source")?)
}

pub(super) fn properties_from_rows(rows: &[SqliteRow]) -> Result<Properties> {
    rows.iter().map(property_from_row).collect()
}

pub(super) fn progress_from_row(row: &SqliteRow) -> Result<ProgressRecord> {
    let path: String = row.try_get("group_path")?;
    let group: Vec<String> = serde_json::from_str(&path)
        .map_err(|e| StorageError::Corrupt(format!("progress group {path:?}: {e}")))?;
    let count = |name: &str| -> Result<u64> {
        let v: i64 = row.try_get(name)?;
        u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("negative progress {name} {v}")))
    };
    Ok(ProgressRecord {
        report: ProgressReport {
            group,
            current: count("current")?,
            total: count("total")?,
            status: row.try_get("status")?,
        },
        updated_at: ts(row.try_get("updated_at")?)?,
    })
}

pub(super) fn log_from_row(row: &SqliteRow) -> Result<LogEntry> {
    let level: i64 = row.try_get("level")?;
    let fields: String = row.try_get("fields")?;
    let fields = match json(&fields)? {
        serde_json::Value::Object(map) => map,
        other => {
            return Err(StorageError::Corrupt(format!(
                "log fields {other} are not an object"
            )));
        }
    };
    Ok(LogEntry {
        id: row.try_get("id")?,
        build_id: BuildId(row.try_get("build_id")?),
        record: LogRecord {
            at: ts(row.try_get("at")?)?,
            level: LogLevel::from_number(level)
                .ok_or_else(|| StorageError::Corrupt(format!("log level {level}")))?,
            message: row.try_get("message")?,
            fields,
        },
    })
}
