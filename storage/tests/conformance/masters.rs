//! Masters: registration, heartbeats, expiry.

use super::*;

// ---- masters ----

pub async fn masters_register_heartbeat_and_list(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let a = s.master_register("a", at(1)).await?;
    ensure!(a.released.is_empty() && a.retried_builds.is_empty());
    let b = master(s, "b").await?;
    s.master_heartbeat(a.master_id, at(7)).await?;
    let got = s.master_get(a.master_id).await?;
    ensure!(got.name == "a" && got.active && got.last_active == at(7));
    let names: Vec<String> = s.master_list().await?.into_iter().map(|m| m.name).collect();
    ensure!(names == ["a", "b"]);
    ensure!(
        s.master_register("a", at(8)).await?.master_id == a.master_id,
        "a name keeps its id"
    );
    ensure!(b != a.master_id);
    ensure!(matches!(
        s.master_heartbeat(MasterId(99_999), at(9)).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

pub async fn an_expired_master_loses_its_claims_and_its_builds_end_as_retry(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b", "c"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let dead = s.master_register("dead", at(0)).await?.master_id;
    let live = s.master_register("live", at(0)).await?.master_id;
    s.request_claim(&r, dead, at(1)).await?;
    let running = start(s, r[0], dead).await?;
    s.request_complete(&[r[2]], ResultCode::Success, at(2))
        .await?;
    s.master_heartbeat(live, at(100)).await?;
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: live,
            silent_since: at(50),
            now: at(100),
        })
        .await?;
    ensure!(expired.len() == 1 && expired[0].master_id == dead && expired[0].name == "dead");
    ensure!(
        expired[0].released == [r[0], r[1]] && expired[0].retried_builds == [running.id],
        "{expired:?}"
    );
    let build = s.build_get(running.id).await?;
    ensure!(build.results == Some(ResultCode::Retry) && build.complete_at == Some(at(100)));
    ensure!(
        build.error.as_deref().is_some_and(|e| e.contains("dead")),
        "{:?}",
        build.error
    );
    ensure!(
        ids(&s.request_list(&unclaimed()).await?) == [r[0], r[1]],
        "the requests are back in the queue"
    );
    ensure!(
        s.request_get(r[2]).await?.claimed_by == Some(dead),
        "a complete request keeps its claim"
    );
    ensure!(!s.master_get(dead).await?.active);
    ensure!(matches!(
        s.master_heartbeat(dead, at(101)).await,
        Err(StorageError::MasterInactive(_))
    ));
    let late = s
        .build_finish(dead, &finish(&running, ResultCode::Success, at(102)))
        .await;
    ensure!(
        matches!(late, Err(StorageError::NotOwner { .. })),
        "the expired master's late write is refused"
    );
    // The work runs again elsewhere.
    s.request_claim(&[r[0]], live, at(103)).await?;
    let again = start(s, r[0], live).await?;
    ensure!(again.number == 2);
    Ok(())
}

pub async fn a_live_master_is_never_expired(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let a = s.master_register("a", at(0)).await?.master_id;
    let b = s.master_register("b", at(0)).await?.master_id;
    s.master_heartbeat(b, at(60)).await?;
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: a,
            silent_since: at(50),
            now: at(61),
        })
        .await?;
    ensure!(expired.is_empty(), "b beat recently");
    let expired = s
        .master_expire_stale(&ExpireMasters {
            by: a,
            silent_since: at(500),
            now: at(501),
        })
        .await?;
    ensure!(
        expired.len() == 1 && expired[0].master_id == b,
        "never the caller itself"
    );
    ensure!(s.master_get(a).await?.active);
    Ok(())
}

pub async fn registering_a_master_again_takes_back_its_earlier_work(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, at(1)).await?;
    let build = start(s, r[0], m).await?;
    let again = s.master_register("m", at(5)).await?;
    ensure!(
        again.master_id == m && again.released == r && again.retried_builds == [build.id],
        "{again:?}"
    );
    ensure!(s.build_get(build.id).await?.results == Some(ResultCode::Retry));
    ensure!(ids(&s.request_list(&unclaimed()).await?) == r);
    Ok(())
}

pub async fn deactivating_a_master_releases_its_claims(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let (_, r) = buildset(s, &b, at(1)).await?;
    let m = master(s, "m").await?;
    s.request_claim(&r, m, at(1)).await?;
    let released = s.master_deactivate(m).await?;
    ensure!(released == r && !s.master_get(m).await?.active);
    ensure!(matches!(
        s.master_heartbeat(m, at(2)).await,
        Err(StorageError::MasterInactive(_))
    ));
    Ok(())
}
