//! Buffered build output: log records, progress reports, state strings and properties
//! that running builds write, stored in batches by one flusher task per engine.
//!
//! A write only appends to the build's buffer. The flusher stores everything buffered
//! at most [`FLUSH_INTERVAL`] after it was written, sooner when a build has
//! [`FLUSH_RECORDS`] records waiting, whatever the job does next: a job that logs and
//! then sleeps for an hour is visible within the interval, not at its next host call. A
//! job that writes faster than the database takes it waits in [`Outputs::log`] once its
//! backlog passes [`BACKLOG_RECORDS`]. When a build ends, [`Outputs::close`] stores what
//! is left before its end is recorded, and refuses anything written after.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::warn;

use kiln_job::WriteError;
use kiln_model::{BuildId, LogRecord, ProgressReport, Property};

use super::SchedulerState;
use crate::events::Event;

/// The longest a written record waits before it is stored (and visible in the API).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A build with this many records waiting has them stored at once.
pub const FLUSH_RECORDS: usize = 256;
/// A build with this many records waiting makes its writer wait for the flusher.
pub const BACKLOG_RECORDS: usize = 16 * FLUSH_RECORDS;

/// What one build has written since the last flush.
#[derive(Default)]
struct Pending {
    logs: Vec<LogRecord>,
    /// The latest report per group, in the order groups first reported.
    progress: Vec<ProgressReport>,
    state: Option<String>,
    /// The latest value per name, in the order first set.
    properties: Vec<(String, Property)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.logs.is_empty()
            && self.progress.is_empty()
            && self.state.is_none()
            && self.properties.is_empty()
    }
}

#[derive(Default)]
struct Buffers {
    pending: HashMap<BuildId, Pending>,
    /// Builds that ended: writes to them are refused.
    closed: HashSet<BuildId>,
}

/// The buffers of every build running on one engine.
#[derive(Default)]
pub(crate) struct Outputs {
    buffers: Mutex<Buffers>,
    /// Something was written: the flusher should look.
    written: Notify,
    /// A build's backlog reached [`FLUSH_RECORDS`]: flush now.
    urgent: Notify,
    /// A flush finished: writers held back by their backlog may go on.
    flushed: Notify,
    /// Held while writing, so that a build's end is never recorded while an older
    /// write of it is still on its way.
    writing: tokio::sync::Mutex<()>,
}

impl Outputs {
    fn buffers(&self) -> MutexGuard<'_, Buffers> {
        self.buffers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `add` on the build's buffer, unless the build has ended.
    fn with(&self, build: BuildId, add: impl FnOnce(&mut Pending)) -> Result<usize, WriteError> {
        let mut buffers = self.buffers();
        if buffers.closed.contains(&build) {
            return Err(WriteError::Ended(build));
        }
        let pending = buffers.pending.entry(build).or_default();
        add(pending);
        let records = pending.logs.len();
        drop(buffers);
        self.written.notify_one();
        if records >= FLUSH_RECORDS {
            self.urgent.notify_one();
        }
        Ok(records)
    }

    /// Buffers a log record; waits while the build's backlog is over [`BACKLOG_RECORDS`].
    pub(crate) async fn log(&self, build: BuildId, record: LogRecord) -> Result<(), WriteError> {
        let mut waiting = self.with(build, |p| p.logs.push(record))?;
        while waiting >= BACKLOG_RECORDS {
            let flushed = self.flushed.notified();
            waiting = self
                .buffers()
                .pending
                .get(&build)
                .map_or(0, |p| p.logs.len());
            if waiting >= BACKLOG_RECORDS {
                flushed.await;
            }
        }
        Ok(())
    }

    /// Buffers a log record without waiting (the sandbox's captured output, which is
    /// bounded by its own limit).
    pub(crate) fn log_now(&self, build: BuildId, record: LogRecord) -> Result<(), WriteError> {
        self.with(build, |p| p.logs.push(record)).map(drop)
    }

    /// Buffers a progress report; it replaces a pending one of the same group.
    pub(crate) fn progress(
        &self,
        build: BuildId,
        report: ProgressReport,
    ) -> Result<(), WriteError> {
        self.with(build, |p| {
            match p.progress.iter_mut().find(|r| r.group == report.group) {
                Some(older) => *older = report,
                None => p.progress.push(report),
            }
        })
        .map(drop)
    }

    /// Buffers a state string; it replaces a pending one.
    pub(crate) fn state(&self, build: BuildId, state: String) -> Result<(), WriteError> {
        self.with(build, |p| p.state = Some(state)).map(drop)
    }

    /// Buffers a property; it replaces a pending one of the same name.
    pub(crate) fn property(
        &self,
        build: BuildId,
        name: &str,
        property: Property,
    ) -> Result<(), WriteError> {
        self.with(build, |p| {
            match p.properties.iter_mut().find(|(n, _)| n == name) {
                Some((_, older)) => *older = property,
                None => p.properties.push((name.to_owned(), property)),
            }
        })
        .map(drop)
    }

    /// Stores what a build left buffered and refuses its later writes; called when the
    /// build has ended, before its end is recorded.
    pub(crate) async fn close(&self, shared: &SchedulerState, build: BuildId) {
        let _writing = self.writing.lock().await;
        let pending = {
            let mut buffers = self.buffers();
            buffers.closed.insert(build);
            buffers.pending.remove(&build)
        };
        if let Some(pending) = pending {
            store(shared, build, pending).await;
        }
        self.flushed.notify_waiters();
    }

    /// Stores what a build has buffered so far, now.
    pub(crate) async fn flush_build(&self, shared: &SchedulerState, build: BuildId) {
        let _writing = self.writing.lock().await;
        let pending = self.buffers().pending.remove(&build);
        if let Some(pending) = pending {
            store(shared, build, pending).await;
        }
        self.flushed.notify_waiters();
    }

    /// Forgets a build whose end is recorded.
    pub(crate) fn forget(&self, build: BuildId) {
        let mut buffers = self.buffers();
        buffers.closed.remove(&build);
        buffers.pending.remove(&build);
    }

    /// Stores everything buffered.
    async fn flush(&self, shared: &SchedulerState) {
        let _writing = self.writing.lock().await;
        let pending = std::mem::take(&mut self.buffers().pending);
        for (build, pending) in pending {
            store(shared, build, pending).await;
        }
        self.flushed.notify_waiters();
    }
}

/// Writes one build's buffered output. A database failure here costs the build some of
/// its log, never its result.
async fn store(shared: &SchedulerState, build: BuildId, pending: Pending) {
    if pending.is_empty() {
        return;
    }
    let store = &shared.store;
    let records = pending.logs.len();
    if !pending.logs.is_empty()
        && let Err(e) = store.log_append(build, &pending.logs).await
    {
        warn!(build = %build, error = %e, "could not store {records} log records");
    }
    let progressed = !pending.progress.is_empty() || pending.state.is_some();
    let now = kiln_model::now();
    for report in &pending.progress {
        if let Err(e) = store.progress_report(build, report, now).await {
            warn!(build = %build, error = %e, "could not store a progress report");
        }
    }
    if let Some(state) = &pending.state
        && let Err(e) = store.build_set_state(build, state).await
    {
        warn!(build = %build, error = %e, "could not store the state string");
    }
    for (name, property) in &pending.properties {
        if let Err(e) = store.build_set_property(build, name, property).await {
            warn!(build = %build, error = %e, property = %name, "could not store a property");
        }
    }
    if records > 0 {
        shared.emit(Event::BuildLog {
            build_id: build,
            records,
        });
    }
    if progressed {
        shared.emit(Event::BuildProgress { build_id: build });
    }
}

/// Stores buffered output until the engine stops: at most [`FLUSH_INTERVAL`] after it
/// was written, at once when a build's backlog reaches [`FLUSH_RECORDS`].
pub(crate) async fn flush_loop(shared: Arc<SchedulerState>) {
    let outputs = &shared.outputs;
    let mut stopping = shared.stopping.subscribe();
    loop {
        tokio::select! {
            () = outputs.written.notified() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(FLUSH_INTERVAL) => {}
            () = outputs.urgent.notified() => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
        outputs.flush(&shared).await;
    }
}
