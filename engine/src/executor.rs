//! How a build's work runs: the [`Executor`] interface and the context it receives.
//!
//! The scheduler hands every build to its builder's executor with a [`BuildContext`] and
//! records the [`Outcome`] it returns. [`FnExecutor`] runs Rust async functions; the WASM
//! host plugs into the same interface.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::model::{
    Build, BuildId, BuildsetId, LogLevel, LogRecord, ProgressReport, Properties, Property,
    RequestId, ResultCode, SourceStamp,
};
use crate::relations::{ResolvedDependency, TriggerError, Triggered};
use crate::scheduler::Shared;
use crate::scheduler::relations::{Parent, TriggerSpec};

/// How a build ended, as the scheduler records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The result code.
    pub results: ResultCode,
    /// The JSON value the job returned.
    pub return_value: Option<Value>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Where it failed, if known.
    pub traceback: Option<String>,
}

impl Outcome {
    /// SUCCESS with a return value.
    pub fn success(return_value: Value) -> Self {
        Outcome::with_results(ResultCode::Success, Some(return_value))
    }

    /// Any result with an optional return value.
    pub fn with_results(results: ResultCode, return_value: Option<Value>) -> Self {
        Outcome {
            results,
            return_value,
            error: None,
            traceback: None,
        }
    }

    /// FAILURE with a message.
    pub fn failure(error: impl Into<String>) -> Self {
        Outcome {
            results: ResultCode::Failure,
            return_value: None,
            error: Some(error.into()),
            traceback: None,
        }
    }

    /// EXCEPTION with a message and, if known, a traceback.
    pub fn exception(error: impl Into<String>, traceback: Option<String>) -> Self {
        Outcome {
            results: ResultCode::Exception,
            return_value: None,
            error: Some(error.into()),
            traceback,
        }
    }
}

/// A job's own report of failure: the build ends as FAILURE with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// What went wrong.
    pub message: String,
    /// More detail (stored as the build's traceback).
    pub details: Option<String>,
}

impl JobError {
    /// A job error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            details: None,
        }
    }
}

impl From<JobError> for Outcome {
    fn from(e: JobError) -> Self {
        Outcome {
            results: ResultCode::Failure,
            return_value: None,
            error: Some(e.message),
            traceback: e.details,
        }
    }
}

impl From<crate::EngineError> for JobError {
    fn from(e: crate::EngineError) -> Self {
        JobError::new(e.to_string())
    }
}

/// Runs builds for a builder.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs one build and says how it ended. A failure of the job is an [`Outcome`], not
    /// an error: the engine records whatever this returns.
    async fn execute(&self, ctx: BuildContext) -> Outcome;
}

type JobFn = dyn Fn(BuildContext) -> Pin<Box<dyn Future<Output = Result<Outcome, JobError>> + Send>>
    + Send
    + Sync;

/// An executor made of a Rust async function.
///
/// ```
/// use kiln_engine::{FnExecutor, Outcome};
/// let echo = FnExecutor::new(|ctx| async move { Ok(Outcome::success(ctx.args().clone())) });
/// # let _ = echo;
/// ```
pub struct FnExecutor {
    job: Box<JobFn>,
}

impl FnExecutor {
    /// Wraps an async function from the build's context to its outcome or a job error.
    pub fn new<F, Fut>(job: F) -> Self
    where
        F: Fn(BuildContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Outcome, JobError>> + Send + 'static,
    {
        FnExecutor {
            job: Box::new(move |ctx| Box::pin(job(ctx))),
        }
    }
}

#[async_trait]
impl Executor for FnExecutor {
    async fn execute(&self, ctx: BuildContext) -> Outcome {
        match (self.job)(ctx).await {
            Ok(outcome) => outcome,
            Err(e) => e.into(),
        }
    }
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

/// Bytes of one state string or one progress status line a build may set: a line for a
/// dashboard, not a report (reports belong in the log or the result directory).
pub const DEFAULT_STATUS_BYTES: usize = 4 << 10;
/// Progress groups one build may report: enough for a deep tree of real work, few
/// enough that the progress table and the dashboard stay small.
pub const DEFAULT_PROGRESS_GROUPS: usize = 1_000;
/// Bytes of build properties (names, JSON values and sources) one build may hold.
pub const DEFAULT_PROPERTY_BYTES: usize = 1 << 20;
/// Child buildsets one build may start, over all its triggers (each trigger is further
/// held to [`MAX_TRIGGER_CHILDREN`](crate::scheduler::MAX_TRIGGER_CHILDREN)).
pub const DEFAULT_MAX_CHILDREN: usize = 10_000;
/// How deep a trigger tree may grow: a self-triggering job stops here instead of
/// filling the queue.
pub const DEFAULT_MAX_TRIGGER_DEPTH: u32 = 16;

/// What one build may write through the engine, whatever runs it: going past a limit
/// ends the build as EXCEPTION with a reason that names the limit. (What a sandboxed
/// build may use of the machine is [`wasm::Limits`](crate::wasm::Limits).)
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

/// What a build's executor can see and do.
#[derive(Clone)]
pub struct BuildContext {
    inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) build: Build,
    pub(crate) builder: String,
    pub(crate) buildset_id: BuildsetId,
    pub(crate) reason: String,
    pub(crate) args: Value,
    pub(crate) kwargs: Value,
    pub(crate) dependencies: Vec<ResolvedDependency>,
    pub(crate) buildset_properties: Properties,
    pub(crate) build_properties: Mutex<Properties>,
    pub(crate) limits: BuildLimits,
    /// What it has written so far, against its limits.
    pub(crate) volume: Mutex<Volume>,
    /// The first limit it went past: the build ends as EXCEPTION with this reason.
    pub(crate) breach: Mutex<Option<String>>,
    pub(crate) result_dir: Option<std::path::PathBuf>,
    pub(crate) shared: Arc<Shared>,
    /// The build as a parent of child buildsets (also holds its sourcestamps and its
    /// stop signal).
    pub(crate) parent: Parent,
    /// Triggers so far: numbers each trigger's children, the same on every run.
    pub(crate) triggers: AtomicU32,
    /// The worst verdict of the policies this build waited on, with the relationship.
    pub(crate) verdict: Mutex<Option<(ResultCode, String)>>,
}

impl BuildContext {
    pub(crate) fn new(inner: ContextInner) -> Self {
        BuildContext {
            inner: Arc::new(inner),
        }
    }

    /// The build's id.
    pub fn build_id(&self) -> BuildId {
        self.inner.build.id
    }

    /// The build's number on its builder.
    pub fn number(&self) -> i64 {
        self.inner.build.number
    }

    /// The builder's name.
    pub fn builder(&self) -> &str {
        &self.inner.builder
    }

    /// The request this build runs.
    pub fn request_id(&self) -> RequestId {
        self.inner.build.request_id
    }

    /// The buildset of that request.
    pub fn buildset_id(&self) -> BuildsetId {
        self.inner.buildset_id
    }

    /// The buildset's reason.
    pub fn reason(&self) -> &str {
        &self.inner.reason
    }

    /// The builder's configured positional arguments (a JSON value, `null` if none).
    pub fn args(&self) -> &Value {
        &self.inner.args
    }

    /// The builder's configured keyword arguments (a JSON value, `null` if none).
    pub fn kwargs(&self) -> &Value {
        &self.inner.kwargs
    }

    /// The buildset's sourcestamps.
    pub fn sourcestamps(&self) -> &[SourceStamp] {
        &self.inner.parent.sourcestamps
    }

    /// The return values of the builds this one depends on, as resolved when it started.
    pub fn dependencies(&self) -> &[ResolvedDependency] {
        &self.inner.dependencies
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
        if asked > self.inner.limits.children {
            let limit = self.inner.limits.children;
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
        let triggered = match self.inner.shared.trigger(&self.inner.parent, spec).await {
            Err(TriggerError::LimitExceeded(reason)) => {
                return Err(TriggerError::LimitExceeded(self.breach(reason)));
            }
            other => other?,
        };
        if wait {
            let relationship = crate::relations::relationship_name(relationship);
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
    /// relationship.
    pub(crate) fn verdict(&self) -> Option<(ResultCode, String)> {
        self.inner
            .verdict
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This build's own result directory, if the engine gives builds one: files left
    /// there become the build's artifacts.
    pub fn result_dir(&self) -> Option<&std::path::Path> {
        self.inner.result_dir.as_deref()
    }

    /// All properties: the buildset's, overridden by any the build set.
    pub fn properties(&self) -> Properties {
        let mut all = self.inner.buildset_properties.clone();
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
            .or_else(|| self.inner.buildset_properties.get(name).cloned())
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

    /// The first limit this build went past, if any.
    pub(crate) fn breached(&self) -> Option<String> {
        self.inner
            .breach
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn limit_exceeded(&self, reason: String) -> EngineError {
        EngineError::LimitExceeded(self.breach(reason))
    }

    fn check_status(&self, what: &str, text: &str) -> Result<()> {
        let limit = self.inner.limits.status_bytes;
        if text.len() > limit {
            return Err(self.limit_exceeded(format!(
                "status limit exceeded: a {what} of {} bytes, more than {limit}",
                text.len()
            )));
        }
        Ok(())
    }

    /// Sets a build property. It reads back at once; it is stored with the build's other
    /// buffered writes, within [`FLUSH_INTERVAL`](crate::scheduler::FLUSH_INTERVAL).
    pub async fn set_property(&self, name: &str, value: Value, source: &str) -> Result<()> {
        if name.trim().is_empty() {
            return Err(EngineError::Invalid(
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
            let limit = self.inner.limits.property_bytes;
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
            .shared
            .outputs
            .property(self.build_id(), name, property.clone())?;
        self.build_properties().insert(name.to_owned(), property);
        Ok(())
    }

    /// Writes a log record. Records are buffered and stored in batches, within
    /// [`FLUSH_INTERVAL`](crate::scheduler::FLUSH_INTERVAL) whatever the job does next;
    /// a job that logs faster than the database takes records waits here.
    pub async fn log(&self, level: LogLevel, message: impl Into<String>) -> Result<()> {
        self.log_with(level, message, serde_json::Map::new()).await
    }

    /// Writes a log record with structured fields (see [`BuildContext::log`]).
    pub async fn log_with(
        &self,
        level: LogLevel,
        message: impl Into<String>,
        fields: serde_json::Map<String, Value>,
    ) -> Result<()> {
        let record = LogRecord {
            at: crate::model::now(),
            level,
            message: message.into(),
            fields,
        };
        self.inner.shared.outputs.log(self.build_id(), record).await
    }

    /// Adds captured output of the sandbox to the log without waiting (it is bounded by
    /// the sandbox's own output limit). Nothing is written once the build has ended.
    pub(crate) fn log_captured(&self, record: LogRecord) {
        let _ = self.inner.shared.outputs.log_now(self.build_id(), record);
    }

    /// Reports progress in a group (the empty path is the build as a whole). Reports are
    /// buffered like log records; the latest per group wins.
    pub async fn progress(
        &self,
        group: &[&str],
        current: u64,
        total: u64,
        status: impl Into<String>,
    ) -> Result<()> {
        let report = ProgressReport {
            group: group.iter().map(|g| g.to_string()).collect(),
            current,
            total,
            status: status.into(),
        };
        if report.group.iter().any(String::is_empty) {
            return Err(EngineError::Invalid(format!(
                "progress group {:?} has an empty name",
                report.group
            )));
        }
        self.check_status("progress status line", &report.status)?;
        {
            let mut volume = self.volume();
            if !volume.groups.contains(&report.group) {
                let limit = self.inner.limits.progress_groups;
                if volume.groups.len() >= limit {
                    drop(volume);
                    return Err(self.limit_exceeded(format!(
                        "progress limit exceeded: more than {limit} progress groups"
                    )));
                }
                volume.groups.insert(report.group.clone());
            }
        }
        self.inner.shared.outputs.progress(self.build_id(), report)
    }

    /// Stores everything this build has written so far now, instead of within the
    /// flush interval: for a job that reads its own writes back through the API.
    pub async fn flush(&self) {
        self.inner
            .shared
            .outputs
            .flush_build(&self.inner.shared, self.build_id())
            .await;
    }

    /// Sets the build's state string (buffered like log records).
    pub async fn set_state(&self, state: &str) -> Result<()> {
        self.check_status("state string", state)?;
        self.inner
            .shared
            .outputs
            .state(self.build_id(), state.to_owned())
    }

    /// Whether the build has been asked to stop.
    pub fn cancelled(&self) -> bool {
        self.inner.parent.stop.borrow().is_some()
    }

    /// Why the build was asked to stop, if it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.inner.parent.stop.borrow()
    }

    /// Resolves when the build is asked to stop; use it in `tokio::select!` to stop
    /// waiting work promptly.
    pub async fn stopped(&self) -> StopReason {
        let mut rx = self.inner.parent.stop.clone();
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
