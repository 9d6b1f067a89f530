//! The embedding API: open an engine, register builders, submit, wait, subscribe, shut down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_job::{Executor, Policy, Reporter};
use kiln_model::{
    BuildId, Builder, BuilderId, Buildset, BuildsetId, MasterId, RequestId, Schedule,
};
use kiln_storage::{self as storage, CancelOutcome, Store};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::client::{Client, Submission, Submitted};
use crate::config::{BuilderConfig, EngineConfig};
use crate::dependencies::find_cycle;
use crate::error::{EngineError, Result};
use crate::events::Event;
use crate::reporting::ReporterConfig;
use crate::scheduler::Scheduler;
use crate::schedules::{ScheduleConfig, ScheduleSet};

/// How often [`Engine::reporters_caught_up`] looks at the reporters' cursors.
const REPORTER_CHECK: Duration = Duration::from_millis(20);

/// A running engine: one master that claims and runs requests for its builders.
///
/// Stop it with [`Engine::shutdown`]. Dropping it instead stops claiming at once but
/// records nothing: builds it was running stay claimed until master expiry hands them
/// to another master (or this master's next start takes them back).
pub struct Engine {
    client: Client,
    scheduler: Scheduler,
    /// What the engine's own services (schedules) submit through.
    shared: Arc<Shared>,
    schedules: Arc<ScheduleSet>,
}

/// The part of an engine its services hold: submitting as the engine does (group
/// commit, events, a wake-up of the claim loop).
pub(crate) struct Shared {
    pub(crate) client: Client,
    state: Arc<crate::scheduler::SchedulerState>,
}

impl Shared {
    /// Submits and announces what was added.
    pub(crate) async fn submit(&self, submissions: &[Submission]) -> Result<Vec<Submitted>> {
        let known = self.state.builder_ids();
        // Announced before any claim that sees these rows announces their builds.
        let _announcing = self.state.announcing.read().await;
        let submitted = self.client.submit_many_known(submissions, &known).await?;
        for (submission, s) in submissions.iter().zip(&submitted) {
            if s.existing {
                // Nothing was added: the buildset holding the key was announced when it was.
                continue;
            }
            self.state.emit(Event::BuildsetSubmitted {
                buildset_id: s.buildset_id,
                reason: submission.reason.clone(),
                requests: s.requests.clone(),
            });
            if s.requests.is_empty() {
                self.state.emit(Event::BuildsetComplete {
                    buildset_id: s.buildset_id,
                    results: kiln_model::ResultCode::Success,
                });
            }
        }
        drop(_announcing);
        self.state.wake_claims();
        Ok(submitted)
    }

    /// Becomes `true` when the engine stops.
    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.state.stopping_signal()
    }
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
            .master_register(&config.master_name, kiln_model::now())
            .await?;
        if !registered.released.is_empty() || !registered.retried_builds.is_empty() {
            warn!(
                master = %config.master_name, released = registered.released.len(), retried = registered.retried_builds.len(),
                "took back work an earlier process of this master left unfinished"
            );
        }
        info!(master = %config.master_name, id = %registered.master_id, backend = store.backend(), "engine started");
        let client = Client::from_store(store.clone())
            .with_limits(config.submit_limits)
            .with_group_commit(config.max_group_commit);
        let scheduler = Scheduler::start(store, registered.master_id, config);
        let shared = Arc::new(Shared {
            client: client.clone(),
            state: scheduler.shared.clone(),
        });
        Ok(Engine {
            client,
            scheduler,
            shared,
            schedules: Arc::new(ScheduleSet::default()),
        })
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
        if let Some(retention) = &config.retention {
            retention
                .check()
                .map_err(|e| EngineError::Invalid(format!("builder {:?}: {e}", config.name)))?;
        }
        config
            .retry
            .check()
            .map_err(|e| EngineError::Invalid(format!("builder {:?}: {e}", config.name)))?;
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
        self.client
            .store()
            .builder_serve(self.master_id(), id)
            .await?;
        self.client.forget_served().await;
        let locks = self.resolve_locks(&config).await?;
        self.client.store().builder_set_locks(id, &locks).await?;
        let name = config.name.clone();
        if !self.scheduler.register(id, config, executor) {
            return Err(EngineError::DuplicateBuilder(name));
        }
        Ok(id)
    }

    /// The configs of the builders registered on this engine.
    pub fn builder_configs(&self) -> Vec<BuilderConfig> {
        self.scheduler.builder_configs()
    }

    /// Defines a lock with `count` units (1: exclusive), or changes its count; every
    /// master sharing the database sees the same lock. Define a lock before the builders
    /// that take it.
    pub async fn define_lock(&self, name: &str, count: u32) -> Result<()> {
        self.client.store().lock_define(name, count).await?;
        Ok(())
    }

    /// A builder's locks as units of the locks defined in the database.
    async fn resolve_locks(&self, config: &BuilderConfig) -> Result<Vec<(String, u32)>> {
        if config.locks.is_empty() {
            return Ok(Vec::new());
        }
        let defined = self.client.locks().await?;
        config
            .locks
            .iter()
            .map(|lock| {
                let found = defined
                    .iter()
                    .find(|l| l.name == lock.name)
                    .ok_or_else(|| {
                        EngineError::Invalid(format!(
                            "builder {:?} takes lock {:?}, which is not defined",
                            config.name, lock.name
                        ))
                    })?;
                let units = match lock.units {
                    crate::config::LockUnits::Count(n) => n,
                    crate::config::LockUnits::Exclusive => {
                        u32::try_from(found.capacity).unwrap_or(u32::MAX)
                    }
                };
                Ok((lock.name.clone(), units))
            })
            .collect()
    }

    /// Subscribes to lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.scheduler.shared.events.subscribe()
    }

    /// Submits a buildset; its requests start at once if this engine runs their builders.
    pub async fn submit(&self, submission: &Submission) -> Result<Submitted> {
        crate::client::only(self.submit_many(std::slice::from_ref(submission)).await?)
    }

    /// Registers a schedule (or replaces the one of that name): this engine fires its
    /// ticks from now on, as every engine that registers it does, and they make one
    /// buildset per tick between them. Its builders must be known to the database.
    pub async fn register_schedule(&self, config: ScheduleConfig) -> Result<Schedule> {
        config.check()?;
        for builder in &config.submission.builders {
            self.client.builder_named(builder).await?;
        }
        let row = self.client.register_schedule_row(&config).await?;
        if self.schedules.insert(config) {
            self.scheduler.spawn_service(crate::schedules::service(
                self.schedules.clone(),
                Arc::downgrade(&self.shared),
            ));
        }
        Ok(row)
    }

    /// Deletes a complete buildset (see [`Client::delete_buildset`]) and the result
    /// directories of its builds.
    pub async fn delete_buildset(&self, id: BuildsetId) -> Result<Vec<kiln_model::Build>> {
        let gone = self.client.delete_buildset(id).await?;
        self.remove_result_dirs(&gone).await;
        Ok(gone)
    }

    /// Deletes a finished build (see [`Client::delete_build`]) and its result directory.
    pub async fn delete_build(&self, id: BuildId) -> Result<kiln_model::Build> {
        let gone = self.client.delete_build(id).await?;
        self.remove_result_dirs(std::slice::from_ref(&gone)).await;
        Ok(gone)
    }

    async fn remove_result_dirs(&self, builds: &[kiln_model::Build]) {
        if let Some(root) = &self.scheduler.shared.config.results_dir {
            self.client.remove_result_dirs(root, builds).await;
        }
    }

    /// Applies the builders' retention policies and the log retention now, as the
    /// background task does every `retention_interval`.
    pub async fn apply_retention(&self) -> Result<crate::retention::RoundOutcome> {
        Ok(crate::scheduler::retention::round(&self.scheduler.shared).await?)
    }

    /// Fires a schedule now (see [`Client::force_schedule`]).
    pub async fn force_schedule(&self, name: &str) -> Result<Submitted> {
        let submission = self.client.forced_submission(name).await?;
        crate::client::only(
            self.shared
                .submit(std::slice::from_ref(&submission))
                .await?,
        )
    }

    /// Submits several buildsets in one transaction (all or none), in the order given.
    pub async fn submit_many(&self, submissions: &[Submission]) -> Result<Vec<Submitted>> {
        self.shared.submit(submissions).await
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

    /// The engine's metrics in a registry of their own, ready to encode as OpenMetrics
    /// text or to extend: what it counted since it started (claims, builds started and
    /// finished per builder and result, durations, submit-to-start latency) and what the
    /// database says now (queued requests per builder, paused builders, masters alive,
    /// reporters' outbox lag), read by this call.
    pub async fn metrics(&self) -> Result<prometheus_client::registry::Registry> {
        let client = &self.client;
        let builders = client.builders().await?;
        let depths: BTreeMap<BuilderId, u64> = client.queue_depths().await?.into_iter().collect();
        let masters = client
            .query_masters(
                &storage::Query::new()
                    .eq(storage::MasterField::Active, true)
                    .counted()
                    .limit(1),
            )
            .await?;
        let reporters = client.reporters().await?;
        let (in_flight, waiting) = self.scheduler.shared.running_counts();
        let snapshot = crate::metrics::Snapshot {
            queued: builders
                .iter()
                .map(|b| (b.name.clone(), depths.get(&b.id).copied().unwrap_or(0)))
                .collect(),
            paused: builders
                .iter()
                .filter(|b| b.paused)
                .map(|b| b.name.clone())
                .collect(),
            masters_alive: masters.total.unwrap_or(masters.items.len() as u64),
            outbox_lag: reporters.into_iter().map(|r| (r.name, r.pending)).collect(),
            in_flight: in_flight as u64,
            waiting: waiting as u64,
            commits: self.scheduler.shared.store.commit_stats(),
        };
        let mut registry = prometheus_client::registry::Registry::default();
        self.scheduler.shared.metrics.register(&mut registry);
        snapshot.register(&mut registry);
        Ok(registry)
    }

    /// Whether this engine can do its work now: the database answers and this master is
    /// registered and active (not expired by others after a long silence, not shut
    /// down). An error says which is not the case.
    pub async fn ready(&self) -> Result<()> {
        let me = self.client.master(self.master_id()).await?;
        if me.active {
            Ok(())
        } else {
            Err(EngineError::NotReady(format!(
                "master {} ({}) is not active: it was shut down or expired by another master",
                me.id, me.name
            )))
        }
    }

    /// Pauses or resumes a builder (see [`Client::set_builder_paused`]); resuming wakes
    /// this engine's claim loop, and on PostgreSQL every other master's.
    pub async fn set_builder_paused(&self, name: &str, paused: bool) -> Result<Builder> {
        let builder = self.client.set_builder_paused(name, paused).await?;
        if !paused {
            self.scheduler.wake();
        }
        Ok(builder)
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
