//! Lifecycle events, broadcast to every subscriber of an engine.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{BuildId, BuildsetId, MasterId, RequestId, ResultCode};

/// Something that happened to the engine's work. Events describe changes this engine
/// made; work done by other processes on the same database is seen through the store.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A buildset was submitted through this engine.
    BuildsetSubmitted {
        /// The buildset.
        buildset_id: BuildsetId,
        /// Its reason.
        reason: String,
        /// Its requests by builder name.
        requests: BTreeMap<String, RequestId>,
    },
    /// A build started.
    BuildStarted {
        /// The build.
        build_id: BuildId,
        /// Its number on its builder.
        number: i64,
        /// The builder's name.
        builder: String,
        /// The request it runs.
        request_id: RequestId,
        /// The request's buildset.
        buildset_id: BuildsetId,
    },
    /// A build finished.
    BuildFinished {
        /// The build.
        build_id: BuildId,
        /// Its number on its builder.
        number: i64,
        /// The builder's name.
        builder: String,
        /// The request it ran.
        request_id: RequestId,
        /// The request's buildset.
        buildset_id: BuildsetId,
        /// Its result.
        results: ResultCode,
    },
    /// A request completed without a build (cancelled before it ran).
    RequestCompleted {
        /// The request.
        request_id: RequestId,
        /// Its result.
        results: ResultCode,
    },
    /// A buildset completed: all its requests are complete.
    BuildsetComplete {
        /// The buildset.
        buildset_id: BuildsetId,
        /// The worst of its requests' results.
        results: ResultCode,
    },
    /// A build running on this engine wrote log records.
    BuildLog {
        /// The build.
        build_id: BuildId,
        /// How many records were written.
        records: usize,
    },
    /// A build running on this engine reported progress or changed its state string.
    BuildProgress {
        /// The build.
        build_id: BuildId,
    },
    /// This engine recorded delivery progress for a reporter.
    ReporterProgress {
        /// The reporter.
        reporter: String,
        /// The last outbox seq it has dealt with.
        cursor: i64,
        /// Events delivered since the previous progress event.
        delivered: u64,
        /// Events given up on since the previous progress event.
        dropped: u64,
        /// The latest delivery error, when the last attempt failed.
        last_error: Option<String>,
    },
    /// This engine deleted events from the outbox that every reporter had dealt with.
    OutboxPruned {
        /// How many it deleted.
        events: u64,
    },
    /// This engine expired another master that stopped heartbeating.
    MasterExpired {
        /// The expired master.
        master_id: MasterId,
        /// Its name.
        name: String,
        /// Requests that went back to the queue.
        released: Vec<RequestId>,
    },
}

/// How many events a slow subscriber may fall behind before it misses some (it is told
/// with `RecvError::Lagged` and should re-read state from the store).
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;
