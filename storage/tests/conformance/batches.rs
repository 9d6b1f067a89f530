//! The scheduler's hot path: batches of starts and finishes.

use super::*;

// ---- batches: the scheduler's hot path ----

fn end(build: &kiln_model::Build, results: ResultCode, at: Timestamp) -> FinishedBuild {
    FinishedBuild {
        build_id: build.id,
        request_id: build.request_id,
        results,
        return_value: Some(json!({"build": build.id.0})),
        error: None,
        traceback: None,
        state_string: Some(format!("ended {results}")),
        artifacts: Vec::new(),
        complete_at: at,
        retry_at: None,
    }
}

pub async fn adding_many_buildsets_is_all_or_nothing_and_keeps_their_order(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let mut props = BTreeMap::new();
    props.insert("p".to_string(), Property::new(json!({"x": 1}), "batch"));
    let batch = vec![
        NewBuildset {
            reason: "one".into(),
            builder_ids: b.clone(),
            submitted_at: at(1),
            ..Default::default()
        },
        NewBuildset {
            reason: "two".into(),
            submitted_at: at(2),
            ..Default::default()
        },
        NewBuildset {
            reason: "three".into(),
            builder_ids: vec![b[1]],
            sourcestamps: vec![stamp("r", "main", "1"), stamp("r", "main", "1")],
            properties: props.clone(),
            priority: 9,
            submitted_at: at(3),
            ..Default::default()
        },
    ];
    let added = s.buildset_add_many(&batch).await?;
    ensure!(
        added.len() == 3
            && added[0].buildset_id < added[1].buildset_id
            && added[1].buildset_id < added[2].buildset_id
    );
    ensure!(
        added[0].requests.len() == 2
            && added[1].requests.is_empty()
            && added[2].requests.len() == 1
    );
    let two = s.buildset_get(added[1].buildset_id).await?;
    ensure!(two.reason == "two" && two.complete && two.results == Some(ResultCode::Success));
    let three = s.buildset_get(added[2].buildset_id).await?;
    ensure!(three.reason == "three" && !three.complete && three.submitted_at == at(3));
    ensure!(s.buildset_properties(added[2].buildset_id).await? == props);
    ensure!(s.buildset_sourcestamps(added[2].buildset_id).await? == vec![stamp("r", "main", "1")]);
    let r = s.request_get(added[2].requests[&b[1]]).await?;
    ensure!(r.priority == 9 && r.buildset_id == added[2].buildset_id && r.builder_id == b[1]);

    let before = s.buildset_list(&BuildsetFilter::default()).await?.len();
    let bad = vec![
        NewBuildset {
            reason: "fine".into(),
            builder_ids: vec![b[0]],
            ..Default::default()
        },
        NewBuildset {
            reason: "ghost".into(),
            builder_ids: vec![BuilderId(4_242)],
            ..Default::default()
        },
    ];
    ensure!(matches!(
        s.buildset_add_many(&bad).await,
        Err(StorageError::UnknownBuilder(_))
    ));
    ensure!(
        s.buildset_list(&BuildsetFilter::default()).await?.len() == before,
        "none of the batch was written"
    );
    ensure!(s.buildset_add_many(&[]).await?.is_empty());
    Ok(())
}

pub async fn starting_available_work_claims_and_numbers_builds_in_their_slots(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    // An earlier build on "a" so numbering continues from it.
    built(s, b[0], m, vec![], ResultCode::Success, at(0)).await?;
    let mut a = Vec::new();
    for (i, priority) in [0, 5, 5].into_iter().enumerate() {
        let (_, r) = buildset_with(
            s,
            NewBuildset {
                builder_ids: vec![b[0]],
                priority,
                submitted_at: at(i as i64),
                ..Default::default()
            },
        )
        .await?;
        a.push(r[0]);
    }
    let mut props = BTreeMap::new();
    props.insert("k".to_string(), Property::new(json!([1, 2]), "src"));
    let (_, rb) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![b[1]],
            properties: props.clone(),
            sourcestamps: vec![stamp("z", "main", "2"), stamp("a", "dev", "1")],
            submitted_at: at(0),
            ..Default::default()
        },
    )
    .await?;
    let outcome = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![3, 7]), (b[1], vec![])],
            at(20),
        ))
        .await?;
    ensure!(outcome.cancelled.is_empty() && outcome.buildsets_completed.is_empty());
    let started: Vec<(RequestId, i64, Option<i64>)> = outcome
        .started
        .iter()
        .map(|sb| (sb.request.id, sb.build.number, sb.build.worker_slot))
        .collect();
    ensure!(
        started == [(a[1], 2, Some(3)), (a[2], 3, Some(7))],
        "{started:?}"
    );
    for sb in &outcome.started {
        ensure!(
            sb.request.claimed_by == Some(m) && sb.build.master_id == m && !sb.build.is_complete()
        );
        ensure!(
            sb.build.state_string == "starting"
                && sb.build.started_at == at(20)
                && sb.build.request_id == sb.request.id
        );
        ensure!(
            s.build_get(sb.build.id).await? == sb.build,
            "the returned build is what is stored"
        );
    }
    ensure!(
        s.request_get(a[0]).await?.claimed_by.is_none(),
        "one request per free slot"
    );
    ensure!(
        s.request_get(rb[0]).await?.claimed_by.is_none(),
        "no slots, no claim"
    );
    let again = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![0, 1, 2]), (b[1], vec![0])],
            at(21),
        ))
        .await?;
    let got: Vec<RequestId> = again.started.iter().map(|sb| sb.request.id).collect();
    ensure!(got == [a[0], rb[0]] || got == [rb[0], a[0]], "{got:?}");
    let with_context = again
        .started
        .iter()
        .find(|sb| sb.request.id == rb[0])
        .ok_or_else(|| anyhow!("the stamped request did not start"))?;
    ensure!(with_context.context.reason == "test" && with_context.context.properties == props);
    ensure!(
        with_context.context.sourcestamps == vec![stamp("a", "dev", "1"), stamp("z", "main", "2")],
        "each build gets its buildset's stamps, sorted"
    );
    ensure!(
        outcome
            .started
            .iter()
            .all(|sb| sb.context.properties.is_empty() && sb.context.sourcestamps.is_empty())
    );
    let none = s
        .build_start_available(&start_all(m, vec![(b[0], vec![0])], at(22)))
        .await?;
    ensure!(none == kiln_storage::StartOutcome::default());
    Ok(())
}

pub async fn starting_available_work_completes_cancel_flagged_requests_instead(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (bs, r) = buildset(s, &b, at(1)).await?;
    let (_, other) = buildset(s, &b, at(2)).await?;
    let gone = master(s, "gone").await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, gone, at(1)).await?;
    ensure!(s.request_cancel(&r, at(2)).await?.flagged == r);
    s.request_unclaim(&r, gone).await?;
    let outcome = s
        .build_start_available(&start_all(m, vec![(b[0], vec![0, 1])], at(3)))
        .await?;
    ensure!(outcome.cancelled == r, "{outcome:?}");
    ensure!(
        outcome.buildsets_completed.len() == 1 && outcome.buildsets_completed[0].buildset_id == bs
    );
    ensure!(outcome.buildsets_completed[0].results == ResultCode::Cancelled);
    ensure!(
        outcome.started.len() == 1
            && outcome.started[0].request.id == other[0]
            && outcome.started[0].build.number == 1
    );
    let done = s.request_get(r[0]).await?;
    ensure!(done.complete && done.results == Some(ResultCode::Cancelled));
    ensure!(
        s.build_list(&BuildFilter {
            request_id: Some(r[0]),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

/// What a start returns for each build is what reading the build and its request back
/// gives, field for field (PostgreSQL sends them as positional JSON arrays, so a column
/// out of order would land in a neighbouring field of the same type).
pub async fn started_builds_and_their_requests_are_returned_as_stored(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    for i in 0..3 {
        buildset(s, &b, at(1 + i)).await?;
    }
    let m = master(s, "m").await?;
    let outcome = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![4, 5, 6]), (b[1], vec![7, 8])],
            at(9),
        ))
        .await?;
    ensure!(outcome.started.len() == 5, "{outcome:?}");
    for started in &outcome.started {
        let build = s.build_get(started.build.id).await?;
        ensure!(started.build == build, "{:?} != {build:?}", started.build);
        let request = s.request_get(started.request.id).await?;
        ensure!(
            started.request == request,
            "{:?} != {request:?}",
            started.request
        );
        ensure!(started.request.claimed_by == Some(m));
    }
    Ok(())
}

pub async fn concurrent_starts_from_several_masters_never_start_a_request_twice(
    h: &Harness,
) -> Result<()> {
    const MASTERS: usize = 3;
    const REQUESTS: usize = 240;
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let batch: Vec<NewBuildset> = (0..REQUESTS / 2)
        .map(|i| NewBuildset {
            reason: format!("{i}"),
            builder_ids: b.clone(),
            submitted_at: at(i as i64),
            ..Default::default()
        })
        .collect();
    s.buildset_add_many(&batch).await?;
    let mut tasks = Vec::new();
    for n in 0..MASTERS {
        let store = h.another().await?;
        let m = master(&*store, &format!("m{n}")).await?;
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store
                    .build_start_available(&start_all(
                        m,
                        vec![(b[0], vec![0, 1, 2]), (b[1], vec![0, 1])],
                        at(0),
                    ))
                    .await?;
                if got.started.is_empty() {
                    return anyhow::Ok(mine);
                }
                let ends: Vec<FinishedBuild> = got
                    .started
                    .iter()
                    .map(|sb| end(&sb.build, ResultCode::Success, at(1)))
                    .collect();
                store.build_finish_batch(m, &ends).await?;
                mine.extend(
                    got.started
                        .into_iter()
                        .map(|sb| (sb.request.id, sb.build.builder_id, sb.build.number)),
                );
            }
        }));
    }
    let mut requests = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for task in tasks {
        for (request, builder, number) in task.await?? {
            ensure!(requests.insert(request), "request {request} started twice");
            ensure!(
                numbers.insert((builder, number)),
                "build number {number} of builder {builder} used twice"
            );
        }
    }
    ensure!(
        requests.len() == REQUESTS,
        "{} of {REQUESTS} started",
        requests.len()
    );
    ensure!(
        s.buildset_list(&BuildsetFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

pub async fn finishing_and_settling_completes_or_releases_requests_and_refuses_foreign_builds(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let m = master(s, "m").await?;
    let other = master(s, "other").await?;
    let (bs1, _) = buildset(s, &b[..2], at(1)).await?;
    let (bs2, _) = buildset(s, &[b[2]], at(1)).await?;
    let started = s
        .build_start_available(&start_all(
            m,
            vec![(b[0], vec![0]), (b[1], vec![0]), (b[2], vec![0])],
            at(2),
        ))
        .await?
        .started;
    ensure!(started.len() == 3);
    let by_builder = |i: usize| {
        started
            .iter()
            .find(|sb| sb.build.builder_id == b[i])
            .map(|sb| sb.build.clone())
    };
    let (a, bb, c) = (
        by_builder(0).ok_or_else(|| anyhow!("no a"))?,
        by_builder(1).ok_or_else(|| anyhow!("no b"))?,
        by_builder(2).ok_or_else(|| anyhow!("no c"))?,
    );
    // "c" runs on m, but "other" tries to finish it: refused, and nothing else changes.
    let artifact = |path: &str| kiln_model::Artifact {
        path: path.into(),
        size: 3,
        location: format!("/results/{path}"),
    };
    let refused = s
        .build_finish_batch(
            other,
            &[FinishedBuild {
                artifacts: vec![artifact("stolen.txt")],
                ..end(&c, ResultCode::Success, at(3))
            }],
        )
        .await?;
    ensure!(refused.refused == [c.id] && refused.completed.is_empty());
    ensure!(!s.build_get(c.id).await?.is_complete());

    let settled = s
        .build_finish_batch(
            m,
            &[
                FinishedBuild {
                    artifacts: vec![artifact("b/report.txt"), artifact("a.log")],
                    ..end(&a, ResultCode::Warnings, at(4))
                },
                end(&bb, ResultCode::Retry, at(4)),
                end(&c, ResultCode::Failure, at(5)),
            ],
        )
        .await?;
    ensure!(settled.refused.is_empty(), "{settled:?}");
    let mut completed = vec![a.request_id, c.request_id];
    completed.sort();
    ensure!(
        settled.completed == completed && settled.released == [bb.request_id],
        "{settled:?}"
    );
    ensure!(
        settled.buildsets_completed.len() == 1 && settled.buildsets_completed[0].buildset_id == bs2
    );
    ensure!(settled.buildsets_completed[0].results == ResultCode::Failure);
    let a_now = s.build_get(a.id).await?;
    ensure!(a_now.results == Some(ResultCode::Warnings) && a_now.complete_at == Some(at(4)));
    ensure!(
        a_now.return_value == Some(json!({"build": a.id.0}))
            && a_now.state_string == "ended WARNINGS"
    );
    ensure!(s.request_get(a.request_id).await?.results == Some(ResultCode::Warnings));
    let retried = s.request_get(bb.request_id).await?;
    ensure!(
        !retried.complete && retried.claimed_by.is_none(),
        "RETRY puts the request back: {retried:?}"
    );
    ensure!(!s.buildset_get(bs1).await?.complete);

    let stored: Vec<String> = s
        .build_artifacts(a.id)
        .await?
        .into_iter()
        .map(|x| x.path)
        .collect();
    ensure!(
        stored == ["a.log", "b/report.txt"],
        "artifacts are kept, by path: {stored:?}"
    );
    ensure!(
        s.build_artifacts(c.id).await?.is_empty(),
        "a refused build's artifacts are not"
    );
    ensure!(matches!(
        s.build_artifacts(BuildId(99_999)).await,
        Err(StorageError::NotFound { .. })
    ));
    let twice = s
        .build_finish_batch(m, &[end(&a, ResultCode::Success, at(6))])
        .await?;
    ensure!(
        twice.refused == [a.id],
        "a finished build cannot finish again"
    );
    ensure!(s.build_get(a.id).await?.results == Some(ResultCode::Warnings));

    // The retried request runs again and completes the first buildset.
    let again = s
        .build_start_available(&start_all(m, vec![(b[1], vec![0])], at(7)))
        .await?
        .started;
    ensure!(again.len() == 1 && again[0].build.number == 2);
    let last = s
        .build_finish_batch(m, &[end(&again[0].build, ResultCode::Success, at(8))])
        .await?;
    ensure!(last.buildsets_completed.len() == 1 && last.buildsets_completed[0].buildset_id == bs1);
    ensure!(last.buildsets_completed[0].results == ResultCode::Warnings);
    let done = s.buildset_get(bs1).await?;
    ensure!(done.complete_at == Some(at(8)) && done.results == Some(ResultCode::Warnings));
    Ok(())
}
