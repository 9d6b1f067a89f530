//! `kiln run <pipeline.toml>`: run a pipeline on an embedded database, show it live,
//! summarise it, exit non-zero if anything failed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_engine::model::{BuildId, BuildsetId, ResultCode};
use kiln_engine::storage::{self, BuildFilter};
use kiln_engine::wasm::{WasmHost, WasmHostConfig, default_cache_dir};
use kiln_engine::{Engine, EngineConfig, Event};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::pipeline::{self, resolve};
use crate::render::{self, Table};

/// How often the live view redraws.
const REDRAW: Duration = Duration::from_millis(100);
/// Running builds whose progress trees the live view shows at once.
const LIVE_TREES: usize = 8;
/// Finished builds the live view keeps on screen.
const LIVE_FINISHED: usize = 12;
/// How long `kiln run` waits at the end for reporters to deliver the last events.
const REPORTER_GRACE: Duration = Duration::from_secs(10);
/// Artifact paths the summary lists per build.
const SUMMARY_ARTIFACTS: usize = 5;

struct Line {
    builder: String,
    number: i64,
    results: Option<ResultCode>,
}

/// What the live view shows: the running builds and the last few that finished. Its
/// size is bounded by what runs at once, not by how many builds the run has had, so a
/// redraw costs the same after a hundred thousand builds as after ten.
#[derive(Default)]
struct Live {
    running: BTreeMap<BuildId, Line>,
    finished: std::collections::VecDeque<Line>,
}

impl Live {
    fn started(&mut self, id: BuildId, line: Line) {
        self.running.insert(id, line);
    }

    fn finished(&mut self, id: BuildId, line: Line) {
        self.running.remove(&id);
        self.finished.push_back(line);
        if self.finished.len() > LIVE_FINISHED {
            self.finished.pop_front();
        }
    }
}

/// An engine opened for a pipeline file, with its builders, policies and reporters
/// registered and its submissions ready.
/// Where builds' result directories are unless a file says: `kiln-results` next to a
/// SQLite database, or in the current directory.
pub fn default_results_dir(database: &str) -> PathBuf {
    if !storage::is_sqlite(database) {
        return PathBuf::from("kiln-results");
    }
    let path = database
        .strip_prefix("sqlite://")
        .or_else(|| database.strip_prefix("sqlite:"))
        .unwrap_or(database);
    let path = path.split('?').next().unwrap_or(path);
    Path::new(path)
        .parent()
        .unwrap_or(Path::new(""))
        .join("kiln-results")
}

pub struct Started {
    pub engine: Engine,
    pub host: std::sync::Arc<WasmHost>,
    /// The database as given: a SQLite path or a URL.
    pub database: String,
    pub results_dir: PathBuf,
    pub submissions: Vec<kiln_engine::Submission>,
    pub reporters: Vec<String>,
    /// The file's schedules: `kiln serve` registers them; `kiln run` does not fire them.
    pub schedules: Vec<kiln_engine::ScheduleConfig>,
}

/// Reads and checks a pipeline file, opens its database (the file's, else `db`) and
/// registers everything it declares. `submits`: the caller will submit the file's
/// `[[submit]]` entries, which must then exist.
pub async fn start(
    path: &Path,
    db: &str,
    submits: bool,
    tune: impl FnOnce(EngineConfig) -> EngineConfig,
) -> Result<Started> {
    let (base, file) = pipeline::read(path)?;
    let database = file
        .run
        .database
        .as_ref()
        .map(|p| resolve(&base, p).display().to_string())
        .unwrap_or_else(|| db.to_owned());
    let results_dir = file
        .run
        .results_dir
        .as_ref()
        .map(|p| resolve(&base, p))
        .unwrap_or_else(|| default_results_dir(&database));
    let cache_dir = file
        .run
        .cache_dir
        .as_ref()
        .map(|p| resolve(&base, p))
        .or_else(default_cache_dir);
    let host = std::sync::Arc::new(WasmHost::new(WasmHostConfig {
        cache_dir,
        ..WasmHostConfig::default()
    }));
    let pipeline = pipeline::load(base, file, &host, submits).await?;

    let mut config = EngineConfig::new(storage::database_url(&database)).results_dir(&results_dir);
    pipeline.retention.apply(&mut config);
    let config = tune(config);
    let engine = Engine::open(config)
        .await
        .with_context(|| format!("opening {}", storage::display_url(&database)))?;
    // Policies and reporters first: a builder may start queued work the moment it is
    // registered, and that work must find its policies and have its events recorded.
    for (relationship, policy) in pipeline.policies {
        engine.set_policy(relationship, policy);
    }
    let reporters: Vec<String> = pipeline
        .reporters
        .iter()
        .map(|(c, _)| c.name.clone())
        .collect();
    for (config, reporter) in pipeline.reporters {
        engine.register_reporter(config, reporter).await?;
    }
    for (name, count) in &pipeline.locks {
        engine.define_lock(name, *count).await?;
    }
    for (config, executor) in pipeline.builders {
        engine.register_builder(config, executor).await?;
    }
    Ok(Started {
        engine,
        host,
        database,
        results_dir,
        submissions: pipeline.submissions,
        reporters,
        schedules: pipeline.schedules,
    })
}

/// Runs the pipeline at `path`; `db` is the CLI's database unless the file names one.
pub async fn run(path: &Path, db: &str, json_out: bool) -> Result<ExitCode> {
    let Started {
        engine,
        database,
        results_dir,
        submissions,
        reporters: reporter_names,
        schedules,
        ..
    } = start(path, db, true, |config| config).await?;
    if !schedules.is_empty() && !json_out {
        eprintln!(
            "kiln run: the file's {} schedule{} fire only under kiln serve",
            schedules.len(),
            if schedules.len() == 1 { "" } else { "s" }
        );
    }
    let mut events = engine.subscribe();
    let submitted = engine.submit_many(&submissions).await?;
    let mut open: BTreeSet<BuildsetId> = submitted.iter().map(|s| s.buildset_id).collect();
    let ours = open.clone();
    if !json_out {
        println!(
            "kiln run: {} buildset{} on {}, results in {}",
            open.len(),
            if open.len() == 1 { "" } else { "s" },
            storage::display_url(&database),
            results_dir.display()
        );
    }

    let live = !json_out && std::io::stdout().is_terminal();
    let mut lines = Live::default();
    let mut view = live.then(LiveView::new);
    let mut interrupted = false;
    let mut redraw = tokio::time::interval(REDRAW);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // Buildsets that completed before we subscribed, or in another process.
    for id in ours.iter() {
        if engine.client().buildset(*id).await?.complete {
            open.remove(id);
        }
    }
    while !open.is_empty() {
        tokio::select! {
            event = events.recv() => match event {
                // Every build this engine runs belongs to the run: its own buildsets and
                // the children their builds trigger.
                Ok(Event::BuildStarted { build_id, builder, number, .. }) => {
                    if !live && !json_out {
                        println!("  started  {builder} #{number}");
                    }
                    lines.started(build_id, Line { builder, number, results: None });
                }
                Ok(Event::BuildFinished { build_id, builder, number, results, .. }) => {
                    if !live && !json_out {
                        println!("  finished {builder} #{number}: {results}");
                    }
                    lines.finished(build_id, Line { builder, number, results: Some(results) });
                }
                Ok(Event::BuildsetComplete { buildset_id, .. }) => {
                    open.remove(&buildset_id);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    for id in open.clone() {
                        if engine.client().buildset(id).await?.complete {
                            open.remove(&id);
                        }
                    }
                }
                Err(RecvError::Closed) => break,
            },
            _ = redraw.tick(), if live => {
                if let Some(view) = view.as_mut() {
                    view.show(&live_lines(&engine, &lines).await);
                }
            }
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                eprintln!("\ninterrupted: cancelling the pipeline's buildsets");
                for id in &open {
                    engine.cancel_buildset(*id).await?;
                }
            }
        }
    }
    if let Some(view) = view {
        view.clear();
    }
    let code = summary(&engine, &ours, json_out).await?;
    if !reporter_names.is_empty() && !interrupted {
        // Give reporters a moment to deliver the last events; what they do not deliver
        // stays in the outbox for the next run on this database.
        if !engine
            .reporters_caught_up(&reporter_names, REPORTER_GRACE)
            .await
            && !json_out
        {
            println!(
                "reporters: some events are still undelivered; they stay in the outbox for the next run"
            );
        }
    }
    engine.shutdown().await;
    Ok(if interrupted {
        ExitCode::from(130)
    } else {
        code
    })
}

/// The live view on a terminal: one indicatif line per finished build, running build
/// and progress group, redrawn in place; indicatif measures and cuts lines by display
/// width, so wide characters neither wrap nor break the redraw.
struct LiveView {
    multi: indicatif::MultiProgress,
    bars: Vec<indicatif::ProgressBar>,
    style: indicatif::ProgressStyle,
}

impl LiveView {
    fn new() -> LiveView {
        let style = indicatif::ProgressStyle::with_template("{wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        LiveView {
            multi: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::stdout(),
            ),
            bars: Vec::new(),
            style,
        }
    }

    /// Shows `lines`, one bar each, adding or removing bars as their number changes.
    fn show(&mut self, lines: &[String]) {
        while self.bars.len() < lines.len() {
            let bar = self
                .multi
                .add(indicatif::ProgressBar::new_spinner().with_style(self.style.clone()));
            self.bars.push(bar);
        }
        while self.bars.len() > lines.len() {
            if let Some(bar) = self.bars.pop() {
                bar.finish_and_clear();
                self.multi.remove(&bar);
            }
        }
        for (bar, line) in self.bars.iter().zip(lines) {
            bar.set_message(line.clone());
        }
    }

    /// Removes the view, leaving the terminal as it was before it.
    fn clear(self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

/// The live view's lines: finished builds, then running builds with their progress.
async fn live_lines(engine: &Engine, lines: &Live) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in &lines.finished {
        out.push(format!(
            "  {:<24} {}",
            format!("{} #{}", line.builder, line.number),
            render::results(line.results)
        ));
    }
    let running = &lines.running;
    for (id, line) in running.iter().take(LIVE_TREES) {
        let tree = engine.client().progress(*id).await.ok();
        let label = format!("{} #{}", line.builder, line.number);
        match tree {
            Some(tree) => {
                out.push(format!("  {label:<24} {}", render::bar(&tree)));
                for group in &tree.children {
                    render::progress_lines(group, 2, &mut out);
                }
            }
            None => out.push(format!("  {label:<24} running")),
        }
    }
    if running.len() > LIVE_TREES {
        out.push(format!(
            "  ... and {} more running",
            running.len() - LIVE_TREES
        ));
    }
    out
}

/// Prints the summary and returns the exit code: 0 unless a buildset ended worse than
/// WARNINGS.
async fn summary(engine: &Engine, ours: &BTreeSet<BuildsetId>, json_out: bool) -> Result<ExitCode> {
    let client = engine.client();
    let names: BTreeMap<i64, String> = client
        .builders()
        .await?
        .into_iter()
        .map(|b| (b.id.0, b.name))
        .collect();
    let mut worst: Option<ResultCode> = None;
    let mut rows = Vec::new();
    let mut table = Table::new(&[
        "builder",
        "build",
        "result",
        "duration",
        "artifacts",
        "error",
    ]);
    let mut listed = Vec::new();
    // Each top-level buildset's builds, each followed by the child buildsets it
    // triggered (depth first).
    enum Item {
        Buildset(BuildsetId, usize),
        Build(Box<kiln_engine::model::Build>, usize),
    }
    let mut stack: Vec<Item> = ours.iter().rev().map(|id| Item::Buildset(*id, 0)).collect();
    while let Some(item) = stack.pop() {
        let (build, depth) = match item {
            Item::Buildset(id, depth) => {
                let buildset = client.buildset(id).await?;
                if depth == 0 {
                    worst = ResultCode::worst_of(worst.into_iter().chain(buildset.results));
                }
                let builds = client
                    .builds(&BuildFilter {
                        buildset_id: Some(id),
                        ..Default::default()
                    })
                    .await?;
                stack.extend(
                    builds
                        .into_iter()
                        .rev()
                        .map(|b| Item::Build(Box::new(b), depth)),
                );
                continue;
            }
            Item::Build(build, depth) => (*build, depth),
        };
        {
            let children = client
                .buildsets(&kiln_engine::storage::BuildsetFilter {
                    parent_buildid: Some(build.id),
                    ..Default::default()
                })
                .await?;
            // Listed newest first: pushing in that order pops the oldest first.
            stack.extend(children.iter().map(|c| Item::Buildset(c.id, depth + 1)));
            let artifacts = client.build_artifacts(build.id).await?;
            let builder = names.get(&build.builder_id.0).cloned().unwrap_or_default();
            let indent = if depth == 0 {
                String::new()
            } else {
                format!("{}└ ", "  ".repeat(depth - 1))
            };
            table.row(vec![
                format!("{indent}{builder}"),
                format!("#{}", build.number),
                render::results(build.results),
                render::duration(build.started_at, build.complete_at),
                artifacts.len().to_string(),
                build
                    .error
                    .clone()
                    .map(|e| e.lines().next().unwrap_or_default().to_owned())
                    .unwrap_or_default(),
            ]);
            for a in artifacts.iter().take(SUMMARY_ARTIFACTS) {
                listed.push(format!("  {builder} #{}: {}", build.number, a.location));
            }
            if artifacts.len() > SUMMARY_ARTIFACTS {
                listed.push(format!(
                    "  {builder} #{}: ... and {} more",
                    build.number,
                    artifacts.len() - SUMMARY_ARTIFACTS
                ));
            }
            rows.push(json!({
                "builder": builder,
                "depth": depth,
                "build": kiln_server::json::build(&build),
                "artifacts": artifacts,
            }));
        }
    }
    let ok = worst.is_none_or(|r| {
        matches!(
            r,
            ResultCode::Success | ResultCode::Warnings | ResultCode::Skipped
        )
    });
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "results": kiln_server::json::result_number(worst),
                "builds": rows,
            }))?
        );
    } else {
        table.print();
        if !listed.is_empty() {
            println!("artifacts:");
            for line in &listed {
                println!("{line}");
            }
        }
        println!("result: {}", render::results(worst));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
