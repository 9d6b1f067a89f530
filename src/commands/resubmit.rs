//! `kiln resubmit`: a buildset again, for every builder or only the failed ones.

use anyhow::Result;
use kiln_engine::Client;
use kiln_engine::model::BuildsetId;

use super::Out;

pub(super) async fn resubmit(client: &Client, out: &Out, buildset: i64, all: bool) -> Result<()> {
    let submitted = client.resubmit(BuildsetId(buildset), all).await?;
    out.emit(&kiln_server::json::submitted(&submitted), || {
        let builders: Vec<&str> = submitted.requests.keys().map(String::as_str).collect();
        println!(
            "submitted buildset {} resubmitting buildset {buildset} for {}",
            submitted.buildset_id,
            builders.join(", ")
        );
    })
}
