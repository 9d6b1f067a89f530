//! Typed collection queries.

use super::*;

// ---- collection queries ----

/// `field op v1 OR v2 ...`: a filter with several values.
fn any_of<F: kiln_storage::Field>(
    q: Query<F>,
    field: F,
    op: Op,
    values: Vec<FilterValue>,
) -> Query<F> {
    let mut q = q;
    q.filters.push(kiln_storage::Filter { field, op, values });
    q
}

pub async fn collection_queries_filter_order_and_page_in_the_database(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let ids = builders(s, &["alpha", "beta"]).await?;
    let m = master(s, "m").await?;
    // Five buildsets submitted at at(0)..at(4); the first three complete with SUCCESS,
    // FAILURE, SUCCESS; the fourth has an external id.
    let mut sets = Vec::new();
    for i in 0..5 {
        let (bs, reqs) = buildset_with(
            s,
            NewBuildset {
                builder_ids: vec![ids[i % 2]],
                external_idstring: (i == 3).then(|| "ext-3".to_owned()),
                submitted_at: at(i as i64),
                ..NewBuildset::default()
            },
        )
        .await?;
        sets.push((bs, reqs[0]));
    }
    for (i, results) in [
        ResultCode::Success,
        ResultCode::Failure,
        ResultCode::Success,
    ]
    .into_iter()
    .enumerate()
    {
        let req = sets[i].1;
        s.request_claim(&[req], m, at(10)).await?;
        let b = start(s, req, m).await?;
        s.build_finish(m, &finish(&b, results, at(20 + i as i64)))
            .await?;
        s.request_complete(&[req], results, at(20 + i as i64))
            .await?;
    }
    let bsids = |page: &kiln_storage::Page<kiln_model::Buildset>| -> Vec<i64> {
        page.items.iter().map(|b| b.id.0).collect()
    };
    let all: Vec<i64> = sets.iter().map(|(b, _)| b.0).collect();
    let buildsets = || Query::<BuildsetField>::new().counted();

    let done = s
        .buildset_query(&buildsets().eq(BuildsetField::Complete, true))
        .await?;
    ensure!(bsids(&done) == all[..3] && done.total == Some(3));
    let failed = s
        .buildset_query(&buildsets().eq(BuildsetField::Results, ResultCode::Failure))
        .await?;
    ensure!(bsids(&failed) == [all[1]]);
    let not_failed = s
        .buildset_query(&buildsets().filter(BuildsetField::Results, Op::Ne, ResultCode::Failure))
        .await?;
    ensure!(
        bsids(&not_failed) == [all[0], all[2], all[3], all[4]],
        "ne counts a missing value as different"
    );
    let either = s
        .buildset_query(&any_of(
            buildsets(),
            BuildsetField::Id,
            Op::Eq,
            vec![FilterValue::Int(all[1]), FilterValue::Int(all[4])],
        ))
        .await?;
    ensure!(
        bsids(&either) == [all[1], all[4]],
        "repeated values mean any of"
    );
    let no_ext = s
        .buildset_query(&buildsets().eq(BuildsetField::ExternalIdstring, FilterValue::Null))
        .await?;
    ensure!(no_ext.total == Some(4));
    let ext = s
        .buildset_query(&buildsets().filter(BuildsetField::ExternalIdstring, Op::Contains, "xt-"))
        .await?;
    ensure!(bsids(&ext) == [all[3]]);
    let window = s
        .buildset_query(
            &buildsets()
                .filter(BuildsetField::SubmittedAt, Op::Ge, at(1))
                .filter(BuildsetField::SubmittedAt, Op::Lt, at(4)),
        )
        .await?;
    ensure!(bsids(&window) == all[1..4]);
    let not_in = s
        .buildset_query(&any_of(
            buildsets(),
            BuildsetField::Id,
            Op::NotIn,
            vec![FilterValue::Int(all[0]), FilterValue::Int(all[1])],
        ))
        .await?;
    ensure!(bsids(&not_in) == all[2..]);
    let uncounted = s.buildset_query(&Query::new()).await?;
    ensure!(uncounted.total.is_none() && uncounted.items.len() == 5);

    // Ordering, paging, and the total before paging.
    let page = s
        .buildset_query(
            &buildsets()
                .order_by(BuildsetField::SubmittedAt, true)
                .limit(2)
                .offset(1),
        )
        .await?;
    ensure!(
        bsids(&page) == [all[3], all[2]] && page.total == Some(5),
        "{page:?}"
    );

    // The other collections.
    let alpha_builds = s
        .build_query(&Query::new().counted().eq(BuildField::BuilderId, ids[0]))
        .await?;
    ensure!(alpha_builds.total == Some(2));
    let in_set = s
        .build_query(&Query::new().eq(BuildField::BuildsetId, BuildsetId(all[1])))
        .await?;
    ensure!(in_set.items.len() == 1 && in_set.items[0].results == Some(ResultCode::Failure));
    let open = s
        .request_query(&Query::new().counted().eq(RequestField::Complete, false))
        .await?;
    ensure!(open.total == Some(2));
    let claimed = s
        .request_query(&Query::new().counted().eq(RequestField::Claimed, true))
        .await?;
    ensure!(
        claimed.total == Some(3),
        "a completed request keeps the claim it ran under"
    );
    let named = s
        .builder_query(&Query::new().filter(BuilderField::Name, Op::Contains, "et"))
        .await?;
    ensure!(named.items.len() == 1 && named.items[0].name == "beta");
    let masters = s.master_query(&Query::new().counted()).await?;
    ensure!(masters.total == Some(1));
    ensure!(
        matches!(
            s.build_query(&Query::new().filter(BuildField::StateString, Op::Gt, "x"))
                .await,
            Err(StorageError::Invalid(_))
        ),
        "an operator that does not apply to the field's type is refused"
    );
    ensure!(
        matches!(
            s.master_query(&Query::new().filter(
                MasterField::LastActive,
                Op::Lt,
                FilterValue::Null
            ))
            .await,
            Err(StorageError::Invalid(_))
        ),
        "null is not ordered"
    );
    Ok(())
}

pub async fn the_priority_of_an_open_request_can_change(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["b"]).await?[0];
    let (_, reqs) = buildset(s, &[b], at(0)).await?;
    s.request_set_priority(reqs[0], 50).await?;
    ensure!(s.request_get(reqs[0]).await?.priority == 50);
    ensure!(matches!(
        s.request_set_priority(reqs[0], 5_000).await,
        Err(StorageError::Invalid(_))
    ));
    s.request_complete(&reqs, ResultCode::Success, at(1))
        .await?;
    ensure!(matches!(
        s.request_set_priority(reqs[0], 1).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.request_set_priority(RequestId(999), 1).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn an_expired_master_starts_nothing_until_it_registers_again(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let paused = master(s, "paused").await?;
    let live = master(s, "live").await?;
    s.buildset_add(&NewBuildset {
        reason: "x".into(),
        builder_ids: b.clone(),
        submitted_at: at(1),
        ..Default::default()
    })
    .await?;
    s.master_heartbeat(live, at(50)).await?;
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: live,
            silent_since: at(10),
            now: at(60),
        })
        .await?;
    ensure!(expired.len() == 1 && expired[0].master_id == paused);
    // What it claimed now would belong to nobody alive: refused, and nothing changes.
    let err = s
        .build_start_available(&start_all(paused, vec![(b[0], vec![0])], at(61)))
        .await
        .err()
        .ok_or_else(|| anyhow!("an expired master started work"))?;
    ensure!(
        matches!(err, StorageError::MasterInactive(m) if m == paused),
        "{err}"
    );
    ensure!(s.request_list(&unclaimed()).await?.len() == 1);
    let again = s.master_register("paused", at(62)).await?;
    let got = s
        .build_start_available(&start_all(again.master_id, vec![(b[0], vec![0])], at(63)))
        .await?;
    ensure!(got.started.len() == 1);
    Ok(())
}
