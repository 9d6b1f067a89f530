//! The storage seam: every read and write of Kiln's state goes through [`Store`].
//!
//! Methods are named entity-first (`request_claim`, `build_finish`) and take their own
//! parameter structs where they need more than two or three values. The SQL lives in the
//! backends only ([`sqlite`], [`postgres`]); the scheduler, the client and the edges never see it.
//! Every backend must pass the conformance suite in `engine/tests/conformance/`.

mod collections;
mod error;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod query;
mod rows;
pub mod sqlite;
pub mod text;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use error::{Result, StorageError};
pub(crate) use error::{clamp_u64, fk_to_not_found, found_or};
pub use query::{Collection, FieldType, Filter, FilterValue, Op, Page, Query};

use kiln_model::{
    Artifact, Build, BuildId, BuildRequest, Builder, BuilderId, Buildset, BuildsetId,
    ChildBuildset, LogEntry, LogLevel, LogQuery, LogRecord, MAX_PRIORITY, MIN_PRIORITY, Master,
    MasterId, ProgressRecord, ProgressReport, Properties, Property, Report, ReporterState,
    RequestId, ResultCode, SourceStamp, SourceStampId, Timestamp,
};

/// Opens the store named by a database URL and brings its schema up to date.
///
/// `sqlite://path/to/kiln.db` (created if missing) and `sqlite::memory:` are understood;
/// a bare path is taken as a SQLite file. `postgres://user@host/db` (or `postgresql://`)
/// opens a PostgreSQL database, which must exist; `?options=-c%20search_path%3Dname`
/// puts Kiln's tables in another schema.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, &StoreOptions::default()).await
}

/// Like [`open`], with options.
pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(postgres::PostgresStore::open(url, options).await?));
        #[cfg(not(feature = "postgres"))]
        return Err(StorageError::BadUrl {
            url: display_url(url),
            reason: "this Kiln was built without PostgreSQL (the `postgres` feature)".into(),
        });
    }
    if let Some((scheme, _)) = url.split_once("://")
        && scheme != "sqlite"
    {
        return Err(StorageError::BadUrl {
            url: url.to_owned(),
            reason: format!("unsupported scheme {scheme:?}: expected sqlite:// or postgres://"),
        });
    }
    Ok(Arc::new(sqlite::SqliteStore::open(url, options).await?))
}

/// A database URL fit for messages: a password in it is replaced by `***`.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_owned(),
    }
}

/// The URL of a database given as a URL or as a SQLite file path.
pub fn database_url(database: &str) -> String {
    if database.contains("://") || database.starts_with("sqlite:") {
        database.to_owned()
    } else {
        format!("sqlite://{database}")
    }
}

/// Whether a database names a SQLite file (a path or a `sqlite:` URL).
pub fn is_sqlite(database: &str) -> bool {
    database_url(database).starts_with("sqlite:")
}

/// Tuning for a store connection.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a write waits for another process's write lock before failing.
    pub busy_timeout: Duration,
    /// The most connections a store keeps open.
    pub max_connections: u32,
    /// Whether to create the database when it does not exist (tools that only read or
    /// control existing work turn this off, so that a mistyped path is an error).
    pub create_if_missing: bool,
    /// How hard a commit works to survive a power cut.
    pub durability: Durability,
}

/// How hard a commit works to survive a power cut (SQLite's `synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The default: in WAL mode nothing is lost when a process dies, but a power cut or
    /// an OS crash may lose the last commits. Commits cost no disk flush.
    #[default]
    Normal,
    /// Every commit waits for the disk: survives a power cut, costs a flush per commit.
    Full,
}

/// How long a SQLite write waits for another writer: long enough to ride out a burst of
/// claims from several masters on one file.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections per store: SQLite serialises writes anyway, a few readers help the API.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            create_if_missing: true,
            durability: Durability::Normal,
        }
    }
}

/// A new buildset with one request per builder.
#[derive(Clone, Debug, Default)]
pub struct NewBuildset {
    /// Why it is submitted.
    pub reason: String,
    /// An identifier of the submitter's choosing.
    pub external_idstring: Option<String>,
    /// What to build; identical stamps are stored once.
    pub sourcestamps: Vec<SourceStamp>,
    /// Buildset properties.
    pub properties: Properties,
    /// One request is made per builder; an empty list makes a buildset that is complete
    /// at once with SUCCESS.
    pub builder_ids: Vec<BuilderId>,
    /// The requests' priority, within [`MIN_PRIORITY`](kiln_model::MIN_PRIORITY)..=[`MAX_PRIORITY`](kiln_model::MAX_PRIORITY).
    pub priority: i32,
    /// Whether a parent build waits for the requests.
    pub waited_for: bool,
    /// The build that starts it, for child buildsets.
    pub parent_buildid: Option<BuildId>,
    /// The relationship to the parent.
    pub parent_relationship: Option<String>,
    /// The request of the build that starts it: a re-run of that request (after its
    /// master died) finds the children by it instead of starting them again.
    pub parent_request_id: Option<RequestId>,
    /// Which trigger of the parent request made it, unique per parent request.
    pub trigger_key: Option<String>,
    /// The build that this rebuilds.
    pub rebuilt_buildid: Option<BuildId>,
    /// How deep it hangs in its trigger tree: 0 for a submission, the parent's buildset's
    /// depth + 1 for a child.
    pub depth: u32,
    /// The submission time.
    pub submitted_at: Timestamp,
}

/// What adding a buildset made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedBuildset {
    /// The new buildset.
    pub buildset_id: BuildsetId,
    /// Its requests by builder.
    pub requests: BTreeMap<BuilderId, RequestId>,
}

/// Which buildsets to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct BuildsetFilter {
    /// Only complete (true) or incomplete (false) ones.
    pub complete: Option<bool>,
    /// Only children of this build.
    pub parent_buildid: Option<BuildId>,
    /// Only ones with this external id.
    pub external_idstring: Option<String>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

/// Which claims a request listing wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClaimFilter {
    /// Claimed or not.
    #[default]
    Any,
    /// Claimed by some master.
    Claimed,
    /// Not claimed and not complete: ready to run.
    Unclaimed,
    /// Claimed by this master.
    ClaimedBy(MasterId),
}

/// A field a request listing can be ordered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOrderField {
    /// The request id.
    Id,
    /// The priority.
    Priority,
    /// The submission time.
    SubmittedAt,
    /// The builder id.
    BuilderId,
    /// The buildset id.
    BuildsetId,
    /// The completion time.
    CompleteAt,
}

/// One ordering key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestOrder {
    /// The field.
    pub field: RequestOrderField,
    /// Whether highest comes first.
    pub descending: bool,
}

/// Which build requests to list.
#[derive(Clone, Debug, Default)]
pub struct RequestFilter {
    /// Only this builder's.
    pub builder_id: Option<BuilderId>,
    /// Only this buildset's.
    pub buildset_id: Option<BuildsetId>,
    /// Only complete (true) or incomplete (false) ones.
    pub complete: Option<bool>,
    /// By claim.
    pub claimed: ClaimFilter,
    /// Only requests whose buildset has a stamp on this branch.
    pub branch: Option<String>,
    /// Only requests whose buildset has a stamp from this repository.
    pub repository: Option<String>,
    /// The ordering, first key first; by id when empty.
    pub order: Vec<RequestOrder>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

/// A new build of a claimed request.
#[derive(Clone, Debug)]
pub struct NewBuild {
    /// The request it executes.
    pub request_id: RequestId,
    /// The master running it (it must hold the request's claim).
    pub master_id: MasterId,
    /// The worker slot it runs in.
    pub worker_slot: Option<i64>,
    /// Its first state string.
    pub state_string: String,
    /// When it starts.
    pub started_at: Timestamp,
}

/// How a build ended.
#[derive(Clone, Debug)]
pub struct FinishBuild {
    /// The build.
    pub build_id: BuildId,
    /// The master that ran it; the write is refused if it no longer owns the build.
    pub master_id: MasterId,
    /// Its result.
    pub results: ResultCode,
    /// What the job returned.
    pub return_value: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Where it failed.
    pub traceback: Option<String>,
    /// A final state string to replace the running one (the old one stays if `None`).
    pub state_string: Option<String>,
    /// When it ended.
    pub complete_at: Timestamp,
}

/// Claim and start builds for the most urgent unclaimed requests, in one transaction.
///
/// Capacity goes to builders with queued work in Buildbot's order across builders: the
/// highest priority queued first, then the oldest queued request, then the name. Within
/// a builder requests are claimed by priority (highest first), then id.
#[derive(Clone, Debug)]
pub struct StartAvailable {
    /// The claiming master.
    pub master_id: MasterId,
    /// Per builder, the worker slots free now: at most one request is claimed per slot,
    /// and its build gets that slot. Builders without queued work cost nothing.
    pub free_slots: Vec<(BuilderId, Vec<i64>)>,
    /// The most requests claimed in all (the engine's free room).
    pub limit: usize,
    /// The first state string of every build.
    pub state_string: String,
    /// The claim and start time.
    pub now: Timestamp,
}

/// A build started by [`Store::build_start_available`], with its request.
#[derive(Clone, Debug, PartialEq)]
pub struct StartedBuild {
    /// The claimed request.
    pub request: BuildRequest,
    /// Its new build.
    pub build: Build,
    /// What the build needs to know about its buildset.
    pub context: BuildsetContext,
}

/// What [`Store::build_start_available`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StartOutcome {
    /// Builds started, highest priority first.
    pub started: Vec<StartedBuild>,
    /// Requests that were flagged for cancel while an earlier claim held them: they
    /// completed as CANCELLED instead of starting.
    pub cancelled: Vec<RequestId>,
    /// Buildsets those cancellations completed.
    pub buildsets_completed: Vec<CompletedBuildset>,
}

/// What a build needs to know about its buildset.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildsetContext {
    /// The buildset's reason.
    pub reason: String,
    /// Its properties.
    pub properties: Properties,
    /// Its sourcestamps, sorted.
    pub sourcestamps: Vec<SourceStamp>,
    /// How deep it hangs in its trigger tree (0: submitted, not triggered).
    pub depth: u32,
}

/// How one build ended, for [`Store::build_finish_and_settle`].
#[derive(Clone, Debug)]
pub struct BuildEnd {
    /// The build.
    pub build_id: BuildId,
    /// Its request: completed with `results`, or released to run again for RETRY.
    pub request_id: RequestId,
    /// Its result.
    pub results: ResultCode,
    /// What the job returned.
    pub return_value: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Where it failed.
    pub traceback: Option<String>,
    /// A final state string (the old one stays if `None`).
    pub state_string: Option<String>,
    /// Files it left in its result directory.
    pub artifacts: Vec<Artifact>,
    /// When it ended.
    pub complete_at: Timestamp,
}

/// What [`Store::build_finish_and_settle`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Builds that were not running on the master any more (expired, finished, unknown):
    /// their results were refused and their requests left alone.
    pub refused: Vec<BuildId>,
    /// Requests completed with their build's result.
    pub completed: Vec<RequestId>,
    /// Requests released for RETRY (back in the queue).
    pub released: Vec<RequestId>,
    /// Buildsets whose last request this completed.
    pub buildsets_completed: Vec<CompletedBuildset>,
}

/// Which builds to list, lowest id first.
#[derive(Clone, Debug, Default)]
pub struct BuildFilter {
    /// Only this builder's.
    pub builder_id: Option<BuilderId>,
    /// Only builds of this request.
    pub request_id: Option<RequestId>,
    /// Only builds of this buildset's requests.
    pub buildset_id: Option<BuildsetId>,
    /// Only finished (true) or running (false) ones.
    pub complete: Option<bool>,
    /// Newest first instead.
    pub descending: bool,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

/// A buildset that completed because its last request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletedBuildset {
    /// The buildset.
    pub buildset_id: BuildsetId,
    /// The worst of its requests' results.
    pub results: ResultCode,
}

/// What a cancellation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CancelOutcome {
    /// Unclaimed requests that completed as CANCELLED.
    pub completed: Vec<RequestId>,
    /// Claimed requests now flagged so that their master stops their builds.
    pub flagged: Vec<RequestId>,
    /// Buildsets that completed as a consequence.
    pub buildsets_completed: Vec<CompletedBuildset>,
}

/// Expire masters that stopped heartbeating.
#[derive(Clone, Debug)]
pub struct ExpireMasters {
    /// The live master doing it (never expires itself).
    pub by: MasterId,
    /// Masters whose last heartbeat is older than this are expired.
    pub silent_since: Timestamp,
    /// The time of expiry, used to finish their builds.
    pub now: Timestamp,
}

/// A master that was expired, with what was taken back from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiredMaster {
    /// The master.
    pub master_id: MasterId,
    /// Its name.
    pub name: String,
    /// Claims released: the requests are back in the queue.
    pub released: Vec<RequestId>,
    /// Its unfinished builds, now finished as RETRY.
    pub retried_builds: Vec<BuildId>,
}

/// What registering a master found of an earlier incarnation with the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredMaster {
    /// The master's id.
    pub master_id: MasterId,
    /// Claims the earlier incarnation held, now released.
    pub released: Vec<RequestId>,
    /// Builds the earlier incarnation left unfinished, now finished as RETRY.
    pub retried_builds: Vec<BuildId>,
}

/// What a reporter's deliverer has done since it last wrote, for
/// [`Store::reporter_progress`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReporterProgress {
    /// The reporter.
    pub name: String,
    /// The master delivering; refused with
    /// [`StorageError::LeaseLost`] when it no longer holds the lease.
    pub master: MasterId,
    /// The last seq dealt with: everything up to it was delivered, filtered out or dropped.
    pub cursor: i64,
    /// Events delivered since the last write.
    pub delivered: u64,
    /// Events given up on since the last write: (seq, attempts, last error).
    pub dropped: Vec<(i64, u32, String)>,
    /// Failed attempts at the event after `cursor`.
    pub attempts: u32,
    /// The latest delivery error, if the last attempt failed.
    pub last_error: Option<String>,
    /// The lease, extended to this time.
    pub lease_until: Timestamp,
    /// When this is written.
    pub now: Timestamp,
}

/// A wake-up from another process on the same database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSignal {
    /// Requests became claimable: submitted, or released by a master.
    Work,
    /// Somebody asked to cancel claimed requests: their masters should look.
    Cancel,
    /// Buildsets completed, with their results.
    Complete(Vec<(BuildsetId, ResultCode)>),
    /// Signals may have been lost (the listening connection dropped, or a subscriber
    /// fell behind): look at everything again.
    Lost,
}

/// The storage seam. One implementation per database; see the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name ("sqlite", "postgres").
    fn backend(&self) -> &'static str;

    /// Wake-ups from other processes sharing the database, for backends that can push
    /// them (PostgreSQL's LISTEN/NOTIFY). `None` means polling is the only way to learn
    /// of other processes' work. A store never signals what it did itself.
    fn signals(&self) -> Option<tokio::sync::broadcast::Receiver<StoreSignal>> {
        None
    }

    // ---- masters ----

    /// Registers a master by name (or re-activates it). An earlier incarnation with the
    /// same name is presumed dead: its claims are released and its unfinished builds
    /// end as RETRY.
    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster>;
    /// Records a heartbeat. Fails with [`StorageError::MasterInactive`] when the master
    /// was expired or shut down meanwhile.
    async fn master_heartbeat(&self, id: MasterId, now: Timestamp) -> Result<()>;
    /// Marks a master inactive (clean shutdown) and releases any claims it still holds
    /// on incomplete requests, and its reporter leases.
    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>>;
    /// Expires active masters silent since before `silent_since`: marks them inactive,
    /// releases their claims and reporter leases and finishes their unfinished builds as
    /// RETRY.
    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>>;
    /// One master.
    async fn master_get(&self, id: MasterId) -> Result<Master>;
    /// All masters.
    async fn master_list(&self) -> Result<Vec<Master>>;

    // ---- builders ----

    /// Returns the builder's id, creating it (or updating its description) as needed.
    async fn builder_ensure(&self, name: &str, description: Option<&str>) -> Result<BuilderId>;
    /// The builder with this name, if any.
    async fn builder_get_by_name(&self, name: &str) -> Result<Option<Builder>>;
    /// One builder.
    async fn builder_get(&self, id: BuilderId) -> Result<Builder>;
    /// All builders, by name.
    async fn builder_list(&self) -> Result<Vec<Builder>>;
    /// Records the builders a builder depends on, by name (replacing the old list).
    async fn builder_set_depends_on(&self, id: BuilderId, depends_on: &[String]) -> Result<()>;

    // ---- buildsets ----

    /// Adds a buildset and one request per builder, atomically.
    async fn buildset_add(&self, params: &NewBuildset) -> Result<AddedBuildset> {
        let mut added = self.buildset_add_many(std::slice::from_ref(params)).await?;
        added
            .pop()
            .ok_or_else(|| StorageError::Invalid("adding one buildset returned none".into()))
    }
    /// Adds several buildsets, each with one request per builder, in one transaction:
    /// all of them or, if any is refused, none. The result is in the order given.
    async fn buildset_add_many(&self, params: &[NewBuildset]) -> Result<Vec<AddedBuildset>>;
    /// One buildset.
    async fn buildset_get(&self, id: BuildsetId) -> Result<Buildset>;
    /// Buildsets, newest first.
    async fn buildset_list(&self, filter: &BuildsetFilter) -> Result<Vec<Buildset>>;
    /// A buildset's properties.
    async fn buildset_properties(&self, id: BuildsetId) -> Result<Properties>;
    /// A buildset's sourcestamps, sorted.
    async fn buildset_sourcestamps(&self, id: BuildsetId) -> Result<Vec<SourceStamp>>;
    /// The ids of a buildset's stored sourcestamps, ascending (equal stamps share an id).
    async fn buildset_sourcestamp_ids(&self, id: BuildsetId) -> Result<Vec<SourceStampId>>;
    /// The child buildsets a parent request's builds started, one entry per child
    /// request, oldest first, each with its latest build and return value.
    async fn buildset_children(&self, parent_request: RequestId) -> Result<Vec<ChildBuildset>>;
    /// Hangs child buildsets from a new build of their parent request (a re-run adopts
    /// the children its earlier build started).
    async fn buildset_adopt(&self, ids: &[BuildsetId], parent_build: BuildId) -> Result<()>;

    // ---- build requests ----

    /// One request.
    async fn request_get(&self, id: RequestId) -> Result<BuildRequest>;
    /// Requests matching a filter.
    async fn request_list(&self, filter: &RequestFilter) -> Result<Vec<BuildRequest>>;
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
    async fn request_cancel(&self, ids: &[RequestId], now: Timestamp) -> Result<CancelOutcome>;
    /// Changes the priority of an incomplete request (it decides the order among
    /// requests not claimed yet). A complete request or a priority out of range is
    /// [`StorageError::Invalid`]; a missing one is `NotFound`.
    async fn request_set_priority(&self, id: RequestId, priority: i32) -> Result<()>;
    /// Requests claimed by this master that somebody asked to cancel.
    async fn request_cancel_pending(&self, master: MasterId) -> Result<Vec<RequestId>>;

    // ---- builds ----

    /// Claims, in one transaction, one unclaimed request per free slot of each builder
    /// (highest priority first, then oldest) and starts a build for each, numbered on
    /// from the builder's highest number. Requests flagged for cancel complete as
    /// CANCELLED instead.
    async fn build_start_available(&self, params: &StartAvailable) -> Result<StartOutcome>;
    /// Finishes several builds of one master in one transaction and settles their
    /// requests: completed with the build's result, or released for RETRY; buildsets
    /// whose last request completes complete. A build not running on that master is
    /// refused (listed in [`Settled::refused`]) without failing the others.
    async fn build_finish_and_settle(&self, master: MasterId, ends: &[BuildEnd])
    -> Result<Settled>;

    /// Starts a build of a request the master has claimed, numbered one above the
    /// builder's highest number (safe under concurrent starts).
    async fn build_add(&self, params: &NewBuild) -> Result<Build>;
    /// One build.
    async fn build_get(&self, id: BuildId) -> Result<Build>;
    /// A builder's build by number.
    async fn build_get_by_number(&self, builder: BuilderId, number: i64) -> Result<Build>;
    /// Builds matching a filter.
    async fn build_list(&self, filter: &BuildFilter) -> Result<Vec<Build>>;
    /// Sets a running build's state string.
    async fn build_set_state(&self, id: BuildId, state: &str) -> Result<()>;
    /// Adds to a build's time spent waiting for locks.
    async fn build_add_locks_duration(&self, id: BuildId, seconds: f64) -> Result<()>;
    /// Finishes a running build; refused with [`StorageError::NotOwner`] if it is
    /// already finished or runs on another master.
    async fn build_finish(&self, params: &FinishBuild) -> Result<()>;
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

    // ---- progress ----

    /// Stores a progress report; the latest per group wins.
    async fn progress_report(
        &self,
        build: BuildId,
        report: &ProgressReport,
        now: Timestamp,
    ) -> Result<()>;
    /// A build's latest report per group, in the order groups first reported.
    async fn progress_list(&self, build: BuildId) -> Result<Vec<ProgressRecord>>;

    // ---- logs ----

    /// Appends log records to a build.
    async fn log_append(&self, build: BuildId, records: &[LogRecord]) -> Result<()>;
    /// Reads log records, oldest first.
    async fn log_list(&self, query: &LogQuery) -> Result<Vec<LogEntry>>;
    /// Deletes records written before `older_than` whose level is below `below`;
    /// returns how many went.
    async fn log_prune(&self, older_than: Timestamp, below: LogLevel) -> Result<u64>;

    // ---- the reporters' outbox ----
    //
    // While at least one reporter is registered, every change that the four lifecycle
    // events describe (buildset submitted, build started, build finished, buildset
    // complete) writes its event into the outbox in the same transaction.

    /// Registers a reporter; a new one starts at the end of the outbox (it hears events
    /// from now on), a known one keeps its place.
    async fn reporter_register(&self, name: &str) -> Result<ReporterState>;
    /// One reporter's state.
    async fn reporter_get(&self, name: &str) -> Result<ReporterState>;
    /// Every reporter, by name.
    async fn reporter_list(&self) -> Result<Vec<ReporterState>>;
    /// Forgets a reporter: its undelivered events no longer keep the outbox from pruning.
    async fn reporter_remove(&self, name: &str) -> Result<()>;
    /// Takes or extends the lease to deliver a reporter's events: granted when nobody
    /// holds it, the master already does, or the holder's lease ran out before `now`.
    /// Returns the state under the lease, or `None` when another master holds it.
    async fn reporter_lease(
        &self,
        name: &str,
        master: MasterId,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<ReporterState>>;
    /// Records delivery progress under the lease.
    async fn reporter_progress(&self, progress: &ReporterProgress) -> Result<()>;
    /// Events after `after`, oldest first, at most `limit`.
    async fn outbox_read(&self, after: i64, limit: u32) -> Result<Vec<Report>>;
    /// Deletes events every registered reporter has dealt with; returns how many went.
    async fn outbox_prune(&self) -> Result<u64>;

    // ---- collection queries (the HTTP API) ----
    //
    // Filters, ordering and paging run in the database; the total counts every match
    // before paging. A field a collection does not have is `StorageError::Invalid`.

    /// Buildsets matching a query.
    async fn query_buildsets(&self, q: &Query) -> Result<Page<Buildset>>;
    /// Build requests matching a query.
    async fn query_requests(&self, q: &Query) -> Result<Page<BuildRequest>>;
    /// Builds matching a query.
    async fn query_builds(&self, q: &Query) -> Result<Page<Build>>;
    /// Builders matching a query.
    async fn query_builders(&self, q: &Query) -> Result<Page<Builder>>;
    /// Masters matching a query.
    async fn query_masters(&self, q: &Query) -> Result<Page<Master>>;
}

/// The rules every backend checks before it adds a buildset.
pub(crate) fn validate_buildset(params: &NewBuildset) -> Result<()> {
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&params.priority) {
        return Err(StorageError::Invalid(format!(
            "priority {} is outside {MIN_PRIORITY}..={MAX_PRIORITY}",
            params.priority
        )));
    }
    let distinct: BTreeSet<_> = params.builder_ids.iter().collect();
    if distinct.len() != params.builder_ids.len() {
        return Err(StorageError::Invalid(
            "a buildset names the same builder twice".into(),
        ));
    }
    if let Some(name) = params.properties.keys().find(|k| k.trim().is_empty()) {
        return Err(StorageError::Invalid(format!(
            "property name {name:?} is empty"
        )));
    }
    Ok(())
}
