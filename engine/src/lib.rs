//! Kiln's embeddable scheduling engine.
//!
//! Kiln keeps buildsets, build requests, claims and builds in SQL and runs the work they
//! describe through executors. An embedder opens an [`Engine`] on a database URL,
//! registers builders with their executors, submits buildsets and waits for them or
//! subscribes to lifecycle [`Event`]s. A [`Client`] offers the same reads and control
//! actions without running anything, which is what command-line tools want.
//!
//! # Layout
//! - [`model`]: plain types, result codes, progress trees, log records; no I/O.
//! - [`storage`]: the one seam to the database ([`storage::Store`]) and its backends.
//! - [`executor`]: how a build's work runs ([`Executor`]), with Rust async functions as
//!   the first kind of executor.
//! - [`wasm`]: the plugin host; WebAssembly job components run sandboxed by wasmtime.
//! - [`relations`]: parent/child buildsets, their policies, and builder dependencies.
//! - [`reporting`]: result reporters and the durable outbox they are delivered from.
//! - [`scheduler`]: claims requests, runs builds, waits on children, delivers to
//!   reporters, heartbeats and expires masters.
//! - [`client`] and [`engine`]: the embedding API.
//! - [`events`]: lifecycle events.
//! - [`error`]: the engine's error type.

pub mod client;
pub mod engine;
pub mod error;
pub mod events;
pub mod executor;
pub mod model;
pub mod relations;
pub mod reporting;
pub mod scheduler;
pub mod storage;
pub mod wasm;

pub use client::{Client, Submission, SubmitLimits, Submitted};
pub use engine::{BuilderConfig, Engine, EngineConfig};
pub use error::{EngineError, Result};
pub use events::Event;
pub use executor::{BuildContext, BuildLimits, Executor, FnExecutor, JobError, Outcome};
pub use relations::{Decision, Policy, Triggered};
pub use reporting::{Reporter, ReporterConfig};
