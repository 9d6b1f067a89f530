//! The interface between Kiln's engine and what runs builds: [`Executor`]s (Rust async
//! functions, WebAssembly components), relationship [`Policy`]s and [`Reporter`]s.
//!
//! An executor gets a [`BuildContext`]: what the build is (its [`BuildSpec`]) and what
//! it may do (log, report progress, set its state and properties, trigger children,
//! learn that it was asked to stop), each write held to its [`BuildLimits`]. The context
//! reaches the engine only through the [`JobRuntime`] trait, which the engine's
//! scheduler implements.
//!
//! Layout: `outcome` holds [`Executor`], [`FnExecutor`], [`Outcome`] and [`JobError`];
//! `context` the [`BuildContext`], its limits and the runtime trait; `policy` the
//! relationship [`Policy`] with the natively run [`BundledPolicy`]; `reporter` the
//! [`Reporter`] trait.
//!
//! Architecture invariant: this crate knows no database, no scheduler, no wasm and no
//! HTTP. The engine depends on it, and so does the WebAssembly host, which never sees
//! the engine.

mod context;
mod outcome;
mod policy;
mod reporter;

pub use context::{
    BuildContext, BuildLimits, BuildSpec, DEFAULT_MAX_CHILDREN, DEFAULT_MAX_TRIGGER_DEPTH,
    DEFAULT_PROGRESS_GROUPS, DEFAULT_PROPERTY_BYTES, DEFAULT_STATUS_BYTES, JobRuntime,
    ResolvedDependency, StopReason, TriggerSpec, WriteError,
};
pub use outcome::{Executor, FnExecutor, JobError, Outcome};
pub use policy::{
    BundledPolicy, Decision, ParentInfo, Policy, PolicyError, TriggerError, Triggered,
    relationship_name,
};
pub use reporter::Reporter;
