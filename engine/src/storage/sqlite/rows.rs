//! Decoding SQLite rows into model types, and encoding values for binding.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::model::{
    Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId, LogEntry, LogLevel,
    LogRecord, Master, MasterId, ProgressRecord, ProgressReport, Properties, Property, RequestId,
    ResultCode, SourceStamp, Timestamp,
};
use crate::storage::{Result, StorageError};

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
    })
}

pub(super) fn sourcestamp_from_row(row: &SqliteRow) -> Result<SourceStamp> {
    Ok(SourceStamp {
        codebase: row.try_get("codebase")?,
        repository: row.try_get("repository")?,
        branch: non_empty(row.try_get("branch")?),
        revision: non_empty(row.try_get("revision")?),
        project: row.try_get("project")?,
    })
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

pub(super) fn request_from_row(row: &SqliteRow) -> Result<BuildRequest> {
    Ok(BuildRequest {
        id: RequestId(row.try_get("id")?),
        buildset_id: BuildsetId(row.try_get("buildset_id")?),
        builder_id: BuilderId(row.try_get("builder_id")?),
        priority: row.try_get("priority")?,
        submitted_at: ts(row.try_get("submitted_at")?)?,
        waited_for: row.try_get("waited_for")?,
        complete: row.try_get("complete")?,
        complete_at: opt_ts(row.try_get("complete_at")?)?,
        results: result_code(row.try_get("results")?)?,
        claimed_by: row.try_get::<Option<i64>, _>("claimed_by")?.map(MasterId),
        claimed_at: opt_ts(row.try_get("claimed_at")?)?,
        cancel_requested: row.try_get("cancel_requested")?,
    })
}

pub(super) fn build_from_row(row: &SqliteRow) -> Result<Build> {
    Ok(Build {
        id: BuildId(row.try_get("id")?),
        number: row.try_get("number")?,
        builder_id: BuilderId(row.try_get("builder_id")?),
        request_id: RequestId(row.try_get("buildrequest_id")?),
        master_id: MasterId(row.try_get("master_id")?),
        worker_slot: row.try_get("worker_slot")?,
        started_at: ts(row.try_get("started_at")?)?,
        complete_at: opt_ts(row.try_get("complete_at")?)?,
        state_string: row.try_get("state_string")?,
        locks_duration_s: row.try_get("locks_duration_s")?,
        results: result_code(row.try_get("results")?)?,
        return_value: row
            .try_get::<Option<String>, _>("return_value")?
            .as_deref()
            .map(json)
            .transpose()?,
        error: row.try_get("error")?,
        traceback: row.try_get("traceback")?,
    })
}

pub(super) fn property_from_row(row: &SqliteRow) -> Result<(String, Property)> {
    let value: String = row.try_get("value")?;
    Ok((
        row.try_get("name")?,
        Property {
            value: json(&value)?,
            source: row.try_get("source")?,
        },
    ))
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
