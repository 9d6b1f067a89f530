//! What the seam's methods take and give back: one struct per operation where a few
//! arguments would not do, and the outcomes of the batch operations.

use std::collections::BTreeMap;

use kiln_model::{
    Artifact, Build, BuildId, BuildRequest, BuilderId, BuildsetId, MasterId, Properties, RequestId,
    ResultCode, SourceStamp, Timestamp,
};

/// A new buildset with one request per builder.
#[derive(Clone, Debug, Default)]
pub struct NewBuildset {
    /// Why it is submitted.
    pub reason: String,
    /// An identifier of the submitter's choosing.
    pub external_idstring: Option<String>,
    /// Makes the submit idempotent: while a buildset with this key exists, adding
    /// another with the same key returns that buildset (with `existing` set) instead of
    /// making a new one, atomically under concurrent submits on every backend.
    pub idempotency_key: Option<String>,
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
    /// The buildset that this resubmits.
    pub resubmitted_from: Option<BuildsetId>,
    /// How deep it hangs in its trigger tree: 0 for a submission, the parent's buildset's
    /// depth + 1 for a child.
    pub depth: u32,
    /// The submission time.
    pub submitted_at: Timestamp,
    /// A delayed run: the requests are not claimable before this time.
    pub not_before: Option<Timestamp>,
}

/// What adding a buildset made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedBuildset {
    /// The new buildset.
    pub buildset_id: BuildsetId,
    /// Its requests by builder.
    pub requests: BTreeMap<BuilderId, RequestId>,
    /// Whether it existed already: its idempotency key was taken, so nothing was added
    /// and this is the buildset that holds the key.
    pub existing: bool,
}

/// One batch of a builder's retention (see
/// [`retention_sweep`](crate::seam::RetentionWrites::retention_sweep)).
#[derive(Clone, Debug)]
pub struct RetentionSweep {
    /// The builder.
    pub builder_id: BuilderId,
    /// Work that completed before this may go.
    pub cutoff: Timestamp,
    /// The newest builds (and requests) of the builder that always stay.
    pub keep_last: u32,
    /// The most builds, and the most requests, one batch deletes.
    pub batch: u32,
}

/// What one batch of retention deleted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Swept {
    /// The deleted builds (their result directories are the caller's to remove).
    pub builds: Vec<Build>,
    /// Requests deleted.
    pub requests: u64,
    /// Buildsets deleted.
    pub buildsets: u64,
    /// Source stamps deleted: those of the deleted buildsets that no buildset left
    /// names (a stamp is stored once for every buildset with the same source).
    pub sourcestamps: u64,
    /// Another master was sweeping: nothing was done.
    pub busy: bool,
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
    /// Builders that collapse requests (Buildbot's `collapseRequests`), each with
    /// whether properties must match too: before claiming, their queued requests with
    /// the same sourcestamps (and properties) as a newer queued one complete as SKIPPED,
    /// superseded by the newest. Only the builder's [`COLLAPSE_WINDOW`] newest queued
    /// requests are looked at.
    pub collapse: Vec<(BuilderId, bool)>,
    /// Builders that take locks (see [`Locks`](crate::seam::Locks)): a request of one
    /// is claimed only when every lock it takes has its units free, and its build holds
    /// them until it finishes. A builder whose next request finds a lock busy marks it
    /// as waiting from then; its build's `locks_duration_s` counts from that mark.
    pub lock_builders: Vec<BuilderId>,
}

/// The most units a lock may have: a bound on what one definition can ask of the
/// claim's accounting.
pub const MAX_LOCK_CAPACITY: u32 = 1_000_000;

/// What collapsing did in one claim: each SKIPPED request with the request that
/// superseded it, and the buildsets that completed.
pub(crate) type Collapsed = (Vec<(RequestId, RequestId)>, Vec<CompletedBuildset>);

/// How many of a collapsing builder's newest queued requests one claim looks at: a
/// bound on the work each claim does for it, however long its queue.
pub const COLLAPSE_WINDOW: u32 = 10_000;

/// A build started by [`build_start_available`](crate::seam::BuildWrites::build_start_available), with its request.
#[derive(Clone, Debug, PartialEq)]
pub struct StartedBuild {
    /// The claimed request.
    pub request: BuildRequest,
    /// Its new build.
    pub build: Build,
    /// What the build needs to know about its buildset.
    pub context: BuildsetContext,
}

/// What [`build_start_available`](crate::seam::BuildWrites::build_start_available) did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StartOutcome {
    /// Builds started, highest priority first.
    pub started: Vec<StartedBuild>,
    /// Requests that were flagged for cancel while an earlier claim held them: they
    /// completed as CANCELLED instead of starting.
    pub cancelled: Vec<RequestId>,
    /// Buildsets those cancellations and collapses completed.
    pub buildsets_completed: Vec<CompletedBuildset>,
    /// Requests that completed as SKIPPED, each with the newer request that superseded
    /// it (collapsing builders only).
    pub collapsed: Vec<(RequestId, RequestId)>,
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

/// How one build finished, for [`build_finish_batch`](crate::seam::BuildWrites::build_finish_batch)
/// and [`build_finish`](crate::seam::BuildWrites::build_finish).
#[derive(Clone, Debug)]
pub struct FinishedBuild {
    /// The build.
    pub build_id: BuildId,
    /// Its request: in a batch, completed with `results`, or released to run again for
    /// RETRY.
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
    /// Run the request again (a retry): release it, not claimable before this time,
    /// whatever the build's result. RETRY without it releases the request at once.
    pub retry_at: Option<Timestamp>,
}

/// What [`build_finish_batch`](crate::seam::BuildWrites::build_finish_batch) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinishOutcome {
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
/// [`reporter_progress`](crate::seam::OutboxWrites::reporter_progress).
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
