//! Production shapes: what the examples never reached.

use super::*;

// ---- production shapes ----

pub async fn outbox_seqs_are_never_reused_after_the_prune_empties_the_outbox(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    s.reporter_register("r").await?;
    let m = master(s, "m").await?;
    buildset(s, &[], at(1)).await?;
    let first = s.outbox_read(0, 100).await?;
    ensure!(first.len() == 2, "{first:?}");
    let last = first[1].seq;
    s.reporter_lease("r", m, at(1), at(30)).await?;
    s.reporter_progress(&progress("r", m, last, at(2))).await?;
    ensure!(s.outbox_prune().await? == 2);
    ensure!(s.outbox_read(0, 100).await?.is_empty());
    // The table is empty now; the next events must still come after the cursor.
    buildset(s, &[], at(3)).await?;
    let next = s.outbox_read(last, 100).await?;
    ensure!(
        next.len() == 2 && next.iter().all(|e| e.seq > last),
        "events after the prune must have seqs past {last}: {next:?}"
    );
    let state = s.reporter_get("r").await?;
    ensure!(state.pending == 2, "{state:?}");
    // A store opened anew (a restart) continues the sequence too.
    let again = h.another().await?;
    again.outbox_prune().await?;
    buildset(&*again, &[], at(4)).await?;
    let all = again.outbox_read(last, 100).await?;
    ensure!(all.len() == 4 && all.windows(2).all(|w| w[0].seq < w[1].seq));
    Ok(())
}

pub async fn a_reporters_pending_count_is_every_event_past_its_cursor(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let fresh = s.reporter_register("r").await?;
    ensure!(fresh.pending == 0, "{fresh:?}");
    let m = master(s, "m").await?;
    for i in 0..5 {
        buildset(s, &[], at(i)).await?;
    }
    ensure!(s.reporter_get("r").await?.pending == 10);
    let events = s.outbox_read(0, 100).await?;
    s.reporter_lease("r", m, at(5), at(30)).await?;
    s.reporter_progress(&progress("r", m, events[3].seq, at(6)))
        .await?;
    let listed = s.reporter_list().await?;
    ensure!(listed.len() == 1 && listed[0].pending == 6, "{listed:?}");
    Ok(())
}

pub async fn claim_capacity_goes_to_builders_with_queued_work_in_buildbots_order(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    // 40 builders, more than any fixed share of the capacity would reach; only some
    // have queued work.
    let names: Vec<String> = (0..40).map(|i| format!("b{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let b = builders(s, &refs).await?;
    let m = master(s, "m").await?;
    let queue = |builder: usize, priority: i32, second: i64| {
        let params = NewBuildset {
            builder_ids: vec![b[builder]],
            priority,
            submitted_at: at(second),
            ..NewBuildset::default()
        };
        async move { buildset_with(s, params).await.map(|(_, r)| r[0]) }
    };
    // b39: priority 9. b05 and b30: priority 5, b30 queued earlier. b20: priority 5 too,
    // same time as b30 but a later name. b01: priority 0, two requests, the second one
    // more urgent.
    let r39 = queue(39, 9, 50).await?;
    let r05 = queue(5, 5, 40).await?;
    let r30 = queue(30, 5, 10).await?;
    let r20 = queue(20, 5, 10).await?;
    let r01a = queue(1, 0, 0).await?;
    let r01b = queue(1, 3, 60).await?;
    let every_builder: Vec<(BuilderId, Vec<i64>)> = b.iter().map(|id| (*id, vec![0, 1])).collect();
    let mut order = Vec::new();
    // One request per round: the limit decides who gets the only room.
    for round in 0..6 {
        let mut params = start_all(m, every_builder.clone(), at(100 + round));
        params.limit = 1;
        let started = s.build_start_available(&params).await?;
        ensure!(
            started.started.len() == 1,
            "round {round}: {:?}",
            started.started
        );
        order.push(started.started[0].request.id);
    }
    ensure!(
        order == [r39, r20, r30, r05, r01b, r01a],
        "claim order {order:?}; want b39, b20 (same age as b30, earlier name), b30, b05, then b01 by priority"
    );
    // Nothing left: a round with room claims nothing.
    let none = s
        .build_start_available(&start_all(m, every_builder.clone(), at(200)))
        .await?;
    ensure!(none.started.is_empty());
    // The limit caps the total; builders without work do not use it up.
    for (i, builder) in b.iter().enumerate().take(30) {
        buildset(s, &[*builder], at(300 + i as i64)).await?;
    }
    let mut params = start_all(m, every_builder, at(400));
    params.limit = 25;
    let got = s.build_start_available(&params).await?;
    ensure!(got.started.len() == 25, "{}", got.started.len());
    Ok(())
}

pub async fn unclaimed_requests_in_collection_queries_exclude_complete_ones(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let m = master(s, "m").await?;
    let (_, queued) = buildset(s, &b, at(1)).await?;
    let (_, cancelled) = buildset(s, &b, at(2)).await?;
    let (_, claimed) = buildset(s, &b, at(3)).await?;
    s.request_cancel(&cancelled, at(4)).await?;
    s.request_claim(&claimed, m, at(5)).await?;
    let query = |value: bool| Query::new().eq(RequestField::Claimed, value);
    let unclaimed: Vec<RequestId> = s
        .request_query(&query(false))
        .await?
        .items
        .iter()
        .map(|r| r.id)
        .collect();
    ensure!(unclaimed == queued, "claimed=false: {unclaimed:?}");
    let with_claim: Vec<RequestId> = s
        .request_query(&query(true))
        .await?
        .items
        .iter()
        .map(|r| r.id)
        .collect();
    ensure!(with_claim == claimed, "claimed=true: {with_claim:?}");
    Ok(())
}
