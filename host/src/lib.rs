//! The plugin host: WebAssembly components behind the `kiln:plugin` WIT package, run by
//! wasmtime in a sandbox.
//!
//! One [`WasmHost`] owns the wasmtime engines (one per distinct wasm stack limit, since
//! that is an engine setting; usually just one), each with the pooling allocator, epoch
//! interruption driven by a ticker thread, and a linker holding WASI p2 and the Kiln
//! host interface. Loading a plugin checks it against the `job` world, compiles it (or
//! loads it from the on-disk cache) off the async threads, and pre-instantiates it.
//! Every build then gets a fresh store, so nothing leaks between builds.
//!
//! Layout: [`limits`] names every limit; [`check`] tells components apart and checks
//! worlds; `cache` keeps compiled components on disk; `state` is one build's store
//! data and the host functions; [`executor`] runs a build and turns what happened into
//! an [`Outcome`](kiln_job::Outcome); `output` captures stdout/stderr with a cap.

/// Conversions between [`ResultCode`](kiln_model::ResultCode) and the `result-code`
/// of one world's generated bindings (each world's bindings have their own copy of the
/// type): defines `to_wit` and `from_wit` in the calling module.
macro_rules! result_code_conversions {
    ($wit:path) => {
        use $wit as wit_result;

        #[allow(dead_code)]
        pub(crate) fn to_wit(code: kiln_model::ResultCode) -> wit_result::ResultCode {
            use kiln_model::ResultCode as R;
            match code {
                R::Success => wit_result::ResultCode::Success,
                R::Warnings => wit_result::ResultCode::Warnings,
                R::Failure => wit_result::ResultCode::Failure,
                R::Skipped => wit_result::ResultCode::Skipped,
                R::Exception => wit_result::ResultCode::Exception,
                R::Retry => wit_result::ResultCode::Retry,
                R::Cancelled => wit_result::ResultCode::Cancelled,
            }
        }

        #[allow(dead_code)]
        pub(crate) fn from_wit(code: wit_result::ResultCode) -> kiln_model::ResultCode {
            use kiln_model::ResultCode as R;
            match code {
                wit_result::ResultCode::Success => R::Success,
                wit_result::ResultCode::Warnings => R::Warnings,
                wit_result::ResultCode::Failure => R::Failure,
                wit_result::ResultCode::Skipped => R::Skipped,
                wit_result::ResultCode::Exception => R::Exception,
                wit_result::ResultCode::Retry => R::Retry,
                wit_result::ResultCode::Cancelled => R::Cancelled,
            }
        }
    };
}

mod bindings;
mod cache;
pub mod check;
pub mod executor;
pub mod limits;
mod outbound;
mod output;
pub mod policy;
pub mod reporter;
mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, WasmBacktraceDetails,
};

pub use cache::{CacheStats, default_cache_dir};
pub use check::{WasmKind, World, WorldReport};
pub use executor::{DirGrant, Grants, RESULTS_GUEST_DIR, WasmExecutor};
pub use limits::Limits;
pub use outbound::HttpGrant;
pub use policy::{PolicyPlugin, WasmPolicy};
pub use reporter::{ReporterPlugin, WasmReporter};

use bindings::{Job, JobPre};
use state::JobState;

/// Concurrent sandboxed builds per engine: the pooling allocator's slots. Sized for
/// thousands of builds waiting on timers or children at once.
pub const DEFAULT_MAX_INSTANCES: u32 = 4_096;
/// Room on a build's async stack beyond its wasm stack, for host functions.
const ASYNC_STACK_MARGIN: usize = 1 << 20;
/// Finished instances whose memory is handed back to the kernel in one call. Each
/// `madvise` flushes the TLBs of every core running this process; measured here, one
/// per job cost a third of the lifecycle's time.
const DECOMMIT_BATCH: usize = 64;
/// Bytes of each linear memory (and each table) kept resident between builds and reset
/// with `memset` (only the dirtied pages, where the kernel can tell: Linux 6.7+)
/// instead of being handed back to the kernel. Covers a small guest's stack, data and
/// first heap pages.
const KEEP_RESIDENT: usize = 2 << 20;

/// What can go wrong in the plugin host (a failing job is an outcome, not this).
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// A plugin was refused when loaded; every problem found is listed.
    #[error("plugin {plugin}: {}", problems.join("; "))]
    Plugin {
        /// The plugin's name (or path).
        plugin: String,
        /// What is wrong with it.
        problems: Vec<String>,
    },
    /// Invalid limits or grants.
    #[error("{0}")]
    Invalid(String),
    /// wasmtime could not be set up.
    #[error("the wasm engine could not be set up: {0}")]
    Engine(String),
}

/// How the host is set up.
#[derive(Clone, Debug)]
pub struct WasmHostConfig {
    /// Where compiled components are cached (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
    /// See [`DEFAULT_MAX_INSTANCES`].
    pub max_instances: u32,
}

impl Default for WasmHostConfig {
    fn default() -> Self {
        WasmHostConfig {
            cache_dir: default_cache_dir(),
            max_instances: DEFAULT_MAX_INSTANCES,
        }
    }
}

/// A wasmtime engine with its linker and epoch ticker.
pub(crate) struct EngineCtx {
    pub(crate) engine: Engine,
    /// Sandboxes (stores with an instance) alive now, across the host's engines.
    pub(crate) live: LiveSandboxes,
    pub(crate) linker: Linker<JobState>,
    pub(crate) reporter_linker: Linker<reporter::ReporterState>,
    ticking: Arc<AtomicBool>,
}

/// Counts sandboxes alive: each holds a [`LiveSandbox`] for as long as its store lives.
#[derive(Clone, Default)]
pub(crate) struct LiveSandboxes(Arc<std::sync::atomic::AtomicUsize>);

impl LiveSandboxes {
    /// Counts one sandbox until the guard drops.
    pub(crate) fn enter(&self) -> LiveSandbox {
        self.0.fetch_add(1, Ordering::Relaxed);
        LiveSandbox(self.0.clone())
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One sandbox counted in [`LiveSandboxes`].
pub(crate) struct LiveSandbox(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for LiveSandbox {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for EngineCtx {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

/// The plugin host. Cheap to share behind an `Arc`.
pub struct WasmHost {
    config: WasmHostConfig,
    live: LiveSandboxes,
    engines: Mutex<BTreeMap<usize, Arc<EngineCtx>>>,
    counters: Arc<cache::Counters>,
}

/// A job plugin, checked, compiled and pre-instantiated: ready to run builds.
pub struct JobPlugin {
    name: String,
    engine: Arc<EngineCtx>,
    pre: JobPre<JobState>,
    stack_bytes: usize,
}

impl JobPlugin {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl WasmHost {
    /// A host with the given configuration.
    pub fn new(config: WasmHostConfig) -> Self {
        WasmHost {
            config,
            live: LiveSandboxes::default(),
            engines: Mutex::new(BTreeMap::new()),
            counters: Arc::new(cache::Counters::default()),
        }
    }

    /// How many components this host compiled, and how many it loaded from its cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.counters.stats()
    }

    /// Sandboxes in use now (jobs, policies and reporters running or suspended), and
    /// how many the host's pool holds at most (`max_instances`).
    pub fn sandboxes(&self) -> (usize, u32) {
        (self.live.count(), self.config.max_instances)
    }

    /// The engine for a wasm stack limit, created on first use.
    fn engine_for(&self, stack_bytes: usize) -> Result<Arc<EngineCtx>, WasmError> {
        let mut engines = self.engines.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(engine) = engines.get(&stack_bytes) {
            return Ok(engine.clone());
        }
        let engine = Arc::new(new_engine(
            stack_bytes,
            self.config.max_instances,
            self.live.clone(),
        )?);
        engines.insert(stack_bytes, engine.clone());
        Ok(engine)
    }

    /// Checks, compiles and pre-instantiates a job plugin for builds with `limits`.
    /// Compilation runs on a blocking thread, so running builds are not held up.
    pub async fn load_job(
        &self,
        name: &str,
        wasm: Arc<[u8]>,
        limits: &Limits,
    ) -> Result<Arc<JobPlugin>, WasmError> {
        limits
            .validate()
            .map_err(|e| WasmError::Invalid(format!("plugin {name}: {e}")))?;
        let engine = self.engine_for(limits.wasm_stack_bytes)?;
        let cache_dir = self.config.cache_dir.clone();
        let owned_name = name.to_owned();
        let stack_bytes = limits.wasm_stack_bytes;
        let counters = self.counters.clone();
        let task = tokio::task::spawn_blocking(move || {
            let component =
                compile_checked(&engine, &owned_name, &wasm, cache_dir.as_deref(), &counters)?;
            let pre =
                pre_instantiate(&engine, &component).map_err(|problems| WasmError::Plugin {
                    plugin: owned_name.clone(),
                    problems,
                })?;
            Ok(Arc::new(JobPlugin {
                name: owned_name,
                engine,
                pre,
                stack_bytes,
            }))
        });
        task.await
            .map_err(|e| WasmError::Engine(format!("compiling {name} failed: {e}")))?
    }

    /// Checks, compiles (or loads from the cache) and pre-instantiates a plugin for a
    /// world other than `job`, off the async threads.
    async fn load_other<P: Send + 'static>(
        &self,
        name: &str,
        wasm: Arc<[u8]>,
        make: impl FnOnce(String, Arc<EngineCtx>, &Component) -> Result<P, Vec<String>> + Send + 'static,
    ) -> Result<P, WasmError> {
        let engine = self.engine_for(limits::DEFAULT_WASM_STACK_BYTES)?;
        let cache_dir = self.config.cache_dir.clone();
        let owned_name = name.to_owned();
        let counters = self.counters.clone();
        let task = tokio::task::spawn_blocking(move || {
            let component =
                compile_checked(&engine, &owned_name, &wasm, cache_dir.as_deref(), &counters)?;
            make(owned_name.clone(), engine, &component).map_err(|problems| WasmError::Plugin {
                plugin: owned_name,
                problems,
            })
        });
        task.await
            .map_err(|e| WasmError::Engine(format!("compiling {name} failed: {e}")))?
    }

    /// Checks, compiles and pre-instantiates a relationship policy plugin.
    pub async fn load_policy(
        &self,
        name: &str,
        wasm: Arc<[u8]>,
    ) -> Result<Arc<PolicyPlugin>, WasmError> {
        self.load_other(name, wasm, |name, engine, component| {
            let pre = policy::pre_instantiate(&engine, component)?;
            Ok(Arc::new(PolicyPlugin::new(name, engine, pre)))
        })
        .await
    }

    /// Checks, compiles and pre-instantiates a reporter plugin.
    pub async fn load_reporter(
        &self,
        name: &str,
        wasm: Arc<[u8]>,
    ) -> Result<Arc<ReporterPlugin>, WasmError> {
        self.load_other(name, wasm, |name, engine, component| {
            let pre = reporter::pre_instantiate(&engine, component)?;
            Ok(Arc::new(ReporterPlugin::new(name, engine, pre)))
        })
        .await
    }

    /// Says which world a component satisfies, or exactly why it satisfies none.
    pub fn check(&self, wasm: &[u8]) -> Result<WorldReport, WasmError> {
        let engine = self.engine_for(limits::DEFAULT_WASM_STACK_BYTES)?;
        let mut report = WorldReport {
            world: None,
            package_versions: Vec::new(),
            imports: Vec::new(),
            exports: Vec::new(),
            problems: Vec::new(),
            toolchain: check::toolchain(wasm),
        };
        let component = match compile_checked(
            &engine,
            "the file",
            wasm,
            self.config.cache_dir.as_deref(),
            &self.counters,
        ) {
            Ok(component) => component,
            Err(WasmError::Plugin { problems, .. }) => {
                report.problems = problems;
                return Ok(report);
            }
            Err(other) => return Err(other),
        };
        let ty = component.component_type();
        report.imports = ty
            .imports(&engine.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        report.exports = ty
            .exports(&engine.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let mut versions: Vec<String> = report
            .imports
            .iter()
            .filter_map(|i| i.strip_prefix("kiln:plugin/"))
            .filter_map(|i| i.split_once('@').map(|(_, v)| v.to_owned()))
            .collect();
        versions.sort();
        versions.dedup();
        report.package_versions = versions;
        let fits = |world: World| match world {
            World::Job => pre_instantiate(&engine, &component).map(|_| ()),
            World::Policy => policy::pre_instantiate(&engine, &component).map(|_| ()),
            World::Reporter => reporter::pre_instantiate(&engine, &component).map(|_| ()),
        };
        if let Some(world) = World::ALL.into_iter().find(|w| fits(*w).is_ok()) {
            report.world = Some(world.name());
            return Ok(report);
        }
        // Report against the world whose export it has, or the job world.
        let likely = check::likely_world(&engine.engine, &component).unwrap_or(World::Job);
        report.problems = fits(likely).err().unwrap_or_default();
        Ok(report)
    }

    /// Compiles a plugin for the default limits and returns a [`WasmExecutor`] for it:
    /// the short way for embedders and tests.
    pub async fn job_executor(
        &self,
        name: &str,
        wasm: &[u8],
        limits: Limits,
        grants: Grants,
    ) -> Result<WasmExecutor, WasmError> {
        let plugin = self.load_job(name, Arc::from(wasm), &limits).await?;
        WasmExecutor::new(plugin, limits, grants)
    }
}

fn new_engine(
    stack_bytes: usize,
    max_instances: u32,
    live: LiveSandboxes,
) -> Result<EngineCtx, WasmError> {
    let n = max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // A component from a Rust guest holds a handful of core instances and tables and
    // one memory; other toolchains use a few more.
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(8))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(8))
        .total_stacks(n)
        .max_memory_size(limits::MAX_MEMORY_BYTES)
        .decommit_batch_size(DECOMMIT_BATCH)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(stack_bytes)
        .async_stack_size(stack_bytes + ASYNC_STACK_MARGIN)
        .memory_reservation(limits::MAX_MEMORY_BYTES as u64)
        .wasm_backtrace_details(WasmBacktraceDetails::Disable)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).map_err(|e| WasmError::Engine(e.to_string()))?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| WasmError::Engine(e.to_string()))?;
    // Jobs get wasi:http as reporters do: a request reaches only the builder's granted
    // hosts (`outbound`), so linking it grants nothing by itself.
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| WasmError::Engine(e.to_string()))?;
    Job::add_to_linker::<_, HasSelf<JobState>>(&mut linker, |s| s)
        .map_err(|e| WasmError::Engine(e.to_string()))?;
    let reporter_linker = reporter::linker(&engine)?;
    let ticking = Arc::new(AtomicBool::new(true));
    spawn_ticker(engine.weak(), ticking.clone())?;
    Ok(EngineCtx {
        engine,
        live,
        linker,
        reporter_linker,
        ticking,
    })
}

/// Advances the engine's epoch every tick until the engine is dropped.
fn spawn_ticker(engine: wasmtime::EngineWeak, ticking: Arc<AtomicBool>) -> Result<(), WasmError> {
    std::thread::Builder::new()
        .name("kiln-epoch".into())
        .spawn(move || {
            while ticking.load(Ordering::Relaxed) {
                std::thread::sleep(limits::EPOCH_TICK);
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })
        .map(|_| ())
        .map_err(|e| WasmError::Engine(format!("cannot start the epoch ticker: {e}")))
}

/// Compiles bytes that must be a component, naming what they are when they are not.
fn compile_checked(
    engine: &EngineCtx,
    name: &str,
    wasm: &[u8],
    cache_dir: Option<&std::path::Path>,
    counters: &cache::Counters,
) -> Result<Component, WasmError> {
    let problem = |p: String| WasmError::Plugin {
        plugin: name.to_owned(),
        problems: vec![p],
    };
    match check::kind(wasm) {
        WasmKind::NotWasm => return Err(problem("it is not WebAssembly (no \\0asm header)".into())),
        WasmKind::CoreModule => {
            return Err(problem(
                "it is a core WebAssembly module, not a component: build it for wasm32-wasip2, or wrap it with `wasm-tools component new`".into(),
            ))
        }
        WasmKind::Component => {}
    }
    cache::compile(&engine.engine, name, wasm, cache_dir, counters)
        .map_err(|e| problem(format!("it is not a valid component: {e:#}")))
}

/// Pre-instantiates a component as a job, or lists why it is not one.
fn pre_instantiate(
    engine: &EngineCtx,
    component: &Component,
) -> Result<JobPre<JobState>, Vec<String>> {
    let problems = check::world_problems(World::Job, &engine.engine, component);
    if !problems.is_empty() {
        return Err(problems);
    }
    let instance = engine
        .linker
        .instantiate_pre(component)
        .map_err(|e| vec![format!("it does not link against the job world: {e:#}")])?;
    JobPre::new(instance).map_err(|e| vec![format!("it does not match the job world: {e:#}")])
}
