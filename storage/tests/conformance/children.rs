//! Parent builds and their child buildsets.

use super::*;

// ---- relations ----

pub async fn builders_record_their_dependencies(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let [app, _lib] = builders(s, &["app", "lib"]).await?[..] else {
        return Err(anyhow!("two builders"));
    };
    ensure!(s.builder_get(app).await?.depends_on.is_empty());
    s.builder_set_depends_on(app, &["lib".to_owned(), "tools".to_owned()])
        .await?;
    ensure!(s.builder_get(app).await?.depends_on == ["lib", "tools"]);
    let listed = s.builder_list().await?;
    ensure!(
        listed
            .iter()
            .find(|b| b.name == "app")
            .map(|b| b.depends_on.len())
            == Some(2)
    );
    s.builder_set_depends_on(app, &[]).await?;
    ensure!(
        s.builder_get_by_name("app")
            .await?
            .is_some_and(|b| b.depends_on.is_empty())
    );
    ensure!(matches!(
        s.builder_set_depends_on(BuilderId(999), &[]).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn the_latest_build_with_given_results_is_found_by_completion_time(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?[0];
    let m = master(s, "m").await?;
    let failed = built(s, b, m, vec![], ResultCode::Failure, at(30)).await?;
    let ok = built(s, b, m, vec![], ResultCode::Success, at(20)).await?;
    built(s, b, m, vec![], ResultCode::Skipped, at(40)).await?;
    let any = [ResultCode::Success, ResultCode::Failure];
    ensure!(s.build_latest_with(b, &any).await?.map(|x| x.id) == Some(failed.id));
    ensure!(
        s.build_latest_with(b, &[ResultCode::Success])
            .await?
            .map(|x| x.id)
            == Some(ok.id)
    );
    ensure!(
        s.build_latest_with(b, &[ResultCode::Cancelled])
            .await?
            .is_none()
    );
    Ok(())
}

/// A parent build on `m` with two children keyed t0.0 and t0.1.
async fn parent_with_children(
    s: &dyn Store,
    m: MasterId,
    waited_for: bool,
) -> Result<(RequestId, BuildId, Vec<(BuildsetId, RequestId)>)> {
    let ids = builders(s, &["parent", "child"]).await?;
    let (_, requests) = buildset(s, &ids[..1], at(0)).await?;
    s.request_claim(&requests, m, at(1)).await?;
    let build = start(s, requests[0], m).await?;
    let mut children = Vec::new();
    for i in 0..2 {
        let (bs, reqs) = buildset_with(
            s,
            NewBuildset {
                builder_ids: vec![ids[1]],
                waited_for,
                parent_buildid: Some(build.id),
                parent_relationship: Some("triggers".into()),
                parent_request_id: Some(requests[0]),
                trigger_key: Some(format!("t0.{i}")),
                submitted_at: at(2),
                ..NewBuildset::default()
            },
        )
        .await?;
        children.push((bs, reqs[0]));
    }
    Ok((requests[0], build.id, children))
}

pub async fn children_are_found_by_their_parent_request_and_adopted_by_a_new_build(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let m = master(s, "m").await?;
    let (parent_request, parent_build, children) = parent_with_children(s, m, true).await?;
    // The first child ran and returned a value.
    s.request_claim(&[children[0].1], m, at(3)).await?;
    let child_build = start(s, children[0].1, m).await?;
    s.build_finish(
        m,
        &FinishedBuild {
            return_value: Some(json!({"ok": true})),
            ..finish(&child_build, ResultCode::Success, at(4))
        },
    )
    .await?;
    s.request_complete(&[children[0].1], ResultCode::Success, at(4))
        .await?;

    let found = s.buildset_children(parent_request).await?;
    ensure!(found.len() == 2);
    ensure!(found[0].trigger_key.as_deref() == Some("t0.0") && found[0].builder == "child");
    ensure!(found[0].complete && found[0].results == Some(ResultCode::Success));
    ensure!(found[0].build_id == Some(child_build.id));
    ensure!(found[0].return_value == Some(json!({"ok": true})));
    ensure!(!found[1].complete && found[1].build_id.is_none() && found[1].waited_for);
    ensure!(found.iter().all(|c| c.parent_buildid == Some(parent_build)));
    ensure!(found[1].relationship.as_deref() == Some("triggers"));

    // The parent's master dies; a new build of the same request adopts the children.
    s.request_unclaim(&[parent_request], m).await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[parent_request], m2, at(5)).await?;
    let rerun = start(s, parent_request, m2).await?;
    let all: Vec<BuildsetId> = children.iter().map(|(bs, _)| *bs).collect();
    s.buildset_adopt(&all, rerun.id).await?;
    let found = s.buildset_children(parent_request).await?;
    ensure!(found.iter().all(|c| c.parent_buildid == Some(rerun.id)));
    ensure!(s.buildset_children(RequestId(999)).await?.is_empty());
    Ok(())
}

pub async fn cancelling_a_request_cancels_its_waited_for_children_recursively(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let m = master(s, "m").await?;
    let (parent_request, _, children) = parent_with_children(s, m, true).await?;
    // One child runs and has a waited-for grandchild of its own.
    s.request_claim(&[children[0].1], m, at(3)).await?;
    let child_build = start(s, children[0].1, m).await?;
    let child_builder = s.build_get(child_build.id).await?.builder_id;
    let (_, grandchild) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![child_builder],
            waited_for: true,
            parent_buildid: Some(child_build.id),
            parent_request_id: Some(children[0].1),
            trigger_key: Some("t0.0".into()),
            submitted_at: at(4),
            ..NewBuildset::default()
        },
    )
    .await?;
    // And an unwaited child of the parent is left alone.
    let (_, unwaited) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![child_builder],
            waited_for: false,
            parent_request_id: Some(parent_request),
            trigger_key: Some("t1.0".into()),
            submitted_at: at(4),
            ..NewBuildset::default()
        },
    )
    .await?;
    let outcome = s.request_cancel(&[parent_request], at(5)).await?;
    ensure!(
        outcome.flagged == [parent_request, children[0].1],
        "flagged {:?}",
        outcome.flagged
    );
    let mut completed = outcome.completed.clone();
    completed.sort();
    ensure!(
        completed == [children[1].1, grandchild[0]],
        "completed {completed:?}"
    );
    ensure!(!s.request_get(unwaited[0]).await?.complete);
    Ok(())
}
