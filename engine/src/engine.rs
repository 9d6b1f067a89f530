//! The embedding API: open an engine, register builders, submit, wait, subscribe, shut down.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::client::{Client, Submission, SubmitLimits, Submitted};
use crate::error::{EngineError, Result};
use crate::events::{DEFAULT_EVENT_CAPACITY, Event};
use crate::executor::{BuildLimits, Executor};
use crate::model::{BuildId, BuilderId, Buildset, BuildsetId, MasterId, RequestId};
use crate::relations::{Dependency, MissingDependency, Policy, find_cycle, retval_references};
use crate::reporting::{Reporter, ReporterConfig};
use crate::scheduler::Scheduler;
use crate::storage::{self, CancelOutcome, Store, StoreOptions};

/// How often the claim loop looks at the database when nothing woke it: the delay before
/// this engine sees work submitted by another process. Submits through this engine wake
/// it at once.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often a master records that it is alive.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often [`Engine::reporters_caught_up`] looks at the reporters' cursors.
const REPORTER_CHECK: Duration = Duration::from_millis(20);
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
/// queued. Equal to the WASM host's default sandbox slots
/// ([`DEFAULT_MAX_INSTANCES`](crate::wasm::DEFAULT_MAX_INSTANCES)), so that builds wait
/// for a slot in the queue instead of failing to get one.
pub const DEFAULT_MAX_RUNNING_BUILDS: u32 = crate::wasm::DEFAULT_MAX_INSTANCES;

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
    /// Database connection tuning.
    pub store: StoreOptions,
    /// Where builds get their result directories (`<dir>/<builder>/<number>/`), whose
    /// files become the builds' artifacts. `None`: builds get no result directory.
    pub results_dir: Option<std::path::PathBuf>,
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
            store: StoreOptions::default(),
            results_dir: None,
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

    fn validate(&self) -> Result<()> {
        let positive = [
            ("poll_interval", self.poll_interval),
            ("outbox_prune_interval", self.outbox_prune_interval),
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
        }
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

/// A running engine: one master that claims and runs requests for its builders.
///
/// Stop it with [`Engine::shutdown`]. Dropping it instead stops claiming at once but
/// records nothing: builds it was running stay claimed until master expiry hands them
/// to another master (or this master's next start takes them back).
pub struct Engine {
    client: Client,
    scheduler: Scheduler,
}

impl Engine {
    /// Opens the database, registers this master and starts the scheduler.
    pub async fn open(config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let store = storage::open_with(&config.database_url, &config.store).await?;
        Engine::open_on(store, config).await
    }

    /// Starts an engine on a store the embedder opened (a backend of its own, or a
    /// wrapper around one that observes or injects faults); `config.database_url` and
    /// `config.store` are not used.
    pub async fn open_on(store: Arc<dyn Store>, config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let registered = store
            .master_register(&config.master_name, crate::model::now())
            .await?;
        if !registered.released.is_empty() || !registered.retried_builds.is_empty() {
            warn!(
                master = %config.master_name, released = registered.released.len(), retried = registered.retried_builds.len(),
                "took back work an earlier process of this master left unfinished"
            );
        }
        info!(master = %config.master_name, id = %registered.master_id, backend = store.backend(), "engine started");
        let client = Client::from_store(store.clone()).with_limits(config.submit_limits);
        let scheduler = Scheduler::start(store, registered.master_id, config);
        Ok(Engine { client, scheduler })
    }

    /// Opens an engine with default settings on a database URL.
    pub async fn open_url(url: &str) -> Result<Engine> {
        Engine::open(EngineConfig::new(url)).await
    }

    /// The client for reads and control actions.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This engine's master id.
    pub fn master_id(&self) -> MasterId {
        self.scheduler.shared.master
    }

    /// Registers a builder with the executor that runs its builds, creating the builder in
    /// the database if needed. Its queued requests start at once.
    pub async fn register_builder(
        &self,
        config: BuilderConfig,
        executor: impl Executor,
    ) -> Result<BuilderId> {
        self.register_builder_arc(config, Arc::new(executor)).await
    }

    /// Like [`Engine::register_builder`], with a shared executor.
    pub async fn register_builder_arc(
        &self,
        config: BuilderConfig,
        executor: Arc<dyn Executor>,
    ) -> Result<BuilderId> {
        if config.max_concurrent == Some(0) {
            return Err(EngineError::Invalid(format!(
                "builder {:?}: max_concurrent must be at least 1",
                config.name
            )));
        }
        config.check_dependencies()?;
        config
            .limits
            .validate()
            .map_err(|e| EngineError::Invalid(format!("builder {:?}: {e}", config.name)))?;
        let mut graph: BTreeMap<String, Vec<String>> = self
            .scheduler
            .builder_configs()
            .into_iter()
            .map(|b| {
                (
                    b.name,
                    b.depends_on.into_iter().map(|d| d.builder).collect(),
                )
            })
            .collect();
        graph.insert(
            config.name.clone(),
            config
                .depends_on
                .iter()
                .map(|d| d.builder.clone())
                .collect(),
        );
        if let Some(cycle) = find_cycle(&graph) {
            return Err(EngineError::Invalid(format!(
                "builder {:?} would close a dependency cycle: {}",
                config.name,
                cycle.join(" -> ")
            )));
        }
        let id = self
            .client
            .store()
            .builder_ensure(&config.name, config.description.as_deref())
            .await?;
        let depends_on: Vec<String> = config
            .depends_on
            .iter()
            .map(|d| d.builder.clone())
            .collect();
        self.client
            .store()
            .builder_set_depends_on(id, &depends_on)
            .await?;
        let name = config.name.clone();
        if !self.scheduler.register(id, config, executor) {
            return Err(EngineError::DuplicateBuilder(name));
        }
        Ok(id)
    }

    /// Subscribes to lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.scheduler.shared.events.subscribe()
    }

    /// Submits a buildset; its requests start at once if this engine runs their builders.
    pub async fn submit(&self, submission: &Submission) -> Result<Submitted> {
        crate::client::only(self.submit_many(std::slice::from_ref(submission)).await?)
    }

    /// Submits several buildsets in one transaction (all or none), in the order given.
    pub async fn submit_many(&self, submissions: &[Submission]) -> Result<Vec<Submitted>> {
        let known = self.scheduler.builder_ids();
        let submitted = self.client.submit_many_known(submissions, &known).await?;
        let shared = &self.scheduler.shared;
        for (submission, s) in submissions.iter().zip(&submitted) {
            shared.emit(Event::BuildsetSubmitted {
                buildset_id: s.buildset_id,
                reason: submission.reason.clone(),
                requests: s.requests.clone(),
            });
            if s.requests.is_empty() {
                shared.emit(Event::BuildsetComplete {
                    buildset_id: s.buildset_id,
                    results: crate::model::ResultCode::Success,
                });
            }
        }
        self.scheduler.wake();
        Ok(submitted)
    }

    /// Waits until a buildset is complete and returns it. Completion by another process is
    /// noticed at once on PostgreSQL (its notification), else within one poll interval.
    pub async fn wait_buildset(&self, id: BuildsetId) -> Result<Buildset> {
        let mut events = self.subscribe();
        let poll = self.scheduler.shared.config.poll_interval;
        loop {
            let buildset = self.client.buildset(id).await?;
            if buildset.complete {
                return Ok(buildset);
            }
            let deadline = tokio::time::sleep(poll);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(Event::BuildsetComplete { buildset_id, .. }) if buildset_id == id => break,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return Err(EngineError::ShuttingDown),
                    },
                    () = &mut deadline => break,
                }
            }
        }
    }

    /// Cancels a request (see [`Client::cancel_request`]); a build of it running here
    /// is told to stop at once.
    pub async fn cancel_request(&self, id: RequestId) -> Result<CancelOutcome> {
        let outcome = self.client.cancel_request(id).await?;
        self.after_cancel(&outcome);
        Ok(outcome)
    }

    /// Cancels every incomplete request of a buildset.
    pub async fn cancel_buildset(&self, id: BuildsetId) -> Result<CancelOutcome> {
        let outcome = self.client.cancel_buildset(id).await?;
        self.after_cancel(&outcome);
        Ok(outcome)
    }

    fn after_cancel(&self, outcome: &CancelOutcome) {
        self.scheduler.shared.after_cancel(outcome);
    }

    /// Rebuilds a build (see [`Client::rebuild`]).
    pub async fn rebuild(&self, id: BuildId) -> Result<Submitted> {
        let submitted = self.client.rebuild(id).await?;
        self.scheduler.wake();
        Ok(submitted)
    }

    /// Resubmits a buildset (see [`Client::resubmit`]).
    pub async fn resubmit(&self, id: BuildsetId, all: bool) -> Result<Submitted> {
        let submitted = self.client.resubmit(id, all).await?;
        self.scheduler.wake();
        Ok(submitted)
    }

    /// Sets the policy for a relationship name; builds triggering under that name are
    /// decided by it. "triggers" and "dependency" use the bundled worst-of until set.
    pub fn set_policy(&self, relationship: impl Into<String>, policy: impl Policy) {
        self.set_policy_arc(relationship, Arc::new(policy));
    }

    /// Like [`Engine::set_policy`], with a shared policy.
    pub fn set_policy_arc(&self, relationship: impl Into<String>, policy: Arc<dyn Policy>) {
        self.scheduler.set_policy(relationship.into(), policy);
    }

    /// Registers a reporter: from now on every lifecycle event is written to the outbox
    /// with the change it describes, and this engine delivers the ones the reporter wants
    /// (while it holds the reporter's lease; another master takes over if this one dies).
    /// A reporter known to the database resumes where it stopped. Register reporters
    /// before submitting work whose events they should hear.
    pub async fn register_reporter(
        &self,
        config: ReporterConfig,
        reporter: impl Reporter,
    ) -> Result<()> {
        self.register_reporter_arc(config, Arc::new(reporter)).await
    }

    /// Like [`Engine::register_reporter`], with a shared reporter.
    pub async fn register_reporter_arc(
        &self,
        config: ReporterConfig,
        reporter: Arc<dyn Reporter>,
    ) -> Result<()> {
        config.validate().map_err(EngineError::Invalid)?;
        self.client.store().reporter_register(&config.name).await?;
        self.scheduler
            .spawn_service(crate::scheduler::reporters::deliver_loop(
                self.scheduler.shared.clone(),
                config,
                reporter,
            ));
        Ok(())
    }

    /// Waits until the named reporters have dealt with every event in the outbox, at most
    /// `timeout`; says whether they got there.
    pub async fn reporters_caught_up(&self, names: &[String], timeout: Duration) -> bool {
        let store = self.client.store().clone();
        let check = async {
            loop {
                let mut behind = false;
                for name in names {
                    let caught_up = match store.reporter_get(name).await {
                        Ok(state) => {
                            matches!(store.outbox_read(state.cursor, 1).await, Ok(e) if e.is_empty())
                        }
                        Err(_) => true,
                    };
                    behind |= !caught_up;
                }
                if !behind {
                    return;
                }
                // Delivery runs in its own task; look again shortly.
                tokio::time::sleep(REPORTER_CHECK).await;
            }
        };
        tokio::time::timeout(timeout, check).await.is_ok()
    }

    /// Stops claiming work, lets running builds finish within the shutdown grace period,
    /// stops the rest (their requests go back to the queue), releases every claim and
    /// marks this master inactive.
    ///
    /// Takes `&self` so that an engine shared by a server (`Arc<Engine>`) can be shut down
    /// while requests still hold it; calling it twice does nothing more.
    pub async fn shutdown(&self) {
        self.scheduler.shutdown().await;
        info!(master = %self.scheduler.shared.master, "engine stopped");
    }
}
