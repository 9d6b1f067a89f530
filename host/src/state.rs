//! The state of one sandboxed build and the host functions its job calls.
//!
//! Logs, progress, the state string and properties go to the engine's buffers for the
//! build ([`BuildContext`]), which stores them in batches within the engine's flush
//! interval whatever the guest does next. Every host call counts against the build's
//! budget; a write past one of the build's limits stops the guest with the reason.

use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

use super::bindings::kiln::plugin::{host, types};
use super::limits::Limits;
use kiln_job::{BuildContext, WriteError};
use kiln_model::{ChildBuildset, LogLevel, LogRecord, Properties, Property};

/// The most elements a wasm table may grow to.
pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Refuses memory growth beyond the build's limit and remembers that it did, so that
/// the trap that usually follows is reported as what it is.
pub(crate) struct MemoryLimiter {
    limit: usize,
    pub(crate) refused: Option<usize>,
}

impl MemoryLimiter {
    /// A limiter allowing `limit` bytes of linear memory.
    pub(crate) fn new(limit: usize) -> Self {
        MemoryLimiter {
            limit,
            refused: None,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Everything a store of one build holds.
pub(crate) struct JobState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// The build; `None` when a component runs outside the engine (benchmarks).
    build: Option<BuildContext>,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) limits: Limits,
    /// Why the host stopped the guest, when it did (a limit or an interruption).
    pub(crate) interrupt: Option<String>,
    /// When the build's deadline passes.
    pub(crate) deadline: Instant,
    host_calls: u64,
    log_bytes: usize,
    http: wasmtime_wasi_http::WasiHttpCtx,
    /// Outbound HTTP: the builder's grant and the build's budget.
    pub(crate) outbound: crate::outbound::Outbound,
}

impl JobState {
    pub(crate) fn new(
        wasi: WasiCtx,
        build: Option<BuildContext>,
        limits: Limits,
        http: crate::outbound::HttpGrant,
    ) -> Self {
        let now = Instant::now();
        JobState {
            wasi,
            table: ResourceTable::new(),
            build,
            limiter: MemoryLimiter::new(limits.memory_bytes),
            limits,
            interrupt: None,
            deadline: now + limits.deadline,
            host_calls: 0,
            log_bytes: 0,
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            outbound: crate::outbound::Outbound::new(
                http,
                "builder",
                limits.http_requests,
                limits.http_bytes,
            ),
        }
    }

    /// Whether the build was asked to stop.
    pub(crate) fn stop_requested(&self) -> bool {
        self.build.as_ref().is_some_and(BuildContext::cancelled)
    }

    /// Stops the guest with a reason that becomes the build's error.
    fn refuse(&mut self, reason: String) -> wasmtime::Error {
        let error = wasmtime::format_err!("{reason}");
        self.interrupt = Some(reason);
        error
    }

    fn count_call(&mut self) -> wasmtime::Result<()> {
        self.host_calls += 1;
        if self.host_calls > self.limits.host_calls {
            let limit = self.limits.host_calls;
            return Err(self.refuse(format!(
                "host call limit exceeded: more than {limit} calls into the Kiln host"
            )));
        }
        Ok(())
    }

    /// Adds captured output to the build's log (it has its own limit).
    pub(crate) fn push_log(
        &mut self,
        level: LogLevel,
        message: String,
        fields: serde_json::Map<String, serde_json::Value>,
    ) {
        if let Some(build) = &self.build {
            build.log_captured(LogRecord {
                at: kiln_model::now(),
                level,
                message,
                fields,
            });
        }
    }

    /// Turns a refused write into a trap whose reason becomes the build's error (a
    /// limit), or into nothing (the build has ended, so nobody reads it).
    fn refused(&mut self, e: WriteError) -> wasmtime::Result<()> {
        match e {
            WriteError::Ended(_) => Ok(()),
            e => Err(self.refuse(e.to_string())),
        }
    }
}

impl WasiView for JobState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for JobState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl types::Host for JobState {}

fn level(level: types::LogLevel) -> LogLevel {
    match level {
        types::LogLevel::Debug => LogLevel::Debug,
        types::LogLevel::Info => LogLevel::Info,
        types::LogLevel::Warning => LogLevel::Warning,
        types::LogLevel::Error => LogLevel::Error,
        types::LogLevel::Critical => LogLevel::Critical,
    }
}

impl host::Host for JobState {
    async fn log(&mut self, level_: types::LogLevel, message: String) -> wasmtime::Result<()> {
        self.count_call()?;
        self.log_bytes = self.log_bytes.saturating_add(message.len());
        if self.log_bytes > self.limits.log_bytes {
            let limit = self.limits.log_bytes;
            return Err(self.refuse(format!(
                "log volume limit exceeded: more than {limit} bytes of log messages"
            )));
        }
        let Some(build) = self.build.clone() else {
            return Ok(());
        };
        match build.log(level(level_), message).await {
            Ok(()) => Ok(()),
            Err(e) => self.refused(e),
        }
    }

    async fn progress(
        &mut self,
        group: Vec<String>,
        current: u64,
        total: u64,
        status: String,
    ) -> wasmtime::Result<()> {
        self.count_call()?;
        let Some(build) = self.build.clone() else {
            return Ok(());
        };
        let group: Vec<&str> = group.iter().map(String::as_str).collect();
        match build.progress(&group, current, total, status).await {
            Ok(()) => Ok(()),
            Err(e) => self.refused(e),
        }
    }

    async fn set_state(&mut self, state: String) -> wasmtime::Result<()> {
        self.count_call()?;
        let Some(build) = self.build.clone() else {
            return Ok(());
        };
        match build.set_state(&state).await {
            Ok(()) => Ok(()),
            Err(e) => self.refused(e),
        }
    }

    async fn get_property(&mut self, name: String) -> wasmtime::Result<Option<types::Property>> {
        self.count_call()?;
        let found = self.build.as_ref().and_then(|b| b.get_property(&name));
        Ok(found.map(|p| types::Property {
            name,
            value: p.value.to_string(),
            source: p.source,
        }))
    }

    async fn set_property(
        &mut self,
        name: String,
        value: String,
        source: String,
    ) -> wasmtime::Result<Result<(), String>> {
        self.count_call()?;
        if name.trim().is_empty() {
            return Ok(Err("a property name must not be empty".into()));
        }
        let value: serde_json::Value = match serde_json::from_str(&value) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Err(format!(
                    "property {name:?}: the value is not JSON: {e}"
                )));
            }
        };
        let Some(build) = self.build.clone() else {
            return Ok(Ok(()));
        };
        match build.set_property(&name, value, &source).await {
            Ok(()) => Ok(Ok(())),
            Err(e @ WriteError::LimitExceeded(_)) => Err(self.refuse(e.to_string())),
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    async fn cancelled(&mut self) -> wasmtime::Result<bool> {
        self.count_call()?;
        Ok(self.stop_requested())
    }

    async fn trigger(
        &mut self,
        builders: Vec<String>,
        properties: Vec<types::Property>,
        wait: bool,
        relationship: String,
    ) -> wasmtime::Result<Result<host::Triggered, String>> {
        self.count_call()?;
        let Some(build) = self.build.clone() else {
            return Ok(Err(
                "trigger needs a build: it is not available outside the engine".into(),
            ));
        };
        let mut props = Properties::new();
        for p in properties {
            match serde_json::from_str(&p.value) {
                Ok(value) => {
                    props.insert(p.name, Property::new(value, p.source));
                }
                Err(e) => {
                    return Ok(Err(format!(
                        "property {:?}: the value is not JSON: {e}",
                        p.name
                    )));
                }
            }
        }
        let names: Vec<&str> = builders.iter().map(String::as_str).collect();
        match build.trigger(&names, props, wait, &relationship).await {
            Ok(t) => Ok(Ok(host::Triggered {
                verdict: to_wit(t.verdict),
                children: t.children.iter().map(wit_child).collect(),
            })),
            Err(e @ kiln_job::TriggerError::LimitExceeded(_)) => Err(self.refuse(e.to_string())),
            Err(e) => Ok(Err(e.to_string())),
        }
    }
}

result_code_conversions!(super::bindings::kiln::plugin::types);

fn wit_child(c: &ChildBuildset) -> types::Child {
    types::Child {
        builder: c.builder.clone(),
        buildset_id: c.buildset_id.0,
        complete: c.complete,
        results: c.results.map(to_wit),
        build_id: c.build_id.map(|b| b.0),
        return_value: c
            .return_value
            .as_ref()
            .map_or_else(|| "null".to_owned(), ToString::to_string),
    }
}
