//! What each command does: open the database, call the engine's client, print.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use kiln_engine::model::{
    Build, BuildId, BuildsetId, LogLevel, LogQuery, Property, RequestId, SourceStamp,
};
use kiln_engine::storage::{
    BuildFilter, BuildsetFilter, ClaimFilter, RequestFilter, RequestOrder, RequestOrderField,
    StoreOptions,
};
use kiln_engine::{Client, Submission};
use serde::Serialize;
use serde_json::json;

use crate::cli::{
    CancelWhat, ClaimState, Cli, Command, ListWhat, LogsArgs, PluginWhat, ReporterWhat, ShowWhat,
    SubmitArgs,
};
use crate::render::{self, Table};

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Run { pipeline } => return crate::run::run(pipeline, &cli.db, cli.json).await,
        Command::Plugin {
            what: PluginWhat::Check { file },
        } => return plugin_check(file, cli.json),
        Command::Serve(args) => return crate::serve::serve(args, &cli.db).await,
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
        Command::Submit(args) => submit(&client, &out, args).await?,
        Command::List { what } => list(&client, &out, what).await?,
        Command::Show { what } => show(&client, &out, what).await?,
        Command::Logs(args) => logs(&client, &out, args).await?,
        Command::Cancel { what } => cancel(&client, &out, what).await?,
        Command::Run { .. } | Command::Plugin { .. } | Command::Serve(_) => unreachable_command()?,
        Command::Reporter {
            what: ReporterWhat::Remove { name },
        } => {
            client.store().reporter_remove(&name).await?;
            out.emit(&json!({ "removed": name }), || {
                println!("removed reporter {name}");
            })?;
        }
        Command::Resubmit { buildset, all } => {
            let submitted = client
                .resubmit(kiln_engine::model::BuildsetId(buildset), all)
                .await?;
            out.emit(&submitted, || {
                let builders: Vec<&str> = submitted.requests.keys().map(String::as_str).collect();
                println!(
                    "submitted buildset {} resubmitting buildset {buildset} for {}",
                    submitted.buildset_id,
                    builders.join(", ")
                );
            })?;
        }
        Command::Rebuild { build } => {
            let build = find_build(&client, &build).await?;
            let submitted = client.rebuild(build.id).await?;
            out.emit(&submitted, || {
                println!(
                    "submitted buildset {} rebuilding build {}",
                    submitted.buildset_id, build.id
                );
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Commands handled before the database is opened never reach the table below.
fn unreachable_command() -> Result<()> {
    bail!("internal error: this command is handled elsewhere")
}

/// `kiln plugin check`: which world a component satisfies, or why none.
fn plugin_check(file: &str, json_out: bool) -> Result<ExitCode> {
    let bytes = match file.strip_prefix("bundled:") {
        Some(name) => kiln_bundled::get(name)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| anyhow!("there is no bundled plugin {name:?}"))?,
        None => std::fs::read(file).with_context(|| format!("cannot read {file}"))?,
    };
    let host = kiln_engine::wasm::WasmHost::new(kiln_engine::wasm::WasmHostConfig::default());
    let report = host.check(&bytes)?;
    if json_out {
        let value = json!({
            "file": file,
            "world": report.world,
            "package": "kiln:plugin",
            "package_versions": report.package_versions,
            "imports": report.imports,
            "exports": report.exports,
            "problems": report.problems,
            "toolchain": report.toolchain,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match report.world {
            Some(world) => {
                let versions = if report.package_versions.is_empty() {
                    "?".to_owned()
                } else {
                    report.package_versions.join(", ")
                };
                println!("{file}: a `{world}` component, built against kiln:plugin@{versions}");
            }
            None => println!("{file}: not a Kiln plugin"),
        }
        if let Some(toolchain) = &report.toolchain {
            println!("built with: {toolchain}");
        }
        for problem in &report.problems {
            println!("  - {problem}");
        }
        if !report.imports.is_empty() {
            println!("imports: {}", report.imports.join(", "));
        }
        if !report.exports.is_empty() {
            println!("exports: {}", report.exports.join(", "));
        }
    }
    Ok(if report.world.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Out {
    json: bool,
}

impl Out {
    /// Prints `value` as JSON, or runs `human` to print it for people.
    fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce()) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human();
        }
        Ok(())
    }
}

fn parse_property(text: &str) -> Result<(String, serde_json::Value)> {
    let (name, value) = text.split_once('=').ok_or_else(|| {
        anyhow!("property {text:?} is not NAME=JSON (for example -p retries=3 or -p 'tag=\"v1\"')")
    })?;
    let name = name.trim();
    if name.is_empty() {
        bail!("property {text:?} has an empty name");
    }
    let value = serde_json::from_str(value).with_context(|| {
        format!("property {name:?}: {value:?} is not valid JSON (strings need quotes: -p '{name}=\"{value}\"')")
    })?;
    Ok((name.to_owned(), value))
}

async fn submit(client: &Client, out: &Out, args: SubmitArgs) -> Result<()> {
    let mut submission = Submission::new(args.reason).priority(args.priority);
    submission.builders = args.builders;
    submission.external_idstring = args.external_id;
    for text in &args.properties {
        let (name, value) = parse_property(text)?;
        if submission
            .properties
            .insert(name.clone(), Property::new(value, &args.property_source))
            .is_some()
        {
            bail!("property {name:?} is given twice");
        }
    }
    let stamp_given = args.repository.is_some()
        || args.branch.is_some()
        || args.revision.is_some()
        || args.project.is_some()
        || args.codebase.is_some();
    if stamp_given {
        submission.sourcestamps.push(SourceStamp {
            codebase: args.codebase.unwrap_or_default(),
            repository: args.repository.unwrap_or_default(),
            branch: args.branch,
            revision: args.revision,
            project: args.project.unwrap_or_default(),
        });
    }
    let submitted = client.submit(&submission).await?;
    out.emit(&submitted, || {
        println!("submitted buildset {}", submitted.buildset_id);
        let mut table = Table::new(&["builder", "request"]);
        for (builder, request) in &submitted.requests {
            table.row(vec![builder.clone(), request.to_string()]);
        }
        table.print();
    })
}

/// Builder names by id, for display.
async fn builder_names(client: &Client) -> Result<BTreeMap<i64, String>> {
    Ok(client
        .builders()
        .await?
        .into_iter()
        .map(|b| (b.id.0, b.name))
        .collect())
}

/// The id of an optional builder filter given by name.
async fn builder_id(
    client: &Client,
    name: Option<&str>,
) -> Result<Option<kiln_engine::model::BuilderId>> {
    Ok(match name {
        Some(name) => Some(client.builder_named(name).await?.id),
        None => None,
    })
}

fn name_of(names: &BTreeMap<i64, String>, id: i64) -> String {
    names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
}

fn parse_order(text: &str) -> Result<RequestOrder> {
    let (descending, field) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let field = match field {
        "id" => RequestOrderField::Id,
        "priority" => RequestOrderField::Priority,
        "submitted_at" => RequestOrderField::SubmittedAt,
        "builder" | "builderid" => RequestOrderField::BuilderId,
        "buildset" | "buildsetid" => RequestOrderField::BuildsetId,
        "complete_at" => RequestOrderField::CompleteAt,
        other => bail!(
            "cannot order by {other:?}: expected id, priority, submitted_at, builder, buildset or complete_at (prefix - for descending)"
        ),
    };
    Ok(RequestOrder { field, descending })
}

async fn list(client: &Client, out: &Out, what: ListWhat) -> Result<()> {
    match what {
        ListWhat::Buildsets { complete, page } => {
            let filter = BuildsetFilter {
                complete,
                limit: page.limit,
                offset: page.offset,
                ..Default::default()
            };
            let buildsets = client.buildsets(&filter).await?;
            out.emit(&json!({ "buildsets": buildsets }), || {
                let mut table =
                    Table::new(&["id", "status", "results", "reason", "submitted", "duration"]);
                for bs in &buildsets {
                    table.row(vec![
                        bs.id.to_string(),
                        if bs.complete { "complete" } else { "running" }.into(),
                        render::results(bs.results),
                        bs.reason.clone(),
                        render::time(bs.submitted_at),
                        render::duration(bs.submitted_at, bs.complete_at),
                    ]);
                }
                table.print();
            })
        }
        ListWhat::Requests {
            builder,
            buildset,
            complete,
            claimed,
            claimed_by,
            branch,
            repository,
            order,
            page,
        } => {
            let builder_id = builder_id(client, builder.as_deref()).await?;
            let claimed = match (claimed_by, claimed) {
                (Some(master), _) => {
                    let masters = client.masters().await?;
                    let found = masters
                        .iter()
                        .find(|m| m.name == master || m.id.to_string() == master)
                        .ok_or_else(|| anyhow!("unknown master {master:?}"))?;
                    ClaimFilter::ClaimedBy(found.id)
                }
                (None, ClaimState::Any) => ClaimFilter::Any,
                (None, ClaimState::Claimed) => ClaimFilter::Claimed,
                (None, ClaimState::Unclaimed) => ClaimFilter::Unclaimed,
            };
            let filter = RequestFilter {
                builder_id,
                buildset_id: buildset.map(BuildsetId),
                complete,
                claimed,
                branch,
                repository,
                order: order
                    .iter()
                    .map(|o| parse_order(o))
                    .collect::<Result<_>>()?,
                limit: page.limit,
                offset: page.offset,
            };
            let requests = client.requests(&filter).await?;
            let names = builder_names(client).await?;
            out.emit(&json!({ "buildrequests": requests }), || {
                let mut table = Table::new(&[
                    "id",
                    "buildset",
                    "builder",
                    "priority",
                    "status",
                    "results",
                    "submitted",
                ]);
                for r in &requests {
                    table.row(vec![
                        r.id.to_string(),
                        r.buildset_id.to_string(),
                        name_of(&names, r.builder_id.0),
                        r.priority.to_string(),
                        request_status(r),
                        render::results(r.results),
                        render::time(r.submitted_at),
                    ]);
                }
                table.print();
            })
        }
        ListWhat::Builds {
            builder,
            request,
            buildset,
            complete,
            page,
        } => {
            let builder_id = builder_id(client, builder.as_deref()).await?;
            let filter = BuildFilter {
                builder_id,
                request_id: request.map(RequestId),
                buildset_id: buildset.map(BuildsetId),
                complete,
                descending: false,
                limit: page.limit,
                offset: page.offset,
            };
            let builds = client.builds(&filter).await?;
            let names = builder_names(client).await?;
            out.emit(&json!({ "builds": builds }), || {
                builds_table(&names, &builds).print()
            })
        }
        ListWhat::Builders => {
            let builders = client.builders().await?;
            let mut rows = Vec::new();
            for b in &builders {
                let latest = client.store().build_latest_successful(b.id).await?;
                let status = client.builder_status(b).await?;
                rows.push(json!({
                    "builder": b,
                    "status": status,
                    "latest_successful_build": latest.as_ref().map(|l| l.id),
                }));
            }
            out.emit(&json!({ "builders": rows }), || {
                let mut table = Table::new(&[
                    "id",
                    "name",
                    "status",
                    "latest success",
                    "depends on",
                    "description",
                ]);
                for (b, row) in builders.iter().zip(&rows) {
                    let latest = row["latest_successful_build"]
                        .as_i64()
                        .map(|id| format!("build {id}"));
                    let status = row["status"].as_str().unwrap_or_default().replace('_', " ");
                    table.row(vec![
                        b.id.to_string(),
                        b.name.clone(),
                        status,
                        render::opt(latest),
                        b.depends_on.join(", "),
                        render::opt(b.description.clone()),
                    ]);
                }
                table.print();
            })
        }
        ListWhat::Masters => {
            let masters = client.masters().await?;
            out.emit(&json!({ "masters": masters }), || {
                let mut table = Table::new(&["id", "name", "active", "last heartbeat"]);
                for m in &masters {
                    table.row(vec![
                        m.id.to_string(),
                        m.name.clone(),
                        m.active.to_string(),
                        render::time(m.last_active),
                    ]);
                }
                table.print();
            })
        }
        ListWhat::Reporters => {
            let reporters = client.store().reporter_list().await?;
            out.emit(&json!({ "reporters": reporters }), || {
                let mut table = Table::new(&[
                    "name",
                    "delivered",
                    "pending",
                    "dropped",
                    "attempts",
                    "leased by",
                    "last error",
                ]);
                for r in &reporters {
                    table.row(vec![
                        r.name.clone(),
                        r.delivered.to_string(),
                        r.pending.to_string(),
                        r.dropped.to_string(),
                        r.attempts.to_string(),
                        render::opt(r.owner.map(|m| format!("master {m}"))),
                        render::opt(r.last_error.clone()),
                    ]);
                }
                table.print();
            })
        }
    }
}

fn request_status(r: &kiln_engine::model::BuildRequest) -> String {
    match (r.complete, r.claimed_by) {
        (true, _) => "complete".into(),
        (false, Some(m)) if r.cancel_requested => format!("cancelling (master {m})"),
        (false, Some(m)) => format!("claimed by master {m}"),
        (false, None) => "queued".into(),
    }
}

fn builds_table(names: &BTreeMap<i64, String>, builds: &[Build]) -> Table {
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
async fn find_build(client: &Client, text: &str) -> Result<Build> {
    if let Ok(id) = text.parse::<i64>() {
        return Ok(client.build(BuildId(id)).await?);
    }
    let (builder, number) = text
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("build {text:?} is neither an id nor BUILDER/NUMBER"))?;
    let number: i64 = number
        .parse()
        .map_err(|_| anyhow!("build {text:?}: {number:?} is not a build number"))?;
    Ok(client.build_by_number(builder, number).await?)
}

fn properties_table(properties: &kiln_engine::model::Properties) -> Table {
    let mut table = Table::new(&["name", "value", "source"]);
    for (name, p) in properties {
        table.row(vec![name.clone(), p.value.to_string(), p.source.clone()]);
    }
    table
}

async fn show(client: &Client, out: &Out, what: ShowWhat) -> Result<()> {
    let store = client.store();
    let names = builder_names(client).await?;
    match what {
        ShowWhat::Buildset { id } => {
            let id = BuildsetId(id);
            let buildset = client.buildset(id).await?;
            let properties = store.buildset_properties(id).await?;
            let sourcestamps = store.buildset_sourcestamps(id).await?;
            let requests = client
                .requests(&RequestFilter {
                    buildset_id: Some(id),
                    ..Default::default()
                })
                .await?;
            let value = json!({"buildset": buildset, "properties": properties, "sourcestamps": sourcestamps, "buildrequests": requests});
            out.emit(&value, || {
                println!(
                    "buildset {}: {} {}",
                    buildset.id,
                    if buildset.complete {
                        "complete"
                    } else {
                        "running"
                    },
                    render::results(buildset.results)
                );
                println!("  reason:        {}", buildset.reason);
                println!("  submitted:     {}", render::time(buildset.submitted_at));
                println!(
                    "  completed:     {}",
                    render::opt_time(buildset.complete_at)
                );
                println!(
                    "  external id:   {}",
                    render::opt(buildset.external_idstring.clone())
                );
                println!(
                    "  parent build:  {} {}",
                    render::opt(buildset.parent_buildid),
                    buildset.parent_relationship.clone().unwrap_or_default()
                );
                println!("  rebuilt build: {}", render::opt(buildset.rebuilt_buildid));
                println!("sourcestamps:");
                let mut table =
                    Table::new(&["repository", "branch", "revision", "project", "codebase"]);
                for s in &sourcestamps {
                    table.row(vec![
                        s.repository.clone(),
                        render::opt(s.branch.clone()),
                        render::opt(s.revision.clone()),
                        s.project.clone(),
                        s.codebase.clone(),
                    ]);
                }
                table.print();
                println!("properties:");
                properties_table(&properties).print();
                println!("requests:");
                let mut table = Table::new(&["id", "builder", "priority", "status", "results"]);
                for r in &requests {
                    table.row(vec![
                        r.id.to_string(),
                        name_of(&names, r.builder_id.0),
                        r.priority.to_string(),
                        request_status(r),
                        render::results(r.results),
                    ]);
                }
                table.print();
            })
        }
        ShowWhat::Request { id } => {
            let request = client.request(RequestId(id)).await?;
            let builds = client
                .builds(&BuildFilter {
                    request_id: Some(request.id),
                    ..Default::default()
                })
                .await?;
            out.emit(&json!({"buildrequest": request, "builds": builds}), || {
                println!(
                    "request {}: {} {}",
                    request.id,
                    request_status(&request),
                    render::results(request.results)
                );
                println!("  buildset:   {}", request.buildset_id);
                println!("  builder:    {}", name_of(&names, request.builder_id.0));
                println!("  priority:   {}", request.priority);
                println!("  waited for: {}", request.waited_for);
                println!("  submitted:  {}", render::time(request.submitted_at));
                println!("  claimed:    {}", render::opt_time(request.claimed_at));
                println!("  completed:  {}", render::opt_time(request.complete_at));
                println!("builds:");
                builds_table(&names, &builds).print();
            })
        }
        ShowWhat::Build { build } => {
            let build = find_build(client, &build).await?;
            let properties = store.build_properties(build.id).await?;
            let progress = client.progress(build.id).await?;
            let builder = name_of(&names, build.builder_id.0);
            out.emit(&json!({"build": build, "builder": builder, "properties": properties, "progress": progress}), || {
                println!("build {} ({builder} #{}): {}", build.id, build.number, render::results(build.results));
                println!("  state:     {}", build.state_string);
                println!("  request:   {}", build.request_id);
                println!("  master:    {} (slot {})", build.master_id, render::opt(build.worker_slot));
                println!("  started:   {}", render::time(build.started_at));
                println!("  finished:  {}", render::opt_time(build.complete_at));
                println!("  duration:  {}", render::duration(build.started_at, build.complete_at));
                println!("  locks:     {:.3}s", build.locks_duration_s);
                println!("  returned:  {}", render::opt(build.return_value.as_ref()));
                if let Some(error) = &build.error {
                    println!("  error:     {error}");
                }
                if let Some(traceback) = &build.traceback {
                    println!("traceback:\n{traceback}");
                }
                println!("properties:");
                properties_table(&properties).print();
                if !progress.children.is_empty() || progress.total > 0 {
                    println!("progress:");
                    let mut lines = Vec::new();
                    render::progress_lines(&progress, 0, &mut lines);
                    for line in lines {
                        println!("{line}");
                    }
                }
            })
        }
    }
}

async fn logs(client: &Client, out: &Out, args: LogsArgs) -> Result<()> {
    let build = find_build(client, &args.build).await?;
    let min_level: LogLevel = args.level.parse()?;
    let query = LogQuery {
        build_id: Some(build.id),
        min_level: Some(min_level),
        since: args.since.as_deref().map(render::parse_when).transpose()?,
        until: args.until.as_deref().map(render::parse_when).transpose()?,
        after_id: None,
        limit: args.limit,
    };
    let entries = client.logs(&query).await?;
    out.emit(&json!({ "logs": entries }), || {
        for e in &entries {
            let fields = if e.record.fields.is_empty() {
                String::new()
            } else {
                format!(" {}", serde_json::Value::Object(e.record.fields.clone()))
            };
            println!(
                "{} {:<8} {}{fields}",
                render::time(e.record.at),
                e.record.level.name().to_uppercase(),
                e.record.message
            );
        }
    })
}

async fn cancel(client: &Client, out: &Out, what: CancelWhat) -> Result<()> {
    let outcome = match what {
        CancelWhat::Request { id } => client.cancel_request(RequestId(id)).await?,
        CancelWhat::Buildset { id } => client.cancel_buildset(BuildsetId(id)).await?,
    };
    let value = json!({
        "cancelled": outcome.completed,
        "stopping": outcome.flagged,
        "buildsets_completed": outcome.buildsets_completed.iter().map(|b| json!({"buildset": b.buildset_id, "results": b.results})).collect::<Vec<_>>(),
    });
    out.emit(&value, || {
        if outcome.completed.is_empty() && outcome.flagged.is_empty() {
            println!("nothing to cancel: every request is already complete");
        }
        for id in &outcome.completed {
            println!("request {id} cancelled");
        }
        for id in &outcome.flagged {
            println!("request {id} is running; its master will stop the build");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_as_name_equals_json_and_reject_the_rest() {
        assert_eq!(parse_property("n=3").ok(), Some(("n".into(), json!(3))));
        assert_eq!(
            parse_property("tags=[\"a\"]").ok(),
            Some(("tags".into(), json!(["a"])))
        );
        assert_eq!(parse_property("eq==\"x\"").ok().map(|p| p.0), None);
        for bad in ["novalue", "=3", "s=text", "n="] {
            assert!(parse_property(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn order_fields_accept_a_minus_for_descending_and_reject_unknown_fields() {
        let o = parse_order("-priority").ok();
        assert_eq!(
            o,
            Some(RequestOrder {
                field: RequestOrderField::Priority,
                descending: true
            })
        );
        assert!(parse_order("colour").is_err());
    }
}
