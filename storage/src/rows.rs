//! Decoding stored rows into model types, shared by every backend.
//!
//! Both schemas store the same values the same way: times as microseconds since the
//! Unix epoch (BIGINT), result codes as Buildbot's numbers, flags as 0/1 integers and
//! JSON values as text. So one decoder serves both, through [`Col`], which reads a named
//! column from a SQLite or a PostgreSQL row alike.

use serde::Deserialize;
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::{BuildsetContext, Result, StorageError};
use kiln_model::{
    Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId, LogEntry, LogLevel,
    LogRecord, Master, MasterId, ProgressRecord, ProgressReport, Properties, Property, Report,
    ReportKind, ReporterState, RequestId, ResultCode, Schedule, SourceStamp, Timestamp,
};

/// The columns of a build, with `b` as the table alias.
/// The columns of a buildset that [`buildset_from_row`] reads, with `bs` as the table
/// alias. Named, never `*`: a statement prepared while another process migrates the
/// file would otherwise come back with more columns than sqlx cached for it (it panicked
/// on a cold CI run).
pub(crate) const BUILDSET_COLUMNS: &str = "bs.id, bs.reason, bs.external_idstring, bs.submitted_at, bs.complete, \
     bs.complete_at, bs.results, bs.parent_buildid, bs.parent_relationship, bs.rebuilt_buildid, bs.resubmitted_from";

pub(crate) const BUILD_COLUMNS: &str = "b.id, b.number, b.builder_id, b.buildrequest_id, b.master_id, b.worker_slot, \
     b.started_at, b.complete_at, b.state_string, b.locks_duration_s, b.results, b.return_value, b.error, b.traceback";

/// A request joined with its claim.
pub(crate) const REQUEST_FROM: &str = "SELECT r.id, r.buildset_id, r.builder_id, r.priority, r.submitted_at, \
     r.waited_for, r.complete, r.complete_at, r.results, r.cancel_requested, r.not_before, r.superseded_by, c.master_id AS claimed_by, c.claimed_at \
     FROM buildrequests r LEFT JOIN buildrequest_claims c ON c.request_id = r.id";

/// Reads a named column of a row, whichever backend it came from.
pub(crate) trait Col {
    /// A BIGINT column.
    fn int(&self, name: &str) -> Result<i64>;
    /// A nullable BIGINT column.
    fn opt_int(&self, name: &str) -> Result<Option<i64>>;
    /// An INTEGER column (priorities).
    fn int32(&self, name: &str) -> Result<i32>;
    /// A floating-point column.
    fn float(&self, name: &str) -> Result<f64>;
    /// A text column.
    fn text(&self, name: &str) -> Result<String>;
    /// A nullable text column.
    fn opt_text(&self, name: &str) -> Result<Option<String>>;
    /// A 0/1 flag.
    fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.int(name)? != 0)
    }
}

impl<R> Col for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    i64: Type<R::Database> + for<'r> Decode<'r, R::Database>,
    i32: Type<R::Database> + for<'r> Decode<'r, R::Database>,
    f64: Type<R::Database> + for<'r> Decode<'r, R::Database>,
    String: Type<R::Database> + for<'r> Decode<'r, R::Database>,
{
    fn int(&self, name: &str) -> Result<i64> {
        Ok(self.try_get(name)?)
    }
    fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.try_get(name)?)
    }
    fn int32(&self, name: &str) -> Result<i32> {
        Ok(self.try_get(name)?)
    }
    fn float(&self, name: &str) -> Result<f64> {
        Ok(self.try_get(name)?)
    }
    fn text(&self, name: &str) -> Result<String> {
        Ok(self.try_get(name)?)
    }
    fn opt_text(&self, name: &str) -> Result<Option<String>> {
        Ok(self.try_get(name)?)
    }
}

/// A row of the SQLite writer's synchronous connection (rusqlite), read like the others.
pub(crate) struct SyncRow<'a, 'b>(pub(crate) &'a rusqlite::Row<'b>);

impl Col for SyncRow<'_, '_> {
    fn int(&self, name: &str) -> Result<i64> {
        Ok(self.0.get(name)?)
    }
    fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.0.get(name)?)
    }
    fn int32(&self, name: &str) -> Result<i32> {
        Ok(self.0.get(name)?)
    }
    fn float(&self, name: &str) -> Result<f64> {
        Ok(self.0.get(name)?)
    }
    fn text(&self, name: &str) -> Result<String> {
        Ok(self.0.get(name)?)
    }
    fn opt_text(&self, name: &str) -> Result<Option<String>> {
        Ok(self.0.get(name)?)
    }
}

/// A timestamp as stored: microseconds since the Unix epoch.
pub(crate) fn micros(t: Timestamp) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn ts(v: i64) -> Result<Timestamp> {
    chrono::DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StorageError::Corrupt(format!("timestamp {v} is out of range")))
}

pub(crate) fn opt_ts(v: Option<i64>) -> Result<Option<Timestamp>> {
    v.map(ts).transpose()
}

pub(crate) fn result_code(v: Option<i64>) -> Result<Option<ResultCode>> {
    v.map(|n| {
        ResultCode::from_code(n).ok_or_else(|| StorageError::Corrupt(format!("result code {n}")))
    })
    .transpose()
}

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| StorageError::Corrupt(format!("stored JSON: {e}")))
}

/// A JSON array of ids, for SQLite's `json_each(?)`.
pub(crate) fn json_ids(ids: impl IntoIterator<Item = i64>) -> String {
    let ids: Vec<i64> = ids.into_iter().collect();
    serde_json::Value::from(ids).to_string()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(crate) fn master_from_row(row: &impl Col) -> Result<Master> {
    Ok(Master {
        id: MasterId(row.int("id")?),
        name: row.text("name")?,
        active: row.flag("active")?,
        last_active: ts(row.int("last_active")?)?,
    })
}

/// Whether an active master registered the builder of the row (`builders` unaliased).
pub(crate) const SERVED: &str = "(CASE WHEN EXISTS (SELECT 1 FROM master_builders mb JOIN masters m ON m.id = mb.master_id \
     WHERE mb.builder_id = builders.id AND m.active = 1) THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END)";

pub(crate) fn builder_from_row(row: &impl Col) -> Result<Builder> {
    Ok(Builder {
        id: BuilderId(row.int("id")?),
        name: row.text("name")?,
        description: row.opt_text("description")?,
        depends_on: from_json(&row.text("depends_on")?)?,
        paused: row.flag("paused")?,
        served: row.flag("served")?,
    })
}

pub(crate) fn lock_hold_from_row(row: &impl Col) -> Result<kiln_model::LockHold> {
    Ok(kiln_model::LockHold {
        build_id: BuildId(row.int("build_id")?),
        master_id: MasterId(row.int("master_id")?),
        units: row.int("units")?,
        acquired_at: ts(row.int("acquired_at")?)?,
    })
}

pub(crate) fn schedule_from_row(row: &impl Col) -> Result<Schedule> {
    Ok(Schedule {
        name: row.text("name")?,
        definition: json(&row.text("definition")?)?,
        last_fire: ts(row.int("last_fire")?)?,
        next_fire: opt_ts(row.opt_int("next_fire")?)?,
        last_buildset_id: row.opt_int("last_buildset_id")?.map(BuildsetId),
        fires: row.int("fires")?,
    })
}

pub(crate) fn sourcestamp_from_row(row: &impl Col) -> Result<SourceStamp> {
    Ok(sourcestamp(
        row.text("codebase")?,
        row.text("repository")?,
        row.text("branch")?,
        row.text("revision")?,
        row.text("project")?,
    ))
}

pub(crate) fn buildset_from_row(row: &impl Col) -> Result<Buildset> {
    Ok(Buildset {
        id: BuildsetId(row.int("id")?),
        reason: row.text("reason")?,
        external_idstring: row.opt_text("external_idstring")?,
        submitted_at: ts(row.int("submitted_at")?)?,
        complete: row.flag("complete")?,
        complete_at: opt_ts(row.opt_int("complete_at")?)?,
        results: result_code(row.opt_int("results")?)?,
        parent_buildid: row.opt_int("parent_buildid")?.map(BuildId),
        parent_relationship: row.opt_text("parent_relationship")?,
        rebuilt_buildid: row.opt_int("rebuilt_buildid")?.map(BuildId),
        resubmitted_from: row.opt_int("resubmitted_from")?.map(BuildsetId),
    })
}

/// A request as stored, filled from a row of [`REQUEST_FROM`] or from JSON: an object
/// with the same keys (each backend builds one in SQL), or an array of the values in the
/// order of the fields below (PostgreSQL's claim turn). Keep the order.
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
    #[serde(default)]
    not_before: Option<i64>,
    #[serde(default)]
    superseded_by: Option<i64>,
    claimed_by: Option<i64>,
    claimed_at: Option<i64>,
}

impl RawRequest {
    fn from_row(row: &impl Col) -> Result<Self> {
        Ok(RawRequest {
            id: row.int("id")?,
            buildset_id: row.int("buildset_id")?,
            builder_id: row.int("builder_id")?,
            priority: row.int32("priority")?,
            submitted_at: row.int("submitted_at")?,
            waited_for: row.int("waited_for")?,
            complete: row.int("complete")?,
            complete_at: row.opt_int("complete_at")?,
            results: row.opt_int("results")?,
            cancel_requested: row.int("cancel_requested")?,
            not_before: row.opt_int("not_before")?,
            superseded_by: row.opt_int("superseded_by")?,
            claimed_by: row.opt_int("claimed_by")?,
            claimed_at: row.opt_int("claimed_at")?,
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
            not_before: opt_ts(self.not_before)?,
            superseded_by: self.superseded_by.map(RequestId),
        })
    }
}

pub(crate) fn request_from_row(row: &impl Col) -> Result<BuildRequest> {
    RawRequest::from_row(row)?.into_model()
}

/// A build as stored, filled from a row of [`BUILD_COLUMNS`] or from JSON: an object with
/// the same keys, or an array of the values in the order of the fields below (how
/// PostgreSQL's claim turn sends them); one conversion serves all. Keep the order.
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

impl RawBuild {
    fn from_row(row: &impl Col) -> Result<Self> {
        Ok(RawBuild {
            id: row.int("id")?,
            number: row.int("number")?,
            builder_id: row.int("builder_id")?,
            buildrequest_id: row.int("buildrequest_id")?,
            master_id: row.int("master_id")?,
            worker_slot: row.opt_int("worker_slot")?,
            started_at: row.int("started_at")?,
            complete_at: row.opt_int("complete_at")?,
            state_string: row.text("state_string")?,
            locks_duration_s: row.float("locks_duration_s")?,
            results: row.opt_int("results")?,
            return_value: row.opt_text("return_value")?,
            error: row.opt_text("error")?,
            traceback: row.opt_text("traceback")?,
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

pub(crate) fn build_from_row(row: &impl Col) -> Result<Build> {
    RawBuild::from_row(row)?.into_model()
}

/// name, JSON value, source
pub(crate) type RawProperty = (String, String, String);
/// codebase, repository, branch, revision, project
pub(crate) type RawStamp = (String, String, String, String, String);

pub(crate) fn context_from_raw(
    (reason, properties, stamps, depth): (String, Vec<RawProperty>, Vec<RawStamp>, i64),
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
        depth: u32::try_from(depth).unwrap_or(u32::MAX),
    })
}

/// Started builds from a JSON array of `[build, request, [reason, properties, stamps, depth]]`
/// (PostgreSQL's claim reads them back so; SQLite's answers from what it wrote).
#[cfg(feature = "postgres")]
pub(crate) fn started_from_json(text: &str) -> Result<Vec<(Build, BuildRequest, BuildsetContext)>> {
    type Raw = (
        RawBuild,
        RawRequest,
        (String, Vec<RawProperty>, Vec<RawStamp>, i64),
    );
    let raw: Vec<Raw> = serde_json::from_str(text)
        .map_err(|e| StorageError::Corrupt(format!("started builds: {e}")))?;
    raw.into_iter()
        .map(|(b, r, c)| Ok((b.into_model()?, r.into_model()?, context_from_raw(c)?)))
        .collect()
}

/// Decodes a JSON value made by the database's JSON functions.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StorageError::Corrupt(format!("aggregated rows: {e}")))
}

/// A property from its stored parts.
pub(crate) fn property(name: String, value: &str, source: String) -> Result<(String, Property)> {
    Ok((
        name,
        Property {
            value: json(value)?,
            source,
        },
    ))
}

/// A sourcestamp from its stored columns (absent branch and revision are stored as '').
pub(crate) fn sourcestamp(
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

pub(crate) fn property_from_row(row: &impl Col) -> Result<(String, Property)> {
    let value: String = row.text("value")?;
    property(row.text("name")?, &value, row.text("source")?)
}

pub(crate) fn properties_from_rows(rows: &[impl Col]) -> Result<Properties> {
    rows.iter().map(property_from_row).collect()
}

pub(crate) fn progress_from_row(row: &impl Col) -> Result<ProgressRecord> {
    let path: String = row.text("group_path")?;
    let group: Vec<String> = serde_json::from_str(&path)
        .map_err(|e| StorageError::Corrupt(format!("progress group {path:?}: {e}")))?;
    let count = |name: &str| -> Result<u64> {
        let v: i64 = row.int(name)?;
        u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("negative progress {name} {v}")))
    };
    Ok(ProgressRecord {
        report: ProgressReport {
            group,
            current: count("current")?,
            total: count("total")?,
            status: row.text("status")?,
        },
        updated_at: ts(row.int("updated_at")?)?,
    })
}

pub(crate) fn log_from_row(row: &impl Col) -> Result<LogEntry> {
    let level: i64 = row.int("level")?;
    let fields: String = row.text("fields")?;
    let fields = match json(&fields)? {
        serde_json::Value::Object(map) => map,
        other => {
            return Err(StorageError::Corrupt(format!(
                "log fields {other} are not an object"
            )));
        }
    };
    Ok(LogEntry {
        id: row.int("id")?,
        build_id: BuildId(row.int("build_id")?),
        record: LogRecord {
            at: ts(row.int("at")?)?,
            level: LogLevel::from_number(level)
                .ok_or_else(|| StorageError::Corrupt(format!("log level {level}")))?,
            message: row.text("message")?,
            fields,
        },
    })
}

pub(crate) fn reporter_from_row(row: &impl Col) -> Result<ReporterState> {
    Ok(ReporterState {
        name: row.text("name")?,
        cursor: row.int("cursor")?,
        owner: row.opt_int("owner")?.map(MasterId),
        lease_until: opt_ts(row.opt_int("lease_until")?)?,
        attempts: u32::try_from(row.int("attempts")?).unwrap_or(u32::MAX),
        last_error: row.opt_text("last_error")?,
        delivered: u64::try_from(row.int("delivered")?).unwrap_or_default(),
        dropped: u64::try_from(row.int("dropped")?).unwrap_or_default(),
        pending: u64::try_from(row.int("pending")?).unwrap_or_default(),
    })
}

pub(crate) fn report_from_row(row: &impl Col) -> Result<Report> {
    let kind = row.text("kind")?;
    Ok(Report {
        seq: row.int("seq")?,
        kind: kind
            .parse::<ReportKind>()
            .map_err(|e| StorageError::Corrupt(e.to_string()))?,
        buildset_id: BuildsetId(row.int("buildset_id")?),
        build_id: row.opt_int("build_id")?.map(BuildId),
        builder: row.opt_text("builder")?,
        results: result_code(row.opt_int("results")?)?,
        at: ts(row.int("at")?)?,
        payload: seconds_as_floats(from_json(&row.text("payload")?)?),
    })
}

/// The fields of an event payload that hold seconds.
const SECONDS_FIELDS: [&str; 4] = ["submitted_at", "started_at", "complete_at", "duration_s"];

/// Times in seconds are always JSON floats, whichever way the database printed a whole
/// number (SQLite writes `3.0`, PostgreSQL `3`), so that reporters see one shape.
fn seconds_as_floats(mut payload: serde_json::Value) -> serde_json::Value {
    if let Some(fields) = payload.as_object_mut() {
        for name in SECONDS_FIELDS {
            if let Some(value) = fields.get_mut(name)
                && let Some(seconds) = value.as_f64()
            {
                *value = serde_json::Value::from(seconds);
            }
        }
    }
    payload
}
