//! `kiln rebuild`: one build again, with its buildset's properties and stamps.

use anyhow::Result;
use kiln_engine::Client;

use super::{Out, find_build};

pub(super) async fn rebuild(client: &Client, out: &Out, build: &str) -> Result<()> {
    let build = find_build(client, build).await?;
    let submitted = client.rebuild(build.id).await?;
    out.emit(&kiln_server::json::submitted(&submitted), || {
        println!(
            "submitted buildset {} rebuilding build {}",
            submitted.buildset_id, build.id
        );
    })
}
