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
