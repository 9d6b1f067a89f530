//! What the engine counts for operators: claims, builds started and finished per builder
//! and result, build durations, submit-to-start latency; and, read from the database
//! when asked, queue depths, masters alive and reporters' outbox lag.
//!
//! Metrics are [`prometheus_client`] types in a registry of the engine's own (nothing
//! global, so an embedder's metrics are left alone): [`Engine::metrics`](crate::Engine::metrics)
//! returns a registry to encode or to extend, which is what `kiln serve`'s `/metrics`
//! does.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use kiln_model::ResultCode;

/// Labels of per-builder metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuilderLabels {
    /// The builder's name.
    pub builder: String,
}

/// Labels of finished builds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The builder's name.
    pub builder: String,
    /// The result's name (`SUCCESS`, `FAILURE`, ...).
    pub result: String,
}

/// Labels of per-reporter metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReporterLabels {
    /// The reporter's name.
    pub reporter: String,
}

/// Build durations: 1 ms to about 9 hours, doubling.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

/// Submit-to-start latency: 100 µs to about 14 minutes, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 24))
}

/// The engine's counters and histograms, updated as it works. Cloning shares them.
#[derive(Clone)]
pub(crate) struct EngineMetrics {
    claims: Counter,
    started: Family<BuilderLabels, Counter>,
    finished: Family<ResultLabels, Counter>,
    durations: Family<BuilderLabels, Histogram, fn() -> Histogram>,
    submit_to_start: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            claims: Counter::default(),
            started: Family::default(),
            finished: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            submit_to_start: latency_histogram(),
        }
    }
}

impl EngineMetrics {
    /// A request was claimed and its build started, `latency` seconds after its submit.
    pub(crate) fn build_started(&self, builder: &str, latency: f64) {
        self.claims.inc();
        self.started
            .get_or_create(&BuilderLabels {
                builder: builder.to_owned(),
            })
            .inc();
        self.submit_to_start.observe(latency.max(0.0));
    }

    /// A build was recorded as finished after running `seconds`.
    pub(crate) fn build_finished(&self, builder: &str, results: ResultCode, seconds: f64) {
        self.finished
            .get_or_create(&ResultLabels {
                builder: builder.to_owned(),
                result: results.to_string(),
            })
            .inc();
        self.durations
            .get_or_create(&BuilderLabels {
                builder: builder.to_owned(),
            })
            .observe(seconds.max(0.0));
    }

    /// Registers every metric of the engine's own in `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_claims",
            "Build requests this master claimed",
            self.claims.clone(),
        );
        registry.register(
            "kiln_builds_started",
            "Builds this master started, per builder",
            self.started.clone(),
        );
        registry.register(
            "kiln_builds_finished",
            "Builds this master recorded as finished, per builder and result",
            self.finished.clone(),
        );
        registry.register_with_unit(
            "kiln_build_duration",
            "How long builds ran, per builder",
            Unit::Seconds,
            self.durations.clone(),
        );
        registry.register_with_unit(
            "kiln_submit_to_start",
            "From a request's submission to the start of its build on this master",
            Unit::Seconds,
            self.submit_to_start.clone(),
        );
    }
}

/// What the database says when metrics are asked for.
pub(crate) struct Snapshot {
    /// Queued requests per builder name, every known builder (0 for an empty queue).
    pub(crate) queued: Vec<(String, u64)>,
    /// Paused builders' names.
    pub(crate) paused: Vec<String>,
    /// Active masters.
    pub(crate) masters_alive: u64,
    /// Events each reporter has yet to deal with.
    pub(crate) outbox_lag: Vec<(String, u64)>,
    /// Builds started here and not recorded as finished, and of those the ones waiting
    /// on children.
    pub(crate) in_flight: u64,
    pub(crate) waiting: u64,
    /// The store's group commit, where it has one of its own (SQLite).
    pub(crate) commits: Option<kiln_storage::CommitStats>,
}

impl Snapshot {
    /// Registers the snapshot's gauges in `registry`.
    pub(crate) fn register(self, registry: &mut Registry) {
        let queued = Family::<BuilderLabels, Gauge>::default();
        for (builder, n) in self.queued {
            queued
                .get_or_create(&BuilderLabels { builder })
                .set(clamp(n));
        }
        registry.register(
            "kiln_requests_queued",
            "Build requests waiting for a master (incomplete, claimed by nobody), per builder",
            queued,
        );
        let paused = Family::<BuilderLabels, Gauge>::default();
        for builder in self.paused {
            paused.get_or_create(&BuilderLabels { builder }).set(1);
        }
        registry.register("kiln_builder_paused", "1 for each paused builder", paused);
        registry.register(
            "kiln_masters_alive",
            "Masters registered and active on the database",
            gauge(self.masters_alive),
        );
        let lag = Family::<ReporterLabels, Gauge>::default();
        for (reporter, n) in self.outbox_lag {
            lag.get_or_create(&ReporterLabels { reporter })
                .set(clamp(n));
        }
        registry.register(
            "kiln_outbox_lag",
            "Lifecycle events a reporter has yet to deal with",
            lag,
        );
        registry.register(
            "kiln_builds_running",
            "Builds started on this master and not finished yet (waiting ones included)",
            gauge(self.in_flight),
        );
        registry.register(
            "kiln_builds_waiting",
            "Of the running builds, those waiting on their children",
            gauge(self.waiting),
        );
        if let Some(stats) = self.commits {
            registry.register(
                "kiln_sqlite_commits",
                "Write transactions the SQLite writer committed since the engine opened the database",
                counter(stats.commits),
            );
            registry.register(
                "kiln_sqlite_commit_callers",
                "Callers' writes those commits carried (divided by the commits: callers per commit)",
                counter(stats.callers),
            );
            registry.register(
                "kiln_sqlite_log_writes",
                "Writes of the write-ahead log that reached the kernel (one per commit of up to 64 KiB)",
                counter(stats.log_writes),
            );
        }
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A counter that has counted `n`.
fn counter(n: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(n);
    c
}

/// A gauge set to `n`.
pub fn gauge(n: u64) -> Gauge {
    let g = Gauge::default();
    g.set(clamp(n));
    g
}
