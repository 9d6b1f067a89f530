//! The command line, as clap parses it.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Kiln: an embeddable scheduling engine for builds and jobs.
///
/// Every command works on a Kiln database: a SQLite file (default `kiln.db` in the
/// current directory), a `sqlite://` URL, or a `postgres://` URL. Output is a table for people; add `--json`
/// for scripts.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true)]
pub struct Cli {
    /// The database: a SQLite file path, a sqlite:// URL, or a postgres:// URL for a
    /// database several masters share.
    #[arg(long, global = true, env = "KILN_DATABASE", default_value = "kiln.db")]
    pub db: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline file: register its WASM builders, submit its buildsets, show them
    /// live, print a summary, exit non-zero if any build failed.
    Run {
        /// The pipeline file (TOML); see the README for its format.
        pipeline: std::path::PathBuf,
    },
    /// Serve the HTTP API (/api/v2) and the dashboard (/) while running the builders,
    /// policies and reporters of a pipeline file.
    Serve(ServeArgs),
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        what: PluginWhat,
    },
    /// Manage reporters registered in the database.
    Reporter {
        #[command(subcommand)]
        what: ReporterWhat,
    },
    /// Submit a buildset: one build request per builder.
    Submit(SubmitArgs),
    /// List buildsets, build requests, builds, builders or masters.
    List {
        #[command(subcommand)]
        what: ListWhat,
    },
    /// Show one buildset, build request or build in full.
    Show {
        #[command(subcommand)]
        what: ShowWhat,
    },
    /// Print a build's log records.
    Logs(LogsArgs),
    /// Cancel a build request or every open request of a buildset.
    Cancel {
        #[command(subcommand)]
        what: CancelWhat,
    },
    /// Delete finished work with its logs, progress, properties and result directories.
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Delete old log records below a level.
    Prune {
        #[command(subcommand)]
        what: PruneWhat,
    },
    /// Fire a schedule now, whatever its timing says (its own ticks are not moved).
    Fire {
        /// The schedule's name.
        schedule: String,
    },
    /// Pause a builder for every master sharing the database: its requests stay queued
    /// and nobody claims them until it is resumed; running builds finish.
    Pause {
        /// The builder's name.
        builder: String,
    },
    /// Resume a paused builder: its queued requests run again, highest priority first.
    Resume {
        /// The builder's name.
        builder: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages: kiln.1 and one per command, into a directory.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, default_value = "man")]
        dir: std::path::PathBuf,
    },
    /// Submit a new buildset that repeats a build (same builder, stamps and properties).
    Rebuild {
        /// The build: an id, or BUILDER/NUMBER.
        build: String,
    },
    /// Submit a new buildset that runs again the builders of a buildset whose requests
    /// failed or were cancelled (Copr's resubmit).
    Resubmit {
        /// The buildset id.
        buildset: i64,
        /// Run every builder of the buildset again, not only the failed ones.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A pipeline file whose builders, policies and reporters this server runs; without
    /// one it serves the database and runs nothing.
    pub config: Option<std::path::PathBuf>,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8010")]
    pub listen: String,
    /// The bearer token writes need (submit, cancel, rebuild, upload, ...); without one
    /// the server is read-only.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Reads need the token too.
    #[arg(long)]
    pub private_reads: bool,
    /// Where uploaded plugins are kept; without it uploads are refused.
    #[arg(long)]
    pub plugins_dir: Option<std::path::PathBuf>,
    /// Also submit the config's [[submit]] entries when the server starts.
    #[arg(long, requires = "config")]
    pub submit: bool,
    /// This master's name, unique among the masters sharing the database (default: the
    /// host name and process id).
    #[arg(long)]
    pub master: Option<String>,
    /// Seconds between this master's heartbeats (default 10).
    #[arg(long, value_parser = seconds)]
    pub heartbeat_interval: Option<std::time::Duration>,
    /// Seconds of silence after which another master expires this one and runs its work
    /// elsewhere (default 60). Every master sharing a database should use the same value.
    #[arg(long, value_parser = seconds)]
    pub master_expiry: Option<std::time::Duration>,
    /// Seconds between looks at the database for work that no notification announced
    /// (default 1).
    #[arg(long, value_parser = seconds)]
    pub poll_interval: Option<std::time::Duration>,
    /// Connections open at once; past it new ones are answered 503.
    #[arg(long, default_value_t = kiln_server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a request's head may take to arrive; an idle keep-alive connection is
    /// closed after as long.
    #[arg(long, value_parser = seconds, default_value = "10")]
    pub header_timeout: std::time::Duration,
}

/// A positive number of seconds, such as `10` or `0.5`.
fn seconds(text: &str) -> Result<std::time::Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{text} must be more than 0 seconds"));
    }
    std::time::Duration::try_from_secs_f64(value).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A builder to run (repeat for several).
    #[arg(long = "builder", short = 'b', required = true)]
    pub builders: Vec<String>,
    /// Why the work is submitted.
    #[arg(long, default_value = "submitted from the command line")]
    pub reason: String,
    /// A property as NAME=JSON (repeat for several), e.g. `-p retries=3 -p 'tags=["a"]'`.
    #[arg(long = "property", short = 'p')]
    pub properties: Vec<String>,
    /// The source recorded for the properties.
    #[arg(long, default_value = "cli")]
    pub property_source: String,
    /// Higher runs first (-1000..=1000).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// An identifier of your choosing, stored with the buildset.
    #[arg(long)]
    pub external_id: Option<String>,
    /// Make the submit idempotent: while a buildset with this key exists, submitting
    /// again with it prints that buildset and adds nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A delayed run: not before this time, an RFC 3339 time or a delay from now such as
    /// 90s, 15m, 2h, 3d. Until then the requests wait as scheduled.
    #[arg(long, value_name = "WHEN")]
    pub not_before: Option<String>,
    /// The repository of the sourcestamp to build.
    #[arg(long)]
    pub repository: Option<String>,
    /// The branch of the sourcestamp.
    #[arg(long)]
    pub branch: Option<String>,
    /// The revision (git hash) of the sourcestamp.
    #[arg(long)]
    pub revision: Option<String>,
    /// The project of the sourcestamp.
    #[arg(long)]
    pub project: Option<String>,
    /// The codebase of the sourcestamp.
    #[arg(long)]
    pub codebase: Option<String>,
    /// Wait until the buildset completes, then exit with its result: 0 for SUCCESS,
    /// WARNINGS or SKIPPED, 1 otherwise.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ClaimState {
    /// Claimed or not.
    Any,
    /// Claimed by some master.
    Claimed,
    /// Not claimed and not complete.
    Unclaimed,
}

#[derive(Debug, Args)]
pub struct Page {
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Skip this many rows first.
    #[arg(long)]
    pub offset: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum ListWhat {
    /// Buildsets, newest first.
    Buildsets {
        /// Only complete (true) or incomplete (false) ones.
        #[arg(long)]
        complete: Option<bool>,
        /// Only these results (SUCCESS, FAILURE, ... or Buildbot's numbers); repeat for
        /// any of several.
        #[arg(long = "results")]
        results: Vec<String>,
        /// Order by a field (id, submitted_at, complete_at, results, reason, ...);
        /// prefix with - for descending; repeat for several keys. Default: -id.
        #[arg(long, allow_hyphen_values = true)]
        order: Vec<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Build requests, newest first unless ordered.
    Requests {
        /// Only this builder's.
        #[arg(long)]
        builder: Option<String>,
        /// Only this buildset's.
        #[arg(long)]
        buildset: Option<i64>,
        /// Only complete (true) or incomplete (false) ones.
        #[arg(long)]
        complete: Option<bool>,
        /// By claim.
        #[arg(long, value_enum, default_value_t = ClaimState::Any, conflicts_with = "claimed_by")]
        claimed: ClaimState,
        /// Only requests claimed by this master (name or id).
        #[arg(long)]
        claimed_by: Option<String>,
        /// Only requests whose buildset has a stamp on this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Only requests whose buildset has a stamp from this repository.
        #[arg(long)]
        repository: Option<String>,
        /// Order by a field (id, priority, submitted_at, builder, buildset, complete_at);
        /// prefix with - for descending; repeat for several keys.
        #[arg(long, allow_hyphen_values = true)]
        order: Vec<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Builds, newest first.
    Builds {
        /// Only this builder's.
        #[arg(long)]
        builder: Option<String>,
        /// Only builds of this request.
        #[arg(long)]
        request: Option<i64>,
        /// Only builds of this buildset.
        #[arg(long)]
        buildset: Option<i64>,
        /// Only finished (true) or running (false) ones.
        #[arg(long)]
        complete: Option<bool>,
        /// Only these results (SUCCESS, FAILURE, ... or Buildbot's numbers); repeat for
        /// any of several.
        #[arg(long = "results")]
        results: Vec<String>,
        /// Order by a field (id, number, started_at, complete_at, results, ...);
        /// prefix with - for descending; repeat for several keys. Default: -id.
        #[arg(long, allow_hyphen_values = true)]
        order: Vec<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Builders, with their status (not built, failed, success, outdated), dependencies
    /// and latest successful build.
    Builders,
    /// Masters (engine processes).
    Masters,
    /// Reporters: how far each got through the outbox, what it dropped, its last error.
    Reporters,
    /// Schedules: timing, last and next fire, the last buildset each made.
    Schedules,
    /// Locks: units held of the count, the builders taking each, holding builds and
    /// waiting requests.
    Locks,
}

#[derive(Debug, Subcommand)]
pub enum ShowWhat {
    /// A buildset with its properties, sourcestamps and requests.
    Buildset {
        /// The buildset id.
        id: i64,
    },
    /// A build request with its builds.
    Request {
        /// The request id.
        id: i64,
    },
    /// A build with its properties and progress.
    Build {
        /// The build: an id, or BUILDER/NUMBER.
        build: String,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The build: an id, BUILDER/NUMBER, or a builder's name for its latest build.
    pub build: String,
    /// Keep printing new records as they are written, until the build ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only records at this level or above (debug, info, warning, error, critical).
    #[arg(long, default_value = "debug")]
    pub level: String,
    /// Only records written since then: an RFC 3339 time or an age such as 90s, 15m, 2h, 3d.
    #[arg(long)]
    pub since: Option<String>,
    /// Only records written before then (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum DeleteWhat {
    /// A complete buildset: its requests and builds go with it (buildsets its builds
    /// triggered stay). An incomplete one is refused: cancel it first.
    Buildset {
        /// The buildset id.
        id: i64,
        /// Where its builds' result directories are (default: kiln-results next to a
        /// SQLite database); they are removed too.
        #[arg(long)]
        results_dir: Option<std::path::PathBuf>,
    },
    /// A finished build (a running one is refused).
    Build {
        /// The build id.
        id: i64,
        /// As for buildsets.
        #[arg(long)]
        results_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PruneWhat {
    /// Log records older than `--older-than` below `--below`.
    Logs {
        /// An age such as 7d, 12h, or an RFC 3339 time.
        #[arg(long)]
        older_than: String,
        /// Records at this level and above stay: debug, info, warning, error, critical.
        #[arg(long, default_value = "info")]
        below: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CancelWhat {
    /// One build request: unclaimed, it completes as CANCELLED; running, its build is stopped.
    Request {
        /// The request id.
        id: i64,
    },
    /// Every open request of a buildset.
    Buildset {
        /// The buildset id.
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReporterWhat {
    /// Forget a reporter that no config uses any more: its undelivered events stop
    /// holding the outbox back. A config that names it again starts it afresh.
    Remove {
        /// The reporter's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginWhat {
    /// Say which Kiln world a component satisfies, or exactly why it satisfies none.
    Check {
        /// A .wasm file, or bundled:<name>.
        file: String,
    },
}
