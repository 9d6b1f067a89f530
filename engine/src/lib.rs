//! Kiln's embeddable scheduling engine.
//!
//! Kiln keeps buildsets, build requests, claims and builds in SQL and runs the work they
//! describe through executors. An embedder opens an [`Engine`] on a database URL,
//! registers builders with their executors, submits buildsets and waits for them or
//! subscribes to lifecycle [`Event`]s. A [`Client`] offers the same reads and control
//! actions without running anything, which is what command-line tools want. The
//! engine's public API is the only door to its database: nothing above it opens a store.
//!
//! # Layout
//! - [`config`]: [`EngineConfig`] and [`BuilderConfig`], every default a named constant.
//! - [`client`] and [`engine`]: the embedding API ([`Client`], [`Engine`]).
//! - [`scheduler`]: claims requests, runs builds, buffers what they write, waits on
//!   children, delivers reports, heartbeats and expires masters.
//! - [`dependencies`]: builder dependencies and `$retval` substitution.
//! - [`retention`]: what of finished work is kept ([`RetentionPolicy`]).
//! - [`retry`]: automatic retries with backoff ([`RetryPolicy`]).
//! - [`schedules`]: periodic and cron submissions ([`ScheduleConfig`]).
//! - [`reporting`]: how reports are delivered to reporters ([`ReporterConfig`]).
//! - [`events`]: the live lifecycle [`Event`]s.
//! - [`metrics`]: what the engine counts for operators ([`Engine::metrics`]).
//! - [`error`]: the engine's error type.
//!
//! Beside it: [`model`] (`kiln-model`, plain data), `kiln-storage` (the database seam;
//! not re-exported), the executor interface (`kiln-job`, re-exported at the root) and,
//! with the `wasm` feature, the WebAssembly host as [`wasm`] (`kiln-host`).

pub mod client;
pub mod config;
pub mod dependencies;
pub mod engine;
pub mod error;
pub mod events;
mod group_commit;
pub mod metrics;
pub mod reporting;
pub mod retention;
pub mod retry;
pub mod scheduler;
pub mod schedules;

#[cfg(feature = "wasm")]
pub use kiln_host as wasm;
pub use kiln_model as model;

/// The storage types the engine's API speaks in: filters, queries, pages, outcomes,
/// options and errors. The store itself is not here: everything above the engine reads
/// and writes through [`Client`] and [`Engine`].
pub mod storage {
    /// How job text is made storable (a NUL becomes U+2400).
    pub use kiln_storage::text::NUL_STAND_IN;
    pub use kiln_storage::{
        BuildField, BuildFilter, BuilderField, BuildsetField, BuildsetFilter, CancelOutcome,
        ClaimFilter, Durability, Field, FieldType, Filter, FilterValue, MAX_LOCK_CAPACITY,
        MasterField, Op, Page, Query, RequestField, RequestFilter, RequestOrder, RequestOrderField,
        StorageError, StoreOptions, database_url, display_url, is_sqlite,
    };
}

pub use client::{Client, Submission, SubmitLimits, Submitted};
pub use config::{BuilderConfig, Collapse, EngineConfig, LockUnits, LockUse};
pub use engine::Engine;
pub use error::{EngineError, Result};
pub use events::Event;
pub use kiln_job::{
    BuildContext, BuildLimits, BundledPolicy, Decision, Executor, FnExecutor, JobError, Outcome,
    ParentInfo, Policy, PolicyError, Reporter, ResolvedDependency, StopReason, TriggerError,
    Triggered, WriteError,
};
pub use reporting::ReporterConfig;
pub use retention::{LogRetention, RetentionPolicy};
pub use retry::RetryPolicy;
pub use schedules::{CatchUp, ScheduleConfig, Timing};
