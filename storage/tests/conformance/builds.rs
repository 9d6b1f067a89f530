//! Builds: starting, finding, finishing, deleting.

use super::*;

// ---- builds ----

pub async fn build_numbers_are_unique_per_builder_under_concurrent_starts(
    h: &Harness,
) -> Result<()> {
    const BUILDS: usize = 40;
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let mut requests = Vec::new();
    for i in 0..BUILDS / 2 {
        let (_, r) = buildset(s, &b, at(i as i64)).await?;
        requests.extend(r);
    }
    s.request_claim(&requests, m, at(0)).await?;
    let mut tasks = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let store = if i % 2 == 0 {
            h.store.clone()
        } else {
            h.another().await?
        };
        let request = *request;
        tasks.push(tokio::spawn(
            async move { start(&*store, request, m).await },
        ));
    }
    let mut numbers: BTreeMap<BuilderId, Vec<i64>> = BTreeMap::new();
    for task in tasks {
        let build = task.await??;
        numbers
            .entry(build.builder_id)
            .or_default()
            .push(build.number);
    }
    for (builder, mut n) in numbers {
        n.sort();
        ensure!(
            n == (1..=(BUILDS / 2) as i64).collect::<Vec<_>>(),
            "builder {builder}: {n:?}"
        );
    }
    Ok(())
}

pub async fn a_build_starts_only_on_a_request_its_master_holds(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    ensure!(matches!(
        start(s, r[0], m1)
            .await
            .map_err(|e| e.downcast::<StorageError>()),
        Err(Ok(StorageError::ClaimLost { .. }))
    ));
    s.request_claim(&r, m1, at(2)).await?;
    ensure!(matches!(
        start(s, r[0], m2)
            .await
            .map_err(|e| e.downcast::<StorageError>()),
        Err(Ok(StorageError::ClaimLost { .. }))
    ));
    let build = start(s, r[0], m1).await?;
    ensure!(
        build.number == 1
            && build.master_id == m1
            && build.request_id == r[0]
            && build.worker_slot == Some(0)
    );
    ensure!(build.state_string == "starting" && build.started_at == at(10) && !build.is_complete());
    Ok(())
}

pub async fn builds_are_found_by_id_by_number_and_by_filters(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let one = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    let two = built(s, b[1], m, vec![], ResultCode::Failure, at(2)).await?;
    let (bs3, r3) = buildset(s, &[b[0]], at(3)).await?;
    s.request_claim(&r3, m, at(3)).await?;
    let three = start(s, r3[0], m).await?;
    ensure!(s.build_get(one.id).await? == one);
    ensure!(s.build_get_by_number(b[0], 2).await?.id == three.id);
    ensure!(matches!(
        s.build_get_by_number(b[1], 2).await,
        Err(StorageError::NotFound { .. })
    ));
    let list = |f: BuildFilter| async move {
        s.build_list(&f)
            .await
            .map(|v| v.iter().map(|b| b.id).collect::<Vec<_>>())
    };
    ensure!(list(BuildFilter::default()).await? == [one.id, two.id, three.id]);
    ensure!(
        list(BuildFilter {
            builder_id: Some(b[0]),
            ..Default::default()
        })
        .await?
            == [one.id, three.id]
    );
    ensure!(
        list(BuildFilter {
            request_id: Some(r3[0]),
            ..Default::default()
        })
        .await?
            == [three.id]
    );
    ensure!(
        list(BuildFilter {
            buildset_id: Some(bs3),
            ..Default::default()
        })
        .await?
            == [three.id]
    );
    ensure!(
        list(BuildFilter {
            complete: Some(true),
            ..Default::default()
        })
        .await?
            == [one.id, two.id]
    );
    ensure!(
        list(BuildFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?
            == [three.id]
    );
    ensure!(
        list(BuildFilter {
            descending: true,
            limit: Some(2),
            ..Default::default()
        })
        .await?
            == [three.id, two.id]
    );
    Ok(())
}

pub async fn finishing_a_build_records_its_outcome_once_and_only_by_its_master(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&r, m1, at(2)).await?;
    let build = start(s, r[0], m1).await?;
    let outcome = FinishedBuild {
        return_value: Some(json!({"artifacts": ["a.tar"], "n": 1.5})),
        error: Some("boom".into()),
        traceback: Some("at step 2".into()),
        state_string: Some("failed: boom".into()),
        ..finish(&build, ResultCode::Failure, at(20))
    };
    let err = s
        .build_finish(m2, &outcome)
        .await
        .err()
        .ok_or_else(|| anyhow!("foreign finish"))?;
    ensure!(matches!(err, StorageError::NotOwner { .. }), "{err}");
    s.build_finish(m1, &outcome).await?;
    let done = s.build_get(build.id).await?;
    ensure!(done.results == Some(ResultCode::Failure) && done.complete_at == Some(at(20)));
    ensure!(done.return_value == outcome.return_value && done.error.as_deref() == Some("boom"));
    ensure!(done.traceback.as_deref() == Some("at step 2") && done.state_string == "failed: boom");
    let again = s
        .build_finish(m1, &finish(&build, ResultCode::Success, at(30)))
        .await;
    ensure!(
        matches!(again, Err(StorageError::NotOwner { .. })),
        "a finished build cannot finish again"
    );
    ensure!(s.build_get(build.id).await?.results == Some(ResultCode::Failure));
    Ok(())
}

pub async fn state_strings_are_set_and_lock_durations_accumulate(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, at(2)).await?;
    let build = start(s, r[0], m).await?;
    s.build_set_state(build.id, "compiling 3/4").await?;
    s.build_add_locks_duration(build.id, 1.5).await?;
    s.build_add_locks_duration(build.id, 2.25).await?;
    let now = s.build_get(build.id).await?;
    ensure!(now.state_string == "compiling 3/4" && (now.locks_duration_s - 3.75).abs() < 1e-9);
    ensure!(matches!(
        s.build_add_locks_duration(build.id, -1.0).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.build_set_state(BuildId(99_999), "x").await,
        Err(StorageError::NotFound { .. })
    ));
    s.build_finish(m, &finish(&build, ResultCode::Success, at(3)))
        .await?;
    ensure!(
        s.build_get(build.id).await?.state_string == "compiling 3/4",
        "finishing without a final state keeps the last one"
    );
    Ok(())
}

pub async fn the_previous_successful_build_needs_exact_success_and_the_same_stamps(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let x = stamp("r", "main", "1");
    let y = stamp("r2", "main", "9");
    let ok_xy = built(
        s,
        b[0],
        m,
        vec![x.clone(), y.clone()],
        ResultCode::Success,
        at(1),
    )
    .await?;
    let _ok_x = built(s, b[0], m, vec![x.clone()], ResultCode::Success, at(2)).await?;
    let _warn = built(
        s,
        b[0],
        m,
        vec![y.clone(), x.clone()],
        ResultCode::Warnings,
        at(3),
    )
    .await?;
    let _other_builder = built(
        s,
        b[1],
        m,
        vec![x.clone(), y.clone()],
        ResultCode::Success,
        at(4),
    )
    .await?;
    let current = built(
        s,
        b[0],
        m,
        vec![y.clone(), x.clone()],
        ResultCode::Failure,
        at(5),
    )
    .await?;
    let prev = s.build_previous_successful(current.id).await?;
    ensure!(prev.as_ref().map(|p| p.id) == Some(ok_xy.id), "{prev:?}");
    ensure!(
        s.build_previous_successful(ok_xy.id).await?.is_none(),
        "nothing before the first"
    );
    let z_only = built(
        s,
        b[0],
        m,
        vec![stamp("z", "main", "1")],
        ResultCode::Success,
        at(6),
    )
    .await?;
    ensure!(
        s.build_previous_successful(z_only.id).await?.is_none(),
        "different stamps never match"
    );
    Ok(())
}

pub async fn the_latest_successful_build_never_counts_skipped(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    ensure!(s.build_latest_successful(b[0]).await?.is_none());
    let ok = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    let warn = built(s, b[0], m, vec![], ResultCode::Warnings, at(2)).await?;
    built(s, b[0], m, vec![], ResultCode::Skipped, at(3)).await?;
    built(s, b[0], m, vec![], ResultCode::Failure, at(4)).await?;
    let latest = s.build_latest_successful(b[0]).await?.map(|b| b.id);
    ensure!(
        latest == Some(warn.id),
        "WARNINGS counts, SKIPPED and FAILURE do not: {latest:?} (ok was {})",
        ok.id
    );
    built(s, b[1], m, vec![], ResultCode::Skipped, at(5)).await?;
    ensure!(s.build_latest_successful(b[1]).await?.is_none());
    Ok(())
}

pub async fn deleting_a_build_removes_its_logs_progress_and_properties(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    s.request_claim(&r, m, at(1)).await?;
    let build = start(s, r[0], m).await?;
    s.log_append(
        build.id,
        &[LogRecord {
            at: at(1),
            level: LogLevel::Info,
            message: "hi".into(),
            fields: Default::default(),
        }],
    )
    .await?;
    s.progress_report(
        build.id,
        &ProgressReport {
            group: vec!["x".into()],
            current: 1,
            total: 2,
            status: "".into(),
        },
        at(1),
    )
    .await?;
    s.build_set_property(build.id, "p", &Property::new(json!(1), "job"))
        .await?;
    ensure!(
        matches!(
            s.build_delete(build.id).await,
            Err(StorageError::Invalid(_))
        ),
        "a running build is not deleted"
    );
    s.build_finish(m, &finish(&build, ResultCode::Success, at(2)))
        .await?;
    let keep = built(s, b[0], m, vec![], ResultCode::Success, at(3)).await?;
    s.log_append(
        keep.id,
        &[LogRecord {
            at: at(3),
            level: LogLevel::Info,
            message: "kept".into(),
            fields: Default::default(),
        }],
    )
    .await?;
    s.build_delete(build.id).await?;
    ensure!(matches!(
        s.build_get(build.id).await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(
        s.log_list(&LogQuery {
            build_id: Some(build.id),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    ensure!(s.progress_list(build.id).await?.is_empty());
    ensure!(
        s.log_list(&LogQuery::default()).await?.len() == 1,
        "other builds' logs stay"
    );
    ensure!(
        s.request_get(r[0]).await?.claimed_by == Some(m),
        "the request is untouched"
    );
    Ok(())
}

pub async fn build_properties_keep_their_values_and_sources(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let build = built(s, b[0], m, vec![], ResultCode::Success, at(1)).await?;
    s.build_set_property(build.id, "v", &Property::new(json!("1.0"), "job"))
        .await?;
    s.build_set_property(build.id, "v", &Property::new(json!({"major": 2}), "later"))
        .await?;
    s.build_set_property(build.id, "n", &Property::new(json!(null), "job"))
        .await?;
    let props = s.build_properties(build.id).await?;
    ensure!(
        props.len() == 2
            && props["v"] == Property::new(json!({"major": 2}), "later")
            && props["n"].value.is_null()
    );
    ensure!(matches!(
        s.build_set_property(BuildId(99_999), "x", &Property::new(json!(1), "s"))
            .await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}
