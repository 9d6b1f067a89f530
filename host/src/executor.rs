//! Running one build in a fresh sandbox and turning what happened into an outcome.
//!
//! | what happened | result | error |
//! | --- | --- | --- |
//! | `run` returned an outcome | its code (SUCCESS, WARNINGS, SKIPPED) | |
//! | `run` returned a job error | FAILURE | its message (details as traceback) |
//! | a trap, a limit, the deadline | EXCEPTION | the reason; the wasm backtrace as traceback |
//! | a cancel | CANCELLED (set by the scheduler) | |

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use wasmtime::{Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi::{FsPerms, WasiCtx};

use super::bindings::kiln::plugin::types as wit;
use super::limits::{EPOCH_TICK, Limits};
use super::output::CappedOutput;
use super::state::JobState;
use super::{JobPlugin, WasmError};
use kiln_job::{BuildContext, Executor, Outcome};
use kiln_model::{LogLevel, ResultCode};

/// Where a build's result directory appears inside the sandbox.
pub const RESULTS_GUEST_DIR: &str = "/results";

/// A host directory a builder lets its jobs see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the guest sees it (e.g. `/data`).
    pub guest: String,
    /// Whether the guest may write to it.
    pub writable: bool,
}

/// What a builder grants its jobs beyond the empty sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Environment variables, as name and value.
    pub env: Vec<(String, String)>,
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Hosts its builds may reach over HTTP (wasi:http); none unless listed.
    pub http: crate::outbound::HttpGrant,
}

impl Grants {
    pub(crate) fn validate(&self) -> Result<(), String> {
        self.http.validate()?;
        for dir in &self.dirs {
            if !dir.host.is_dir() {
                return Err(format!(
                    "granted directory {} does not exist",
                    dir.host.display()
                ));
            }
            if !dir.guest.starts_with('/') || dir.guest == RESULTS_GUEST_DIR {
                return Err(format!(
                    "guest path {:?} must be absolute and not {RESULTS_GUEST_DIR}",
                    dir.guest
                ));
            }
        }
        if let Some((name, _)) = self
            .env
            .iter()
            .find(|(k, _)| k.is_empty() || k.contains('='))
        {
            return Err(format!("environment variable name {name:?} is not valid"));
        }
        Ok(())
    }
}

/// Runs a builder's builds in a WebAssembly job plugin.
pub struct WasmExecutor {
    plugin: Arc<JobPlugin>,
    limits: Limits,
    grants: Grants,
}

impl WasmExecutor {
    /// An executor for a loaded plugin. The plugin must have been loaded for the same
    /// wasm stack limit.
    pub fn new(plugin: Arc<JobPlugin>, limits: Limits, grants: Grants) -> Result<Self, WasmError> {
        limits.validate().map_err(WasmError::Invalid)?;
        grants.validate().map_err(WasmError::Invalid)?;
        if limits.wasm_stack_bytes != plugin.stack_bytes {
            return Err(WasmError::Invalid(format!(
                "plugin {} was loaded for a {} byte stack, not {}",
                plugin.name, plugin.stack_bytes, limits.wasm_stack_bytes
            )));
        }
        Ok(WasmExecutor {
            plugin,
            limits,
            grants,
        })
    }

    /// The limits builds run with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

#[async_trait]
impl Executor for WasmExecutor {
    async fn execute(&self, ctx: BuildContext) -> Outcome {
        let context = wit_context(&ctx);
        match run_sandboxed(&self.plugin, &self.limits, &self.grants, Some(ctx), context).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::exception(format!("the sandbox could not be set up: {e:#}"), None),
        }
    }
}

/// What happened to the call into the guest.
enum Ran {
    Finished(wasmtime::Result<Result<wit::Outcome, wit::JobError>>),
    TimedOut,
    Stopped,
}

/// Runs one build of `plugin` in a fresh store. `build` is `None` outside the engine
/// (benchmarks, checks): host calls then write nothing.
pub(crate) async fn run_sandboxed(
    plugin: &JobPlugin,
    limits: &Limits,
    grants: &Grants,
    build: Option<BuildContext>,
    context: wit::BuildContext,
) -> wasmtime::Result<Outcome> {
    let stdout = CappedOutput::new(limits.output_bytes);
    let stderr = CappedOutput::new(limits.output_bytes);
    let result_dir = build.as_ref().and_then(BuildContext::result_dir);
    let wasi = wasi_ctx(grants, result_dir, &stdout, &stderr)?;
    let _live = plugin.engine.live.enter();
    let mut store = Store::new(
        &plugin.engine.engine,
        JobState::new(wasi, build.clone(), *limits, grants.http.clone()),
    );
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut cx| {
        let state = cx.data_mut();
        if state.stop_requested() {
            state.interrupt = Some("the build was cancelled".into());
            return Ok(UpdateDeadline::Interrupt);
        }
        if std::time::Instant::now() >= state.deadline {
            state.interrupt = Some(format!(
                "deadline exceeded: the job ran longer than {:?}",
                state.limits.deadline
            ));
            return Ok(UpdateDeadline::Interrupt);
        }
        // Yield every tick so that a busy guest never holds an async thread for long.
        Ok(UpdateDeadline::Yield(1))
    });

    let call = async {
        let job = plugin.pre.instantiate_async(&mut store).await?;
        job.call_run(&mut store, &context).await
    };
    // The epoch stops busy guests; this also stops a guest blocked in a host call.
    let backstop = limits.deadline + 2 * EPOCH_TICK;
    let ran = tokio::select! {
        ran = tokio::time::timeout(backstop, call) => match ran {
            Ok(result) => Ran::Finished(result),
            Err(_) => Ran::TimedOut,
        },
        _ = stopped(build.as_ref()) => Ran::Stopped,
    };

    let state = store.data_mut();
    capture(
        state,
        stdout.take(),
        "stdout",
        LogLevel::Info,
        stdout.exceeded(),
    );
    let stderr_text = stderr.take();
    let stderr_tail = tail(&stderr_text);
    capture(
        state,
        stderr_text,
        "stderr",
        LogLevel::Warning,
        stderr.exceeded(),
    );
    // A request outside the grant or past the budget ends the build as EXCEPTION
    // naming it, whatever the guest made of the refusal.
    let violation = match ran {
        Ran::Stopped => None,
        _ => state.outbound.violation(),
    };
    let outcome = if let Some(reason) = violation {
        Outcome::exception(reason, None)
    } else {
        match ran {
            Ran::Finished(Ok(Ok(outcome))) => returned(outcome, limits),
            Ran::Finished(Ok(Err(error))) => Outcome {
                results: ResultCode::Failure,
                return_value: None,
                error: Some(error.message),
                traceback: error.details,
            },
            Ran::Finished(Err(trap)) => {
                let output_exceeded = stdout.exceeded() || stderr.exceeded();
                let reason = trap_reason(
                    &trap,
                    state,
                    limits,
                    output_exceeded,
                    stderr_tail.as_deref(),
                );
                let traceback = trap
                    .downcast_ref::<WasmBacktrace>()
                    .map(|bt| bt.to_string());
                Outcome::exception(reason, traceback)
            }
            Ran::TimedOut => Outcome::exception(
                format!(
                    "deadline exceeded: the job ran longer than {:?} (blocked in a host call)",
                    limits.deadline
                ),
                None,
            ),
            Ran::Stopped => Outcome::with_results(ResultCode::Cancelled, None),
        }
    };
    Ok(outcome)
}

/// Resolves when the build is asked to stop; never without a build.
async fn stopped(build: Option<&BuildContext>) {
    match build {
        Some(build) => {
            build.stopped().await;
        }
        None => std::future::pending().await,
    }
}

/// The WASI context: nothing ambient; only what the builder grants, the build's own
/// result directory, and captured stdout/stderr.
pub(crate) fn wasi_ctx(
    grants: &Grants,
    result_dir: Option<&std::path::Path>,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> wasmtime::Result<WasiCtx> {
    let mut wasi = WasiCtx::builder();
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    for (name, value) in &grants.env {
        wasi.env(name, value);
    }
    for dir in &grants.dirs {
        let perms = if dir.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        wasi.preopened_dir(&dir.host, &dir.guest, perms)?;
    }
    if let Some(dir) = result_dir {
        wasi.preopened_dir(dir, RESULTS_GUEST_DIR, FsPerms::ReadWrite)?;
    }
    Ok(wasi.build())
}

/// The context a job receives.
pub(crate) fn wit_context(ctx: &BuildContext) -> wit::BuildContext {
    wit::BuildContext {
        build_id: ctx.build_id().0,
        number: ctx.number(),
        builder: ctx.builder().to_owned(),
        buildset_id: ctx.buildset_id().0,
        reason: ctx.reason().to_owned(),
        args: ctx.args().to_string(),
        kwargs: ctx.kwargs().to_string(),
        properties: ctx
            .properties()
            .into_iter()
            .map(|(name, p)| wit::Property {
                name,
                value: p.value.to_string(),
                source: p.source,
            })
            .collect(),
        sourcestamps: ctx
            .sourcestamps()
            .iter()
            .map(|s| wit::Sourcestamp {
                codebase: s.codebase.clone(),
                repository: s.repository.clone(),
                branch: s.branch.clone(),
                revision: s.revision.clone(),
                project: s.project.clone(),
            })
            .collect(),
        dependencies: ctx
            .dependencies()
            .iter()
            .map(|d| wit::Dependency {
                builder: d.builder.clone(),
                build_id: d.build_id.0,
                return_value: d.return_value.to_string(),
            })
            .collect(),
    }
}

/// Checks and converts what the job returned.
fn returned(outcome: wit::Outcome, limits: &Limits) -> Outcome {
    let size = outcome.return_value.len();
    if size > limits.return_bytes {
        return Outcome::exception(
            format!(
                "return value too large: {size} bytes, the limit is {} bytes",
                limits.return_bytes
            ),
            None,
        );
    }
    let value: Value = match serde_json::from_str(&outcome.return_value) {
        Ok(v) => v,
        Err(e) => {
            return Outcome::exception(format!("the job's return value is not JSON: {e}"), None);
        }
    };
    let results = match outcome.code {
        wit::JobResult::Success => ResultCode::Success,
        wit::JobResult::Warnings => ResultCode::Warnings,
        wit::JobResult::Skipped => ResultCode::Skipped,
    };
    Outcome::with_results(results, (!value.is_null()).then_some(value))
}

/// Why the guest trapped, in the words of the limit or interruption that caused it.
fn trap_reason(
    trap: &wasmtime::Error,
    state: &JobState,
    limits: &Limits,
    output_exceeded: bool,
    stderr_tail: Option<&str>,
) -> String {
    if let Some(reason) = &state.interrupt {
        return reason.clone();
    }
    if let Some(asked) = state.limiter.refused {
        return format!(
            "memory limit exceeded: the job tried to grow its memory to {} MiB, the limit is {} MiB",
            asked >> 20,
            limits.memory_bytes >> 20
        );
    }
    if output_exceeded {
        return format!(
            "captured output limit exceeded: more than {} bytes on stdout or stderr",
            limits.output_bytes
        );
    }
    let said = stderr_tail
        .map(|t| format!(" (stderr: {t})"))
        .unwrap_or_default();
    match trap.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => format!(
            "wasm stack overflow: the job used more than its {} KiB of stack (unbounded recursion?)",
            limits.wasm_stack_bytes >> 10
        ),
        Some(Trap::UnreachableCodeReached) => {
            format!(
                "the job trapped: wasm `unreachable` was executed (a panic or abort in the guest){said}"
            )
        }
        Some(Trap::Interrupt) => "the job was interrupted".into(),
        Some(other) => format!("the job trapped: {other}{said}"),
        None => format!("the job failed: {}{said}", first_line(&trap.to_string())),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// The last two lines a guest wrote to stderr (a Rust panic's location and message).
fn tail(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(2);
    (!lines.is_empty()).then(|| lines[start..].join(" | "))
}

/// Turns captured output into log records, one per line.
fn capture(state: &mut JobState, bytes: Vec<u8>, stream: &str, level: LogLevel, exceeded: bool) {
    if bytes.is_empty() && !exceeded {
        return;
    }
    let fields = || {
        let mut map = Map::new();
        map.insert("stream".into(), json!(stream));
        map
    };
    for line in String::from_utf8_lossy(&bytes).lines() {
        state.push_log(level, line.to_owned(), fields());
    }
    if exceeded {
        state.push_log(
            LogLevel::Warning,
            format!("{stream} was cut at {} bytes", state.limits.output_bytes),
            fields(),
        );
    }
}

impl JobPlugin {
    /// Runs the job once outside any engine, with empty arguments: a fresh store,
    /// instantiation, the call and the drop, as every build pays them. Host calls write
    /// nothing. For benchmarks and smoke tests.
    pub async fn run_once(&self, limits: &Limits) -> Result<Outcome, WasmError> {
        let context = wit::BuildContext {
            build_id: 0,
            number: 0,
            builder: self.name.clone(),
            buildset_id: 0,
            reason: String::new(),
            args: "null".into(),
            kwargs: "null".into(),
            properties: Vec::new(),
            sourcestamps: Vec::new(),
            dependencies: Vec::new(),
        };
        run_sandboxed(self, limits, &Grants::default(), None, context)
            .await
            .map_err(|e| WasmError::Engine(format!("{e:#}")))
    }
}
