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
    // The API's vocabulary: request ids, bsid, results as Buildbot's numbers.
    let value = json!({
        "cancelled": outcome.completed.iter().map(|r| r.0).collect::<Vec<_>>(),
        "stopping": outcome.flagged.iter().map(|r| r.0).collect::<Vec<_>>(),
        "buildsets_completed": outcome.buildsets_completed.iter().map(|b| json!({
            "bsid": b.buildset_id.0,
            "results": kiln_server::json::result_number(Some(b.results)),
        })).collect::<Vec<_>>(),
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
