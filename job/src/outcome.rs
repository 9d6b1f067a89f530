//! What runs a build ([`Executor`]) and what it ends with ([`Outcome`], [`JobError`]).

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use kiln_model::ResultCode;
use serde_json::Value;

use crate::BuildContext;

/// How a build ended, as the engine records it.
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

impl From<crate::WriteError> for JobError {
    /// A refused write, for a job that gives up with `?`. (A build that went past a
    /// limit ends as EXCEPTION whatever its job returns.)
    fn from(e: crate::WriteError) -> Self {
        JobError::new(e.to_string())
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
/// use kiln_job::{FnExecutor, Outcome};
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
