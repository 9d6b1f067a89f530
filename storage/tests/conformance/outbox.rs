//! The reporters' outbox.

use super::*;

// ---- the outbox ----

pub async fn nothing_is_written_to_the_outbox_while_no_reporter_is_registered(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?[0];
    let m = master(s, "m").await?;
    built(s, b, m, vec![], ResultCode::Success, at(1)).await?;
    ensure!(s.outbox_read(0, 100).await?.is_empty());
    Ok(())
}

pub async fn every_lifecycle_change_writes_its_event_in_the_same_transaction(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let b = builders(s, &["b"]).await?[0];
    let m = master(s, "m").await?;
    // The batch paths: add, start, finish and settle.
    let (bs, requests) = buildset(s, &[b], at(1)).await?;
    let started = s
        .build_start_available(&start_all(m, vec![(b, vec![0])], at(2)))
        .await?;
    let build = started.started[0].build.id;
    s.build_finish_batch(
        m,
        &[FinishedBuild {
            build_id: build,
            request_id: requests[0],
            results: ResultCode::Warnings,
            return_value: Some(json!([1, 2])),
            error: None,
            traceback: None,
            state_string: Some("done".into()),
            artifacts: vec![],
            complete_at: at(5),
            retry_at: None,
        }],
    )
    .await?;
    // An empty buildset is submitted and complete at once; a cancel completes another.
    buildset(s, &[], at(6)).await?;
    let (cancelled, open) = buildset(s, &[b], at(7)).await?;
    s.request_cancel(&open, at(8)).await?;

    let events = s.outbox_read(0, 100).await?;
    let kinds: Vec<(ReportKind, BuildsetId)> =
        events.iter().map(|e| (e.kind, e.buildset_id)).collect();
    use ReportKind::*;
    ensure!(
        kinds
            == [
                (BuildsetSubmitted, bs),
                (BuildStarted, bs),
                (BuildFinished, bs),
                (BuildsetComplete, bs),
                (BuildsetSubmitted, BuildsetId(bs.0 + 1)),
                (BuildsetComplete, BuildsetId(bs.0 + 1)),
                (BuildsetSubmitted, cancelled),
                (BuildsetComplete, cancelled),
            ],
        "{kinds:?}"
    );
    ensure!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let finished = &events[2];
    ensure!(finished.build_id == Some(build) && finished.builder.as_deref() == Some("b"));
    ensure!(finished.results == Some(ResultCode::Warnings));
    let p = &finished.payload;
    ensure!(p["event"] == "build_finished" && p["results"] == 1 && p["state_string"] == "done");
    ensure!(
        p["return_value"] == json!([1, 2]) && p["duration_s"] == json!(3.0),
        "{p}"
    );
    ensure!(events[7].payload["results"] == ResultCode::Cancelled.code());
    ensure!(events[0].payload["builders"] == json!(["b"]));

    // The single-row paths too: build_add and build_finish, and a master's expiry.
    let (_, more) = buildset(s, &[b], at(9)).await?;
    s.request_claim(&more, m, at(9)).await?;
    let lone = start(s, more[0], m).await?;
    let before = s.outbox_read(0, 100).await?.len();
    s.build_finish(m, &finish(&lone, ResultCode::Success, at(10)))
        .await?;
    let (_, last) = buildset(s, &[b], at(11)).await?;
    s.request_claim(&last, m, at(11)).await?;
    let orphan = start(s, last[0], m).await?;
    s.master_expire_stale(&ExpireMasters {
        by: master(s, "other").await?,
        silent_since: at(1_000),
        now: at(1_000),
    })
    .await?;
    let after = s.outbox_read(0, 100).await?;
    let tail: Vec<(ReportKind, Option<BuildId>, Option<ResultCode>)> = after[before..]
        .iter()
        .map(|e| (e.kind, e.build_id, e.results))
        .collect();
    ensure!(
        tail == [
            (BuildFinished, Some(lone.id), Some(ResultCode::Success)),
            (BuildsetSubmitted, None, None),
            (BuildStarted, Some(orphan.id), None),
            (BuildFinished, Some(orphan.id), Some(ResultCode::Retry)),
        ],
        "{tail:?}"
    );
    Ok(())
}

pub async fn a_new_reporter_starts_at_the_end_of_the_outbox_and_a_known_one_keeps_its_place(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let first = s.reporter_register("first").await?;
    ensure!(first.cursor == 0 && first.delivered == 0 && first.owner.is_none());
    buildset(s, &[], at(1)).await?;
    let events = s.outbox_read(0, 10).await?;
    ensure!(events.len() == 2);
    let second = s.reporter_register("second").await?;
    ensure!(
        second.cursor == events[1].seq,
        "a new reporter hears only new events"
    );
    let again = s.reporter_register("first").await?;
    ensure!(again.cursor == 0, "registering again keeps the place");
    ensure!(s.reporter_list().await?.len() == 2);
    s.reporter_remove("second").await?;
    ensure!(matches!(
        s.reporter_get("second").await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(matches!(
        s.reporter_remove("second").await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(matches!(
        s.reporter_register(" ").await,
        Err(StorageError::Invalid(_))
    ));
    Ok(())
}

pub async fn only_one_master_holds_a_reporters_lease_until_it_runs_out(h: &Harness) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let (a, b) = (master(s, "a").await?, master(s, "b").await?);
    ensure!(
        s.reporter_lease("r", a, at(0), at(30))
            .await?
            .is_some_and(|r| r.owner == Some(a))
    );
    ensure!(s.reporter_lease("r", b, at(10), at(40)).await?.is_none());
    ensure!(
        s.reporter_lease("r", a, at(20), at(50)).await?.is_some(),
        "the holder renews"
    );
    ensure!(s.reporter_lease("r", b, at(49), at(80)).await?.is_none());
    let taken = s.reporter_lease("r", b, at(51), at(80)).await?;
    ensure!(
        taken.is_some_and(|r| r.owner == Some(b)),
        "an expired lease is taken over"
    );
    // A master that shuts down gives its leases up at once.
    s.master_deactivate(b).await?;
    let state = s.reporter_get("r").await?;
    ensure!(
        state.owner.is_none() && state.lease_until.is_none(),
        "{state:?}"
    );
    ensure!(s.reporter_lease("r", a, at(52), at(90)).await?.is_some());
    ensure!(matches!(
        s.reporter_lease("nope", a, at(0), at(1)).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn delivery_progress_is_refused_without_the_lease(h: &Harness) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let (a, b) = (master(s, "a").await?, master(s, "b").await?);
    s.reporter_lease("r", a, at(0), at(30)).await?;
    s.reporter_progress(&progress("r", a, 5, at(1))).await?;
    ensure!(matches!(
        s.reporter_progress(&progress("r", b, 9, at(2))).await,
        Err(StorageError::LeaseLost { .. })
    ));
    s.reporter_progress(&ReporterProgress {
        dropped: vec![(6, 3, "boom".into())],
        delivered: 0,
        attempts: 2,
        last_error: Some("boom".into()),
        ..progress("r", a, 6, at(3))
    })
    .await?;
    let state = s.reporter_get("r").await?;
    ensure!(
        state.cursor == 6 && state.delivered == 1 && state.dropped == 1,
        "{state:?}"
    );
    ensure!(state.attempts == 2 && state.last_error.as_deref() == Some("boom"));
    // A cursor never moves back.
    s.reporter_progress(&progress("r", a, 2, at(4))).await?;
    ensure!(s.reporter_get("r").await?.cursor == 6);
    // After the lease ran out, the old holder's writes are refused too.
    ensure!(matches!(
        s.reporter_progress(&progress("r", a, 7, at(100))).await,
        Err(StorageError::LeaseLost { .. })
    ));
    Ok(())
}

pub async fn pruning_the_outbox_keeps_what_any_reporter_still_needs(h: &Harness) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("slow").await?;
    s.reporter_register("fast").await?;
    let m = master(s, "m").await?;
    for i in 0..3 {
        buildset(s, &[], at(i)).await?;
    }
    let all = s.outbox_read(0, 100).await?;
    ensure!(all.len() == 6);
    s.reporter_lease("fast", m, at(0), at(30)).await?;
    s.reporter_progress(&progress("fast", m, all[5].seq, at(1)))
        .await?;
    s.reporter_lease("slow", m, at(0), at(30)).await?;
    s.reporter_progress(&progress("slow", m, all[1].seq, at(1)))
        .await?;
    ensure!(s.outbox_prune().await? == 2);
    let left = s.outbox_read(0, 100).await?;
    ensure!(left.len() == 4 && left[0].seq == all[2].seq);
    Ok(())
}
