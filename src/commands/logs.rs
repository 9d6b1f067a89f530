//! `kiln logs`: a build's log records, optionally followed.

use anyhow::Result;
use kiln_engine::Client;
use kiln_engine::model::{LogEntry, LogLevel, LogQuery};

use super::{Out, find_build, find_build_or_none};
use crate::cli::LogsArgs;
use crate::render;

/// How often `--follow` looks for new records.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) async fn logs(client: &Client, out: &Out, args: LogsArgs) -> Result<()> {
    // Following a builder that has not built yet waits for its first build.
    let build = loop {
        match find_build_or_none(client, &args.build).await? {
            Some(build) => break build,
            None if args.follow => tokio::time::sleep(FOLLOW_POLL).await,
            None => break find_build(client, &args.build).await?,
        };
    };
    let min_level: LogLevel = args.level.parse()?;
    let mut query = LogQuery {
        build_id: Some(build.id),
        min_level: Some(min_level),
        since: args.since.as_deref().map(render::parse_when).transpose()?,
        until: args.until.as_deref().map(render::parse_when).transpose()?,
        after_id: None,
        limit: args.limit,
    };
    let entries = client.logs(&query).await?;
    if !args.follow {
        return out.emit(
            &super::listed("logs", entries.iter().map(kiln_server::json::log)),
            || print_all(&entries),
        );
    }
    // Followed: records as they come (JSON lines with --json), until the build ends and
    // what it wrote last is printed.
    let emit = |entries: &[LogEntry]| -> Result<usize> {
        for e in entries {
            if out.json {
                println!("{}", kiln_server::json::log(e));
            } else {
                print_all(std::slice::from_ref(e));
            }
        }
        Ok(entries.len())
    };
    let mut shown = emit(&entries)?;
    query.after_id = entries.last().map(|e| e.id).or(query.after_id);
    loop {
        let ended = client.build(build.id).await?.complete_at.is_some();
        let more = client.logs(&query).await?;
        shown += emit(&more)?;
        if let Some(last) = more.last() {
            query.after_id = Some(last.id);
        }
        if ended || args.limit.is_some_and(|l| shown >= l as usize) {
            return Ok(());
        }
        if more.is_empty() {
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

fn print_all(entries: &[LogEntry]) {
    for e in entries {
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
}
