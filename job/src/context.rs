//! What a build's executor can see and do: the [`BuildContext`], the limits its writes
//! are held to, and the [`JobRuntime`] it reaches the engine through.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use kiln_model::{
    Build, BuildId, BuildsetId, LogLevel, LogRecord, ProgressReport, Properties, Property,
    RequestId, ResultCode, SourceStamp,
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::policy::{TriggerError, Triggered, relationship_name};

/// A dependency's return value, as resolved when a build started.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResolvedDependency {
    /// The dependency's builder.
    pub builder: String,
    /// The build whose return value is used.
    pub build_id: BuildId,
    /// Its return value (`null` when it returned nothing).
    pub return_value: Value,
}

/// Bytes of one state string or one progress status line a build may set: a line for a
/// dashboard, not a report (reports belong in the log or the result directory).
pub const DEFAULT_STATUS_BYTES: usize = 4 << 10;
/// Progress groups one build may report: enough for a deep tree of real work, few
/// enough that the progress table and the dashboard stay small.
pub const DEFAULT_PROGRESS_GROUPS: usize = 1_000;
/// Bytes of build properties (names, JSON values and sources) one build may hold.
pub const DEFAULT_PROPERTY_BYTES: usize = 1 << 20;
/// Child buildsets one build may start, over all its triggers (each trigger is further
/// held to the engine's `MAX_TRIGGER_CHILDREN`).
pub const DEFAULT_MAX_CHILDREN: usize = 10_000;
/// How deep a trigger tree may grow: a self-triggering job stops here instead of
/// filling the queue.
pub const DEFAULT_MAX_TRIGGER_DEPTH: u32 = 16;

/// What one build may write through the engine, whatever runs it: going past a limit
/// ends the build as EXCEPTION with a reason that names the limit. (What a sandboxed
/// build may use of the machine is the plugin host's `Limits`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildLimits {
    /// See [`DEFAULT_STATUS_BYTES`].
    pub status_bytes: usize,
    /// See [`DEFAULT_PROGRESS_GROUPS`].
    pub progress_groups: usize,
    /// See [`DEFAULT_PROPERTY_BYTES`].
    pub property_bytes: usize,
    /// See [`DEFAULT_MAX_CHILDREN`].
    pub children: usize,
    /// See [`DEFAULT_MAX_TRIGGER_DEPTH`].
    pub trigger_depth: u32,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            status_bytes: DEFAULT_STATUS_BYTES,
            progress_groups: DEFAULT_PROGRESS_GROUPS,
            property_bytes: DEFAULT_PROPERTY_BYTES,
            children: DEFAULT_MAX_CHILDREN,
            trigger_depth: DEFAULT_MAX_TRIGGER_DEPTH,
        }
    }
}

impl BuildLimits {
    /// Checks that the limits are usable, naming the first one that is not.
    pub fn validate(&self) -> Result<(), String> {
        if self.status_bytes == 0 || self.progress_groups == 0 || self.property_bytes == 0 {
            return Err("status, progress group and property limits must be at least 1".into());
        }
        Ok(())
    }
}

/// What a build has written so far, held against its [`BuildLimits`].
#[derive(Default)]
pub(crate) struct Volume {
    /// Progress groups reported so far.
    groups: std::collections::BTreeSet<Vec<String>>,
    /// Bytes of each property set so far, by name.
    properties: std::collections::BTreeMap<String, usize>,
    /// Children asked for so far.
    children: usize,
}

/// Why a running build is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Somebody cancelled it: it ends as CANCELLED.
    Cancelled,
    /// The engine is shutting down: it ends as RETRY and its request runs again.
    Shutdown,
    /// This master lost its registration (it was expired): the build is no longer ours.
    MasterLost,
}

/// Why a build's write was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The build went past one of its [`BuildLimits`]; it ends as EXCEPTION with this
    /// reason whatever its job does next.
    #[error("{0}")]
    LimitExceeded(String),
    /// The build has ended: it can write nothing more.
    #[error("build {0} has ended; it can write nothing more")]
    Ended(BuildId),
    /// The write itself is malformed (an empty property name, an empty progress group).
    #[error("{0}")]
    Invalid(String),
}

/// The build as the engine started it: everything its job sees, and what the engine
/// needs to start children for it.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    /// The build.
    pub build: Build,
    /// Its builder's name.
    pub builder: String,
    /// Its request's buildset.
    pub buildset_id: BuildsetId,
    /// The buildset's reason.
    pub reason: String,
    /// The builder's positional arguments, dependencies' return values substituted.
    pub args: Value,
    /// The builder's keyword arguments, dependencies' return values substituted.
    pub kwargs: Value,
    /// The return values of the builds it depends on.
    pub dependencies: Vec<ResolvedDependency>,
    /// The buildset's properties.
    pub properties: Properties,
    /// The buildset's sourcestamps (its children get them too).
    pub sourcestamps: Vec<SourceStamp>,
    /// Its request's priority (its children get it too).
    pub priority: i32,
    /// How deep its buildset hangs in its trigger tree (0: submitted, not triggered).
    pub depth: u32,
    /// What it may write.
    pub limits: BuildLimits,
    /// Its own result directory, if the engine gives builds one.
    pub result_dir: Option<std::path::PathBuf>,
    /// Tells it when it is asked to stop.
    pub stop: watch::Receiver<Option<StopReason>>,
}

/// What one build may ask of the engine that runs it. The engine's scheduler implements
/// it; everything a job writes goes through it, so this crate knows no database and no
/// scheduler.
#[async_trait]
pub trait JobRuntime: Send + Sync + 'static {
    /// Buffers a log record; may wait while the build has a large backlog.
    async fn log(&self, build: BuildId, record: LogRecord) -> Result<(), WriteError>;
    /// Buffers a log record without waiting (captured output, bounded on its own).
    fn log_now(&self, build: BuildId, record: LogRecord) -> Result<(), WriteError>;
    /// Buffers a progress report (the latest per group wins).
    fn progress(&self, build: BuildId, report: ProgressReport) -> Result<(), WriteError>;
    /// Buffers the build's state string.
    fn state(&self, build: BuildId, state: String) -> Result<(), WriteError>;
    /// Buffers a build property (the latest per name wins).
    fn property(&self, build: BuildId, name: &str, property: Property) -> Result<(), WriteError>;
    /// Stores what the build has buffered, now.
    async fn flush(&self, build: BuildId);
    /// Starts (or adopts) child buildsets of `parent` and, when `spec.wait`, waits until
    /// the relationship's policy lets the parent go on.
    async fn trigger(
        &self,
        parent: &BuildSpec,
        spec: TriggerSpec,
    ) -> Result<Triggered, TriggerError>;
}

/// What a build asks to trigger.
#[derive(Clone, Debug)]
pub struct TriggerSpec {
    /// One child buildset per entry (a builder may repeat).
    pub builders: Vec<String>,
    /// The children's properties.
    pub properties: Properties,
    /// Whether the parent waits for its policy's verdict.
    pub wait: bool,
    /// The relationship (`""` means "triggers").
    pub relationship: String,
    /// Prefix of the children's trigger keys: the same on every run of the parent's
    /// request, so that a re-run finds what an earlier run started.
    pub key_prefix: String,
}

/// What a build's executor can see and do.
#[derive(Clone)]
pub struct BuildContext {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    spec: BuildSpec,
    runtime: Arc<dyn JobRuntime>,
    build_properties: Mutex<Properties>,
    /// What it has written so far, against its limits.
    volume: Mutex<Volume>,
    /// The first limit it went past: the build ends as EXCEPTION with this reason.
    breach: Mutex<Option<String>>,
    /// Triggers so far: numbers each trigger's children, the same on every run.
    triggers: AtomicU32,
    /// The worst verdict of the policies this build waited on, with the relationship.
    verdict: Mutex<Option<(ResultCode, String)>>,
}

impl BuildContext {
    /// The context of a build the engine started, reaching the engine through `runtime`.
    /// (A test can run an executor against a runtime of its own.)
    pub fn new(spec: BuildSpec, runtime: Arc<dyn JobRuntime>) -> Self {
        BuildContext {
            inner: Arc::new(ContextInner {
                spec,
                runtime,
                build_properties: Mutex::new(Properties::new()),
                volume: Mutex::new(Volume::default()),
                breach: Mutex::new(None),
                triggers: AtomicU32::new(0),
                verdict: Mutex::new(None),
            }),
        }
    }

    /// The build as the engine started it.
    pub fn spec(&self) -> &BuildSpec {
        &self.inner.spec
    }

    /// The build's id.
    pub fn build_id(&self) -> BuildId {
        self.inner.spec.build.id
    }

    /// The build's number on its builder.
    pub fn number(&self) -> i64 {
        self.inner.spec.build.number
    }

    /// The builder's name.
    pub fn builder(&self) -> &str {
        &self.inner.spec.builder
    }

    /// The request this build runs.
    pub fn request_id(&self) -> RequestId {
        self.inner.spec.build.request_id
    }

    /// The buildset of that request.
    pub fn buildset_id(&self) -> BuildsetId {
        self.inner.spec.buildset_id
    }

    /// The buildset's reason.
    pub fn reason(&self) -> &str {
        &self.inner.spec.reason
    }

    /// The builder's configured positional arguments (a JSON value, `null` if none).
    pub fn args(&self) -> &Value {
        &self.inner.spec.args
    }

    /// The builder's configured keyword arguments (a JSON value, `null` if none).
    pub fn kwargs(&self) -> &Value {
        &self.inner.spec.kwargs
    }

    /// The buildset's sourcestamps.
    pub fn sourcestamps(&self) -> &[SourceStamp] {
        &self.inner.spec.sourcestamps
    }

    /// The return values of the builds this one depends on, as resolved when it started.
    pub fn dependencies(&self) -> &[ResolvedDependency] {
        &self.inner.spec.dependencies
    }

    /// Starts one child buildset per entry of `builders` (a builder may repeat) with this
    /// build's priority and sourcestamps, `properties`, and this build as parent under
    /// `relationship` (`""` means "triggers"). With `wait`, returns once the
    /// relationship's policy lets this build go on; the build then ends with the worse of
    /// the policy's verdict and its own result.
    ///
    /// Triggers are numbered in the order a build makes them: if this build's master dies
    /// and its request runs again, the same trigger adopts the children the first run
    /// started instead of starting them again.
    pub async fn trigger(
        &self,
        builders: &[&str],
        properties: Properties,
        wait: bool,
        relationship: &str,
    ) -> Result<Triggered, TriggerError> {
        let asked = {
            let mut volume = self.volume();
            volume.children = volume.children.saturating_add(builders.len());
            volume.children
        };
        if asked > self.inner.spec.limits.children {
            let limit = self.inner.spec.limits.children;
            return Err(TriggerError::LimitExceeded(self.breach(format!(
                "children limit exceeded: more than {limit} child buildsets from one build"
            ))));
        }
        let n = self.inner.triggers.fetch_add(1, Ordering::Relaxed);
        let spec = TriggerSpec {
            builders: builders.iter().map(|b| (*b).to_owned()).collect(),
            properties,
            wait,
            relationship: relationship.to_owned(),
            key_prefix: format!("t{n}"),
        };
        let triggered = match self.inner.runtime.trigger(&self.inner.spec, spec).await {
            Err(TriggerError::LimitExceeded(reason)) => {
                return Err(TriggerError::LimitExceeded(self.breach(reason)));
            }
            other => other?,
        };
        if wait {
            let relationship = relationship_name(relationship);
            let mut verdict = self
                .inner
                .verdict
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let worse = verdict
                .as_ref()
                .is_none_or(|(v, _)| v.worst(triggered.verdict) != *v);
            if worse {
                *verdict = Some((triggered.verdict, relationship.to_owned()));
            }
        }
        Ok(triggered)
    }

    /// The worst verdict of the policies this build waited on so far, with its
    /// relationship: the build ends with the worse of this and its job's result.
    pub fn verdict(&self) -> Option<(ResultCode, String)> {
        self.inner
            .verdict
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This build's own result directory, if the engine gives builds one: files left
    /// there become the build's artifacts. It is empty when the build starts and is a
    /// staging directory the engine reuses: when the build ends, what it left moves to
    /// `<results_dir>/<builder>/<number>/`, so keep no path into it past the build.
    pub fn result_dir(&self) -> Option<&std::path::Path> {
        self.inner.spec.result_dir.as_deref()
    }

    /// All properties: the buildset's, overridden by any the build set.
    pub fn properties(&self) -> Properties {
        let mut all = self.inner.spec.properties.clone();
        all.extend(
            self.build_properties()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        all
    }

    /// One property: the build's own if set, else the buildset's.
    pub fn get_property(&self, name: &str) -> Option<Property> {
        self.build_properties()
            .get(name)
            .cloned()
            .or_else(|| self.inner.spec.properties.get(name).cloned())
    }

    fn build_properties(&self) -> std::sync::MutexGuard<'_, Properties> {
        // A poisoned lock only means another clone panicked mid-insert; the map is intact.
        self.inner
            .build_properties
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn volume(&self) -> std::sync::MutexGuard<'_, Volume> {
        self.inner
            .volume
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the first limit this build went past and returns the reason.
    fn breach(&self, reason: String) -> String {
        let mut breach = self
            .inner
            .breach
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        breach.get_or_insert_with(|| reason.clone());
        reason
    }

    /// The first limit this build went past, if any: the build ends as EXCEPTION with
    /// this reason.
    pub fn breached(&self) -> Option<String> {
        self.inner
            .breach
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn limit_exceeded(&self, reason: String) -> WriteError {
        WriteError::LimitExceeded(self.breach(reason))
    }

    fn check_status(&self, what: &str, text: &str) -> Result<(), WriteError> {
        let limit = self.inner.spec.limits.status_bytes;
        if text.len() > limit {
            return Err(self.limit_exceeded(format!(
                "status limit exceeded: a {what} of {} bytes, more than {limit}",
                text.len()
            )));
        }
        Ok(())
    }

    /// Sets a build property. It reads back at once; it is stored with the build's other
    /// buffered writes, within the engine's flush interval (100 ms by default).
    pub async fn set_property(
        &self,
        name: &str,
        value: Value,
        source: &str,
    ) -> Result<(), WriteError> {
        if name.trim().is_empty() {
            return Err(WriteError::Invalid(
                "a property name must not be empty".into(),
            ));
        }
        let size = name.len() + value.to_string().len() + source.len();
        {
            let mut volume = self.volume();
            let others: usize = volume
                .properties
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .map(|(_, bytes)| *bytes)
                .sum();
            let limit = self.inner.spec.limits.property_bytes;
            if others + size > limit {
                drop(volume);
                return Err(self.limit_exceeded(format!(
                    "property limit exceeded: more than {limit} bytes of build properties"
                )));
            }
            volume.properties.insert(name.to_owned(), size);
        }
        let property = Property::new(value, source);
        self.inner
            .runtime
            .property(self.build_id(), name, property.clone())?;
        self.build_properties().insert(name.to_owned(), property);
        Ok(())
    }

    /// Writes a log record. Records are buffered and stored in batches, within
    /// the engine's flush interval (100 ms by default) whatever the job does next;
    /// a job that logs faster than the database takes records waits here.
    pub async fn log(&self, level: LogLevel, message: impl Into<String>) -> Result<(), WriteError> {
        self.log_with(level, message, serde_json::Map::new()).await
    }

    /// Writes a log record with structured fields (see [`BuildContext::log`]).
    pub async fn log_with(
        &self,
        level: LogLevel,
        message: impl Into<String>,
        fields: serde_json::Map<String, Value>,
    ) -> Result<(), WriteError> {
        let record = LogRecord {
            at: kiln_model::now(),
            level,
            message: message.into(),
            fields,
        };
        self.inner.runtime.log(self.build_id(), record).await
    }

    /// Adds captured output of a sandbox to the log without waiting (it is bounded by
    /// the sandbox's own output limit). Nothing is written once the build has ended.
    pub fn log_captured(&self, record: LogRecord) {
        let _ = self.inner.runtime.log_now(self.build_id(), record);
    }

    /// Reports progress in a group (the empty path is the build as a whole). Reports are
    /// buffered like log records; the latest per group wins.
    pub async fn progress(
        &self,
        group: &[&str],
        current: u64,
        total: u64,
        status: impl Into<String>,
    ) -> Result<(), WriteError> {
        let report = ProgressReport {
            group: group.iter().map(|g| g.to_string()).collect(),
            current,
            total,
            status: status.into(),
        };
        if report.group.iter().any(String::is_empty) {
            return Err(WriteError::Invalid(format!(
                "progress group {:?} has an empty name",
                report.group
            )));
        }
        self.check_status("progress status line", &report.status)?;
        {
            let mut volume = self.volume();
            if !volume.groups.contains(&report.group) {
                let limit = self.inner.spec.limits.progress_groups;
                if volume.groups.len() >= limit {
                    drop(volume);
                    return Err(self.limit_exceeded(format!(
                        "progress limit exceeded: more than {limit} progress groups"
                    )));
                }
                volume.groups.insert(report.group.clone());
            }
        }
        self.inner.runtime.progress(self.build_id(), report)
    }

    /// Stores everything this build has written so far now, instead of within the
    /// flush interval: for a job that reads its own writes back through the API.
    pub async fn flush(&self) {
        self.inner.runtime.flush(self.build_id()).await;
    }

    /// Sets the build's state string (buffered like log records).
    pub async fn set_state(&self, state: &str) -> Result<(), WriteError> {
        self.check_status("state string", state)?;
        self.inner.runtime.state(self.build_id(), state.to_owned())
    }

    /// Whether the build has been asked to stop.
    pub fn cancelled(&self) -> bool {
        self.inner.spec.stop.borrow().is_some()
    }

    /// Why the build was asked to stop, if it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.inner.spec.stop.borrow()
    }

    /// Resolves when the build is asked to stop; use it in `tokio::select!` to stop
    /// waiting work promptly.
    pub async fn stopped(&self) -> StopReason {
        let mut rx = self.inner.spec.stop.clone();
        loop {
            if let Some(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The engine dropped the build; treat that as a shutdown.
                return StopReason::Shutdown;
            }
        }
    }
}
