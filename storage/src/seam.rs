//! The storage seam, in one part per entity.
//!
//! Each entity has a part whose SQL is the same on every backend, written once over a
//! [`Dialect`](crate::sql::Dialect) in `common/` ([`Masters`], [`Builders`],
//! [`Buildsets`], [`Requests`], [`Builds`], [`Output`], [`Outbox`]), and, where locking,
//! batching or notifications differ, a part each backend writes in a file of its own
//! ([`MasterWrites`], [`BuildsetWrites`], [`RequestWrites`], [`BuildWrites`],
//! [`OutboxWrites`]). [`Store`] is all of them; a caller brings the parts it calls into
//! scope with `use kiln_storage::seam::*`.
//!
//! Methods are named entity-first and take a parameter struct where a few arguments
//! would not do. While at least one reporter is registered, every change that a
//! lifecycle report describes (buildset submitted, build started, build finished,
//! buildset complete) writes its report into the outbox in the same transaction.

use async_trait::async_trait;
use kiln_model::{
    Artifact, Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId,
    ChildBuildset, Lock, LogEntry, LogLevel, LogQuery, LogRecord, Master, MasterId, ProgressRecord,
    ProgressReport, Properties, Property, Report, ReporterState, RequestId, ResultCode, Schedule,
    SourceStamp, SourceStampId, Timestamp,
};

use crate::filters::{BuildFilter, BuildsetFilter, RequestFilter};
use crate::query::{
    BuildField, BuilderField, BuildsetField, MasterField, Page, Query, RequestField,
};
use crate::{
    AddedBuildset, CancelOutcome, CompletedBuildset, ExpireMasters, ExpiredMaster, FinishOutcome,
    FinishedBuild, NewBuild, NewBuildset, RegisteredMaster, ReporterProgress, Result,
    RetentionSweep, StartAvailable, StartOutcome, StorageError, StoreSignal, Swept,
};

/// The whole seam: every part, plus what a backend says of itself. One implementation
/// per database; every backend passes the conformance suite (`storage/tests/`).
pub trait Store:
    Masters
    + MasterWrites
    + Builders
    + BuilderWrites
    + Buildsets
    + BuildsetWrites
    + Requests
    + RequestWrites
    + Builds
    + BuildWrites
    + Output
    + Outbox
    + OutboxWrites
    + Schedules
    + RetentionWrites
    + Locks
{
    /// The backend's name ("sqlite", "postgres").
    fn backend(&self) -> &'static str;

    /// Whether the store itself shares one commit among the writes of concurrent
    /// callers (SQLite's writer thread does), so that grouping them above it again
    /// only adds a hand-off per write.
    fn groups_writes(&self) -> bool {
        false
    }

    /// What the store's own group commit did since the store was opened, for a backend
    /// that has one (SQLite's writer thread); `None` for the others, whose server keeps
    /// its own figures (PostgreSQL's `pg_stat_database`).
    fn commit_stats(&self) -> Option<CommitStats> {
        None
    }

    /// Wake-ups from other processes sharing the database, for backends that can push
    /// them (PostgreSQL's LISTEN/NOTIFY). `None` means polling is the only way to learn
    /// of other processes' work. A store never signals what it did itself.
    fn signals(&self) -> Option<tokio::sync::broadcast::Receiver<StoreSignal>> {
        None
    }
}

/// Masters: reads and the heartbeat.
#[async_trait]
pub trait Masters: Send + Sync + 'static {
    /// Records a heartbeat. Fails with [`StorageError::MasterInactive`] when the master
    /// was expired or shut down meanwhile.
    async fn master_heartbeat(&self, id: MasterId, now: Timestamp) -> Result<()>;
    /// One master.
    async fn master_get(&self, id: MasterId) -> Result<Master>;
    /// Masters matching a query.
    async fn master_query(&self, q: &Query<MasterField>) -> Result<Page<Master>>;

    /// Every master, by id.
    async fn master_list(&self) -> Result<Vec<Master>> {
        Ok(self.master_query(&Query::new()).await?.items)
    }
}

/// Masters: registration, shutdown and expiry, which take back a master's work.
#[async_trait]
pub trait MasterWrites: Send + Sync + 'static {
    /// Registers a master by name (or re-activates it). An earlier incarnation with the
    /// same name is presumed dead: its claims are released and its unfinished builds
    /// end as RETRY.
    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster>;
    /// Marks a master inactive (clean shutdown) and releases any claims it still holds
    /// on incomplete requests, and its reporter leases.
    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>>;
    /// Expires active masters silent since before `silent_since`: marks them inactive,
    /// releases their claims and reporter leases and finishes their unfinished builds as
    /// RETRY.
    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>>;
}

/// Builders.
#[async_trait]
pub trait Builders: Send + Sync + 'static {
    /// Returns the builder's id, creating it (or updating its description) as needed.
    async fn builder_ensure(&self, name: &str, description: Option<&str>) -> Result<BuilderId>;
    /// The builder with this name, if any.
    async fn builder_get_by_name(&self, name: &str) -> Result<Option<Builder>>;
    /// One builder.
    async fn builder_get(&self, id: BuilderId) -> Result<Builder>;
    /// Builders matching a query.
    async fn builder_query(&self, q: &Query<BuilderField>) -> Result<Page<Builder>>;

    /// Every builder, by name.
    async fn builder_list(&self) -> Result<Vec<Builder>> {
        let q = Query::new().order_by(BuilderField::Name, false);
        Ok(self.builder_query(&q).await?.items)
    }
    /// Records that `master` runs `builder`: it counts as served while the master is
    /// active (until the master registers again, shuts down or is expired).
    async fn builder_serve(&self, master: MasterId, builder: BuilderId) -> Result<()>;
    /// Records the builders a builder depends on, by name (replacing the old list).
    async fn builder_set_depends_on(&self, id: BuilderId, depends_on: &[String]) -> Result<()>;
}

/// Schedules: each one's last fire, kept so that a restart neither skips nor repeats one.
#[async_trait]
pub trait Schedules: Send + Sync + 'static {
    /// Registers a schedule, or updates its definition and next fire time. A new one
    /// starts as if it had fired at `now`: ticks before its registration are not caught
    /// up.
    async fn schedule_register(
        &self,
        name: &str,
        definition: &str,
        next_fire: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Schedule>;
    /// Records that `tick` was dealt with (fired as `buildset`, or passed over with
    /// `None`) and when the schedule fires next. Only moves forward: `false` when a
    /// later or equal tick was recorded already (another master got there first).
    async fn schedule_fired(
        &self,
        name: &str,
        tick: Timestamp,
        buildset: Option<BuildsetId>,
        next_fire: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<bool>;
    /// One schedule.
    async fn schedule_get(&self, name: &str) -> Result<Schedule>;
    /// Every schedule, by name.
    async fn schedule_list(&self) -> Result<Vec<Schedule>>;
}

/// Locks (Buildbot's master locks): a lock has a capacity in units, a builder takes
/// some units of the locks it lists, and a claim starts a build of it only when all of
/// them are free (see [`StartAvailable::lock_builders`]); finishing the build, or
/// expiring its master, releases them.
#[async_trait]
pub trait Locks: Send + Sync + 'static {
    /// Defines a lock, or changes its capacity (the latest definition wins; builds
    /// holding more than a lowered capacity keep their units until they finish).
    async fn lock_define(&self, name: &str, capacity: u32) -> Result<()>;
    /// Records the locks a builder takes, with the units each build takes (replacing
    /// the old list). Every lock must be defined, and no build may take more units
    /// than its lock has.
    async fn builder_set_locks(&self, id: BuilderId, locks: &[(String, u32)]) -> Result<()>;
    /// Every lock, by name, with its users, holders and waiting requests.
    async fn lock_list(&self) -> Result<Vec<Lock>>;
}

/// Retention: deleting finished work, one entity on demand or a builder's old work in
/// bounded batches.
#[async_trait]
pub trait RetentionWrites: Send + Sync + 'static {
    /// Deletes a complete buildset with its requests, builds, logs, progress,
    /// properties, artifacts rows and sourcestamp links; returns the deleted builds
    /// (whose result directories the caller removes). Buildsets its builds triggered
    /// stay, without a parent. An incomplete one is [`StorageError::Invalid`].
    async fn buildset_delete(&self, id: BuildsetId) -> Result<Vec<Build>>;
    /// One batch of a builder's retention: finished builds that completed before
    /// `cutoff` and are not among its `keep_last` newest builds (at most `batch`), then
    /// complete requests of the builder with no build left under the same rule, then
    /// the complete buildsets those requests leave empty. On PostgreSQL one master
    /// sweeps at a time: another that tries meanwhile sweeps nothing (`busy`).
    async fn retention_sweep(&self, params: &RetentionSweep) -> Result<Swept>;
}

/// Builders: pausing and resuming, which every master sharing the database must hear of.
#[async_trait]
pub trait BuilderWrites: Send + Sync + 'static {
    /// Pauses or resumes a builder. No master claims a paused builder's requests (they
    /// stay queued; builds already running finish); resuming wakes every master.
    /// Pausing a paused builder changes nothing. A missing builder is `NotFound`.
    async fn builder_set_paused(&self, id: BuilderId, paused: bool) -> Result<()>;
}

/// Buildsets: reads, and hanging children from a new parent build.
#[async_trait]
pub trait Buildsets: Send + Sync + 'static {
    /// One buildset.
    async fn buildset_get(&self, id: BuildsetId) -> Result<Buildset>;
    /// Buildsets matching a query.
    async fn buildset_query(&self, q: &Query<BuildsetField>) -> Result<Page<Buildset>>;

    /// Buildsets matching a filter, newest first.
    async fn buildset_list(&self, filter: &BuildsetFilter) -> Result<Vec<Buildset>> {
        Ok(self.buildset_query(&filter.query()).await?.items)
    }
    /// A buildset's properties.
    async fn buildset_properties(&self, id: BuildsetId) -> Result<Properties>;
    /// The newest buildset submitted with the property `name`, with its value.
    async fn buildset_property_latest(&self, name: &str) -> Result<Option<(BuildsetId, Property)>>;
    /// A buildset's sourcestamps, sorted.
    async fn buildset_sourcestamps(&self, id: BuildsetId) -> Result<Vec<SourceStamp>>;
    /// A page of the stored sourcestamps by id (equal stamps are stored once), and how
    /// many there are.
    async fn sourcestamp_page(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<(SourceStampId, SourceStamp)>, u64)>;
    /// One stored sourcestamp.
    async fn sourcestamp_get(&self, id: SourceStampId) -> Result<SourceStamp>;
    /// The ids of a buildset's stored sourcestamps, ascending (equal stamps share an id).
    async fn buildset_sourcestamp_ids(&self, id: BuildsetId) -> Result<Vec<SourceStampId>>;
    /// The child buildsets a parent request's builds started, one entry per child
    /// request, oldest first, each with its latest build and return value.
    async fn buildset_children(&self, parent_request: RequestId) -> Result<Vec<ChildBuildset>>;
    /// Hangs child buildsets from a new build of their parent request (a re-run adopts
    /// the children its earlier build started).
    async fn buildset_adopt(&self, ids: &[BuildsetId], parent_build: BuildId) -> Result<()>;
}

/// Buildsets: submitting them.
#[async_trait]
pub trait BuildsetWrites: Send + Sync + 'static {
    /// Adds several buildsets, each with one request per builder, in one transaction:
    /// all of them or, if any is refused, none. The result is in the order given.
    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>>;

    /// Adds a buildset and one request per builder, atomically.
    async fn buildset_add(&self, params: &NewBuildset) -> Result<AddedBuildset> {
        let mut added = self.buildset_add_many(std::slice::from_ref(params)).await?;
        added
            .pop()
            .ok_or_else(|| StorageError::Invalid("adding one buildset returned none".into()))
    }
}

/// Build requests: reads, priorities, and the cancels a master should look at.
#[async_trait]
pub trait Requests: Send + Sync + 'static {
    /// One request.
    async fn request_get(&self, id: RequestId) -> Result<BuildRequest>;
    /// Requests matching a query.
    async fn request_query(&self, q: &Query<RequestField>) -> Result<Page<BuildRequest>>;

    /// Requests matching a filter.
    async fn request_list(&self, filter: &RequestFilter) -> Result<Vec<BuildRequest>> {
        Ok(self.request_query(&filter.query()).await?.items)
    }
    /// Changes the priority of an incomplete request (it decides the order among
    /// requests not claimed yet). A complete request or a priority out of range is
    /// [`StorageError::Invalid`]; a missing one is `NotFound`.
    async fn request_set_priority(&self, id: RequestId, priority: i32) -> Result<()> {
        let mut answers = self.request_set_priority_each(&[(id, priority)]).await?;
        answers.pop().unwrap_or_else(|| {
            Err(StorageError::Invalid(
                "changing one priority returned no answer".into(),
            ))
        })
    }
    /// Changes several priorities in one transaction (group commit), each with its own
    /// answer as [`request_set_priority`](Self::request_set_priority) gives it. The outer
    /// error is the transaction's: then nothing changed.
    async fn request_set_priority_each(
        &self,
        changes: &[(RequestId, i32)],
    ) -> Result<Vec<Result<()>>>;
    /// How many requests wait in each builder's queue (incomplete and claimed by
    /// nobody), for builders with any; by builder id. Paused builders' queues count.
    async fn request_queue_depths(&self) -> Result<Vec<(BuilderId, u64)>>;
    /// Requests claimed by this master that somebody asked to cancel.
    async fn request_cancel_pending(&self, master: MasterId) -> Result<Vec<RequestId>>;
}

/// Build requests: claims, completion and cancellation (Buildbot's data layer rules).
#[async_trait]
pub trait RequestWrites: Send + Sync + 'static {
    /// Claims all of `ids` for a master, or none: if any is claimed (by anyone) or
    /// complete, fails with [`StorageError::AlreadyClaimed`] and changes nothing.
    async fn request_claim(
        &self,
        ids: &[RequestId],
        master: MasterId,
        now: Timestamp,
    ) -> Result<()>;
    /// Releases the master's own claims on incomplete requests among `ids`; other
    /// masters' claims and unknown ids are ignored.
    async fn request_unclaim(&self, ids: &[RequestId], master: MasterId) -> Result<()>;
    /// Completes all of `ids` with a result, or none: if any is missing or complete,
    /// fails with [`StorageError::NotClaimed`]. RETRY is refused as a completion result.
    /// Buildsets whose last request this completes complete with the worst result.
    async fn request_complete(
        &self,
        ids: &[RequestId],
        results: ResultCode,
        now: Timestamp,
    ) -> Result<Vec<CompletedBuildset>>;
    /// Cancels requests: unclaimed ones complete as CANCELLED, claimed ones are flagged
    /// for their master to stop. Complete and unknown ids are ignored. The requests of
    /// waited-for child buildsets these requests' builds started are cancelled too,
    /// recursively.
    async fn request_cancel(&self, ids: &[RequestId], now: Timestamp) -> Result<CancelOutcome> {
        let mut outcomes = self.request_cancel_each(&[ids.to_vec()], now).await?;
        outcomes
            .pop()
            .ok_or_else(|| StorageError::Invalid("cancelling returned no outcome".into()))
    }
    /// Several cancels in one transaction (group commit), applied in order, each with the
    /// outcome [`request_cancel`](Self::request_cancel) would give it at its turn.
    async fn request_cancel_each(
        &self,
        groups: &[Vec<RequestId>],
        now: Timestamp,
    ) -> Result<Vec<CancelOutcome>>;
}

/// Builds: reads, what a running build writes of itself, and deletion.
#[async_trait]
pub trait Builds: Send + Sync + 'static {
    /// One build.
    async fn build_get(&self, id: BuildId) -> Result<Build>;
    /// A builder's build by number.
    async fn build_get_by_number(&self, builder: BuilderId, number: i64) -> Result<Build>;
    /// Builds matching a query.
    async fn build_query(&self, q: &Query<BuildField>) -> Result<Page<Build>>;

    /// Builds matching a filter.
    async fn build_list(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        Ok(self.build_query(&filter.query()).await?.items)
    }
    /// Sets a running build's state string.
    async fn build_set_state(&self, id: BuildId, state: &str) -> Result<()>;
    /// Adds to a build's time spent waiting for locks.
    async fn build_add_locks_duration(&self, id: BuildId, seconds: f64) -> Result<()>;
    /// The latest earlier build of the same builder with exactly SUCCESS and the same set
    /// of sourcestamps.
    async fn build_previous_successful(&self, id: BuildId) -> Result<Option<Build>>;
    /// The most recently finished SUCCESS or WARNINGS build of a builder (never SKIPPED).
    async fn build_latest_successful(&self, builder: BuilderId) -> Result<Option<Build>>;
    /// The most recently finished build of a builder whose result is one of `results`.
    async fn build_latest_with(
        &self,
        builder: BuilderId,
        results: &[ResultCode],
    ) -> Result<Option<Build>>;
    /// Deletes a finished build with its properties, logs and progress.
    async fn build_delete(&self, id: BuildId) -> Result<()>;
    /// Sets one build property.
    async fn build_set_property(&self, id: BuildId, name: &str, property: &Property) -> Result<()>;
    /// A build's properties.
    async fn build_properties(&self, id: BuildId) -> Result<Properties>;
    /// The files a build left in its result directory, by path.
    async fn build_artifacts(&self, id: BuildId) -> Result<Vec<Artifact>>;
}

/// Builds: starting and finishing them, on the scheduler's hot path and one at a time.
#[async_trait]
pub trait BuildWrites: Send + Sync + 'static {
    /// Claims, in one transaction, the most urgent unclaimed requests for builders with
    /// free slots, in Buildbot's order (see [`StartAvailable`]), and starts a build for
    /// each, numbered on from the builder's highest number. Requests flagged for cancel
    /// complete as CANCELLED instead.
    async fn build_start_available(&self, params: &StartAvailable) -> Result<StartOutcome>;
    /// Finishes several builds of one master in one transaction and completes their
    /// requests (with the build's result) or releases them (for RETRY); buildsets whose
    /// last request completes complete. A build not running on that master is refused
    /// (listed in [`FinishOutcome::refused`]) without failing the others.
    async fn build_finish_batch(
        &self,
        master: MasterId,
        builds: &[FinishedBuild],
    ) -> Result<FinishOutcome>;
    /// Starts a build of a request the master has claimed, numbered one above the
    /// builder's highest number (safe under concurrent starts).
    async fn build_add(&self, params: &NewBuild) -> Result<Build>;
    /// Finishes one running build (its request is left alone); refused with
    /// [`StorageError::NotOwner`] if it is already finished or runs on another master.
    async fn build_finish(&self, master: MasterId, build: &FinishedBuild) -> Result<()>;
}

/// What builds report while they run: progress and logs.
#[async_trait]
pub trait Output: Send + Sync + 'static {
    /// Stores a progress report; the latest per group wins.
    async fn progress_report(
        &self,
        build: BuildId,
        report: &ProgressReport,
        now: Timestamp,
    ) -> Result<()>;
    /// A build's latest report per group, in the order groups first reported.
    async fn progress_list(&self, build: BuildId) -> Result<Vec<ProgressRecord>>;
    /// Appends log records to a build.
    async fn log_append(&self, build: BuildId, records: &[LogRecord]) -> Result<()>;
    /// Reads log records, oldest first.
    async fn log_list(&self, query: &LogQuery) -> Result<Vec<LogEntry>>;
    /// Deletes records written before `older_than` whose level is below `below`;
    /// returns how many went.
    async fn log_prune(&self, older_than: Timestamp, below: LogLevel) -> Result<u64>;
}

/// The reporters' outbox: reporters, their leases and cursors, and the reports.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// One reporter's state.
    async fn reporter_get(&self, name: &str) -> Result<ReporterState>;
    /// Every reporter, by name.
    async fn reporter_list(&self) -> Result<Vec<ReporterState>>;
    /// Forgets a reporter: its undelivered reports no longer keep the outbox from pruning.
    async fn reporter_remove(&self, name: &str) -> Result<()>;
    /// Takes or extends the lease to deliver a reporter's reports: granted when nobody
    /// holds it, the master already does, or the holder's lease ran out before `now`.
    /// Returns the state under the lease, or `None` when another master holds it.
    async fn reporter_lease(
        &self,
        name: &str,
        master: MasterId,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<ReporterState>>;
    /// Reports after `after`, oldest first, at most `limit`.
    async fn outbox_read(&self, after: i64, limit: u32) -> Result<Vec<Report>>;
    /// Deletes reports every registered reporter has dealt with; returns how many went.
    async fn outbox_prune(&self) -> Result<u64>;
}

/// The reporters' outbox: registration, which must not be overtaken by a report
/// committing late, and delivery progress, written under the lease.
#[async_trait]
pub trait OutboxWrites: Send + Sync + 'static {
    /// Registers a reporter; a new one starts at the end of the outbox (it hears reports
    /// from now on), a known one keeps its place.
    async fn reporter_register(&self, name: &str) -> Result<ReporterState>;
    /// Records delivery progress under the lease.
    async fn reporter_progress(&self, progress: &ReporterProgress) -> Result<()>;
}

/// Counts of a store's group commit since it was opened: `callers / commits` is how many
/// callers' writes one commit carried on average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Write transactions committed.
    pub commits: u64,
    /// Callers' pieces of work those transactions carried (each committed; work that
    /// failed and was rolled back to its savepoint is not counted).
    pub callers: u64,
    /// Writes of the write-ahead log that reached the kernel: one per commit of up to
    /// 64 KiB (SQLite alone makes two per page).
    pub log_writes: u64,
}
