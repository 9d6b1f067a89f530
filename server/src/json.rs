//! Entities as the API shows them, in Buildbot's spelling (`bsid`, `buildrequestid`,
//! `builderid`, ...): times are seconds since the Unix epoch, results are Buildbot's
//! numbers. The engine's types go through here into [`crate::wire`]'s; the command
//! line's `--json` uses the same functions, so that the API, its event stream and the
//! CLI speak one vocabulary.

use kiln_engine::model::{
    Build, BuildRequest, Builder, BuilderStatus, Buildset, Master, Properties, ResultCode,
    SourceStamp, Timestamp,
};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::wire;

/// Seconds since the epoch, with microseconds.
fn seconds(t: Timestamp) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

fn opt_seconds(t: Option<Timestamp>) -> Option<f64> {
    t.map(seconds)
}

fn results(r: Option<ResultCode>) -> Option<i64> {
    r.map(|r| i64::from(r.code()))
}

/// A wire value as JSON. The wire types have only string map keys, so this cannot
/// fail; `null` stands in if it ever did.
pub fn value<T: serde::Serialize>(wire: T) -> Value {
    serde_json::to_value(wire).unwrap_or(Value::Null)
}

/// The output fields of a buildset.
pub const BUILDSET_FIELDS: &[&str] = &[
    "bsid",
    "reason",
    "external_idstring",
    "submitted_at",
    "complete",
    "complete_at",
    "results",
    "parent_buildid",
    "parent_relationship",
    "rebuilt_buildid",
    "resubmitted_from",
    "sourcestamps",
    "state",
    "properties",
];

pub fn buildset(b: &Buildset) -> Value {
    value(buildset_wire(b))
}

pub fn buildset_wire(b: &Buildset) -> wire::Buildset {
    wire::Buildset {
        bsid: b.id.0,
        reason: b.reason.clone(),
        external_idstring: b.external_idstring.clone(),
        submitted_at: seconds(b.submitted_at),
        complete: b.complete,
        complete_at: opt_seconds(b.complete_at),
        results: results(b.results),
        parent_buildid: b.parent_buildid.map(|x| x.0),
        parent_relationship: b.parent_relationship.clone(),
        rebuilt_buildid: b.rebuilt_buildid.map(|x| x.0),
        resubmitted_from: b.resubmitted_from.map(|x| x.0),
        state: None,
        sourcestamps: None,
        properties: None,
    }
}

pub fn sourcestamps(stamps: &[SourceStamp]) -> Value {
    value(
        stamps
            .iter()
            .map(|s| stamp_wire(None, s))
            .collect::<Vec<_>>(),
    )
}

pub fn stamp_wire(
    id: Option<kiln_engine::model::SourceStampId>,
    s: &SourceStamp,
) -> wire::SourceStamp {
    wire::SourceStamp {
        ssid: id.map(|i| i.0),
        codebase: s.codebase.clone(),
        repository: s.repository.clone(),
        branch: s.branch.clone(),
        revision: s.revision.clone(),
        project: s.project.clone(),
        patch: None,
    }
}

/// A stored sourcestamp with its id, in Buildbot's shape (`ssid`; no patches).
pub fn sourcestamp(id: kiln_engine::model::SourceStampId, s: &SourceStamp) -> Value {
    value(stamp_wire(Some(id), s))
}

pub fn properties_wire(props: &Properties) -> wire::Properties {
    wire::Properties(
        props
            .iter()
            .map(|(name, p)| (name.clone(), (p.value.clone(), p.source.clone())))
            .collect(),
    )
}

/// Properties as Buildbot shows them: name → [value, source].
pub fn properties(props: &Properties) -> Value {
    value(properties_wire(props))
}

/// The output fields of a build request.
pub const REQUEST_FIELDS: &[&str] = &[
    "buildrequestid",
    "buildsetid",
    "builderid",
    "priority",
    "submitted_at",
    "waited_for",
    "complete",
    "complete_at",
    "results",
    "claimed",
    "claimed_by_masterid",
    "claimed_at",
    "cancel_requested",
    "not_before",
    "superseded_by",
];

pub fn request(r: &BuildRequest) -> Value {
    value(wire::BuildRequest {
        buildrequestid: r.id.0,
        buildsetid: r.buildset_id.0,
        builderid: r.builder_id.0,
        priority: i64::from(r.priority),
        submitted_at: seconds(r.submitted_at),
        waited_for: r.waited_for,
        complete: r.complete,
        complete_at: opt_seconds(r.complete_at),
        results: results(r.results),
        claimed: r.claimed_by.is_some(),
        claimed_by_masterid: r.claimed_by.map(|m| m.0),
        claimed_at: opt_seconds(r.claimed_at),
        cancel_requested: r.cancel_requested,
        not_before: opt_seconds(r.not_before),
        superseded_by: r.superseded_by.map(|x| x.0),
    })
}

/// The output fields of a build.
pub const BUILD_FIELDS: &[&str] = &[
    "buildid",
    "number",
    "builderid",
    "buildrequestid",
    "masterid",
    "workerslot",
    "started_at",
    "complete",
    "complete_at",
    "state_string",
    "locks_duration_s",
    "results",
    "return_value",
    "error",
    "traceback",
    "properties",
];

pub fn build(b: &Build) -> Value {
    value(wire::Build {
        buildid: b.id.0,
        number: b.number,
        builderid: b.builder_id.0,
        buildrequestid: b.request_id.0,
        masterid: b.master_id.0,
        workerslot: b.worker_slot,
        started_at: seconds(b.started_at),
        complete: b.complete_at.is_some(),
        complete_at: opt_seconds(b.complete_at),
        state_string: b.state_string.clone(),
        locks_duration_s: b.locks_duration_s,
        results: results(b.results),
        return_value: b.return_value.clone(),
        error: b.error.clone(),
        traceback: b.traceback.clone(),
        properties: None,
    })
}

/// The output fields of a builder.
pub const BUILDER_FIELDS: &[&str] = &[
    "builderid",
    "name",
    "description",
    "depends_on",
    "paused",
    "served",
    "status",
    "latest_successful_buildid",
];

pub fn builder(b: &Builder, status: BuilderStatus, latest: Option<&Build>) -> Value {
    value(wire::Builder {
        builderid: b.id.0,
        name: b.name.clone(),
        description: b.description.clone(),
        depends_on: b.depends_on.clone(),
        paused: b.paused,
        served: b.served,
        status: match status {
            BuilderStatus::Building => wire::BuilderStatus::Building,
            BuilderStatus::NotBuilt => wire::BuilderStatus::NotBuilt,
            BuilderStatus::Failed => wire::BuilderStatus::Failed,
            BuilderStatus::Success => wire::BuilderStatus::Success,
            BuilderStatus::Outdated => wire::BuilderStatus::Outdated,
        },
        latest_successful_buildid: latest.map(|l| l.id.0),
    })
}

/// The output fields of a master.
pub const MASTER_FIELDS: &[&str] = &["masterid", "name", "active", "last_active"];

pub fn master(m: &Master) -> Value {
    value(wire::Master {
        masterid: m.id.0,
        name: m.name.clone(),
        active: m.active,
        last_active: seconds(m.last_active),
    })
}

/// The output fields of a schedule.
pub const SCHEDULE_FIELDS: &[&str] = &[
    "name",
    "timing",
    "builders",
    "catch_up",
    "only_if_changed",
    "definition",
    "last_fire",
    "next_fire",
    "last_bsid",
    "fires",
];

pub fn schedule(s: &kiln_engine::model::Schedule) -> Value {
    let d = &s.definition;
    value(wire::Schedule {
        name: s.name.clone(),
        timing: d.get("timing").cloned().unwrap_or(Value::Null),
        builders: d
            .pointer("/submission/builders")
            .and_then(Value::as_array)
            .map(|b| {
                b.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        catch_up: d.get("catch_up").cloned().unwrap_or(Value::Null),
        only_if_changed: d.get("only_if_changed").cloned().unwrap_or(Value::Null),
        definition: d.clone(),
        last_fire: seconds(s.last_fire),
        next_fire: opt_seconds(s.next_fire),
        last_bsid: s.last_buildset_id.map(|b| b.0),
        fires: s.fires,
    })
}

/// The output fields of a lock.
pub const LOCK_FIELDS: &[&str] = &["name", "count", "held", "holders", "users", "waiting"];

pub fn lock(l: &kiln_engine::model::Lock) -> Value {
    value(wire::Lock {
        name: l.name.clone(),
        count: l.capacity,
        held: l.held(),
        holders: l
            .holders
            .iter()
            .map(|h| wire::LockHolder {
                buildid: h.build_id.0,
                masterid: h.master_id.0,
                units: h.units,
                acquired_at: seconds(h.acquired_at),
            })
            .collect(),
        users: l
            .users
            .iter()
            .map(|u| wire::LockUser {
                builderid: u.builder_id.0,
                name: u.builder.clone(),
                units: u.units,
            })
            .collect(),
        waiting: l.waiting,
    })
}

/// What a submit made, as `POST /buildsets` answers.
pub fn submitted(s: &kiln_engine::Submitted) -> Value {
    value(wire::SubmitReply {
        bsid: s.buildset_id.0,
        brids: s.requests.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        existing: s.existing,
        unserved: s.unserved.clone(),
    })
}

/// A result as Buildbot's number.
pub fn result_number(r: Option<ResultCode>) -> Value {
    json!(results(r))
}

/// The output fields of a reporter.
pub const REPORTER_FIELDS: &[&str] = &[
    "name",
    "cursor",
    "masterid",
    "lease_until",
    "attempts",
    "last_error",
    "delivered",
    "dropped",
    "pending",
];

pub fn reporter(r: &kiln_engine::model::ReporterState) -> Value {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    value(wire::Reporter {
        name: r.name.clone(),
        cursor: r.cursor,
        masterid: r.owner.map(|m| m.0),
        lease_until: opt_seconds(r.lease_until),
        attempts: i64::from(r.attempts),
        last_error: r.last_error.clone(),
        delivered: count(r.delivered),
        dropped: count(r.dropped),
        pending: count(r.pending),
    })
}

/// One log record.
pub fn log(e: &kiln_engine::model::LogEntry) -> Value {
    value(wire::LogRecord {
        id: e.id,
        at: seconds(e.record.at),
        level: e.record.level.name().to_owned(),
        message: e.record.message.clone(),
        fields: Value::Object(e.record.fields.clone()),
    })
}

/// Keeps only the selected fields of an object (all when none are selected).
pub fn select(value: Value, fields: &[String]) -> Value {
    if fields.is_empty() {
        return value;
    }
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| fields.iter().any(|f| f == k))
                .collect::<Map<String, Value>>(),
        ),
        other => other,
    }
}

/// A collection response: `{"<plural>": [...], "meta": {"total": N}}`.
pub fn collection(plural: &str, items: Vec<Value>, total: u64, fields: &[String]) -> Value {
    let items: Vec<Value> = items.into_iter().map(|v| select(v, fields)).collect();
    json!({ plural: items, "meta": { "total": total } })
}

/// A single-entity response in the same shape, as Buildbot answers.
pub fn entity(plural: &str, item: Value, fields: &[String]) -> Value {
    json!({ plural: [select(item, fields)], "meta": { "total": 1 } })
}

/// Reads an id from a path segment.
pub fn id(what: &str, text: &str) -> Result<i64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} id {text:?} is not a number")))
}
