//! What the engine's end-to-end tests share: fresh databases (`kiln-testdb`) and the
//! children and parents policy tests decide over.

#![allow(dead_code)]

pub use kiln_testdb::*;

/// A child buildset as a policy sees it: only `complete` and `results` matter.
pub fn child(
    complete: bool,
    results: Option<kiln_engine::model::ResultCode>,
) -> kiln_engine::model::ChildBuildset {
    use kiln_engine::model::{BuilderId, BuildsetId, ChildBuildset, RequestId};
    ChildBuildset {
        buildset_id: BuildsetId(1),
        trigger_key: None,
        relationship: None,
        waited_for: true,
        parent_buildid: None,
        request_id: RequestId(1),
        builder_id: BuilderId(1),
        builder: "x".into(),
        complete,
        results,
        build_id: None,
        return_value: None,
    }
}

/// A parent build for policy decisions.
pub fn parent(relationship: &str) -> kiln_engine::ParentInfo {
    kiln_engine::ParentInfo {
        build_id: kiln_engine::model::BuildId(1),
        builder: "p".into(),
        number: 1,
        relationship: relationship.into(),
    }
}

/// Registers a builder "gate" on `engine` and starts its one build, which holds its slot
/// until the returned sender is sent `true`: with room for one build, everything
/// submitted meanwhile queues. Returns once the gate build has started.
pub async fn hold_the_room(
    engine: &kiln_engine::Engine,
) -> anyhow::Result<tokio::sync::watch::Sender<bool>> {
    use kiln_engine::{BuilderConfig, FnExecutor, Outcome, Submission};
    let (open, gate) = tokio::sync::watch::channel(false);
    engine
        .register_builder(
            BuilderConfig::new("gate"),
            FnExecutor::new(move |_| {
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(Outcome::success(serde_json::json!(null)))
                }
            }),
        )
        .await?;
    let mut events = engine.subscribe();
    engine
        .submit(&Submission::new("gate").builder("gate"))
        .await?;
    guard("the gate build", started(&mut events, "gate")).await??;
    Ok(open)
}

/// Returns once a build of `builder` has started.
pub async fn started(
    events: &mut tokio::sync::broadcast::Receiver<kiln_engine::Event>,
    builder: &str,
) -> anyhow::Result<()> {
    loop {
        if let kiln_engine::Event::BuildStarted { builder: b, .. } = events.recv().await?
            && b == builder
        {
            return Ok(());
        }
    }
}
