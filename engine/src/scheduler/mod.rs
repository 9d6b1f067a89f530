//! The scheduler: claims requests, runs their builds through executors, completes them.
//!
//! One claim loop per engine wakes on every submit in this process (a [`Notify`]), on a
//! settled build (a slot freed), on other processes' signals where the store relays them
//! (PostgreSQL's LISTEN/NOTIFY) and on a slow poll for work that other processes put in
//! the database. Each round claims and starts, in one transaction, up to every
//! registered builder's free slots, highest priority first, then oldest. Every started
//! build runs in its own tokio task; the loop never waits for a build. A finisher task
//! records finished builds in batches, one transaction for everything that finished
//! meanwhile.
//!
//! Layout: this file holds the claim loop; [`run`] runs builds and the finisher;
//! [`artifacts`] prepares result directories and collects what builds leave there;
//! [`masters`] heartbeats and expires silent masters.

pub(crate) mod artifacts;
mod builds;
mod masters;
mod output;
pub(crate) mod reporters;
pub(crate) mod retention;
mod triggers;

pub use output::{BACKLOG_RECORDS, FLUSH_INTERVAL, FLUSH_RECORDS};
pub use triggers::MAX_TRIGGER_CHILDREN;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use kiln_job::{
    BuildSpec, Executor, JobRuntime, Policy, StopReason, TriggerError, TriggerSpec, Triggered,
    WriteError,
};
use kiln_model::{
    BuildId, BuilderId, LogRecord, MasterId, ProgressReport, Property, RequestId, ResultCode,
};
use kiln_storage::{CancelOutcome, StartAvailable, Store, StoreSignal};

use crate::config::{BuilderConfig, EngineConfig};
use crate::events::Event;

/// A builder registered on this engine, with its executor and slot bookkeeping.
pub(crate) struct RegisteredBuilder {
    pub(crate) id: BuilderId,
    pub(crate) config: BuilderConfig,
    pub(crate) executor: Arc<dyn Executor>,
    /// Which worker slots are busy; a build takes the lowest free one.
    busy_slots: Mutex<BTreeSet<i64>>,
}

impl RegisteredBuilder {
    fn slots(&self) -> MutexGuard<'_, BTreeSet<i64>> {
        self.busy_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The lowest free slots, at most `batch` of them and never beyond the limit.
    fn free_slots(&self, batch: u32) -> Vec<i64> {
        let busy = self.slots();
        let room = match self.config.max_concurrent {
            Some(max) => (max as usize)
                .saturating_sub(busy.len())
                .min(batch as usize),
            None => batch as usize,
        };
        (0..).filter(|s| !busy.contains(s)).take(room).collect()
    }

    fn occupy_slot(&self, slot: i64) {
        self.slots().insert(slot);
    }

    fn release_slot(&self, slot: i64) {
        self.slots().remove(&slot);
    }
}

/// A build running on this engine.
struct RunningBuild {
    request_id: RequestId,
    stop: watch::Sender<Option<StopReason>>,
}

/// State shared by the claim loop, the heartbeat service and every build task.
pub(crate) struct SchedulerState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) master: MasterId,
    pub(crate) config: EngineConfig,
    builders: RwLock<HashMap<BuilderId, Arc<RegisteredBuilder>>>,
    /// Relationship policies by relationship name.
    pub(crate) policies: RwLock<HashMap<String, Arc<dyn Policy>>>,
    running: Mutex<HashMap<BuildId, RunningBuild>>,
    /// Started builds not yet recorded as finished.
    in_flight: watch::Sender<usize>,
    /// Of those, builds waiting on their children: they hold no room (see
    /// [`SchedulerState::waiting`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Hands finished builds to the finisher, which records them in batches.
    finished: mpsc::UnboundedSender<builds::Done>,
    /// Wakes the claim loop: see [`SchedulerState::wake_claims`] and
    /// [`SchedulerState::room_freed`].
    wake: Notify,
    /// Whether a claim round may find something: set by every wake-up that may bring work
    /// (a submit, another process's signal, a resumed builder, an expired master) and by
    /// a round that left work behind for want of room; taken by the claim loop before
    /// each round. A wake-up that only freed room (a build finished) runs a round only
    /// when it is set: with the queues drained, that round was a transaction that found
    /// nothing, once per finished build, and it delayed the claim of the next submit
    /// behind it (measured: about a third of an idle engine's submit-to-start).
    may_claim: AtomicBool,
    pub(crate) events: broadcast::Sender<Event>,
    stopping: watch::Sender<bool>,
    /// What running builds wrote and the flusher has not stored yet.
    pub(crate) outputs: output::Outputs,
    /// The result directories builds run in (see [`artifacts::Staging`]).
    pub(crate) staging: artifacts::Staging,
    /// What this engine counts for `/metrics`.
    pub(crate) metrics: crate::metrics::EngineMetrics,
    /// Held shared by every submit of this engine from before its write until it has
    /// announced what it added, and taken exclusively by the claim loop before it
    /// announces what it started, collapsed or cancelled: a build's `BuildStarted` (or a
    /// request's `RequestCompleted`) never comes before its buildset's
    /// `BuildsetSubmitted`. (The SQLite writer shares one commit between a
    /// submit and a claim queued behind it, which then sees the new rows; the two
    /// callers' tasks are woken by the same commit in no fixed order.)
    pub(crate) announcing: tokio::sync::RwLock<()>,
}

/// The scheduler's side of the executor interface: what a build's context reaches. Its
/// writes go to the build's buffers (`output`), its triggers to `triggers`.
pub(crate) struct Runtime(pub(crate) Arc<SchedulerState>);

#[async_trait::async_trait]
impl JobRuntime for Runtime {
    async fn log(&self, build: BuildId, record: LogRecord) -> Result<(), WriteError> {
        self.0.outputs.log(build, record).await
    }

    fn log_now(&self, build: BuildId, record: LogRecord) -> Result<(), WriteError> {
        self.0.outputs.log_now(build, record)
    }

    fn progress(&self, build: BuildId, report: ProgressReport) -> Result<(), WriteError> {
        self.0.outputs.progress(build, report)
    }

    fn state(&self, build: BuildId, state: String) -> Result<(), WriteError> {
        self.0.outputs.state(build, state)
    }

    fn property(&self, build: BuildId, name: &str, property: Property) -> Result<(), WriteError> {
        self.0.outputs.property(build, name, property)
    }

    async fn flush(&self, build: BuildId) {
        self.0.outputs.flush_build(&self.0, build).await;
    }

    async fn trigger(
        &self,
        parent: &BuildSpec,
        spec: TriggerSpec,
    ) -> Result<Triggered, TriggerError> {
        self.0.trigger(parent, spec).await
    }
}

/// A build waiting on its children, while this lives (see [`SchedulerState::waiting`]).
pub(crate) struct Waiting<'a>(&'a SchedulerState);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl SchedulerState {
    /// Marks a build as waiting on its children until the guard drops. A waiting build
    /// is a parked future: it does not count against `max_running_builds`, so that
    /// parents waiting on children can never hold all the room their children need
    /// (with room for N builds, N waiting parents used to stop the engine for good).
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Room was freed: children may be waiting for it.
        self.room_freed();
        Waiting(self)
    }

    /// Builds started here and not recorded as finished, and of those the ones waiting
    /// on their children.
    pub(crate) fn running_counts(&self) -> (usize, usize) {
        (
            *self.in_flight.borrow(),
            self.waiting.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub(crate) fn emit(&self, event: Event) {
        // No subscribers is fine: events are a courtesy, the store is the truth.
        let _ = self.events.send(event);
    }

    fn running(&self) -> MutexGuard<'_, HashMap<BuildId, RunningBuild>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn builder(&self, id: BuilderId) -> Option<Arc<RegisteredBuilder>> {
        self.builders
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Asks running builds to stop; `which` picks them by request.
    fn stop_builds(&self, reason: StopReason, which: impl Fn(RequestId) -> bool) -> usize {
        let running = self.running();
        let mut n = 0;
        for build in running.values().filter(|b| which(b.request_id)) {
            // send_if_modified keeps the first reason: a cancelled build stays cancelled.
            build.stop.send_if_modified(|current| {
                if current.is_none() {
                    *current = Some(reason);
                    true
                } else {
                    false
                }
            });
            n += 1;
        }
        n
    }

    /// The builders registered here, by name.
    pub(crate) fn builder_ids(&self) -> std::collections::BTreeMap<String, BuilderId> {
        self.builders
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|b| (b.config.name.clone(), b.id))
            .collect()
    }

    /// Becomes `true` when the engine stops.
    pub(crate) fn stopping_signal(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Wakes the claim loop (new work may be there).
    pub(crate) fn wake_claims(&self) {
        self.may_claim.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Wakes the claim loop because room was freed (a build finished, a parent began
    /// waiting on its children): it claims only if its last round left work behind for
    /// want of room, or something else woke it meanwhile.
    pub(crate) fn room_freed(&self) {
        self.wake.notify_one();
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Cancels requests (and, in the store, their waited-for children, recursively):
    /// builds of them running here are told to stop at once, the rest complete as
    /// CANCELLED or are stopped by their masters.
    pub(crate) async fn cancel_requests(
        &self,
        ids: &[RequestId],
    ) -> kiln_storage::Result<CancelOutcome> {
        let outcome = self.store.request_cancel(ids, kiln_model::now()).await?;
        self.after_cancel(&outcome);
        Ok(outcome)
    }

    /// Stops local builds and tells subscribers what a cancellation did.
    pub(crate) fn after_cancel(&self, outcome: &CancelOutcome) {
        self.stop_builds(StopReason::Cancelled, |r| outcome.flagged.contains(&r));
        for request_id in &outcome.completed {
            self.emit(Event::RequestCompleted {
                request_id: *request_id,
                results: ResultCode::Cancelled,
            });
        }
        builds::emit_completed(self, outcome.buildsets_completed.clone());
    }
}

/// The scheduler of one engine.
pub(crate) struct Scheduler {
    pub(crate) shared: Arc<SchedulerState>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the claim loop and the heartbeat service for a registered master.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        master: MasterId,
        config: EngineConfig,
    ) -> Scheduler {
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let (finished, finished_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(SchedulerState {
            store,
            master,
            config,
            builders: RwLock::new(HashMap::new()),
            policies: RwLock::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            in_flight: watch::channel(0).0,
            waiting: std::sync::atomic::AtomicUsize::new(0),
            finished,
            wake: Notify::new(),
            may_claim: AtomicBool::new(true),
            events,
            stopping: watch::channel(false).0,
            outputs: output::Outputs::default(),
            staging: artifacts::Staging::default(),
            metrics: crate::metrics::EngineMetrics::default(),
            announcing: tokio::sync::RwLock::new(()),
        });
        let mut tasks = vec![
            tokio::spawn(claim_loop(shared.clone())),
            tokio::spawn(masters::heartbeat_loop(shared.clone())),
            tokio::spawn(builds::finisher_loop(shared.clone(), finished_rx)),
            tokio::spawn(output::flush_loop(shared.clone())),
            // Cheap when nothing is configured: a round with no policy does nothing.
            tokio::spawn(retention::retention_loop(shared.clone())),
        ];
        if let Some(signals) = shared.store.signals() {
            tasks.push(tokio::spawn(signal_loop(shared.clone(), signals)));
        }
        Scheduler {
            shared,
            tasks: Mutex::new(tasks),
        }
    }

    /// Adds a builder; the claim loop picks its requests up at once.
    pub(crate) fn register(
        &self,
        id: BuilderId,
        config: BuilderConfig,
        executor: Arc<dyn Executor>,
    ) -> bool {
        let mut builders = self
            .shared
            .builders
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if builders.values().any(|b| b.config.name == config.name) {
            return false;
        }
        builders.insert(
            id,
            Arc::new(RegisteredBuilder {
                id,
                config,
                executor,
                busy_slots: Mutex::new(BTreeSet::new()),
            }),
        );
        drop(builders);
        self.wake();
        true
    }

    /// The configs of the builders registered here.
    pub(crate) fn builder_configs(&self) -> Vec<BuilderConfig> {
        let builders = self
            .shared
            .builders
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        builders.values().map(|b| b.config.clone()).collect()
    }

    /// Runs a service task until the engine stops.
    pub(crate) fn spawn_service(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = tokio::spawn(task);
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    /// Sets the policy of a relationship.
    pub(crate) fn set_policy(&self, relationship: String, policy: Arc<dyn Policy>) {
        self.shared
            .policies
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(relationship, policy);
    }

    /// Wakes the claim loop (new work may be there).
    pub(crate) fn wake(&self) {
        self.shared.wake_claims();
    }

    /// Stops claiming, lets running builds finish within the grace period, stops the rest
    /// (their requests go back to the queue) and marks the master inactive.
    pub(crate) async fn shutdown(&self) {
        self.shared.stopping.send_replace(true);
        self.wake();
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        let mut in_flight = self.shared.in_flight.subscribe();
        let grace = self.shared.config.shutdown_grace;
        if tokio::time::timeout(grace, in_flight.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            let n = self.shared.stop_builds(StopReason::Shutdown, |_| true);
            warn!(
                builds = n,
                "shutdown grace period over; stopping running builds, their requests will run again"
            );
            let limit = self.shared.config.cancel_grace + Duration::from_secs(1);
            if tokio::time::timeout(limit, in_flight.wait_for(|n| *n == 0))
                .await
                .is_err()
            {
                warn!("some builds did not stop; the database releases their claims");
            }
        }
        for task in tasks {
            task.abort();
        }
        self.shared.staging.clear();
        match self
            .shared
            .store
            .master_deactivate(self.shared.master)
            .await
        {
            Ok(released) if !released.is_empty() => {
                debug!(?released, "released claims at shutdown")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not mark the master inactive at shutdown"),
        }
    }
}

impl Drop for Scheduler {
    /// An engine dropped without [`shutdown`](crate::Engine::shutdown) stops claiming at
    /// once; builds it was running are taken back by master expiry.
    fn drop(&mut self) {
        self.shared.stopping.send_replace(true);
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}

/// Claims and starts work whenever woken, until the engine stops.
async fn claim_loop(shared: Arc<SchedulerState>) {
    let mut stopping = shared.stopping.subscribe();
    // The poll keeps its own beat: wake-ups (a build finishing every few milliseconds)
    // must not keep pushing it back, or requests coming due and cancels made through
    // another process would wait for a quiet moment.
    let mut next_poll = tokio::time::Instant::now() + shared.config.poll_interval;
    loop {
        if shared.is_stopping() {
            return;
        }
        let polled = tokio::select! {
            _ = shared.wake.notified() => false,
            _ = tokio::time::sleep_until(next_poll) => true,
            _ = stopping.wait_for(|s| *s) => return,
        };
        if polled {
            next_poll = tokio::time::Instant::now() + shared.config.poll_interval;
            check_remote_cancels(&shared).await;
        }
        // Only freed room woke it, and the last round left nothing behind for want of
        // room: a round now would find nothing (see `may_claim`).
        if !shared.may_claim.swap(false, Ordering::SeqCst) && !polled {
            continue;
        }
        // Claim until a round leaves nothing it could have taken, so a burst of submits
        // drains without waiting for more wake-ups.
        loop {
            if shared.is_stopping() {
                return;
            }
            // Whatever wakes it from here on is seen by this round or sets it again.
            shared.may_claim.store(false, Ordering::SeqCst);
            match claim_round(&shared).await {
                Ok(false) => break,
                Ok(true) => continue,
                Err(e) => {
                    warn!(error = %e, "claiming build requests failed; retrying at the next poll");
                    shared.may_claim.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
    }
}

/// One claim-and-start transaction; spawns a task per started build. Returns whether
/// another round may find more: some builder was given every slot it offered (its queue
/// may hold more), or requests were cancelled or collapsed instead of started. A round
/// that gave every builder less than it offered has emptied their queues, and the next
/// one would be a transaction that finds nothing: under a steady trickle of single
/// submits that was one wasted transaction per build.
async fn claim_round(shared: &Arc<SchedulerState>) -> kiln_storage::Result<bool> {
    let builders: Vec<Arc<RegisteredBuilder>> = shared
        .builders
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    // Room under the engine-wide cap. Every builder with a free slot is offered to the
    // store, which gives the room to builders with queued work in Buildbot's order:
    // offering it in registration (or hash) order starved every builder after the first
    // few whenever they together had more free slots than the engine has room.
    let busy = shared
        .in_flight
        .borrow()
        .saturating_sub(shared.waiting.load(std::sync::atomic::Ordering::Relaxed));
    let room = (shared.config.max_running_builds as usize).saturating_sub(busy);
    if room == 0 {
        // The next build to finish makes room for what is queued.
        shared.may_claim.store(true, Ordering::SeqCst);
        return Ok(false);
    }
    let batch = shared
        .config
        .claim_batch
        .min(u32::try_from(room).unwrap_or(u32::MAX));
    let free_slots: Vec<(BuilderId, Vec<i64>)> = builders
        .iter()
        .map(|b| (b.id, b.free_slots(batch)))
        .filter(|(_, slots)| !slots.is_empty())
        .collect();
    // Work may be left behind for want of room: builders with every slot busy (not
    // offered), and builders with locks (a build ending elsewhere frees them).
    if free_slots.len() < builders.len() || builders.iter().any(|b| !b.config.locks.is_empty()) {
        shared.may_claim.store(true, Ordering::SeqCst);
    }
    if free_slots.is_empty() {
        return Ok(false);
    }
    let offered: HashMap<BuilderId, usize> = free_slots
        .iter()
        .map(|(id, slots)| (*id, slots.len()))
        .collect();
    // Collapsing happens when a builder claims: only builders with room collapse.
    let collapse: Vec<(BuilderId, bool)> = builders
        .iter()
        .filter(|b| free_slots.iter().any(|(id, _)| *id == b.id))
        .filter_map(|b| b.config.collapse.map(|c| (b.id, c.properties)))
        .collect();
    let lock_builders: Vec<BuilderId> = builders
        .iter()
        .filter(|b| !b.config.locks.is_empty() && free_slots.iter().any(|(id, _)| *id == b.id))
        .map(|b| b.id)
        .collect();
    let outcome = shared
        .store
        .build_start_available(&StartAvailable {
            master_id: shared.master,
            free_slots,
            limit: room,
            state_string: "starting".into(),
            now: kiln_model::now(),
            collapse,
            lock_builders,
        })
        .await?;
    let announces = !outcome.started.is_empty()
        || !outcome.collapsed.is_empty()
        || !outcome.cancelled.is_empty()
        || !outcome.buildsets_completed.is_empty();
    if announces {
        // Submits whose rows this claim may have seen announce them first.
        drop(shared.announcing.write().await);
    }
    for (request_id, _) in &outcome.collapsed {
        shared.emit(Event::RequestCompleted {
            request_id: *request_id,
            results: ResultCode::Skipped,
        });
    }
    for request_id in &outcome.cancelled {
        shared.emit(Event::RequestCompleted {
            request_id: *request_id,
            results: ResultCode::Cancelled,
        });
    }
    builds::emit_completed(shared, outcome.buildsets_completed);
    let mut given: HashMap<BuilderId, usize> = HashMap::new();
    for started in &outcome.started {
        *given.entry(started.build.builder_id).or_default() += 1;
    }
    let more = !outcome.cancelled.is_empty()
        || !outcome.collapsed.is_empty()
        || given
            .iter()
            .any(|(id, n)| offered.get(id).is_some_and(|o| n >= o));
    if more || outcome.started.len() >= room {
        // What the room did not take waits for the next build to finish.
        shared.may_claim.store(true, Ordering::SeqCst);
    }
    if outcome.started.is_empty() {
        return Ok(more);
    }
    shared
        .in_flight
        .send_modify(|n| *n += outcome.started.len());
    for started in outcome.started {
        let slot = started.build.worker_slot.unwrap_or_default();
        let Some(builder) = shared.builder(started.build.builder_id) else {
            // Cannot happen: builds are only started for registered builders.
            continue;
        };
        builder.occupy_slot(slot);
        shared.metrics.build_started(
            &builder.config.name,
            (started.build.started_at - started.request.submitted_at).as_seconds_f64(),
        );
        // Registered before the task runs, so that a cancel right after BuildStarted
        // always finds the build.
        let (stop_tx, stop_rx) = watch::channel(None);
        shared.running().insert(
            started.build.id,
            RunningBuild {
                request_id: started.request.id,
                stop: stop_tx,
            },
        );
        // Emitted here, as soon as the build exists, not when its task first runs.
        shared.emit(Event::BuildStarted {
            build_id: started.build.id,
            number: started.build.number,
            builder: builder.config.name.clone(),
            request_id: started.request.id,
            buildset_id: started.request.buildset_id,
        });
        tokio::spawn(builds::run_build(
            shared.clone(),
            builder,
            started,
            slot,
            stop_rx,
        ));
    }
    Ok(more)
}

/// Turns other processes' wake-ups into this engine's: new work wakes the claim loop,
/// cancellations are looked at at once, and buildsets completed elsewhere become
/// [`Event::BuildsetComplete`] here, which wakes parents waiting on children and
/// clients waiting on buildsets. The poll stays as the fallback.
async fn signal_loop(shared: Arc<SchedulerState>, mut signals: broadcast::Receiver<StoreSignal>) {
    let mut stopping = shared.stopping.subscribe();
    loop {
        let signal = tokio::select! {
            signal = signals.recv() => signal,
            _ = stopping.wait_for(|s| *s) => return,
        };
        match signal {
            Ok(StoreSignal::Work) => shared.wake_claims(),
            Ok(StoreSignal::Cancel) => check_remote_cancels(&shared).await,
            Ok(StoreSignal::Complete(done)) => {
                for (buildset_id, results) in done {
                    shared.emit(Event::BuildsetComplete {
                        buildset_id,
                        results,
                    });
                }
            }
            Ok(StoreSignal::Lost) | Err(broadcast::error::RecvError::Lagged(_)) => {
                shared.wake_claims();
                check_remote_cancels(&shared).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Stops local builds whose requests somebody cancelled through another process.
async fn check_remote_cancels(shared: &SchedulerState) {
    if shared.running().is_empty() {
        return;
    }
    match shared.store.request_cancel_pending(shared.master).await {
        Ok(ids) if !ids.is_empty() => {
            let n = shared.stop_builds(StopReason::Cancelled, |r| ids.contains(&r));
            debug!(builds = n, "stopping builds cancelled from elsewhere");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read pending cancellations"),
    }
}
