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

use crate::error::Result;
use crate::model::{
    Build, BuildId, BuildsetId, LogLevel, LogRecord, ProgressReport, Properties, Property,
    RequestId, ResultCode, SourceStamp,
};
use crate::relations::{ResolvedDependency, TriggerError, Triggered};
use crate::scheduler::Shared;
use crate::scheduler::relations::{Parent, TriggerSpec};
use crate::storage::Store;

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
    pub(crate) store: Arc<dyn Store>,
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
        let n = self.inner.triggers.fetch_add(1, Ordering::Relaxed);
        let spec = TriggerSpec {
            builders: builders.iter().map(|b| (*b).to_owned()).collect(),
            properties,
            wait,
            relationship: relationship.to_owned(),
            key_prefix: format!("t{n}"),
        };
        let triggered = self.inner.shared.trigger(&self.inner.parent, spec).await?;
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

    /// The store, for executors that write build data themselves.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
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

    /// Sets a build property (stored at once).
    pub async fn set_property(&self, name: &str, value: Value, source: &str) -> Result<()> {
        let property = Property::new(value, source);
        self.inner
            .store
            .build_set_property(self.build_id(), name, &property)
            .await?;
        self.build_properties().insert(name.to_owned(), property);
        Ok(())
    }

    /// Writes a log record.
    pub async fn log(&self, level: LogLevel, message: impl Into<String>) -> Result<()> {
        self.log_with(level, message, serde_json::Map::new()).await
    }

    /// Writes a log record with structured fields.
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
        self.inner
            .store
            .log_append(self.build_id(), std::slice::from_ref(&record))
            .await?;
        self.notify_output(1, false);
        Ok(())
    }

    /// Reports progress in a group (the empty path is the build as a whole).
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
        self.inner
            .store
            .progress_report(self.build_id(), &report, crate::model::now())
            .await?;
        self.notify_output(0, true);
        Ok(())
    }

    /// Sets the build's state string.
    pub async fn set_state(&self, state: &str) -> Result<()> {
        self.inner
            .store
            .build_set_state(self.build_id(), state)
            .await?;
        self.notify_output(0, true);
        Ok(())
    }

    /// Tells subscribers (the dashboard's live view) that this build wrote `records` log
    /// records and, if `progress`, progress or a state string.
    pub(crate) fn notify_output(&self, records: usize, progress: bool) {
        let build_id = self.build_id();
        if records > 0 {
            self.inner
                .shared
                .emit(crate::events::Event::BuildLog { build_id, records });
        }
        if progress {
            self.inner
                .shared
                .emit(crate::events::Event::BuildProgress { build_id });
        }
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
