//! Build requests: listing, claims, completion and cancellation.

use super::*;

// ---- requests: listing ----

pub async fn listing_requests_filters_by_builder_buildset_completeness_and_claim(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (bs1, r1) = buildset(s, &b, at(1)).await?;
    let (_, r2) = buildset(s, &b, at(2)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[r1[0]], m1, at(3)).await?;
    s.request_claim(&[r2[0]], m2, at(3)).await?;
    s.request_claim(&[r1[1]], m1, at(3)).await?;
    s.request_complete(&[r1[1]], ResultCode::Success, at(4))
        .await?;

    let by_builder = s
        .request_list(&RequestFilter {
            builder_id: Some(b[0]),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&by_builder) == [r1[0], r2[0]]);
    let by_buildset = s
        .request_list(&RequestFilter {
            buildset_id: Some(bs1),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&by_buildset) == r1);
    let complete = s
        .request_list(&RequestFilter {
            complete: Some(true),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&complete) == [r1[1]]);
    let incomplete = s
        .request_list(&RequestFilter {
            complete: Some(false),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&incomplete) == [r1[0], r2[0], r2[1]]);
    let claimed = s
        .request_list(&RequestFilter {
            claimed: ClaimFilter::Claimed,
            ..Default::default()
        })
        .await?;
    ensure!(
        ids(&claimed) == [r1[0], r1[1], r2[0]],
        "a completed request keeps its claim: {:?}",
        ids(&claimed)
    );
    ensure!(
        ids(&s.request_list(&unclaimed()).await?) == [r2[1]],
        "unclaimed means no claim and not complete"
    );
    let mine = s
        .request_list(&RequestFilter {
            claimed: ClaimFilter::ClaimedBy(m1),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&mine) == [r1[0], r1[1]]);
    ensure!(mine[0].claimed_by == Some(m1) && mine[0].claimed_at == Some(at(3)));
    let both = s
        .request_list(&RequestFilter {
            builder_id: Some(b[0]),
            claimed: ClaimFilter::ClaimedBy(m2),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&both) == [r2[0]]);
    Ok(())
}

pub async fn listing_requests_filters_by_branch_and_repository_of_the_stamps(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, main_x) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![stamp("x", "main", "1")],
            ..Default::default()
        },
    )
    .await?;
    let (_, dev_x) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![stamp("x", "dev", "2")],
            ..Default::default()
        },
    )
    .await?;
    let (_, main_y) = buildset_with(
        s,
        NewBuildset {
            builder_ids: b.clone(),
            sourcestamps: vec![stamp("y", "main", "3")],
            ..Default::default()
        },
    )
    .await?;
    let main = s
        .request_list(&RequestFilter {
            branch: Some("main".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&main) == [main_x[0], main_y[0]]);
    let x = s
        .request_list(&RequestFilter {
            repository: Some("x".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&x) == [main_x[0], dev_x[0]]);
    let both = s
        .request_list(&RequestFilter {
            repository: Some("x".into()),
            branch: Some("dev".into()),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&both) == [dev_x[0]]);
    ensure!(
        s.request_list(&RequestFilter {
            branch: Some("none".into()),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

pub async fn listing_requests_orders_limits_and_offsets(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let mut made = Vec::new();
    for (i, priority) in [0, 10, 5, 10].into_iter().enumerate() {
        let (_, r) = buildset_with(
            s,
            NewBuildset {
                builder_ids: b.clone(),
                priority,
                submitted_at: at(10 - i as i64),
                ..Default::default()
            },
        )
        .await?;
        made.push(r[0]);
    }
    let by = |field, descending| RequestOrder { field, descending };
    let ordered = s
        .request_list(&RequestFilter {
            order: vec![
                by(RequestOrderField::Priority, true),
                by(RequestOrderField::SubmittedAt, false),
            ],
            ..Default::default()
        })
        .await?;
    ensure!(
        ids(&ordered) == [made[3], made[1], made[2], made[0]],
        "{:?}",
        ids(&ordered)
    );
    let desc = s
        .request_list(&RequestFilter {
            order: vec![by(RequestOrderField::Id, true)],
            ..Default::default()
        })
        .await?;
    ensure!(ids(&desc) == [made[3], made[2], made[1], made[0]]);
    let page = s
        .request_list(&RequestFilter {
            limit: Some(2),
            offset: Some(1),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&page) == [made[1], made[2]]);
    let tail = s
        .request_list(&RequestFilter {
            offset: Some(3),
            ..Default::default()
        })
        .await?;
    ensure!(ids(&tail) == [made[3]]);
    Ok(())
}

// ---- requests: claims and completion ----

pub async fn claiming_is_all_or_nothing(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[r[1]], m1, at(2)).await?;
    let err = s
        .request_claim(&r, m2, at(3))
        .await
        .err()
        .ok_or_else(|| anyhow!("claimed a held request"))?;
    match err {
        StorageError::AlreadyClaimed(taken) => ensure!(taken == [r[1]], "{taken:?}"),
        other => return Err(anyhow!("expected AlreadyClaimed, got {other}")),
    }
    let after = s
        .request_list(&RequestFilter {
            claimed: ClaimFilter::ClaimedBy(m2),
            ..Default::default()
        })
        .await?;
    ensure!(after.is_empty(), "nothing was claimed by the losing master");
    ensure!(
        s.request_get(r[1]).await?.claimed_by == Some(m1),
        "the existing claim is untouched"
    );
    s.request_claim(&[r[0], r[2]], m2, at(4)).await?;
    ensure!(
        ids(&s
            .request_list(&RequestFilter {
                claimed: ClaimFilter::ClaimedBy(m2),
                ..Default::default()
            })
            .await?)
            == [r[0], r[2]]
    );
    Ok(())
}

pub async fn claiming_a_request_the_caller_already_holds_fails(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r[0]], m, at(2)).await?;
    let err = s
        .request_claim(&r, m, at(3))
        .await
        .err()
        .ok_or_else(|| anyhow!("re-claim succeeded"))?;
    ensure!(
        matches!(err, StorageError::AlreadyClaimed(ref v) if v == &[r[0]]),
        "{err}"
    );
    ensure!(
        s.request_get(r[1]).await?.claimed_by.is_none(),
        "the free request stayed free"
    );
    // A complete request cannot be claimed either.
    s.request_complete(&[r[0]], ResultCode::Success, at(4))
        .await?;
    s.request_unclaim(&[r[0]], m).await?;
    ensure!(matches!(
        s.request_claim(&[r[0]], m, at(5)).await,
        Err(StorageError::AlreadyClaimed(_))
    ));
    Ok(())
}

pub async fn claiming_an_unknown_request_fails_without_side_effects(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    let err = s
        .request_claim(&[r[0], RequestId(424_242)], m, at(2))
        .await
        .err()
        .ok_or_else(|| anyhow!("claimed a ghost"))?;
    ensure!(matches!(err, StorageError::NotFound { .. }), "{err}");
    ensure!(s.request_get(r[0]).await?.claimed_by.is_none());
    Ok(())
}

pub async fn unclaiming_releases_only_the_callers_own_claims(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m1 = master(s, "m1").await?;
    let m2 = master(s, "m2").await?;
    s.request_claim(&[r[0], r[2]], m1, at(2)).await?;
    s.request_claim(&[r[1]], m2, at(2)).await?;
    s.request_complete(&[r[2]], ResultCode::Success, at(3))
        .await?;
    s.request_unclaim(&[r[0], r[1], r[2], RequestId(777_777)], m1)
        .await?;
    ensure!(
        s.request_get(r[0]).await?.claimed_by.is_none(),
        "own claim released"
    );
    ensure!(
        s.request_get(r[1]).await?.claimed_by == Some(m2),
        "another master's claim untouched"
    );
    ensure!(
        s.request_get(r[2]).await?.claimed_by == Some(m1),
        "a complete request keeps its claim"
    );
    Ok(())
}

pub async fn completing_fails_for_the_whole_list_if_any_is_missing_or_complete(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, at(2)).await?;
    s.request_complete(&[r[0]], ResultCode::Success, at(3))
        .await?;
    let err = s
        .request_complete(&[r[0], r[1]], ResultCode::Failure, at(4))
        .await
        .err()
        .ok_or_else(|| anyhow!("completed twice"))?;
    ensure!(
        matches!(err, StorageError::NotClaimed(ref v) if v == &[r[0]]),
        "{err}"
    );
    ensure!(
        !s.request_get(r[1]).await?.complete,
        "nothing else completed"
    );
    let err = s
        .request_complete(&[r[1], RequestId(55_555)], ResultCode::Failure, at(4))
        .await
        .err()
        .ok_or_else(|| anyhow!("completed a ghost"))?;
    ensure!(
        matches!(err, StorageError::NotClaimed(ref v) if v == &[RequestId(55_555)]),
        "{err}"
    );
    ensure!(!s.request_get(r[1]).await?.complete);
    s.request_complete(&[r[1], r[2]], ResultCode::Warnings, at(5))
        .await?;
    let done = s.request_get(r[2]).await?;
    ensure!(
        done.complete
            && done.results == Some(ResultCode::Warnings)
            && done.complete_at == Some(at(5))
    );
    Ok(())
}

pub async fn retry_is_not_a_completion_result(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    ensure!(matches!(
        s.request_complete(&r, ResultCode::Retry, at(2)).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(!s.request_get(r[0]).await?.complete);
    Ok(())
}

pub async fn the_last_request_to_complete_completes_the_buildset_with_the_worst_result(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let cases = [
        (
            [
                ResultCode::Success,
                ResultCode::Skipped,
                ResultCode::Success,
            ],
            ResultCode::Success,
        ),
        (
            [
                ResultCode::Warnings,
                ResultCode::Success,
                ResultCode::Skipped,
            ],
            ResultCode::Warnings,
        ),
        (
            [
                ResultCode::Failure,
                ResultCode::Exception,
                ResultCode::Warnings,
            ],
            ResultCode::Exception,
        ),
        (
            [
                ResultCode::Cancelled,
                ResultCode::Exception,
                ResultCode::Failure,
            ],
            ResultCode::Cancelled,
        ),
        (
            [
                ResultCode::Skipped,
                ResultCode::Skipped,
                ResultCode::Skipped,
            ],
            ResultCode::Skipped,
        ),
    ];
    let m = master(s, "m").await?;
    for (results, worst) in cases {
        let (bs, r) = buildset(s, &b, at(1)).await?;
        s.request_claim(&r, m, at(2)).await?;
        let first = s.request_complete(&[r[0]], results[0], at(3)).await?;
        let second = s.request_complete(&[r[1]], results[1], at(4)).await?;
        ensure!(first.is_empty() && second.is_empty() && !s.buildset_get(bs).await?.complete);
        let last = s.request_complete(&[r[2]], results[2], at(5)).await?;
        ensure!(
            last.len() == 1 && last[0].buildset_id == bs && last[0].results == worst,
            "{results:?}: {last:?}"
        );
        let done = s.buildset_get(bs).await?;
        ensure!(done.complete && done.results == Some(worst) && done.complete_at == Some(at(5)));
    }
    Ok(())
}

pub async fn concurrent_claims_from_several_masters_never_claim_a_request_twice(
    h: &Harness,
) -> Result<()> {
    const MASTERS: usize = 4;
    const REQUESTS: usize = 300;
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    for i in 0..REQUESTS / 2 {
        buildset(s, &b, at(i as i64)).await?;
    }
    let all: Vec<RequestId> = ids(&s.request_list(&RequestFilter::default()).await?);
    let mut tasks = Vec::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(MASTERS));
    for n in 0..MASTERS {
        // Each master has its own connection pool, as a separate process would.
        let store = h.another().await?;
        let m = master(&*store, &format!("m{n}")).await?;
        let all = all.clone();
        let b = b.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Everyone starts together, so the claims really overlap.
            barrier.wait().await;
            let mut mine: Vec<RequestId> = Vec::new();
            let mut round = 0usize;
            loop {
                round += 1;
                // Alternate between both claim paths: explicit lists, and the scheduler's
                // claim-and-start of available work.
                let got = if round.is_multiple_of(2) {
                    let pick: Vec<RequestId> = all
                        .iter()
                        .skip((round * 7 + n * 13) % all.len())
                        .take(3)
                        .copied()
                        .collect();
                    match store.request_claim(&pick, m, at(0)).await {
                        Ok(()) => pick,
                        Err(StorageError::AlreadyClaimed(_)) => Vec::new(),
                        Err(e) => return Err(anyhow!(e)),
                    }
                } else {
                    let got = store
                        .build_start_available(&start_all(
                            m,
                            vec![(b[0], vec![0, 1]), (b[1], vec![0, 1])],
                            at(0),
                        ))
                        .await?;
                    if got.started.is_empty() {
                        return Ok(mine);
                    }
                    got.started.iter().map(|s| s.request.id).collect()
                };
                mine.extend(got);
            }
        }));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        let mine = task.await??;
        for id in mine {
            ensure!(seen.insert(id), "request {id} was claimed twice");
        }
    }
    ensure!(
        seen.len() == REQUESTS,
        "every request claimed once: {} of {REQUESTS}",
        seen.len()
    );
    ensure!(s.request_list(&unclaimed()).await?.is_empty());
    Ok(())
}

// ---- cancel ----

pub async fn cancelling_completes_unclaimed_requests_and_flags_claimed_ones(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (bs, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r[1]], m, at(1)).await?;
    s.request_claim(&[r[2]], m, at(1)).await?;
    s.request_complete(&[r[2]], ResultCode::Success, at(2))
        .await?;
    let outcome = s
        .request_cancel(&[r[0], r[1], r[2], RequestId(88_888)], at(3))
        .await?;
    ensure!(
        outcome.completed == [r[0]]
            && outcome.flagged == [r[1]]
            && outcome.buildsets_completed.is_empty(),
        "{outcome:?}"
    );
    let cancelled = s.request_get(r[0]).await?;
    ensure!(
        cancelled.complete
            && cancelled.results == Some(ResultCode::Cancelled)
            && cancelled.complete_at == Some(at(3))
    );
    let flagged = s.request_get(r[1]).await?;
    ensure!(!flagged.complete && flagged.cancel_requested);
    ensure!(
        s.request_get(r[2]).await?.results == Some(ResultCode::Success),
        "complete requests are untouched"
    );
    ensure!(s.request_cancel_pending(m).await? == [r[1]]);
    s.request_complete(&[r[1]], ResultCode::Cancelled, at(4))
        .await?;
    ensure!(s.request_cancel_pending(m).await?.is_empty());
    ensure!(s.buildset_get(bs).await?.results == Some(ResultCode::Cancelled));
    Ok(())
}

pub async fn cancelling_the_last_open_request_completes_the_buildset(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (bs, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r[0]], m, at(1)).await?;
    s.request_complete(&[r[0]], ResultCode::Failure, at(2))
        .await?;
    let outcome = s.request_cancel(&[r[1]], at(3)).await?;
    ensure!(
        outcome.buildsets_completed.len() == 1
            && outcome.buildsets_completed[0].results == ResultCode::Cancelled
    );
    let done = s.buildset_get(bs).await?;
    ensure!(done.complete && done.results == Some(ResultCode::Cancelled));
    Ok(())
}

pub async fn cancels_in_one_transaction_each_get_the_outcome_of_their_own_turn(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (first, r1) = buildset(s, &b, at(1)).await?;
    let (second, r2) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&[r2[0]], m, at(1)).await?;
    let groups = vec![
        vec![r1[0], r1[1]],
        // Asked again by a later caller: already complete at its turn, so ignored.
        vec![r1[0], r2[0]],
        vec![RequestId(77_777)],
        vec![r2[1]],
    ];
    let outcomes = s.request_cancel_each(&groups, at(3)).await?;
    ensure!(outcomes.len() == 4, "{outcomes:?}");
    ensure!(
        outcomes[0].completed == [r1[0], r1[1]]
            && outcomes[0].flagged.is_empty()
            && outcomes[0].buildsets_completed.len() == 1
            && outcomes[0].buildsets_completed[0].buildset_id == first,
        "{:?}",
        outcomes[0]
    );
    ensure!(
        outcomes[1].completed.is_empty() && outcomes[1].flagged == [r2[0]],
        "{:?}",
        outcomes[1]
    );
    ensure!(outcomes[2] == CancelOutcome::default(), "{:?}", outcomes[2]);
    ensure!(
        outcomes[3].completed == [r2[1]] && outcomes[3].buildsets_completed.is_empty(),
        "the second buildset still has its claimed request open: {:?}",
        outcomes[3]
    );
    ensure!(!s.buildset_get(second).await?.complete);
    ensure!(s.request_cancel_pending(m).await? == [r2[0]]);
    ensure!(s.request_cancel_each(&[], at(4)).await?.is_empty());
    Ok(())
}

pub async fn priority_changes_in_one_transaction_each_get_their_own_answer(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, open) = buildset(s, &b, at(1)).await?;
    let (_, done) = buildset(s, &b, at(1)).await?;
    s.request_complete(&done, ResultCode::Success, at(2))
        .await?;
    let answers = s
        .request_set_priority_each(&[
            (open[0], 7),
            (done[0], 3),
            (RequestId(66_666), 3),
            (open[0], 100_000),
            (open[0], -9),
        ])
        .await?;
    ensure!(answers.len() == 5);
    ensure!(answers[0].is_ok(), "{:?}", answers[0]);
    ensure!(
        matches!(answers[1], Err(StorageError::Invalid(_))),
        "{:?}",
        answers[1]
    );
    ensure!(
        matches!(answers[2], Err(StorageError::NotFound { .. })),
        "{:?}",
        answers[2]
    );
    ensure!(
        matches!(answers[3], Err(StorageError::Invalid(_))),
        "{:?}",
        answers[3]
    );
    ensure!(answers[4].is_ok(), "{:?}", answers[4]);
    ensure!(
        s.request_get(open[0]).await?.priority == -9,
        "the changes apply in order"
    );
    ensure!(s.request_set_priority_each(&[]).await?.is_empty());
    Ok(())
}
