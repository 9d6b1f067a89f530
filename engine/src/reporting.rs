//! Result reporters: plugins that hear lifecycle events and tell the outside world.
//!
//! Delivery is at least once and survives a crash. While a reporter is registered in
//! the database, every change an event describes writes that event into the outbox in
//! the same transaction as the change. Each
//! reporter has a cursor in the outbox; a delivery task on one master at a time (it
//! holds a lease) hands the reporter the events it wants, in order, retrying a failed
//! one with exponential backoff and giving up on it after the last attempt. Reporters
//! never touch a build's result and never hold up the scheduler.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_model::{Report, ReportKind};

/// Delivery attempts per event before a reporter gives up on it (and records it as
/// dropped): with the default backoff, about 40 minutes of trying.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 12;
/// The pause after a first failed delivery; it doubles with each attempt...
pub const DEFAULT_RETRY_FIRST: Duration = Duration::from_secs(1);
/// ...up to this.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);
/// How long a master's lease on a reporter lasts without renewal: if the master dies,
/// another takes over delivery after this.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Events read from the outbox at once.
pub const OUTBOX_BATCH: u32 = 256;
/// How often a delivering master deletes events every reporter has dealt with (the
/// engine's `outbox_prune_interval`).
pub const DEFAULT_OUTBOX_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How a reporter is delivered to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReporterConfig {
    /// Its unique name: its place in the outbox is kept under it.
    pub name: String,
    /// The kinds of events it wants; empty for all.
    pub events: BTreeSet<ReportKind>,
    /// The builders whose events it wants (a buildset event counts when any of the
    /// buildset's builders is listed); empty for all.
    pub builders: BTreeSet<String>,
    /// See [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// See [`DEFAULT_RETRY_FIRST`].
    pub retry_first: Duration,
    /// See [`DEFAULT_RETRY_MAX`].
    pub retry_max: Duration,
    /// See [`DEFAULT_LEASE`].
    pub lease: Duration,
}

impl ReporterConfig {
    /// A reporter that wants every event, with the default retries.
    pub fn new(name: impl Into<String>) -> Self {
        ReporterConfig {
            name: name.into(),
            events: BTreeSet::new(),
            builders: BTreeSet::new(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_first: DEFAULT_RETRY_FIRST,
            retry_max: DEFAULT_RETRY_MAX,
            lease: DEFAULT_LEASE,
        }
    }

    /// Only these kinds of events.
    pub fn events(mut self, kinds: impl IntoIterator<Item = ReportKind>) -> Self {
        self.events = kinds.into_iter().collect();
        self
    }

    /// Only these builders' events.
    pub fn builders(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.builders = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the retry schedule.
    pub fn retries(mut self, max_attempts: u32, first: Duration, max: Duration) -> Self {
        self.max_attempts = max_attempts;
        self.retry_first = first;
        self.retry_max = max;
        self
    }

    /// Whether the reporter wants this event.
    pub fn wants(&self, event: &Report) -> bool {
        if !self.events.is_empty() && !self.events.contains(&event.kind) {
            return false;
        }
        if self.builders.is_empty() {
            return true;
        }
        match &event.builder {
            Some(builder) => self.builders.contains(builder),
            None => event
                .payload
                .get("builders")
                .and_then(|b| b.as_array())
                .is_some_and(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.as_str())
                        .any(|n| self.builders.contains(n))
                }),
        }
    }

    /// The pause before attempt `attempt + 1` after `attempt` failures.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.retry_first.saturating_mul(factor).min(self.retry_max)
    }

    /// Checks the settings, naming the first that is not usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a reporter has an empty name".into());
        }
        if self.max_attempts == 0 {
            return Err(format!(
                "reporter {:?}: max_attempts must be at least 1",
                self.name
            ));
        }
        if self.lease.is_zero() || self.retry_first.is_zero() {
            return Err(format!(
                "reporter {:?}: the lease and the first retry pause must be longer than zero",
                self.name
            ));
        }
        Ok(())
    }
}
