//! The commands, one file each: open the database, call the engine's client, print.
//! Nothing here reaches the database except through [`Client`].

mod cancel;
mod list;
mod logs;
mod plugin;
mod rebuild;
mod reporter;
mod resubmit;
mod run;
mod serve;
mod show;
mod submit;

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use kiln_engine::Client;
use kiln_engine::model::{Build, BuildId};
use kiln_engine::storage::StoreOptions;
use serde::Serialize;

use crate::cli::{Cli, Command, DeleteWhat, PluginWhat, PruneWhat, ReporterWhat};
use crate::render::{self, Table};

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Run { pipeline } => return run::run(pipeline, &cli.db, cli.json).await,
        Command::Plugin {
            what: PluginWhat::Check { file },
        } => return plugin::check(file, cli.json),
        Command::Serve(args) => return serve::serve(args, &cli.db).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "kiln", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir)?;
            if !cli.json {
                println!("man pages written to {}", dir.display());
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    // Commands never create a database: a mistyped path must be an error, not an empty file.
    let options = StoreOptions {
        create_if_missing: false,
        ..StoreOptions::default()
    };
    let client = Client::open_with(&cli.db, &options).await?;
    let out = Out { json: cli.json };
    match cli.command {
        Command::Submit(args) => return submit::submit(&client, &out, args).await,
        Command::List { what } => list::list(&client, &out, what).await?,
        Command::Show { what } => show::show(&client, &out, what).await?,
        Command::Logs(args) => logs::logs(&client, &out, args).await?,
        Command::Cancel { what } => cancel::cancel(&client, &out, what).await?,
        Command::Run { .. }
        | Command::Plugin { .. }
        | Command::Serve(_)
        | Command::Completions { .. }
        | Command::Man { .. } => unreachable_command()?,
        Command::Reporter {
            what: ReporterWhat::Remove { name },
        } => reporter::remove(&client, &out, &name).await?,
        Command::Resubmit { buildset, all } => {
            resubmit::resubmit(&client, &out, buildset, all).await?
        }
        Command::Rebuild { build } => rebuild::rebuild(&client, &out, &build).await?,
        Command::Pause { builder } => pause(&client, &out, &builder, true).await?,
        Command::Delete { what } => delete(&client, &out, &cli.db, what).await?,
        Command::Prune {
            what: PruneWhat::Logs { older_than, below },
        } => {
            let older_than = crate::render::parse_when(&older_than)?;
            let below: kiln_engine::model::LogLevel = below
                .parse()
                .map_err(|e| anyhow!("--below {below:?}: {e}"))?;
            let pruned = client.prune_logs(older_than, below).await?;
            out.emit(&serde_json::json!({ "pruned": pruned }), || {
                println!("{pruned} log records deleted");
            })?
        }
        Command::Fire { schedule } => {
            let submitted = client.force_schedule(&schedule).await?;
            out.emit(&kiln_server::json::submitted(&submitted), || {
                println!(
                    "schedule {schedule} fired: buildset {}",
                    submitted.buildset_id
                );
            })?
        }
        Command::Resume { builder } => pause(&client, &out, &builder, false).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln delete buildset|build`: the database rows, then the result directories.
async fn delete(client: &Client, out: &Out, db: &str, what: DeleteWhat) -> Result<()> {
    let (what, builds, results_dir) = match what {
        DeleteWhat::Buildset { id, results_dir } => (
            format!("buildset {id}"),
            client
                .delete_buildset(kiln_engine::model::BuildsetId(id))
                .await?,
            results_dir,
        ),
        DeleteWhat::Build { id, results_dir } => (
            format!("build {id}"),
            vec![client.delete_build(BuildId(id)).await?],
            results_dir,
        ),
    };
    let root = results_dir.unwrap_or_else(|| run::default_results_dir(db));
    client.remove_result_dirs(&root, &builds).await;
    let ids: Vec<i64> = builds.iter().map(|b| b.id.0).collect();
    out.emit(
        &serde_json::json!({ "deleted": what, "builds": ids }),
        || {
            println!(
                "deleted {what} ({} build{})",
                ids.len(),
                if ids.len() == 1 { "" } else { "s" }
            );
        },
    )
}

/// `kiln pause` and `kiln resume`. Masters on PostgreSQL hear of a resume at once; on
/// SQLite a running `kiln serve` finds it at its next poll of the database.
async fn pause(client: &Client, out: &Out, name: &str, paused: bool) -> Result<()> {
    let builder = client.set_builder_paused(name, paused).await?;
    let status = client.builder_status(&builder).await?;
    let latest = client.latest_successful_build(builder.id).await?;
    let answer = kiln_server::json::builder(&builder, status, latest.as_ref());
    out.emit(&answer, || {
        if paused {
            println!(
                "builder {} paused: its requests stay queued until `kiln resume {}`",
                builder.name, builder.name
            );
        } else {
            println!("builder {} resumed", builder.name);
        }
    })
}

/// Commands handled before the database is opened never reach the table below.
fn unreachable_command() -> Result<()> {
    bail!("internal error: this command is handled elsewhere")
}

/// A collection in the API's shape: `{"<plural>": [...], "meta": {"total": N}}`.
pub(crate) fn listed(
    plural: &str,
    items: impl Iterator<Item = serde_json::Value>,
) -> serde_json::Value {
    let items: Vec<serde_json::Value> = items.collect();
    let total = items.len() as u64;
    kiln_server::json::collection(plural, items, total, &[])
}

/// How a command prints: JSON for programs, or text for people.
pub(crate) struct Out {
    json: bool,
}

impl Out {
    /// Prints `value` as JSON, or runs `human` to print it for people.
    pub(crate) fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce()) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human();
        }
        Ok(())
    }
}

/// Every builder's name by id.
/// Builder names by id, for display.
pub(crate) async fn builder_names(client: &Client) -> Result<BTreeMap<i64, String>> {
    Ok(client
        .builders()
        .await?
        .into_iter()
        .map(|b| (b.id.0, b.name))
        .collect())
}

pub(crate) fn name_of(names: &BTreeMap<i64, String>, id: i64) -> String {
    names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
}

pub(crate) fn request_status(r: &kiln_engine::model::BuildRequest) -> String {
    match (r.complete, r.claimed_by) {
        (true, _) => "complete".into(),
        (false, Some(m)) if r.cancel_requested => format!("cancelling (master {m})"),
        (false, Some(m)) => format!("claimed by master {m}"),
        (false, None) => "queued".into(),
    }
}

pub(crate) fn builds_table(names: &BTreeMap<i64, String>, builds: &[Build]) -> Table {
    let mut table = Table::new(&[
        "id", "builder", "number", "request", "results", "state", "started", "duration",
    ]);
    for b in builds {
        table.row(vec![
            b.id.to_string(),
            name_of(names, b.builder_id.0),
            b.number.to_string(),
            b.request_id.to_string(),
            render::results(b.results),
            b.state_string.clone(),
            render::time(b.started_at),
            render::duration(b.started_at, b.complete_at),
        ]);
    }
    table
}

/// A build by id (`42`) or by builder and number (`compile/7`).
pub(crate) async fn find_build(client: &Client, text: &str) -> Result<Build> {
    find_build_or_none(client, text)
        .await?
        .ok_or_else(|| anyhow!("builder {text:?} has no build yet"))
}

/// Like [`find_build`]; `None` for a builder's name when it has no build yet.
pub(crate) async fn find_build_or_none(client: &Client, text: &str) -> Result<Option<Build>> {
    if let Ok(id) = text.parse::<i64>() {
        return Ok(Some(client.build(BuildId(id)).await?));
    }
    let Some((builder, number)) = text.rsplit_once('/') else {
        // A builder's name: its latest build.
        let builder = client.builder_named(text).await.map_err(|_| {
            anyhow!("build {text:?} is neither an id, BUILDER/NUMBER nor a builder's name")
        })?;
        let q = kiln_engine::storage::Query::new()
            .eq(kiln_engine::storage::BuildField::BuilderId, builder.id)
            .order_by(kiln_engine::storage::BuildField::Id, true)
            .limit(1);
        return Ok(client.query_builds(&q).await?.items.pop());
    };
    let number: i64 = number
        .parse()
        .map_err(|_| anyhow!("build {text:?}: {number:?} is not a build number"))?;
    Ok(Some(client.build_by_number(builder, number).await?))
}
