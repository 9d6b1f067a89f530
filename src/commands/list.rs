//! `kiln list`: buildsets, requests, builds, builders, masters and reporters as tables.

use anyhow::{Result, anyhow, bail};
use kiln_engine::Client;
use kiln_engine::model::{BuildsetId, RequestId, ResultCode};
use kiln_engine::storage::{
    BuildField, BuildsetField, ClaimFilter, Field, Filter, FilterValue, Op, Query, RequestFilter,
    RequestOrder, RequestOrderField,
};

use super::{Out, builder_names, builds_table, listed, name_of, request_status};
use crate::cli::{ClaimState, ListWhat};
use crate::render::{self, Table};
use kiln_server::json as wire;

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

/// A collection query from the command line: `--results` (any of), `--order` (field
/// names, - for descending; newest first by default) and the page.
fn typed_query<F: Field + ResultsField>(
    results: &[String],
    order: &[String],
    page: &crate::cli::Page,
) -> Result<Query<F>> {
    let mut q = Query::new();
    if !results.is_empty() {
        let values = results
            .iter()
            .map(|r| {
                r.parse::<ResultCode>()
                    .map(FilterValue::Result)
                    .map_err(|e| anyhow::anyhow!("--results {r:?}: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        q.filters.push(Filter {
            field: F::RESULTS,
            op: Op::Eq,
            values,
        });
    }
    if order.is_empty() {
        q = q.order_by(F::ID, true);
    }
    for text in order {
        let (descending, name) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let field = F::ALL
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = F::ALL.iter().map(|f| f.name()).collect();
                anyhow::anyhow!(
                    "cannot order by {name:?}: expected one of {}",
                    names.join(", ")
                )
            })?;
        q = q.order_by(field, descending);
    }
    q.limit = page.limit;
    q.offset = page.offset;
    Ok(q)
}

/// The fields every listed entity with results has.
trait ResultsField: Sized {
    const RESULTS: Self;
    const ID: Self;
}

impl ResultsField for BuildsetField {
    const RESULTS: Self = BuildsetField::Results;
    const ID: Self = BuildsetField::Id;
}

impl ResultsField for BuildField {
    const RESULTS: Self = BuildField::Results;
    const ID: Self = BuildField::Id;
}

pub(super) async fn list(client: &Client, out: &Out, what: ListWhat) -> Result<()> {
    match what {
        ListWhat::Buildsets {
            complete,
            results,
            order,
            page,
        } => {
            let mut q = typed_query::<BuildsetField>(&results, &order, &page)?;
            if let Some(complete) = complete {
                q = q.eq(BuildsetField::Complete, complete);
            }
            let buildsets = client.query_buildsets(&q).await?.items;
            out.emit(
                &listed("buildsets", buildsets.iter().map(wire::buildset)),
                || {
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
                },
            )
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
                // Newest first unless ordered, as every listing.
                order: if order.is_empty() {
                    vec![RequestOrder {
                        field: RequestOrderField::Id,
                        descending: true,
                    }]
                } else {
                    order
                        .iter()
                        .map(|o| parse_order(o))
                        .collect::<Result<_>>()?
                },
                limit: page.limit,
                offset: page.offset,
            };
            let requests = client.requests(&filter).await?;
            let names = builder_names(client).await?;
            out.emit(
                &listed("buildrequests", requests.iter().map(wire::request)),
                || {
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
                },
            )
        }
        ListWhat::Builds {
            builder,
            request,
            buildset,
            complete,
            results,
            order,
            page,
        } => {
            let mut q = typed_query::<BuildField>(&results, &order, &page)?;
            if let Some(id) = builder_id(client, builder.as_deref()).await? {
                q = q.eq(BuildField::BuilderId, id);
            }
            if let Some(request) = request {
                q = q.eq(BuildField::RequestId, RequestId(request));
            }
            if let Some(buildset) = buildset {
                q = q.eq(BuildField::BuildsetId, BuildsetId(buildset));
            }
            if let Some(complete) = complete {
                q = q.eq(BuildField::Complete, complete);
            }
            let builds = client.query_builds(&q).await?.items;
            let names = builder_names(client).await?;
            out.emit(&listed("builds", builds.iter().map(wire::build)), || {
                builds_table(&names, &builds).print()
            })
        }
        ListWhat::Builders => {
            let builders = client.builders().await?;
            let mut rows = Vec::new();
            for b in &builders {
                let latest = client.latest_successful_build(b.id).await?;
                let status = client.builder_status(b).await?;
                rows.push(wire::builder(b, status, latest.as_ref()));
            }
            out.emit(&listed("builders", rows.iter().cloned()), || {
                let mut table = Table::new(&[
                    "id",
                    "name",
                    "status",
                    "latest success",
                    "depends on",
                    "description",
                ]);
                for (b, row) in builders.iter().zip(&rows) {
                    let latest = row["latest_successful_buildid"]
                        .as_i64()
                        .map(|id| format!("build {id}"));
                    let mut status = row["status"].as_str().unwrap_or_default().replace('_', " ");
                    if b.paused {
                        status.push_str(", paused");
                    }
                    if !b.served {
                        status.push_str(", no active master");
                    }
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
            out.emit(&listed("masters", masters.iter().map(wire::master)), || {
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
        ListWhat::Schedules => {
            let schedules = client.schedules().await?;
            out.emit(
                &listed("schedules", schedules.iter().map(wire::schedule)),
                || {
                    let mut table = Table::new(&[
                        "name",
                        "timing",
                        "builders",
                        "last fire",
                        "next fire",
                        "last buildset",
                        "fires",
                    ]);
                    for s in &schedules {
                        let d = &s.definition;
                        let timing = match (
                            d.pointer("/timing/every/seconds"),
                            d.pointer("/timing/cron"),
                        ) {
                            (Some(seconds), _) => format!("every {seconds} s"),
                            (_, Some(cron)) => format!(
                                "{} ({})",
                                cron["pattern"].as_str().unwrap_or_default(),
                                cron["timezone"].as_str().unwrap_or_default()
                            ),
                            _ => String::new(),
                        };
                        let builders = d
                            .pointer("/submission/builders")
                            .and_then(|b| b.as_array())
                            .map(|b| {
                                b.iter()
                                    .filter_map(|n| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            })
                            .unwrap_or_default();
                        table.row(vec![
                            s.name.clone(),
                            timing,
                            builders,
                            render::time(s.last_fire),
                            render::opt_time(s.next_fire),
                            render::opt(s.last_buildset_id),
                            s.fires.to_string(),
                        ]);
                    }
                    table.print();
                },
            )
        }
        ListWhat::Locks => {
            let locks = client.locks().await?;
            out.emit(&listed("locks", locks.iter().map(wire::lock)), || {
                let mut table =
                    Table::new(&["name", "held", "builders", "holding builds", "waiting"]);
                for l in &locks {
                    let users: Vec<String> = l
                        .users
                        .iter()
                        .map(|u| format!("{} ({})", u.builder, u.units))
                        .collect();
                    let holders: Vec<String> = l
                        .holders
                        .iter()
                        .map(|h| format!("{} ({})", h.build_id, h.units))
                        .collect();
                    table.row(vec![
                        l.name.clone(),
                        format!("{}/{}", l.held(), l.capacity),
                        users.join(", "),
                        holders.join(", "),
                        l.waiting.to_string(),
                    ]);
                }
                table.print();
            })
        }
        ListWhat::Reporters => {
            let reporters = client.reporters().await?;
            out.emit(
                &listed("reporters", reporters.iter().map(wire::reporter)),
                || {
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
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
