//! Result reporters as WebAssembly components (the `reporter` world).
//!
//! Each event is delivered in a fresh store with only what the reporter's config
//! grants: directories and environment variables as for jobs, and outbound HTTP
//! (wasi:http) to the listed hosts. A request to any other host is refused before a
//! connection is made, and the delivery fails with a message naming the host.

use std::sync::Arc;

use async_trait::async_trait;
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::reporter::kiln::plugin::types as wit;
use super::bindings::reporter::{Reporter as ReporterWorld, ReporterPre};
use super::executor::{Grants, wasi_ctx};
use super::limits::{EPOCH_TICK, Limits};
use super::outbound::Outbound;
use super::output::CappedOutput;
use super::state::MemoryLimiter;
use super::{EngineCtx, WasmError};
use kiln_job::Reporter;
use kiln_model::{Report, ReportKind};

/// The store data of one delivery.
pub(crate) struct ReporterState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: Outbound,
    limiter: MemoryLimiter,
}

impl WasiView for ReporterState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ReporterState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// The linker every reporter shares: WASI p2 and wasi:http.
pub(crate) fn linker(engine: &wasmtime::Engine) -> Result<Linker<ReporterState>, WasmError> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| WasmError::Engine(e.to_string()))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| WasmError::Engine(e.to_string()))?;
    Ok(linker)
}

/// Pre-instantiates a component as a reporter, or lists why it is not one.
pub(crate) fn pre_instantiate(
    engine: &EngineCtx,
    component: &Component,
) -> Result<ReporterPre<ReporterState>, Vec<String>> {
    let problems =
        super::check::world_problems(super::check::World::Reporter, &engine.engine, component);
    if !problems.is_empty() {
        return Err(problems);
    }
    let instance = engine
        .reporter_linker
        .instantiate_pre(component)
        .map_err(|e| {
            vec![format!(
                "it does not link against the reporter world: {e:#}"
            )]
        })?;
    ReporterPre::new(instance)
        .map_err(|e| vec![format!("it does not match the reporter world: {e:#}")])
}

/// A reporter plugin, checked, compiled and pre-instantiated.
pub struct ReporterPlugin {
    name: String,
    engine: Arc<EngineCtx>,
    pre: ReporterPre<ReporterState>,
}

impl ReporterPlugin {
    pub(crate) fn new(
        name: String,
        engine: Arc<EngineCtx>,
        pre: ReporterPre<ReporterState>,
    ) -> Self {
        ReporterPlugin { name, engine, pre }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A reporter plugin with its config, limits and grants: what an engine registers.
pub struct WasmReporter {
    plugin: Arc<ReporterPlugin>,
    config: String,
    limits: Limits,
    grants: Grants,
}

impl WasmReporter {
    /// A reporter running `plugin` with `config` (its kwargs, handed to every call);
    /// `grants.http` lists the hosts it may reach.
    pub fn new(
        plugin: Arc<ReporterPlugin>,
        config: serde_json::Value,
        limits: Limits,
        grants: Grants,
    ) -> Result<Self, WasmError> {
        limits.validate().map_err(WasmError::Invalid)?;
        grants.validate().map_err(WasmError::Invalid)?;
        Ok(WasmReporter {
            plugin,
            config: config.to_string(),
            limits,
            grants,
        })
    }

    /// Delivers one event in a fresh sandbox.
    pub async fn deliver(&self, event: &Report) -> Result<(), String> {
        let stdout = CappedOutput::new(self.limits.output_bytes);
        let stderr = CappedOutput::new(self.limits.output_bytes);
        let wasi = wasi_ctx(&self.grants, None, &stdout, &stderr)
            .map_err(|e| format!("the sandbox could not be set up: {e:#}"))?;
        let _live = self.plugin.engine.live.enter();
        let mut store = Store::new(
            &self.plugin.engine.engine,
            ReporterState {
                wasi,
                table: ResourceTable::new(),
                http: WasiHttpCtx::new(),
                hooks: Outbound::new(
                    self.grants.http.clone(),
                    "reporter",
                    self.limits.http_requests,
                    self.limits.http_bytes,
                ),
                limiter: MemoryLimiter::new(self.limits.memory_bytes),
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        let deadline = std::time::Instant::now() + self.limits.deadline;
        store.epoch_deadline_callback(move |_| {
            if std::time::Instant::now() >= deadline {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        let wit_event = wit_event(event);
        let call = async {
            let reporter: ReporterWorld = self.plugin.pre.instantiate_async(&mut store).await?;
            reporter
                .call_report(&mut store, &self.config, &wit_event)
                .await
        };
        let backstop = self.limits.deadline + 2 * EPOCH_TICK;
        let outcome = tokio::time::timeout(backstop, call).await;
        // A reporter has no build log: what it prints goes to the engine's log.
        let printed = String::from_utf8_lossy(&stdout.take()).into_owned();
        for line in printed.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(reporter = %self.plugin.name, "{line}");
        }
        let errors = String::from_utf8_lossy(&stderr.take()).into_owned();
        for line in errors.lines().filter(|l| !l.trim().is_empty()) {
            tracing::warn!(reporter = %self.plugin.name, "{line}");
        }
        if let Some(violation) = store.data().hooks.violation() {
            return Err(violation);
        }
        match outcome {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(reason),
            Ok(Err(trap)) => {
                let said = errors
                    .lines()
                    .last()
                    .map(|l| format!(" (stderr: {l})"))
                    .unwrap_or_default();
                Err(match store.data().limiter.refused {
                    Some(asked) => format!(
                        "memory limit exceeded: the reporter tried to grow to {} MiB",
                        asked >> 20
                    ),
                    None if matches!(
                        trap.downcast_ref::<wasmtime::Trap>(),
                        Some(wasmtime::Trap::Interrupt)
                    ) =>
                    {
                        format!(
                            "deadline exceeded: the reporter ran longer than {:?}",
                            self.limits.deadline
                        )
                    }
                    None => format!(
                        "the reporter trapped: {}{said}",
                        trap.to_string().lines().next().unwrap_or("")
                    ),
                })
            }
            Err(_) => Err(format!(
                "deadline exceeded: the reporter ran longer than {:?}",
                self.limits.deadline
            )),
        }
    }
}

#[async_trait]
impl Reporter for WasmReporter {
    async fn report(&self, event: &Report) -> Result<(), String> {
        self.deliver(event).await
    }
}

result_code_conversions!(super::bindings::reporter::kiln::plugin::types);

fn wit_event(event: &Report) -> wit::Event {
    wit::Event {
        seq: event.seq,
        kind: match event.kind {
            ReportKind::BuildsetSubmitted => wit::EventKind::BuildsetSubmitted,
            ReportKind::BuildStarted => wit::EventKind::BuildStarted,
            ReportKind::BuildFinished => wit::EventKind::BuildFinished,
            ReportKind::BuildsetComplete => wit::EventKind::BuildsetComplete,
        },
        buildset_id: event.buildset_id.0,
        build_id: event.build_id.map(|b| b.0),
        builder: event.builder.clone(),
        results: event.results.map(to_wit),
        payload: event.payload.to_string(),
    }
}
