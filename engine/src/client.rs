//! Reads and control actions on a Kiln database, without running any builds.
//!
//! The command-line tools use a [`Client`]; an [`Engine`](crate::Engine) wraps one and
//! adds the scheduler.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_MAX_GROUP_COMMIT;
use crate::error::{EngineError, Result};
use crate::group_commit::GroupCommit;
use kiln_model::{
    Artifact, Build, BuildId, BuildRequest, Builder, BuilderId, BuilderStatus, Buildset,
    BuildsetId, ChildBuildset, LogEntry, LogQuery, MAX_PRIORITY, MIN_PRIORITY, Master, MasterId,
    ProgressNode, ProgressRecord, Properties, Property, Report, ReporterState, RequestId,
    ResultCode, Schedule, SourceStamp,
};
use kiln_storage::{
    self as storage, BuildField, BuildFilter, BuilderField, BuildsetField, BuildsetFilter,
    CancelOutcome, MasterField, NewBuildset, Page, Query, RequestField, RequestFilter, Store,
    StoreOptions,
};

/// A submission: one buildset with a request per named builder.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// Why the work is submitted.
    pub reason: String,
    /// Builder names; one request each. None makes a buildset that completes at once.
    pub builders: Vec<String>,
    /// Buildset properties.
    #[serde(default)]
    pub properties: Properties,
    /// What to build.
    #[serde(default)]
    pub sourcestamps: Vec<SourceStamp>,
    /// Higher runs first; within [`MIN_PRIORITY`]..=[`MAX_PRIORITY`].
    #[serde(default)]
    pub priority: i32,
    /// An identifier of the submitter's choosing.
    #[serde(default)]
    pub external_idstring: Option<String>,
    /// Makes the submission idempotent: while a buildset with this key exists, submitting
    /// again with the key returns that buildset ([`Submitted::existing`]) and adds
    /// nothing, however many submits race on however many masters. At most
    /// [`SubmitLimits::name_bytes`] bytes.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// A delayed run: the requests are not claimable before this time (a time in the
    /// past means at once). At most [`SubmitLimits::delay`] ahead.
    #[serde(default)]
    pub not_before: Option<kiln_model::Timestamp>,
}

impl Submission {
    /// A submission with a reason and no builders yet.
    pub fn new(reason: impl Into<String>) -> Self {
        Submission {
            reason: reason.into(),
            ..Submission::default()
        }
    }

    /// Adds a builder.
    pub fn builder(mut self, name: impl Into<String>) -> Self {
        self.builders.push(name.into());
        self
    }

    /// Sets a property.
    pub fn property(
        mut self,
        name: impl Into<String>,
        value: serde_json::Value,
        source: impl Into<String>,
    ) -> Self {
        self.properties
            .insert(name.into(), Property::new(value, source));
        self
    }

    /// Adds a sourcestamp.
    pub fn sourcestamp(mut self, stamp: SourceStamp) -> Self {
        self.sourcestamps.push(stamp);
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the external id.
    pub fn external_idstring(mut self, id: impl Into<String>) -> Self {
        self.external_idstring = Some(id.into());
        self
    }

    /// Delays the run until `at` (see [`Submission::not_before`]).
    pub fn not_before(mut self, at: kiln_model::Timestamp) -> Self {
        self.not_before = Some(at);
        self
    }

    /// Delays the run by `delay` from now.
    pub fn delay(self, delay: std::time::Duration) -> Self {
        let at = kiln_model::now()
            + chrono::TimeDelta::from_std(delay).unwrap_or(chrono::TimeDelta::MAX);
        self.not_before(at)
    }

    /// Sets the idempotency key (see [`Submission::idempotency_key`]).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// Bytes of a name a client gives: a builder, a property, a property's source.
pub const DEFAULT_MAX_NAME_BYTES: usize = 256;
/// Bytes of a free text a client gives: a reason, an external id, a sourcestamp field.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 64 << 10;
/// Bytes of all properties of one submission (names, JSON values and sources).
pub const DEFAULT_MAX_PROPERTIES_BYTES: usize = 1 << 20;
/// Builders one submission may name (one request each).
pub const DEFAULT_MAX_BUILDERS: usize = 1_000;
/// Sourcestamps one submission may carry.
pub const DEFAULT_MAX_SOURCESTAMPS: usize = 100;
/// How far ahead a delayed run may be: a year and a day. A later time is more likely a
/// mistake (milliseconds for seconds) than a plan.
pub const DEFAULT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// What one submission may carry. Every bound has a default above; an engine takes its
/// own from [`EngineConfig::submit_limits`](crate::EngineConfig::submit_limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubmitLimits {
    /// See [`DEFAULT_MAX_NAME_BYTES`].
    pub name_bytes: usize,
    /// See [`DEFAULT_MAX_TEXT_BYTES`].
    pub text_bytes: usize,
    /// See [`DEFAULT_MAX_PROPERTIES_BYTES`].
    pub properties_bytes: usize,
    /// See [`DEFAULT_MAX_BUILDERS`].
    pub builders: usize,
    /// See [`DEFAULT_MAX_SOURCESTAMPS`].
    pub sourcestamps: usize,
    /// See [`DEFAULT_MAX_DELAY`].
    pub delay: std::time::Duration,
}

impl Default for SubmitLimits {
    fn default() -> Self {
        SubmitLimits {
            name_bytes: DEFAULT_MAX_NAME_BYTES,
            text_bytes: DEFAULT_MAX_TEXT_BYTES,
            properties_bytes: DEFAULT_MAX_PROPERTIES_BYTES,
            builders: DEFAULT_MAX_BUILDERS,
            sourcestamps: DEFAULT_MAX_SOURCESTAMPS,
            delay: DEFAULT_MAX_DELAY,
        }
    }
}

/// Checks one text field of a submission: no NUL (no backend stores one faithfully,
/// so it is refused rather than changed) and no more than `max` bytes.
pub fn check_text(field: &str, text: &str, max: usize) -> Result<()> {
    if text.contains('\0') {
        return Err(EngineError::Invalid(format!(
            "{field}: contains a NUL character, which Kiln does not store"
        )));
    }
    if text.len() > max {
        return Err(EngineError::Invalid(format!(
            "{field}: {} bytes, more than the {max} allowed",
            text.len()
        )));
    }
    Ok(())
}

impl Submission {
    /// Checks everything a client controls against `limits`, naming the field at fault.
    pub fn validate(&self, limits: &SubmitLimits) -> Result<()> {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(EngineError::Invalid(format!(
                "priority: {} is outside {MIN_PRIORITY}..={MAX_PRIORITY}",
                self.priority
            )));
        }
        check_text("reason", &self.reason, limits.text_bytes)?;
        if let Some(id) = &self.external_idstring {
            check_text("external_idstring", id, limits.text_bytes)?;
        }
        if let Some(at) = self.not_before {
            let latest = kiln_model::now()
                + chrono::TimeDelta::from_std(limits.delay).unwrap_or(chrono::TimeDelta::MAX);
            if at > latest {
                return Err(EngineError::Invalid(format!(
                    "not_before: {at} is more than {} days ahead",
                    limits.delay.as_secs() / 86_400
                )));
            }
        }
        if let Some(key) = &self.idempotency_key {
            check_text("idempotency_key", key, limits.name_bytes)?;
            if key.trim().is_empty() {
                return Err(EngineError::Invalid(
                    "idempotency_key: empty; leave it out for a submission that is not idempotent"
                        .into(),
                ));
            }
        }
        if self.builders.len() > limits.builders {
            return Err(EngineError::Invalid(format!(
                "builders: {} named, more than the {} allowed",
                self.builders.len(),
                limits.builders
            )));
        }
        for name in &self.builders {
            check_text("builders", name, limits.name_bytes)?;
        }
        if self.sourcestamps.len() > limits.sourcestamps {
            return Err(EngineError::Invalid(format!(
                "sourcestamps: {} given, more than the {} allowed",
                self.sourcestamps.len(),
                limits.sourcestamps
            )));
        }
        for stamp in &self.sourcestamps {
            let fields = [
                ("sourcestamps.codebase", Some(&stamp.codebase)),
                ("sourcestamps.repository", Some(&stamp.repository)),
                ("sourcestamps.branch", stamp.branch.as_ref()),
                ("sourcestamps.revision", stamp.revision.as_ref()),
                ("sourcestamps.project", Some(&stamp.project)),
            ];
            for (field, value) in fields {
                if let Some(value) = value {
                    check_text(field, value, limits.text_bytes)?;
                }
            }
        }
        let mut total = 0usize;
        for (name, property) in &self.properties {
            check_text("properties", name, limits.name_bytes)?;
            check_text(
                &format!("properties.{name}.source"),
                &property.source,
                limits.name_bytes,
            )?;
            total = total
                .saturating_add(name.len())
                .saturating_add(property.value.to_string().len())
                .saturating_add(property.source.len());
        }
        if total > limits.properties_bytes {
            return Err(EngineError::Invalid(format!(
                "properties: {total} bytes, more than the {} allowed",
                limits.properties_bytes
            )));
        }
        Ok(())
    }
}

impl Client {
    /// Submits a buildset that repeats earlier work (a rebuild or a resubmit).
    async fn submit_repeat(&self, submission: Submission, lineage: Lineage) -> Result<Submitted> {
        only(
            self.submit_buildsets(std::slice::from_ref(&submission), lineage, &BTreeMap::new())
                .await?,
        )
    }
}

/// Where a buildset comes from, when it repeats earlier work.
#[derive(Clone, Copy, Debug, Default)]
struct Lineage {
    /// The build it rebuilds.
    rebuilt: Option<BuildId>,
    /// The buildset it resubmits.
    resubmitted: Option<BuildsetId>,
}

/// What a submission made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// The new buildset.
    pub buildset_id: BuildsetId,
    /// Its requests by builder name.
    pub requests: BTreeMap<String, RequestId>,
    /// Whether the buildset existed already: its idempotency key was taken, nothing was
    /// added, and this is the buildset holding the key (with its own builders).
    #[serde(default)]
    pub existing: bool,
    /// The builders of its requests that no active master runs (as seen at most
    /// [`SERVED_TTL`] ago): their work waits until a master that has them starts.
    #[serde(default)]
    pub unserved: Vec<String>,
}

/// The builders an active master runs, and when that was read.
type ServedAt = (std::time::Instant, std::collections::BTreeSet<BuilderId>);

/// How long a client trusts what it read of which builders an active master runs: a
/// submit's `unserved` answer costs no read of its own while that is fresh.
pub const SERVED_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and control actions on a Kiln database.
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
    limits: SubmitLimits,
    /// Concurrent submits, cancels and priority changes share transactions through this.
    submits: GroupCommit,
    /// Builder ids by name, as read so far: a builder's id never changes and builders
    /// are never removed, so a name once seen needs no further read.
    builder_ids: Arc<RwLock<BTreeMap<String, BuilderId>>>,
    /// The builders an active master runs, and when that was read.
    served: Arc<tokio::sync::Mutex<Option<ServedAt>>>,
}

impl Client {
    /// Opens the database at `url` (see [`storage::open`]).
    pub async fn open(url: &str) -> Result<Client> {
        Ok(Client::from_store(storage::open(url).await?))
    }

    /// Opens the database at `url` with options.
    pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Client> {
        Ok(Client::from_store(storage::open_with(url, options).await?))
    }

    /// A client over an already open store.
    pub fn from_store(store: Arc<dyn Store>) -> Client {
        Client {
            submits: GroupCommit::new(store.clone(), DEFAULT_MAX_GROUP_COMMIT),
            store,
            limits: SubmitLimits::default(),
            builder_ids: Arc::default(),
            served: Arc::default(),
        }
    }

    /// The same client, sharing a transaction among at most `max` concurrently
    /// submitted buildsets, cancelled requests or priority changes (see
    /// [`DEFAULT_MAX_GROUP_COMMIT`]); 0 writes each call in a transaction of its own.
    pub fn with_group_commit(mut self, max: usize) -> Client {
        self.submits = GroupCommit::new(self.store.clone(), max);
        self
    }

    /// The same client, holding submissions to other limits.
    pub fn with_limits(mut self, limits: SubmitLimits) -> Client {
        self.limits = limits;
        self
    }

    /// The underlying store, for the engine's own layers (the edges above it read and
    /// write through the methods here).
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// One reporter's delivery state.
    pub async fn reporter(&self, name: &str) -> Result<ReporterState> {
        Ok(self.store.reporter_get(name).await?)
    }

    /// Reports in the outbox after `after` (a reporter's cursor), oldest first, at most
    /// `limit`: what reporters have yet to deliver.
    pub async fn outbox(&self, after: i64, limit: u32) -> Result<Vec<Report>> {
        Ok(self.store.outbox_read(after, limit).await?)
    }

    /// The child buildsets a parent request's builds started, one entry per child
    /// request, each with its latest build and return value.
    pub async fn children(&self, parent_request: RequestId) -> Result<Vec<ChildBuildset>> {
        Ok(self.store.buildset_children(parent_request).await?)
    }

    /// A build's latest progress report per group, in the order groups first reported.
    pub async fn progress_reports(&self, build: BuildId) -> Result<Vec<ProgressRecord>> {
        self.store.build_get(build).await?;
        Ok(self.store.progress_list(build).await?)
    }

    /// One builder.
    pub async fn builder(&self, id: BuilderId) -> Result<Builder> {
        Ok(self.store.builder_get(id).await?)
    }

    /// One master.
    pub async fn master(&self, id: MasterId) -> Result<Master> {
        Ok(self.store.master_get(id).await?)
    }

    /// Forgets a reporter: its undelivered reports no longer keep the outbox from
    /// pruning. An engine that still has it registered registers it again on restart.
    pub async fn remove_reporter(&self, name: &str) -> Result<()> {
        Ok(self.store.reporter_remove(name).await?)
    }

    /// Buildsets matching a typed query, with the total when the query asks for it.
    pub async fn query_buildsets(&self, q: &Query<BuildsetField>) -> Result<Page<Buildset>> {
        Ok(self.store.buildset_query(q).await?)
    }

    /// Build requests matching a typed query.
    pub async fn query_requests(&self, q: &Query<RequestField>) -> Result<Page<BuildRequest>> {
        Ok(self.store.request_query(q).await?)
    }

    /// Builds matching a typed query.
    pub async fn query_builds(&self, q: &Query<BuildField>) -> Result<Page<Build>> {
        Ok(self.store.build_query(q).await?)
    }

    /// Builders matching a typed query.
    pub async fn query_builders(&self, q: &Query<BuilderField>) -> Result<Page<Builder>> {
        Ok(self.store.builder_query(q).await?)
    }

    /// Masters matching a typed query.
    pub async fn query_masters(&self, q: &Query<MasterField>) -> Result<Page<Master>> {
        Ok(self.store.master_query(q).await?)
    }

    /// Changes the priority of a request not complete yet (it decides the order among
    /// requests nobody claimed yet).
    pub async fn set_priority(&self, id: RequestId, priority: i32) -> Result<()> {
        self.submits.set_priority(id, priority).await
    }

    /// The most recently finished SUCCESS or WARNINGS build of a builder.
    pub async fn latest_successful_build(&self, builder: BuilderId) -> Result<Option<Build>> {
        Ok(self.store.build_latest_successful(builder).await?)
    }

    /// A build by builder id and number.
    pub async fn build_of(&self, builder: BuilderId, number: i64) -> Result<Build> {
        Ok(self.store.build_get_by_number(builder, number).await?)
    }

    /// A builder by name, or [`EngineError::UnknownBuilder`].
    pub async fn builder_named(&self, name: &str) -> Result<Builder> {
        self.store
            .builder_get_by_name(name)
            .await?
            .ok_or_else(|| EngineError::UnknownBuilder(name.to_owned()))
    }

    /// Pauses (`true`) or resumes a builder by name, for every master sharing the
    /// database: while paused, nobody claims its requests (they stay queued) and builds
    /// already running finish. Returns the builder as it is now.
    pub async fn set_builder_paused(&self, name: &str, paused: bool) -> Result<Builder> {
        let builder = self.builder_named(name).await?;
        self.store.builder_set_paused(builder.id, paused).await?;
        Ok(Builder { paused, ..builder })
    }

    /// How many requests wait in each builder's queue (incomplete, claimed by nobody),
    /// for the builders with any.
    pub async fn queue_depths(&self) -> Result<Vec<(BuilderId, u64)>> {
        Ok(self.store.request_queue_depths().await?)
    }

    /// A page of the stored sourcestamps with their ids (identical stamps are stored
    /// once), and how many there are.
    pub async fn sourcestamps(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<(kiln_model::SourceStampId, SourceStamp)>, u64)> {
        Ok(self.store.sourcestamp_page(limit, offset).await?)
    }

    /// One stored sourcestamp.
    pub async fn sourcestamp(&self, id: kiln_model::SourceStampId) -> Result<SourceStamp> {
        Ok(self.store.sourcestamp_get(id).await?)
    }

    /// The latest earlier build of the same builder with exactly SUCCESS and the same
    /// sourcestamps (Buildbot's `getPrevSuccessfulBuild`).
    pub async fn previous_successful_build(&self, id: BuildId) -> Result<Option<Build>> {
        self.store.build_get(id).await?;
        Ok(self.store.build_previous_successful(id).await?)
    }

    /// Deletes a complete buildset with its requests, builds and their logs, progress,
    /// properties and artifact records; returns the deleted builds. Buildsets its builds
    /// triggered stay. Result directories on disk are the caller's (an
    /// [`Engine`](crate::Engine) removes its own). An incomplete buildset is refused.
    pub async fn delete_buildset(&self, id: BuildsetId) -> Result<Vec<Build>> {
        Ok(self.store.buildset_delete(id).await?)
    }

    /// Deletes a finished build with its logs, progress, properties and artifact
    /// records; returns it. A running build is refused.
    pub async fn delete_build(&self, id: BuildId) -> Result<Build> {
        let build = self.store.build_get(id).await?;
        self.store.build_delete(id).await?;
        Ok(build)
    }

    /// Removes the result directories (`<root>/<builder>/<number>/`) of deleted builds.
    /// A directory already gone is fine; one that cannot be removed is logged.
    pub async fn remove_result_dirs(&self, root: &std::path::Path, builds: &[Build]) {
        let mut dirs = Vec::with_capacity(builds.len());
        for b in builds {
            match self.builder(b.builder_id).await {
                Ok(builder) => dirs.push((builder.name, b.number)),
                Err(e) => {
                    tracing::warn!(build = %b.id, error = %e, "cannot find a deleted build's builder; its result directory stays")
                }
            }
        }
        crate::scheduler::artifacts::remove(root, dirs).await;
    }

    /// Deletes log records written before `older_than` below `below`; returns how many.
    pub async fn prune_logs(
        &self,
        older_than: kiln_model::Timestamp,
        below: kiln_model::LogLevel,
    ) -> Result<u64> {
        Ok(self.store.log_prune(older_than, below).await?)
    }

    /// One schedule, with its last and next fire.
    pub async fn schedule(&self, name: &str) -> Result<Schedule> {
        Ok(self.store.schedule_get(name).await?)
    }

    /// The newest buildset submitted with the property `name`, and its value.
    pub async fn latest_property(&self, name: &str) -> Result<Option<(BuildsetId, Property)>> {
        Ok(self.store.buildset_property_latest(name).await?)
    }

    /// Waits until a buildset completes and returns it. A client hears no engine's
    /// events: it wakes on the database's own signals where there are some
    /// (PostgreSQL) and looks again every `poll` in any case.
    pub async fn wait_buildset(
        &self,
        id: BuildsetId,
        poll: std::time::Duration,
    ) -> Result<Buildset> {
        let mut signals = self.store.signals();
        loop {
            let buildset = self.buildset(id).await?;
            if buildset.complete {
                return Ok(buildset);
            }
            match signals.as_mut() {
                Some(rx) => {
                    let _ = tokio::time::timeout(poll, rx.recv()).await;
                }
                None => tokio::time::sleep(poll).await,
            }
        }
    }

    /// Every lock, by name, with the builders that take it, the builds holding it and
    /// how many queued requests wait for it.
    pub async fn locks(&self) -> Result<Vec<kiln_model::Lock>> {
        Ok(self.store.lock_list().await?)
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<Schedule>> {
        Ok(self.store.schedule_list().await?)
    }

    /// Fires a schedule now, whatever its timing and `only_if_changed` say, from the
    /// definition its engine stored (so any process can): one buildset with the
    /// schedule's submission, its `schedule` property and `forced` = true. The schedule's
    /// own ticks are not moved.
    pub async fn force_schedule(&self, name: &str) -> Result<Submitted> {
        let submission = self.forced_submission(name).await?;
        self.submit(&submission).await
    }

    pub(crate) async fn forced_submission(&self, name: &str) -> Result<Submission> {
        let row = self.schedule(name).await?;
        let config: crate::schedules::ScheduleConfig = serde_json::from_value(row.definition)
            .map_err(|e| {
                EngineError::Internal(format!(
                    "schedule {name:?} has an unreadable definition: {e}"
                ))
            })?;
        let mut submission = config.submission_for(kiln_model::now(), None);
        submission.idempotency_key = None;
        submission.properties.insert(
            "forced".into(),
            Property::new(serde_json::json!(true), "schedule"),
        );
        Ok(submission)
    }

    /// Registers a schedule's row (see [`Schedules::schedule_register`](kiln_storage::seam::Schedules)).
    pub(crate) async fn register_schedule_row(
        &self,
        config: &crate::schedules::ScheduleConfig,
    ) -> Result<Schedule> {
        let definition = serde_json::to_string(config)
            .map_err(|e| EngineError::Internal(format!("encoding a schedule: {e}")))?;
        let now = kiln_model::now();
        let next = config.next_after(now)?;
        Ok(self
            .store
            .schedule_register(&config.name, &definition, next, now)
            .await?)
    }

    /// Records that a schedule dealt with a tick.
    pub(crate) async fn schedule_fired(
        &self,
        name: &str,
        tick: kiln_model::Timestamp,
        buildset: Option<BuildsetId>,
        next: Option<kiln_model::Timestamp>,
    ) -> Result<bool> {
        Ok(self
            .store
            .schedule_fired(name, tick, buildset, next, kiln_model::now())
            .await?)
    }

    /// All builders.
    pub async fn builders(&self) -> Result<Vec<Builder>> {
        Ok(self.store.builder_list().await?)
    }

    /// All masters.
    pub async fn masters(&self) -> Result<Vec<Master>> {
        Ok(self.store.master_list().await?)
    }

    /// Every reporter the database knows, with its delivery progress.
    pub async fn reporters(&self) -> Result<Vec<ReporterState>> {
        Ok(self.store.reporter_list().await?)
    }

    /// Submits a buildset. Every builder must already be known to the database.
    ///
    /// Concurrent submits (from any number of tasks sharing this client or the engine
    /// that holds it) are written together, one transaction per turn of the writer, and
    /// each returns once its own commit is done: a lone submit waits for nothing else.
    pub async fn submit(&self, submission: &Submission) -> Result<Submitted> {
        only(self.submit_many(std::slice::from_ref(submission)).await?)
    }

    /// Submits several buildsets in one transaction: all of them, or none if any is
    /// refused. The result is in the order given.
    pub async fn submit_many(&self, submissions: &[Submission]) -> Result<Vec<Submitted>> {
        self.submit_buildsets(submissions, Lineage::default(), &BTreeMap::new())
            .await
    }

    /// Like [`Client::submit_many`], resolving builder names from `cached` first and
    /// reading the database only when a name is missing there.
    pub(crate) async fn submit_many_known(
        &self,
        submissions: &[Submission],
        cached: &BTreeMap<String, BuilderId>,
    ) -> Result<Vec<Submitted>> {
        self.submit_buildsets(submissions, Lineage::default(), cached)
            .await
    }

    async fn submit_buildsets(
        &self,
        submissions: &[Submission],
        lineage: Lineage,
        cached: &BTreeMap<String, BuilderId>,
    ) -> Result<Vec<Submitted>> {
        for s in submissions {
            s.validate(&self.limits)?;
        }
        let known = self.builder_ids_of(submissions, cached).await?;
        let mut params = Vec::with_capacity(submissions.len());
        for s in submissions {
            let mut builder_ids = Vec::with_capacity(s.builders.len());
            for name in &s.builders {
                let id = *known
                    .get(name)
                    .ok_or_else(|| EngineError::UnknownBuilder(name.clone()))?;
                if builder_ids.contains(&id) {
                    return Err(EngineError::Invalid(format!(
                        "builder {name:?} is named twice"
                    )));
                }
                builder_ids.push(id);
            }
            params.push(NewBuildset {
                reason: s.reason.clone(),
                external_idstring: s.external_idstring.clone(),
                idempotency_key: s.idempotency_key.clone(),
                not_before: s.not_before,
                sourcestamps: s.sourcestamps.clone(),
                properties: s.properties.clone(),
                builder_ids,
                priority: s.priority,
                rebuilt_buildid: lineage.rebuilt,
                resubmitted_from: lineage.resubmitted,
                submitted_at: kiln_model::now(),
                ..NewBuildset::default()
            });
        }
        let added = self.submits.add(params).await?;
        let served = self.served_builders().await?;
        let mut names: BTreeMap<BuilderId, String> =
            known.iter().map(|(n, id)| (*id, n.clone())).collect();
        // A buildset that held the key already may have other builders than those named
        // this time: their names are read (rarely: only for such a repeat).
        for added in added.iter().filter(|a| a.existing) {
            for builder in added.requests.keys() {
                if !names.contains_key(builder) {
                    let b = self.store.builder_get(*builder).await?;
                    names.insert(*builder, b.name);
                }
            }
        }
        Ok(added
            .into_iter()
            .map(|added| Submitted {
                buildset_id: added.buildset_id,
                requests: added
                    .requests
                    .iter()
                    .filter_map(|(builder, request)| {
                        names.get(builder).map(|n| (n.clone(), *request))
                    })
                    .collect(),
                unserved: added
                    .requests
                    .keys()
                    .filter(|b| !served.contains(b))
                    .filter_map(|b| names.get(b).cloned())
                    .collect(),
                existing: added.existing,
            })
            .collect())
    }

    /// The builders an active master runs, read at most once per [`SERVED_TTL`].
    async fn served_builders(&self) -> Result<std::collections::BTreeSet<BuilderId>> {
        let mut cache = self.served.lock().await;
        if let Some((at, served)) = cache.as_ref()
            && at.elapsed() < SERVED_TTL
        {
            return Ok(served.clone());
        }
        let q = Query::new().eq(BuilderField::Served, true);
        let served: std::collections::BTreeSet<BuilderId> = self
            .store
            .builder_query(&q)
            .await?
            .items
            .into_iter()
            .map(|b| b.id)
            .collect();
        *cache = Some((std::time::Instant::now(), served.clone()));
        Ok(served)
    }

    /// Forgets which builders are served, so that the next submit reads it afresh (an
    /// engine registering a builder calls this).
    pub(crate) async fn forget_served(&self) {
        *self.served.lock().await = None;
    }

    /// The ids of the builders `submissions` name, from `cached` (an engine's own
    /// builders), else from what this client has read before, else read afresh. A name
    /// that is nowhere is left out (the caller reports it).
    async fn builder_ids_of(
        &self,
        submissions: &[Submission],
        cached: &BTreeMap<String, BuilderId>,
    ) -> Result<BTreeMap<String, BuilderId>> {
        let names = || submissions.iter().flat_map(|s| &s.builders);
        let mut known = BTreeMap::new();
        let mut missing = false;
        {
            let seen = self
                .builder_ids
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            for name in names() {
                match cached.get(name).or_else(|| seen.get(name)) {
                    Some(id) => {
                        known.insert(name.clone(), *id);
                    }
                    None => missing = true,
                }
            }
        }
        if missing {
            let builders = self.store.builder_list().await?;
            let mut seen = self
                .builder_ids
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            seen.extend(builders.into_iter().map(|b| (b.name, b.id)));
            for name in names() {
                if let Some(id) = seen.get(name) {
                    known.insert(name.clone(), *id);
                }
            }
        }
        Ok(known)
    }

    /// One buildset.
    pub async fn buildset(&self, id: BuildsetId) -> Result<Buildset> {
        Ok(self.store.buildset_get(id).await?)
    }

    /// Buildsets, newest first.
    pub async fn buildsets(&self, filter: &BuildsetFilter) -> Result<Vec<Buildset>> {
        Ok(self.store.buildset_list(filter).await?)
    }

    /// A buildset's properties.
    pub async fn buildset_properties(&self, id: BuildsetId) -> Result<Properties> {
        Ok(self.store.buildset_properties(id).await?)
    }

    /// A buildset's sourcestamps, sorted.
    pub async fn buildset_sourcestamps(&self, id: BuildsetId) -> Result<Vec<SourceStamp>> {
        Ok(self.store.buildset_sourcestamps(id).await?)
    }

    /// One build request.
    pub async fn request(&self, id: RequestId) -> Result<BuildRequest> {
        Ok(self.store.request_get(id).await?)
    }

    /// Build requests.
    pub async fn requests(&self, filter: &RequestFilter) -> Result<Vec<BuildRequest>> {
        Ok(self.store.request_list(filter).await?)
    }

    /// One build.
    pub async fn build(&self, id: BuildId) -> Result<Build> {
        Ok(self.store.build_get(id).await?)
    }

    /// A build by builder name and number.
    pub async fn build_by_number(&self, builder: &str, number: i64) -> Result<Build> {
        let builder = self.builder_named(builder).await?;
        Ok(self.store.build_get_by_number(builder.id, number).await?)
    }

    /// Builds.
    pub async fn builds(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        Ok(self.store.build_list(filter).await?)
    }

    /// A build's properties (what it set; its buildset's are separate).
    pub async fn build_properties(&self, id: BuildId) -> Result<Properties> {
        Ok(self.store.build_properties(id).await?)
    }

    /// The files a build left in its result directory.
    pub async fn build_artifacts(&self, id: BuildId) -> Result<Vec<Artifact>> {
        Ok(self.store.build_artifacts(id).await?)
    }

    /// Log records.
    pub async fn logs(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        Ok(self.store.log_list(query).await?)
    }

    /// A build's progress as a tree.
    pub async fn progress(&self, build: BuildId) -> Result<ProgressNode> {
        self.store.build_get(build).await?;
        Ok(ProgressNode::tree(&self.store.progress_list(build).await?))
    }

    /// Cancels a request: an unclaimed one completes as CANCELLED at once; a claimed one is
    /// flagged and its master stops the build. Fails if the request does not exist.
    pub async fn cancel_request(&self, id: RequestId) -> Result<CancelOutcome> {
        self.store.request_get(id).await?;
        self.submits.cancel(vec![id], kiln_model::now()).await
    }

    /// Cancels every incomplete request of a buildset.
    pub async fn cancel_buildset(&self, id: BuildsetId) -> Result<CancelOutcome> {
        self.store.buildset_get(id).await?;
        let requests = self
            .store
            .request_list(&RequestFilter {
                buildset_id: Some(id),
                complete: Some(false),
                ..RequestFilter::default()
            })
            .await?;
        let ids: Vec<RequestId> = requests.iter().map(|r| r.id).collect();
        self.submits.cancel(ids, kiln_model::now()).await
    }

    /// Rebuilds a build: a new buildset for the same builder with the same sourcestamps,
    /// properties and priority, whose `rebuilt_buildid` names the original build.
    pub async fn rebuild(&self, id: BuildId) -> Result<Submitted> {
        let build = self.store.build_get(id).await?;
        let request = self.store.request_get(build.request_id).await?;
        let builder = self.store.builder_get(build.builder_id).await?;
        let original = self.store.buildset_get(request.buildset_id).await?;
        let submission = Submission {
            reason: self.fit(format!(
                "rebuild of {} #{}: {}",
                builder.name, build.number, original.reason
            )),
            builders: vec![builder.name],
            properties: self.store.buildset_properties(request.buildset_id).await?,
            sourcestamps: self
                .store
                .buildset_sourcestamps(request.buildset_id)
                .await?,
            priority: request.priority,
            external_idstring: original.external_idstring,
            // A repeat is new work: it must not return the original by its key.
            idempotency_key: None,
            not_before: None,
        };
        self.submit_repeat(
            submission,
            Lineage {
                rebuilt: Some(id),
                resubmitted: None,
            },
        )
        .await
    }
}

impl Client {
    /// A reason made from a stored one, cut to the text limit (on a character boundary)
    /// so that rebuilding a buildset whose reason had the longest length allowed works.
    fn fit(&self, mut reason: String) -> String {
        if reason.len() > self.limits.text_bytes {
            let mut end = self.limits.text_bytes;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        reason
    }

    /// Resubmits a buildset (Copr): a new buildset with the same reason, sourcestamps,
    /// properties and priority, for the builders whose requests failed, ended in an
    /// exception or were cancelled, or for every builder when `all` is set. Refused while
    /// the buildset is still running, and when there is nothing to run again.
    pub async fn resubmit(&self, id: BuildsetId, all: bool) -> Result<Submitted> {
        let original = self.store.buildset_get(id).await?;
        if !original.complete {
            return Err(EngineError::Invalid(format!(
                "buildset {id} is still running; cancel it or wait before resubmitting"
            )));
        }
        let requests = self
            .store
            .request_list(&RequestFilter {
                buildset_id: Some(id),
                ..RequestFilter::default()
            })
            .await?;
        let names: BTreeMap<BuilderId, String> = self
            .store
            .builder_list()
            .await?
            .into_iter()
            .map(|b| (b.id, b.name))
            .collect();
        let builders: Vec<String> = requests
            .iter()
            .filter(|r| {
                all || matches!(
                    r.results,
                    Some(ResultCode::Failure | ResultCode::Exception | ResultCode::Cancelled)
                )
            })
            .filter_map(|r| names.get(&r.builder_id).cloned())
            .collect();
        if builders.is_empty() {
            return Err(EngineError::Invalid(format!(
                "nothing in buildset {id} failed or was cancelled; resubmit it with all builders to run it again"
            )));
        }
        let mut properties = self.store.buildset_properties(id).await?;
        properties.insert(
            "resubmitted_from".into(),
            Property::new(serde_json::json!(id.0), "resubmit"),
        );
        let submission = Submission {
            reason: self.fit(format!("resubmit of buildset {id}: {}", original.reason)),
            builders,
            properties,
            sourcestamps: self.store.buildset_sourcestamps(id).await?,
            priority: requests.first().map_or(0, |r| r.priority),
            external_idstring: original.external_idstring,
            // A repeat is new work: it must not return the original by its key.
            idempotency_key: None,
            not_before: None,
        };
        self.submit_repeat(
            submission,
            Lineage {
                rebuilt: None,
                resubmitted: Some(id),
            },
        )
        .await
    }

    /// A builder's status (jobcontrol): not built, failed, success, or outdated when a
    /// direct dependency has succeeded more recently than the builder's latest success.
    /// RETRY and SKIPPED builds never count, so SKIPPED never makes anything outdated.
    pub async fn builder_status(&self, builder: &Builder) -> Result<BuilderStatus> {
        let counted = [
            ResultCode::Success,
            ResultCode::Warnings,
            ResultCode::Failure,
            ResultCode::Exception,
            ResultCode::Cancelled,
        ];
        let running = Query::new()
            .eq(BuildField::BuilderId, builder.id)
            .eq(BuildField::Complete, false)
            .counted()
            .limit(0);
        if self.store.build_query(&running).await?.total > Some(0) {
            return Ok(BuilderStatus::Building);
        }
        let Some(latest) = self.store.build_latest_with(builder.id, &counted).await? else {
            return Ok(BuilderStatus::NotBuilt);
        };
        if !latest.results.is_some_and(ResultCode::is_successful) {
            return Ok(BuilderStatus::Failed);
        }
        for dep in &builder.depends_on {
            let Some(dep) = self.store.builder_get_by_name(dep).await? else {
                continue;
            };
            let newer = self
                .store
                .build_latest_successful(dep.id)
                .await?
                .and_then(|b| b.complete_at)
                .is_some_and(|at| latest.complete_at.is_some_and(|mine| at > mine));
            if newer {
                return Ok(BuilderStatus::Outdated);
            }
        }
        Ok(BuilderStatus::Success)
    }
}

/// The one result of a batch of one.
pub(crate) fn only(mut submitted: Vec<Submitted>) -> Result<Submitted> {
    match (submitted.pop(), submitted.is_empty()) {
        (Some(one), true) => Ok(one),
        _ => Err(EngineError::Invalid(
            "a batch of one buildset did not give exactly one result".into(),
        )),
    }
}
