//! `kiln cancel`: a request, or every open request of a buildset.

use anyhow::Result;
use kiln_engine::Client;
use kiln_engine::model::{BuildsetId, RequestId};
use serde_json::json;

use super::Out;
use crate::cli::CancelWhat;

pub(super) async fn cancel(client: &Client, out: &Out, what: CancelWhat) -> Result<()> {
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
