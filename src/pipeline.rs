//! The pipeline config of `kiln run`: builders backed by WASM plugins, and what to
//! submit. Reading it checks everything (fields, names, limits, grants, every plugin
//! against its world) and reports all problems together, before anything runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_engine::dependencies::{Dependency, MissingDependency, find_cycle};
use kiln_engine::model::ReportKind;
use kiln_engine::model::{Property, SourceStamp};
use kiln_engine::wasm::{
    DirGrant, Grants, HttpGrant, Limits, WasmExecutor, WasmHost, WasmPolicy, WasmReporter,
};
use kiln_engine::{
    BuildLimits, BuilderConfig, CatchUp, Collapse, LockUnits, LockUse, LogRetention,
    ReporterConfig, RetentionPolicy, RetryPolicy, ScheduleConfig, Submission, Timing,
};
use serde::Deserialize;
use serde_json::Value;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Where the run keeps its state.
    #[serde(default)]
    pub run: RunSection,
    /// Limits for every builder that does not set its own.
    #[serde(default)]
    pub defaults: LimitsSection,
    /// The builders.
    #[serde(default, rename = "builder")]
    pub builders: Vec<BuilderSection>,
    /// What to submit.
    #[serde(default, rename = "submit")]
    pub submits: Vec<SubmitSection>,
    /// Relationship name → policy plugin (`bundled:<name>` or a path).
    #[serde(default)]
    pub relationships: BTreeMap<String, String>,
    /// Result reporters.
    #[serde(default, rename = "reporter")]
    pub reporters: Vec<ReporterSection>,
    /// Schedules (`kiln serve` fires them).
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleSection>,
    /// How retention runs, and log retention.
    #[serde(default)]
    pub retention: RetentionSection,
    /// Locks builders take.
    #[serde(default, rename = "lock")]
    pub locks: Vec<LockSection>,
}

/// `[[lock]]`: a lock with `count` units (1, the default: exclusive) that builders take
/// before their builds start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockSection {
    /// Its unique name, shared by every master on the database.
    pub name: String,
    /// How many units it has.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// One entry of a builder's `locks`: a lock name (one unit), or
/// `{ name = "db", count = 2 }` (two units) or `{ name = "db", exclusive = true }` (all).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LockUseSection {
    /// One unit of the lock.
    Name(String),
    /// With options.
    With {
        /// The lock.
        name: String,
        /// Units each build takes.
        count: Option<u32>,
        /// Whether each build takes the whole lock.
        #[serde(default)]
        exclusive: bool,
    },
}

/// `[retention]`: when the engine applies the builders' retention, and what log records
/// it prunes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Seconds between rounds (default 60).
    pub interval_s: Option<f64>,
    /// The most builds one batch deletes (default 500).
    pub batch: Option<u32>,
    /// Log records older than this many days ...
    pub logs_keep_days: Option<f64>,
    /// ... below this level are deleted (default info: debug records go).
    pub logs_below: Option<String>,
}

/// `[builder.retention]`: its builds finished more than `keep_days` ago, beyond its
/// `keep_last` newest, are deleted with their logs and result directories.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderRetentionSection {
    /// Days finished work is kept (fractions allowed).
    #[serde(default)]
    pub keep_days: f64,
    /// The newest builds kept however old.
    #[serde(default)]
    pub keep_last: u32,
}

/// Days as a duration, for retention: finite, not negative, at most 100 years.
fn days(value: f64, name: &str) -> Result<Duration, String> {
    if !value.is_finite() || !(0.0..=36_500.0).contains(&value) {
        return Err(format!("{name} = {value} must be within 0..=36500 days"));
    }
    Ok(Duration::from_secs_f64(value * 86_400.0))
}

/// `[[schedule]]`: a submission made every interval or at a cron pattern's times.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Its unique name (its fires are recorded under it).
    pub name: String,
    /// An interval such as `15m`, `1h 30m` or `90s`.
    pub every: Option<String>,
    /// A cron pattern such as `0 2 * * *` (minute hour day month weekday).
    pub cron: Option<String>,
    /// The IANA time zone the cron pattern is read in (default UTC).
    pub timezone: Option<String>,
    /// Builder names: one request each.
    pub builders: Vec<String>,
    /// Why (default: `schedule <name>`).
    pub reason: Option<String>,
    /// Buildset properties.
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// `one` (the default), `none` or `all`: what to do about ticks missed while no
    /// master ran.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// `true`: fire only when the sourcestamp's repository and branch have a newer
    /// revision; `{ property = "version" }`: only when a newer value of that buildset
    /// property was submitted.
    #[serde(default)]
    pub only_if_changed: OnlyIfChanged,
    /// The sourcestamp's repository.
    pub repository: Option<String>,
    /// The sourcestamp's branch.
    pub branch: Option<String>,
    /// The sourcestamp's revision.
    pub revision: Option<String>,
    /// The sourcestamp's project.
    pub project: Option<String>,
    /// The sourcestamp's codebase.
    pub codebase: Option<String>,
}

/// `[run]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The database file (relative to the config file); default: the CLI's `--db`.
    pub database: Option<PathBuf>,
    /// Where builds get their result directories; default `kiln-results` next to the
    /// database.
    pub results_dir: Option<PathBuf>,
    /// Where compiled plugins are cached; default `~/.cache/kiln/components`.
    pub cache_dir: Option<PathBuf>,
}

/// Limits in friendly units; each one left out keeps the default.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Wall-clock deadline in seconds.
    pub deadline_s: Option<f64>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Wasm stack in KiB.
    pub stack_kib: Option<u64>,
    /// Captured stdout and stderr, each, in KiB.
    pub output_kib: Option<u64>,
    /// Log volume in KiB.
    pub log_kib: Option<u64>,
    /// Return value size in KiB.
    pub return_kib: Option<u64>,
    /// Calls into the Kiln host.
    pub host_calls: Option<u64>,
    /// Outbound HTTP requests per build (to granted hosts only).
    pub http_requests: Option<u32>,
    /// HTTP body bytes sent and received per build, in MiB.
    pub http_mib: Option<u64>,
    /// One state string or progress status line, in KiB.
    pub status_kib: Option<u64>,
    /// Progress groups per build.
    pub progress_groups: Option<usize>,
    /// Build properties per build, in KiB.
    pub property_kib: Option<u64>,
    /// Child buildsets per build.
    pub children: Option<usize>,
    /// How deep a trigger tree may grow below a submitted buildset.
    pub trigger_depth: Option<u32>,
}

impl LimitsSection {
    /// These limits on top of `base`.
    fn apply(&self, base: Limits) -> Result<Limits, String> {
        let bytes =
            |v: Option<u64>, unit: u64, name: &str, default: usize| -> Result<usize, String> {
                match v {
                    None => Ok(default),
                    Some(v) => v
                        .checked_mul(unit)
                        .and_then(|b| usize::try_from(b).ok())
                        .ok_or_else(|| format!("{name} = {v} is too large")),
                }
            };
        let deadline = match self.deadline_s {
            None => base.deadline,
            Some(s) if s.is_finite() && s > 0.0 && s <= 7.0 * 86_400.0 => {
                Duration::from_secs_f64(s)
            }
            Some(s) => {
                return Err(format!(
                    "deadline_s = {s} must be more than 0 and at most a week"
                ));
            }
        };
        let limits = Limits {
            deadline,
            memory_bytes: bytes(self.memory_mib, 1 << 20, "memory_mib", base.memory_bytes)?,
            wasm_stack_bytes: bytes(self.stack_kib, 1 << 10, "stack_kib", base.wasm_stack_bytes)?,
            output_bytes: bytes(self.output_kib, 1 << 10, "output_kib", base.output_bytes)?,
            log_bytes: bytes(self.log_kib, 1 << 10, "log_kib", base.log_bytes)?,
            return_bytes: bytes(self.return_kib, 1 << 10, "return_kib", base.return_bytes)?,
            host_calls: self.host_calls.unwrap_or(base.host_calls),
            http_requests: self.http_requests.unwrap_or(base.http_requests),
            http_bytes: match self.http_mib {
                None => base.http_bytes,
                Some(mib) => mib
                    .checked_mul(1 << 20)
                    .ok_or_else(|| format!("http_mib = {mib} is too large"))?,
            },
        };
        limits.validate()?;
        Ok(limits)
    }

    /// What these limits say of what a build may write, on top of `base`.
    fn build_limits(&self, base: BuildLimits) -> Result<BuildLimits, String> {
        let kib = |v: Option<u64>, name: &str, default: usize| -> Result<usize, String> {
            match v {
                None => Ok(default),
                Some(v) => v
                    .checked_mul(1 << 10)
                    .and_then(|b| usize::try_from(b).ok())
                    .ok_or_else(|| format!("{name} = {v} is too large")),
            }
        };
        let limits = BuildLimits {
            status_bytes: kib(self.status_kib, "status_kib", base.status_bytes)?,
            progress_groups: self.progress_groups.unwrap_or(base.progress_groups),
            property_bytes: kib(self.property_kib, "property_kib", base.property_bytes)?,
            children: self.children.unwrap_or(base.children),
            trigger_depth: self.trigger_depth.unwrap_or(base.trigger_depth),
        };
        limits.validate()?;
        Ok(limits)
    }

    /// Whether any limit that only builds have is set (reporters have none of them).
    fn sets_build_limits(&self) -> bool {
        self.status_kib.is_some()
            || self.progress_groups.is_some()
            || self.property_kib.is_some()
            || self.children.is_some()
            || self.trigger_depth.is_some()
    }
}

/// `only_if_changed` of a schedule.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OnlyIfChanged {
    /// On (the sourcestamp decides) or off.
    On(bool),
    /// A property decides.
    Property {
        /// The buildset property watched.
        property: String,
    },
}

impl Default for OnlyIfChanged {
    fn default() -> Self {
        OnlyIfChanged::On(false)
    }
}

/// `[[builder]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderSection {
    /// Its unique name.
    pub name: String,
    /// `bundled:<name>` or a path to a `.wasm` component (relative to the config file).
    pub plugin: String,
    /// A human description.
    pub description: Option<String>,
    /// Positional arguments (any JSON-like TOML value).
    #[serde(default)]
    pub args: Option<toml::Value>,
    /// Keyword arguments (a table).
    #[serde(default)]
    pub kwargs: Option<toml::Value>,
    /// The most builds of it that run at once.
    pub max_concurrent: Option<u32>,
    /// Limits beyond `[defaults]`.
    #[serde(default)]
    pub limits: LimitsSection,
    /// What its jobs may see.
    #[serde(default)]
    pub grants: GrantsSection,
    /// Builders it depends on: names, or `{ builder = "...", build = N }` to pin a build.
    #[serde(default)]
    pub depends_on: Vec<DependencySection>,
    /// `fail` (the default) or `build`: what a build does when a dependency has no
    /// successful build.
    #[serde(default)]
    pub on_missing_dependency: MissingDependency,
    /// Automatic retries of its builds.
    #[serde(default)]
    pub retry: Option<RetrySection>,
    /// What of its finished work is kept.
    #[serde(default)]
    pub retention: Option<BuilderRetentionSection>,
    /// `true`, or `{ properties = true }`: collapse its queued requests with the same
    /// sourcestamps (and properties) into the newest.
    #[serde(default)]
    pub collapse: Option<CollapseSection>,
    /// The locks each of its builds takes before it starts.
    #[serde(default)]
    pub locks: Vec<LockUseSection>,
}

/// `collapse` of a builder.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CollapseSection {
    /// On (stamps decide) or off.
    On(bool),
    /// With options.
    With {
        /// Whether properties must match too.
        #[serde(default)]
        properties: bool,
    },
}

impl CollapseSection {
    fn collapse(&self) -> Option<Collapse> {
        match self {
            CollapseSection::On(false) => None,
            CollapseSection::On(true) => Some(Collapse { properties: false }),
            CollapseSection::With { properties } => Some(Collapse {
                properties: *properties,
            }),
        }
    }
}

/// `[builder.retry]`: EXCEPTION (and, with `on_failure`, FAILURE) runs the request again
/// after a backoff that doubles, until `attempts` builds have run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    /// Builds one request may run in all, the first included.
    pub attempts: u32,
    /// Whether FAILURE is retried too.
    #[serde(default)]
    pub on_failure: bool,
    /// The first wait, in seconds (it doubles each time).
    pub backoff_s: Option<f64>,
    /// The longest wait, in seconds.
    pub max_backoff_s: Option<f64>,
}

impl RetrySection {
    fn policy(&self) -> Result<RetryPolicy, String> {
        let defaults = RetryPolicy::default();
        let policy = RetryPolicy {
            attempts: self.attempts,
            on_failure: self.on_failure,
            backoff: seconds(self.backoff_s, "backoff_s", defaults.backoff)?,
            max_backoff: seconds(self.max_backoff_s, "max_backoff_s", defaults.max_backoff)?,
        };
        policy.check().map_err(|e| match e {
            kiln_engine::EngineError::Invalid(why) => format!("retry: {why}"),
            other => format!("retry: {other}"),
        })?;
        Ok(policy)
    }
}

/// One entry of `depends_on`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DependencySection {
    /// The latest successful build of a builder.
    Latest(String),
    /// A pinned build.
    Pinned(Dependency),
}

/// `[[reporter]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReporterSection {
    /// Its unique name: its place in the outbox is kept under it.
    pub name: String,
    /// `bundled:<name>` or a path to a `.wasm` component.
    pub plugin: String,
    /// The events it wants (default all): buildset_submitted, build_started,
    /// build_finished, buildset_complete.
    #[serde(default)]
    pub events: Vec<String>,
    /// The builders whose events it wants (default all).
    #[serde(default)]
    pub builders: Vec<String>,
    /// Its configuration, handed to every call.
    #[serde(default)]
    pub kwargs: Option<toml::Value>,
    /// Delivery attempts per event before it is dropped.
    pub max_attempts: Option<u32>,
    /// The first pause after a failed delivery, in seconds (it doubles each time).
    pub retry_first_s: Option<f64>,
    /// The longest pause, in seconds.
    pub retry_max_s: Option<f64>,
    /// Limits (deadline, memory, ...) beyond the reporter defaults.
    #[serde(default)]
    pub limits: LimitsSection,
    /// What it may see and reach.
    #[serde(default)]
    pub grants: GrantsSection,
}

/// `[builder.grants]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsSection {
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Directories.
    #[serde(default)]
    pub dirs: Vec<DirSection>,
    /// Hosts (`name` or `name:port`) its jobs (or the reporter) may reach over HTTP.
    #[serde(default)]
    pub http: Vec<String>,
}

/// One granted directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSection {
    /// The directory on the host (relative to the config file).
    pub host: PathBuf,
    /// Where the job sees it.
    pub guest: String,
    /// Whether the job may write there.
    #[serde(default)]
    pub writable: bool,
    /// Create the host directory if it does not exist.
    #[serde(default)]
    pub create: bool,
}

/// `[[submit]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitSection {
    /// Why.
    pub reason: Option<String>,
    /// Builder names: one request each.
    pub builders: Vec<String>,
    /// Buildset properties.
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// How many identical buildsets to submit.
    pub count: Option<u32>,
    /// The sourcestamp's repository.
    pub repository: Option<String>,
    /// The sourcestamp's branch.
    pub branch: Option<String>,
    /// The sourcestamp's revision.
    pub revision: Option<String>,
    /// The sourcestamp's project.
    pub project: Option<String>,
    /// The sourcestamp's codebase.
    pub codebase: Option<String>,
}

/// The most buildsets one `[[submit]]` entry may ask for.
const MAX_COUNT: u32 = 1_000_000;

/// A checked pipeline, ready to register and submit.
pub struct Pipeline {
    /// Each builder with its executor, in file order.
    pub builders: Vec<(BuilderConfig, WasmExecutor)>,
    /// Relationship policies by relationship name.
    pub policies: Vec<(String, WasmPolicy)>,
    /// Reporters, in file order.
    pub reporters: Vec<(ReporterConfig, WasmReporter)>,
    /// The buildsets to submit, in file order.
    pub submissions: Vec<Submission>,
    /// The schedules, in file order.
    pub schedules: Vec<ScheduleConfig>,
    /// `[retention]`, checked.
    pub retention: RetentionSettings,
    /// `[[lock]]`s: name and units, to define before the builders.
    pub locks: Vec<(String, u32)>,
}

/// The builder's `locks`, checked against the file's `[[lock]]`s.
fn lock_uses(
    here: &str,
    uses: &[LockUseSection],
    locks: &BTreeMap<&str, u32>,
    problems: &mut Vec<String>,
) -> Vec<LockUse> {
    let mut out: Vec<LockUse> = Vec::new();
    for entry in uses {
        let (name, units) = match entry {
            LockUseSection::Name(name) => (name, LockUnits::Count(1)),
            LockUseSection::With {
                name,
                count: Some(_),
                exclusive: true,
            } => {
                problems.push(format!(
                    "{here}: lock {name:?} says both count and exclusive"
                ));
                continue;
            }
            LockUseSection::With {
                name,
                exclusive: true,
                ..
            } => (name, LockUnits::Exclusive),
            LockUseSection::With { name, count, .. } => {
                (name, LockUnits::Count(count.unwrap_or(1)))
            }
        };
        let Some(capacity) = locks.get(name.as_str()) else {
            problems.push(format!(
                "{here} takes lock {name:?}, which the file does not declare as a [[lock]]"
            ));
            continue;
        };
        if let LockUnits::Count(n) = units
            && (n == 0 || n > *capacity)
        {
            problems.push(format!(
                "{here}: lock {name:?} has {capacity} units; a build cannot take {n}"
            ));
            continue;
        }
        if out.iter().any(|u| &u.name == name) {
            problems.push(format!("{here} lists lock {name:?} twice"));
            continue;
        }
        out.push(LockUse {
            name: name.clone(),
            units,
        });
    }
    out
}

/// How the engine runs retention, from `[retention]`; `None` keeps the engine's default.
#[derive(Debug, Default)]
pub struct RetentionSettings {
    pub interval: Option<Duration>,
    pub batch: Option<u32>,
    pub logs: Option<LogRetention>,
}

impl RetentionSettings {
    /// Applies the settings to an engine's configuration.
    pub fn apply(&self, config: &mut kiln_engine::EngineConfig) {
        if let Some(interval) = self.interval {
            config.retention_interval = interval;
        }
        if let Some(batch) = self.batch {
            config.retention_batch = batch;
        }
        if self.logs.is_some() {
            config.log_retention = self.logs;
        }
    }
}

impl RetentionSection {
    fn settings(&self, problems: &mut Vec<String>) -> RetentionSettings {
        let mut out = RetentionSettings::default();
        match self
            .interval_s
            .map(|s| seconds(Some(s), "interval_s", Duration::ZERO))
        {
            Some(Ok(interval)) => out.interval = Some(interval),
            Some(Err(e)) => problems.push(format!("[retention]: {e}")),
            None => {}
        }
        match self.batch {
            Some(0) => problems.push("[retention]: batch must be at least 1".into()),
            other => out.batch = other,
        }
        if let Some(keep) = self.logs_keep_days {
            let below = self.logs_below.as_deref().unwrap_or("info");
            match (
                days(keep, "logs_keep_days"),
                below.parse::<kiln_engine::model::LogLevel>(),
            ) {
                (Ok(keep_for), Ok(below)) => out.logs = Some(LogRetention { keep_for, below }),
                (Err(e), _) => problems.push(format!("[retention]: {e}")),
                (_, Err(e)) => problems.push(format!("[retention]: logs_below = {below:?}: {e}")),
            }
        } else if self.logs_below.is_some() {
            problems.push("[retention]: logs_below needs logs_keep_days".into());
        }
        out
    }
}

/// Reads a pipeline file and checks everything it can without running anything.
pub fn read(path: &Path) -> Result<(PathBuf, PipelineFile)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: PipelineFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((base, file))
}

/// A config path, relative to the config file unless absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn json(value: &toml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Checks the file and loads every plugin, reporting all problems at once. `submits`:
/// the caller submits the file's `[[submit]]` entries, so the file must declare some
/// (`kiln run`, `kiln serve --submit`); a server that only runs what clients submit
/// needs none.
pub async fn load(
    base: PathBuf,
    file: PipelineFile,
    host: &WasmHost,
    submits: bool,
) -> Result<Pipeline> {
    let mut problems: Vec<String> = Vec::new();
    if file.builders.is_empty() {
        problems.push("the file declares no [[builder]]".into());
    }
    if submits && file.submits.is_empty() {
        problems.push("the file declares nothing to [[submit]]".into());
    }
    let defaults = match file.defaults.apply(Limits::default()) {
        Ok(l) => l,
        Err(e) => {
            problems.push(format!("[defaults]: {e}"));
            Limits::default()
        }
    };
    let build_defaults = match file.defaults.build_limits(BuildLimits::default()) {
        Ok(l) => l,
        Err(e) => {
            problems.push(format!("[defaults]: {e}"));
            BuildLimits::default()
        }
    };
    let mut lock_map: BTreeMap<&str, u32> = BTreeMap::new();
    for lock in &file.locks {
        let here = format!("lock {:?}", lock.name);
        if lock.name.trim().is_empty() {
            problems.push("a [[lock]] has an empty name".into());
        } else if !(1..=kiln_engine::storage::MAX_LOCK_CAPACITY).contains(&lock.count) {
            problems.push(format!(
                "{here}: count must be within 1..={}",
                kiln_engine::storage::MAX_LOCK_CAPACITY
            ));
        } else if lock_map.insert(&lock.name, lock.count).is_some() {
            problems.push(format!("{here} is declared twice"));
        }
    }
    let mut names = BTreeSet::new();
    let mut loading = Vec::new();
    for b in &file.builders {
        let here = format!("builder {:?}", b.name);
        if b.name.trim().is_empty() {
            problems.push("a builder has an empty name".into());
        }
        if !names.insert(b.name.clone()) {
            problems.push(format!("{here} is declared twice"));
        }
        if b.max_concurrent == Some(0) {
            problems.push(format!("{here}: max_concurrent must be at least 1"));
        }
        let retry = match b.retry.as_ref().map(RetrySection::policy).transpose() {
            Ok(policy) => policy.unwrap_or_default(),
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        let retention = match &b.retention {
            None => None,
            Some(r) => match days(r.keep_days, "keep_days").and_then(|keep_for| {
                let policy = RetentionPolicy {
                    keep_for,
                    keep_last: r.keep_last,
                };
                policy.check().map(|()| policy).map_err(|e| match e {
                    kiln_engine::EngineError::Invalid(why) => why,
                    other => other.to_string(),
                })
            }) {
                Ok(policy) => Some(policy),
                Err(e) => {
                    problems.push(format!("{here}: retention: {e}"));
                    continue;
                }
            },
        };
        if let Some(kwargs) = &b.kwargs
            && !kwargs.is_table()
        {
            problems.push(format!("{here}: kwargs must be a table"));
        }
        let limits = match b.limits.apply(defaults) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        let build_limits = match b.limits.build_limits(build_defaults) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        let grants = match b.grants.to_grants(&base) {
            Ok(g) => g,
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        match plugin_bytes(&base, &b.plugin, &here) {
            Ok(bytes) => loading.push((b, limits, build_limits, grants, (retry, retention), bytes)),
            Err(e) => problems.push(e),
        }
    }
    let mut builders = Vec::new();
    for (b, limits, build_limits, grants, (retry, retention), bytes) in loading {
        let loaded = host.load_job(&b.plugin, Arc::from(bytes), &limits).await;
        match loaded.and_then(|plugin| WasmExecutor::new(plugin, limits, grants)) {
            Ok(executor) => {
                let mut config = BuilderConfig::new(&b.name);
                config.description = b.description.clone();
                config.max_concurrent = b.max_concurrent;
                config.limits = build_limits;
                config.retry = retry;
                config.retention = retention;
                config.collapse = b.collapse.as_ref().and_then(CollapseSection::collapse);
                config.locks = lock_uses(
                    &format!("builder {:?}", b.name),
                    &b.locks,
                    &lock_map,
                    &mut problems,
                );
                config.args = b.args.as_ref().map(json).unwrap_or(Value::Null);
                config.kwargs = b.kwargs.as_ref().map(json).unwrap_or(Value::Null);
                config.depends_on = b
                    .depends_on
                    .iter()
                    .map(|d| match d {
                        DependencySection::Latest(name) => Dependency::latest(name),
                        DependencySection::Pinned(dep) => dep.clone(),
                    })
                    .collect();
                config.on_missing_dependency = b.on_missing_dependency;
                if let Err(e) = config.check_dependencies() {
                    problems.push(e.to_string());
                }
                for dep in &config.depends_on {
                    if !names.contains(&dep.builder) {
                        problems.push(format!(
                            "builder {:?} depends on {:?}, which the file does not declare",
                            b.name, dep.builder
                        ));
                    }
                }
                builders.push((config, executor));
            }
            Err(e) => problems.push(format!("builder {:?}: {e}", b.name)),
        }
    }
    let graph: BTreeMap<String, Vec<String>> = builders
        .iter()
        .map(|(c, _)| {
            (
                c.name.clone(),
                c.depends_on.iter().map(|d| d.builder.clone()).collect(),
            )
        })
        .collect();
    if let Some(cycle) = find_cycle(&graph) {
        problems.push(format!("dependency cycle: {}", cycle.join(" -> ")));
    }
    let policies = load_policies(&base, &file.relationships, host, &mut problems).await;
    let reporters = load_reporters(&base, &file.reporters, host, &names, &mut problems).await;
    let mut submissions = Vec::new();
    for (i, s) in file.submits.iter().enumerate() {
        let here = format!("submit #{}", i + 1);
        for name in &s.builders {
            if !names.contains(name) {
                problems.push(format!(
                    "{here} names builder {name:?}, which the file does not declare"
                ));
            }
        }
        let count = s.count.unwrap_or(1);
        if count == 0 || count > MAX_COUNT {
            problems.push(format!("{here}: count must be within 1..={MAX_COUNT}"));
            continue;
        }
        let submission = submission_of(
            s.reason.clone().unwrap_or_else(|| "kiln run".into()),
            &s.builders,
            &s.properties,
            s.priority,
            [
                &s.repository,
                &s.branch,
                &s.revision,
                &s.project,
                &s.codebase,
            ],
        );
        submissions.extend(std::iter::repeat_n(submission, count as usize));
    }
    let schedules = schedules_of(&file.schedules, &names, &mut problems);
    let retention = file.retention.settings(&mut problems);
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        bail!(
            "the pipeline has {} problem{}:\n{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            list.join("\n")
        );
    }
    Ok(Pipeline {
        builders,
        policies,
        reporters,
        submissions,
        schedules,
        retention,
        locks: lock_map
            .into_iter()
            .map(|(name, count)| (name.to_owned(), count))
            .collect(),
    })
}

/// A submission from a `[[submit]]` or `[[schedule]]` entry's fields; `stamp` is the
/// sourcestamp's repository, branch, revision, project and codebase, any of them given.
fn submission_of(
    reason: String,
    builders: &[String],
    properties: &BTreeMap<String, toml::Value>,
    priority: i32,
    stamp: [&Option<String>; 5],
) -> Submission {
    let mut submission = Submission::new(reason).priority(priority);
    submission.builders = builders.to_vec();
    submission.properties = properties
        .iter()
        .map(|(k, v)| (k.clone(), Property::new(json(v), "config")))
        .collect();
    let [repository, branch, revision, project, codebase] = stamp;
    if stamp.iter().any(|f| f.is_some()) {
        submission.sourcestamps.push(SourceStamp {
            codebase: codebase.clone().unwrap_or_default(),
            repository: repository.clone().unwrap_or_default(),
            branch: branch.clone(),
            revision: revision.clone(),
            project: project.clone().unwrap_or_default(),
        });
    }
    submission
}

/// The `[[schedule]]` entries, checked: timing, builders, names.
fn schedules_of(
    sections: &[ScheduleSection],
    builders: &BTreeSet<String>,
    problems: &mut Vec<String>,
) -> Vec<ScheduleConfig> {
    let mut names = BTreeSet::new();
    let mut schedules = Vec::new();
    for s in sections {
        let here = format!("schedule {:?}", s.name);
        if !names.insert(s.name.clone()) {
            problems.push(format!("{here} is declared twice"));
        }
        for name in &s.builders {
            if !builders.contains(name) {
                problems.push(format!(
                    "{here} names builder {name:?}, which the file does not declare"
                ));
            }
        }
        let timing = match (&s.every, &s.cron) {
            (Some(every), None) => {
                if s.timezone.is_some() {
                    problems.push(format!("{here}: timezone applies to cron, not to every"));
                }
                match humantime::parse_duration(every) {
                    Ok(d) => Timing::Every {
                        seconds: d.as_secs(),
                    },
                    Err(e) => {
                        problems.push(format!(
                            "{here}: every = {every:?} is not an interval such as \"15m\" ({e})"
                        ));
                        continue;
                    }
                }
            }
            (None, Some(pattern)) => Timing::Cron {
                pattern: pattern.clone(),
                timezone: s.timezone.clone().unwrap_or_else(|| "UTC".into()),
            },
            _ => {
                problems.push(format!("{here}: give either every or cron"));
                continue;
            }
        };
        let config = ScheduleConfig {
            name: s.name.clone(),
            timing,
            submission: submission_of(
                s.reason.clone().unwrap_or_default(),
                &s.builders,
                &s.properties,
                s.priority,
                [
                    &s.repository,
                    &s.branch,
                    &s.revision,
                    &s.project,
                    &s.codebase,
                ],
            ),
            catch_up: s.catch_up,
            only_if_changed: !matches!(s.only_if_changed, OnlyIfChanged::On(false)),
            watch_property: match &s.only_if_changed {
                OnlyIfChanged::Property { property } => Some(property.clone()),
                OnlyIfChanged::On(_) => None,
            },
        };
        match config.check() {
            Ok(()) => schedules.push(config),
            Err(kiln_engine::EngineError::Invalid(why)) => problems.push(why),
            Err(e) => problems.push(format!("{here}: {e}")),
        }
    }
    schedules
}

impl GrantsSection {
    /// The grants, with host paths resolved against the config file's directory and
    /// directories marked `create` created.
    fn to_grants(&self, base: &Path) -> Result<Grants, String> {
        let mut dirs = Vec::new();
        for d in &self.dirs {
            let host = resolve(base, &d.host);
            if d.create {
                std::fs::create_dir_all(&host)
                    .map_err(|e| format!("cannot create {}: {e}", host.display()))?;
            }
            dirs.push(DirGrant {
                host,
                guest: d.guest.clone(),
                writable: d.writable,
            });
        }
        Ok(Grants {
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            dirs,
            http: HttpGrant {
                hosts: self.http.clone(),
            },
        })
    }
}

/// A plugin's bytes: `bundled:<name>` or a path relative to the config file.
fn plugin_bytes(base: &Path, spec: &str, here: &str) -> Result<Vec<u8>, String> {
    match spec.strip_prefix("bundled:") {
        Some(name) => kiln_bundled::get(name).map(<[u8]>::to_vec).ok_or_else(|| {
            format!(
                "{here}: there is no bundled plugin {name:?} (bundled: {})",
                kiln_bundled::names().collect::<Vec<_>>().join(", ")
            )
        }),
        None => {
            let path = resolve(base, Path::new(spec));
            std::fs::read(&path)
                .map_err(|e| format!("{here}: cannot read plugin {}: {e}", path.display()))
        }
    }
}

async fn load_policies(
    base: &Path,
    relationships: &BTreeMap<String, String>,
    host: &WasmHost,
    problems: &mut Vec<String>,
) -> Vec<(String, WasmPolicy)> {
    let mut policies = Vec::new();
    for (name, plugin) in relationships {
        let here = format!("relationship {name:?}");
        if name.trim().is_empty() {
            problems.push("a relationship has an empty name".into());
            continue;
        }
        let bytes = match plugin_bytes(base, plugin, &here) {
            Ok(b) => b,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let loaded = host.load_policy(plugin, Arc::from(bytes)).await;
        match loaded.and_then(|p| WasmPolicy::new(p, Limits::policy())) {
            Ok(policy) => policies.push((name.clone(), policy)),
            Err(e) => problems.push(format!("{here}: {e}")),
        }
    }
    policies
}

fn seconds(v: Option<f64>, name: &str, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(format!(
            "{name} = {s} must be more than 0 and at most a day"
        )),
    }
}

async fn load_reporters(
    base: &Path,
    sections: &[ReporterSection],
    host: &WasmHost,
    builders: &BTreeSet<String>,
    problems: &mut Vec<String>,
) -> Vec<(ReporterConfig, WasmReporter)> {
    let mut reporters = Vec::new();
    let mut names = BTreeSet::new();
    for r in sections {
        let here = format!("reporter {:?}", r.name);
        if !names.insert(r.name.clone()) {
            problems.push(format!("{here} is declared twice"));
        }
        let mut config = ReporterConfig::new(&r.name);
        let mut ok = true;
        for kind in &r.events {
            match kind.parse::<ReportKind>() {
                Ok(k) => {
                    config.events.insert(k);
                }
                Err(e) => {
                    problems.push(format!("{here}: {e}"));
                    ok = false;
                }
            }
        }
        for b in &r.builders {
            if !builders.contains(b) {
                problems.push(format!(
                    "{here} listens to builder {b:?}, which the file does not declare"
                ));
                ok = false;
            }
        }
        config.builders = r.builders.iter().cloned().collect();
        if let Some(n) = r.max_attempts {
            config.max_attempts = n;
        }
        match (
            seconds(r.retry_first_s, "retry_first_s", config.retry_first),
            seconds(r.retry_max_s, "retry_max_s", config.retry_max),
        ) {
            (Ok(first), Ok(max)) => {
                config.retry_first = first;
                config.retry_max = max.max(first);
            }
            (Err(e), _) | (_, Err(e)) => {
                problems.push(format!("{here}: {e}"));
                ok = false;
            }
        }
        if r.limits.sets_build_limits() {
            problems.push(format!(
                "{here}: status_kib, progress_groups, property_kib, children and trigger_depth are limits of builds, not of reporters"
            ));
        }
        let limits = match r.limits.apply(Limits::reporter()) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        let grants = match r.grants.to_grants(base) {
            Ok(g) => g,
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        let bytes = match plugin_bytes(base, &r.plugin, &here) {
            Ok(b) => b,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let kwargs = r.kwargs.as_ref().map(json).unwrap_or(Value::Null);
        let loaded = host.load_reporter(&r.plugin, Arc::from(bytes)).await;
        match loaded.and_then(|p| WasmReporter::new(p, kwargs, limits, grants)) {
            Ok(reporter) if ok => reporters.push((config, reporter)),
            Ok(_) => {}
            Err(e) => problems.push(format!("{here}: {e}")),
        }
    }
    reporters
}
