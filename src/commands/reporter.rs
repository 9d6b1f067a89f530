//! `kiln reporter remove`: forget a reporter, so that its backlog no longer holds the outbox.

use anyhow::Result;
use kiln_engine::Client;
use serde_json::json;

use super::Out;

pub(super) async fn remove(client: &Client, out: &Out, name: &str) -> Result<()> {
    client.remove_reporter(name).await?;
    out.emit(&json!({ "removed": name }), || {
        println!("removed reporter {name}");
    })
}
