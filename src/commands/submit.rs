//! `kiln submit`: one buildset, with properties and sourcestamps from the command line.

use anyhow::{Context, Result, anyhow, bail};
use kiln_engine::model::{Property, ResultCode, SourceStamp};
use std::process::ExitCode;

use kiln_engine::{Client, Submission};

use super::Out;
use crate::cli::SubmitArgs;
use crate::render::Table;

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

/// How often `--wait` looks at the buildset when the database cannot say (SQLite).
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) async fn submit(client: &Client, out: &Out, args: SubmitArgs) -> Result<ExitCode> {
    let wait = args.wait;
    let mut submission = Submission::new(args.reason).priority(args.priority);
    submission.builders = args.builders;
    submission.external_idstring = args.external_id;
    submission.idempotency_key = args.idempotency_key;
    submission.not_before = args
        .not_before
        .as_deref()
        .map(crate::render::parse_later)
        .transpose()?;
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
    if wait {
        if !out.json {
            println!(
                "submitted buildset {}; waiting for it to complete",
                submitted.buildset_id
            );
            warn_unserved(&submitted);
        }
        let done = client
            .wait_buildset(submitted.buildset_id, WAIT_POLL)
            .await?;
        let ok = done.results.is_some_and(|r| {
            matches!(
                r,
                ResultCode::Success | ResultCode::Warnings | ResultCode::Skipped
            )
        });
        let answer =
            kiln_server::json::entity("buildsets", kiln_server::json::buildset(&done), &[]);
        out.emit(&answer, || {
            println!(
                "buildset {} complete: {}",
                done.id,
                done.results.map(|r| r.name()).unwrap_or("?")
            );
        })?;
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    out.emit(&kiln_server::json::submitted(&submitted), || {
        if submitted.existing {
            println!(
                "buildset {} holds this idempotency key already; nothing was submitted",
                submitted.buildset_id
            );
        } else {
            println!("submitted buildset {}", submitted.buildset_id);
        }
        let mut table = Table::new(&["builder", "request"]);
        for (builder, request) in &submitted.requests {
            table.row(vec![builder.clone(), request.to_string()]);
        }
        table.print();
        warn_unserved(&submitted);
    })?;
    Ok(ExitCode::SUCCESS)
}

fn warn_unserved(submitted: &kiln_engine::Submitted) {
    if !submitted.unserved.is_empty() {
        eprintln!(
            "warning: no active master runs {}: their requests wait until one starts",
            submitted.unserved.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
