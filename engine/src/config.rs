//! How an engine runs ([`EngineConfig`]) and how it runs each builder
//! ([`BuilderConfig`]): every interval and limit with its default as a named constant.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_job::BuildLimits;
use serde_json::Value;

use crate::client::SubmitLimits;
use crate::dependencies::{Dependency, MissingDependency, retval_references};
use crate::error::{EngineError, Result};
use crate::events::DEFAULT_EVENT_CAPACITY;
use crate::retry::RetryPolicy;
use kiln_storage::StoreOptions;

/// The most items (buildsets submitted, requests cancelled, priorities changed) that
/// concurrent calls share one transaction with (group commit, see `Client::submit`).
/// Bounds how long one commit holds the writer when thousands of callers queue at once;
/// a single call carrying more is written alone.
pub const DEFAULT_MAX_GROUP_COMMIT: usize = 1_024;
/// How often the claim loop looks at the database when nothing woke it: the delay before
/// this engine sees work submitted by another process. Submits through this engine wake
/// it at once.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often a master records that it is alive.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a master may stay silent before another expires it and re-queues its work;
/// several heartbeats, so that one slow transaction does not cost a master its builds.
pub const DEFAULT_MASTER_EXPIRY: Duration = Duration::from_secs(60);
/// How long shutdown waits for running builds before stopping them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a build asked to stop may take before its task is aborted.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(5);
/// The most requests one builder claims in one transaction.
pub const DEFAULT_CLAIM_BATCH: u32 = 256;
/// The most builds one engine runs at once, over all builders: beyond it requests stay
/// queued (builds waiting on their children do not count). As many as the WebAssembly
/// host's default sandbox slots (`kiln_host::DEFAULT_MAX_INSTANCES`), so that builds
/// wait for a slot in the queue instead of in the host; a test of the host checks that
/// the two stay equal.
pub const DEFAULT_MAX_RUNNING_BUILDS: u32 = 4_096;

/// How an engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The database URL (`sqlite://kiln.db`, `sqlite::memory:`, or a path).
    pub database_url: String,
    /// This master's unique name. Two live processes must not share one: registering a
    /// name takes back whatever an earlier process of that name left unfinished.
    pub master_name: String,
    /// See [`DEFAULT_POLL_INTERVAL`].
    pub poll_interval: Duration,
    /// See [`DEFAULT_HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: Duration,
    /// See [`DEFAULT_MASTER_EXPIRY`].
    pub master_expiry: Duration,
    /// See [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// See [`DEFAULT_CANCEL_GRACE`].
    pub cancel_grace: Duration,
    /// See [`DEFAULT_CLAIM_BATCH`].
    pub claim_batch: u32,
    /// See [`DEFAULT_MAX_RUNNING_BUILDS`].
    pub max_running_builds: u32,
    /// See [`DEFAULT_EVENT_CAPACITY`].
    pub event_capacity: usize,
    /// See [`DEFAULT_OUTBOX_PRUNE_INTERVAL`](crate::reporting::DEFAULT_OUTBOX_PRUNE_INTERVAL).
    pub outbox_prune_interval: Duration,
    /// What one submission may carry (text sizes, properties, builders, stamps).
    pub submit_limits: SubmitLimits,
    /// See [`DEFAULT_MAX_GROUP_COMMIT`]; 0 gives every submit a transaction of its own.
    /// Applies to stores that do not group concurrent writes themselves (PostgreSQL);
    /// SQLite's writer thread shares its commits among whatever callers queued meanwhile
    /// (each in a savepoint of its own), whatever this says.
    pub max_group_commit: usize,
    /// Database connection tuning.
    pub store: StoreOptions,
    /// Where builds get their result directories (`<dir>/<builder>/<number>/`), whose
    /// files become the builds' artifacts. `None`: builds get no result directory.
    pub results_dir: Option<std::path::PathBuf>,
    /// See [`DEFAULT_RETENTION_INTERVAL`](crate::retention::DEFAULT_RETENTION_INTERVAL).
    pub retention_interval: Duration,
    /// See [`DEFAULT_RETENTION_BATCH`](crate::retention::DEFAULT_RETENTION_BATCH).
    pub retention_batch: u32,
    /// Old log records below a level are pruned; `None` keeps every record.
    pub log_retention: Option<crate::retention::LogRetention>,
}

impl EngineConfig {
    /// Defaults for a database URL; the master is named after the host and process.
    pub fn new(database_url: impl Into<String>) -> Self {
        EngineConfig {
            database_url: database_url.into(),
            master_name: default_master_name(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            master_expiry: DEFAULT_MASTER_EXPIRY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            cancel_grace: DEFAULT_CANCEL_GRACE,
            claim_batch: DEFAULT_CLAIM_BATCH,
            max_running_builds: DEFAULT_MAX_RUNNING_BUILDS,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            outbox_prune_interval: crate::reporting::DEFAULT_OUTBOX_PRUNE_INTERVAL,
            submit_limits: SubmitLimits::default(),
            max_group_commit: DEFAULT_MAX_GROUP_COMMIT,
            store: StoreOptions::default(),
            results_dir: None,
            retention_interval: crate::retention::DEFAULT_RETENTION_INTERVAL,
            retention_batch: crate::retention::DEFAULT_RETENTION_BATCH,
            log_retention: None,
        }
    }

    /// Sets the master name.
    pub fn master_name(mut self, name: impl Into<String>) -> Self {
        self.master_name = name.into();
        self
    }

    /// Gives every build a result directory under `dir`.
    pub fn results_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.results_dir = Some(dir.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let positive = [
            ("poll_interval", self.poll_interval),
            ("outbox_prune_interval", self.outbox_prune_interval),
            ("retention_interval", self.retention_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("master_expiry", self.master_expiry),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(EngineError::Invalid(format!(
                "{name} must be longer than zero"
            )));
        }
        if self.master_expiry <= self.heartbeat_interval {
            return Err(EngineError::Invalid(format!(
                "master_expiry ({:?}) must be longer than heartbeat_interval ({:?}), or live masters expire each other",
                self.master_expiry, self.heartbeat_interval
            )));
        }
        if self.retention_batch == 0 {
            return Err(EngineError::Invalid(
                "retention_batch must be at least 1".into(),
            ));
        }
        if self.claim_batch == 0 {
            return Err(EngineError::Invalid(
                "claim_batch must be at least 1".into(),
            ));
        }
        if self.master_name.trim().is_empty() {
            return Err(EngineError::Invalid("master_name is empty".into()));
        }
        Ok(())
    }
}

/// `host:pid`, unique among live processes.
fn default_master_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A builder as an engine runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct BuilderConfig {
    /// Its unique name.
    pub name: String,
    /// A human description.
    pub description: Option<String>,
    /// The most builds this engine runs at once for it; `None` for no limit.
    pub max_concurrent: Option<u32>,
    /// Positional arguments handed to every build (JSON).
    pub args: Value,
    /// Keyword arguments handed to every build (JSON).
    pub kwargs: Value,
    /// The builders it depends on: their return values may be referenced in `args` and
    /// `kwargs` as `{"$retval": "<builder>"}`.
    pub depends_on: Vec<Dependency>,
    /// What a build does when a dependency has no successful build.
    pub on_missing_dependency: MissingDependency,
    /// What one build may write through the engine (state, progress, properties,
    /// children, trigger depth).
    pub limits: BuildLimits,
    /// How its builds are retried (none automatically by default).
    pub retry: RetryPolicy,
    /// What of its finished work is kept (everything by default).
    pub retention: Option<crate::retention::RetentionPolicy>,
    /// Collapsing of its queued requests (off by default).
    pub collapse: Option<Collapse>,
    /// The locks each of its builds takes before it starts (see [`LockUse`]).
    pub locks: Vec<LockUse>,
}

/// A lock a builder takes (Buildbot's `locks=[lock.access(...)]`): each of its builds
/// starts only when these units of the lock are free, and holds them until it finishes.
/// A request waiting for a lock stays queued: it holds no task, no slot and no sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockUse {
    /// The lock's name, as defined with [`Engine::define_lock`](crate::Engine::define_lock).
    pub name: String,
    /// How much of it a build takes.
    pub units: LockUnits,
}

/// How much of a lock a build takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockUnits {
    /// This many of its units (Buildbot's counting access takes one).
    Count(u32),
    /// All of them: nothing else holds the lock meanwhile.
    Exclusive,
}

impl LockUse {
    /// One unit of a lock (Buildbot's counting access).
    pub fn one(name: impl Into<String>) -> Self {
        LockUse {
            name: name.into(),
            units: LockUnits::Count(1),
        }
    }

    /// The whole lock.
    pub fn exclusive(name: impl Into<String>) -> Self {
        LockUse {
            name: name.into(),
            units: LockUnits::Exclusive,
        }
    }
}

/// Buildbot's `collapseRequests` for one builder: when it claims, its queued requests
/// with the same sourcestamps as a newer queued one (and, with `properties`, the same
/// properties) complete as SKIPPED, superseded by the newest, which runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collapse {
    /// Whether properties must match too.
    pub properties: bool,
}

impl BuilderConfig {
    /// A builder with no limit and no arguments.
    pub fn new(name: impl Into<String>) -> Self {
        BuilderConfig {
            name: name.into(),
            description: None,
            max_concurrent: None,
            args: Value::Null,
            kwargs: Value::Null,
            depends_on: Vec::new(),
            on_missing_dependency: MissingDependency::Fail,
            limits: BuildLimits::default(),
            retry: RetryPolicy::default(),
            retention: None,
            collapse: None,
            locks: Vec::new(),
        }
    }

    /// Adds a lock its builds take.
    pub fn lock(mut self, lock: LockUse) -> Self {
        self.locks.push(lock);
        self
    }

    /// Sets how its builds are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Adds a dependency on the latest successful build of another builder.
    pub fn depends_on(mut self, builder: impl Into<String>) -> Self {
        self.depends_on.push(Dependency::latest(builder));
        self
    }

    /// Builds missing dependencies first instead of failing.
    pub fn build_missing_dependencies(mut self) -> Self {
        self.on_missing_dependency = MissingDependency::Build;
        self
    }

    /// Checks the dependencies: no builder twice, not itself, and every `$retval`
    /// reference names a declared dependency.
    pub fn check_dependencies(&self) -> Result<()> {
        let here = format!("builder {:?}", self.name);
        let mut declared = BTreeSet::new();
        for dep in &self.depends_on {
            if dep.builder == self.name {
                return Err(EngineError::Invalid(format!("{here} depends on itself")));
            }
            if !declared.insert(dep.builder.as_str()) {
                return Err(EngineError::Invalid(format!(
                    "{here} lists dependency {:?} twice",
                    dep.builder
                )));
            }
        }
        for (what, value) in [("args", &self.args), ("kwargs", &self.kwargs)] {
            let refs = retval_references(value)
                .map_err(|e| EngineError::Invalid(format!("{here}: {what}: {e}")))?;
            if let Some(undeclared) = refs.iter().find(|r| !declared.contains(r.as_str())) {
                return Err(EngineError::Invalid(format!(
                    "{here}: {what} reference the return value of {undeclared:?}, which is not in its depends_on"
                )));
            }
        }
        Ok(())
    }

    /// Limits how many builds run at once on this engine.
    pub fn max_concurrent(mut self, n: u32) -> Self {
        self.max_concurrent = Some(n);
        self
    }

    /// Sets the positional arguments.
    pub fn args(mut self, args: Value) -> Self {
        self.args = args;
        self
    }

    /// Sets the keyword arguments.
    pub fn kwargs(mut self, kwargs: Value) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }
}
