//! `kiln logs`: a build's log records, optionally followed.

use anyhow::Result;
use kiln_engine::Client;
use kiln_engine::model::{LogLevel, LogQuery};
use serde_json::json;

use super::{Out, find_build};
use crate::cli::LogsArgs;
use crate::render;

pub(super) async fn logs(client: &Client, out: &Out, args: LogsArgs) -> Result<()> {
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
