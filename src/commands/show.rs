//! `kiln show`: one buildset, request or build, with what belongs to it.

use anyhow::Result;
use kiln_engine::Client;
use kiln_engine::model::{BuildsetId, RequestId};
use kiln_engine::storage::{BuildFilter, RequestFilter};
use serde_json::json;

use super::{Out, builder_names, builds_table, find_build, name_of, request_status};
use crate::cli::ShowWhat;
use crate::render::{self, Table};
use kiln_server::json as wire;

fn properties_table(properties: &kiln_engine::model::Properties) -> Table {
    let mut table = Table::new(&["name", "value", "source"]);
    for (name, p) in properties {
        table.row(vec![name.clone(), p.value.to_string(), p.source.clone()]);
    }
    table
}

pub(super) async fn show(client: &Client, out: &Out, what: ShowWhat) -> Result<()> {
    let names = builder_names(client).await?;
    match what {
        ShowWhat::Buildset { id } => {
            let id = BuildsetId(id);
            let buildset = client.buildset(id).await?;
            let properties = client.buildset_properties(id).await?;
            let sourcestamps = client.buildset_sourcestamps(id).await?;
            let requests = client
                .requests(&RequestFilter {
                    buildset_id: Some(id),
                    ..Default::default()
                })
                .await?;
            let mut one = wire::buildset(&buildset);
            one["sourcestamps"] = wire::sourcestamps(&sourcestamps);
            one["properties"] = wire::properties(&properties);
            let value = json!({
                "buildsets": [one],
                "buildrequests": requests.iter().map(wire::request).collect::<Vec<_>>(),
            });
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
            let value = json!({
                "buildrequests": [wire::request(&request)],
                "builds": builds.iter().map(wire::build).collect::<Vec<_>>(),
            });
            out.emit(&value, || {
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
            let properties = client.build_properties(build.id).await?;
            let progress = client.progress(build.id).await?;
            let builder = name_of(&names, build.builder_id.0);
            let mut one = wire::build(&build);
            one["properties"] = wire::properties(&properties);
            let value = json!({"builds": [one], "builder": builder, "progress": progress});
            out.emit(&value, || {
                println!(
                    "build {} ({builder} #{}): {}",
                    build.id,
                    build.number,
                    render::results(build.results)
                );
                println!("  state:     {}", build.state_string);
                println!("  request:   {}", build.request_id);
                println!(
                    "  master:    {} (slot {})",
                    build.master_id,
                    render::opt(build.worker_slot)
                );
                println!("  started:   {}", render::time(build.started_at));
                println!("  finished:  {}", render::opt_time(build.complete_at));
                println!(
                    "  duration:  {}",
                    render::duration(build.started_at, build.complete_at)
                );
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
