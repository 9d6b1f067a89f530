//! Locks: a build starts only with its builder's lock units free, holds them until it
//! finishes or its master expires, and records how long its request waited.

use super::*;

fn locked(
    master: MasterId,
    free_slots: Vec<(BuilderId, Vec<i64>)>,
    at: Timestamp,
) -> StartAvailable {
    StartAvailable {
        lock_builders: free_slots.iter().map(|(b, _)| *b).collect(),
        ..start_all(master, free_slots, at)
    }
}

pub async fn a_build_starts_only_with_its_lock_units_free_and_frees_them_when_it_finishes(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["tests", "migrate", "free"]).await?;
    s.lock_define("db", 2).await?;
    s.builder_set_locks(b[0], &[("db".into(), 1)]).await?;
    s.builder_set_locks(b[1], &[("db".into(), 2)]).await?;
    for i in 0..3 {
        buildset(s, &[b[0]], at(i)).await?;
    }
    buildset(s, &[b[1]], at(3)).await?;
    buildset(s, &[b[2]], at(4)).await?;
    let m = master(s, "m").await?;
    let slots = vec![(b[0], vec![0, 1, 2]), (b[1], vec![0]), (b[2], vec![0])];
    let first = s
        .build_start_available(&locked(m, slots.clone(), at(10)))
        .await?;
    let per = |o: &kiln_storage::StartOutcome, builder| {
        o.started
            .iter()
            .filter(|x| x.build.builder_id == builder)
            .count()
    };
    ensure!(
        per(&first, b[0]) == 2 && per(&first, b[1]) == 0 && per(&first, b[2]) == 1,
        "two units: two one-unit builds; the lock-free builder is not held back: {:?}",
        first
            .started
            .iter()
            .map(|x| x.build.builder_id)
            .collect::<Vec<_>>()
    );
    let locks = s.lock_list().await?;
    ensure!(locks.len() == 1 && locks[0].name == "db" && locks[0].capacity == 2);
    ensure!(locks[0].held() == 2 && locks[0].holders.len() == 2);
    ensure!(
        locks[0].waiting == 2,
        "the third request of one user and the request of the other wait: {}",
        locks[0].waiting
    );
    ensure!(
        locks[0]
            .users
            .iter()
            .map(|u| (u.builder.as_str(), u.units))
            .collect::<Vec<_>>()
            == [("migrate", 2), ("tests", 1)]
    );

    // Nothing more fits until a holder finishes; one finishing frees one unit, which
    // the oldest waiting request (the third `tests`) takes.
    let none = s
        .build_start_available(&locked(m, slots.clone(), at(11)))
        .await?;
    ensure!(none.started.is_empty());
    let holders: Vec<_> = first
        .started
        .iter()
        .filter(|x| x.build.builder_id == b[0])
        .map(|x| x.build.clone())
        .collect();
    s.build_finish_batch(m, &[finish(&holders[0], ResultCode::Success, at(20))])
        .await?;
    let second = s
        .build_start_available(&locked(m, slots.clone(), at(21)))
        .await?;
    ensure!(per(&second, b[0]) == 1 && per(&second, b[1]) == 0);
    ensure!(
        (second.started[0].build.locks_duration_s - 11.0).abs() < 1e-6,
        "it waited from the first claim that found the lock busy: {}",
        second.started[0].build.locks_duration_s
    );

    // Both remaining holders finish: the two-unit build takes the whole lock.
    let third_holder = second.started[0].build.clone();
    s.build_finish_batch(
        m,
        &[
            finish(&holders[1], ResultCode::Success, at(30)),
            finish(&third_holder, ResultCode::Failure, at(30)),
        ],
    )
    .await?;
    let last = s.build_start_available(&locked(m, slots, at(40))).await?;
    ensure!(per(&last, b[1]) == 1);
    let migrate = &last.started[0].build;
    ensure!((migrate.locks_duration_s - 30.0).abs() < 1e-6);
    ensure!(
        (s.build_get(migrate.id).await?.locks_duration_s - 30.0).abs() < 1e-6,
        "the duration is stored, not only returned"
    );
    let locks = s.lock_list().await?;
    ensure!(locks[0].held() == 2 && locks[0].holders[0].build_id == migrate.id);
    ensure!(locks[0].waiting == 0);
    s.build_finish_batch(m, &[finish(migrate, ResultCode::Success, at(50))])
        .await?;
    ensure!(s.lock_list().await?[0].holders.is_empty());
    Ok(())
}

pub async fn an_expired_master_frees_the_locks_its_builds_held(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["deploy"]).await?;
    s.lock_define("prod", 1).await?;
    s.builder_set_locks(b[0], &[("prod".into(), 1)]).await?;
    buildset(s, &b, at(1)).await?;
    buildset(s, &b, at(2)).await?;
    let dead = s.master_register("dead", at(0)).await?.master_id;
    let alive = s.master_register("alive", at(100)).await?.master_id;
    let slots = vec![(b[0], vec![0, 1])];
    let held = s
        .build_start_available(&locked(dead, slots.clone(), at(10)))
        .await?;
    ensure!(
        held.started.len() == 1,
        "an exclusive lock lets one build run"
    );
    ensure!(
        s.build_start_available(&locked(alive, slots.clone(), at(11)))
            .await?
            .started
            .is_empty(),
        "another master waits for the same lock"
    );
    s.master_expire_stale(&ExpireMasters {
        by: alive,
        silent_since: at(50),
        now: at(100),
    })
    .await?;
    ensure!(s.lock_list().await?[0].holders.is_empty());
    let taken = s
        .build_start_available(&locked(alive, slots, at(101)))
        .await?;
    ensure!(
        taken.started.len() == 1,
        "after the expiry one of the two requests runs (the lost one again, or the next)"
    );
    ensure!(s.lock_list().await?[0].holders[0].master_id == alive);
    Ok(())
}

pub async fn masters_claiming_at_once_never_hold_more_units_than_a_lock_has(
    h: &Harness,
) -> Result<()> {
    let s = h.store.clone();
    let other = h.another().await?;
    let b = builders(&*s, &["a", "b", "c"]).await?;
    s.lock_define("shared", 3).await?;
    for (i, builder) in b.iter().enumerate() {
        s.builder_set_locks(*builder, &[("shared".into(), 1 + (i as u32 % 2))])
            .await?;
    }
    for i in 0..20 {
        buildset(&*s, &b, at(i)).await?;
    }
    let m1 = master(&*s, "m1").await?;
    let m2 = master(&*other, "m2").await?;
    let slots: Vec<(BuilderId, Vec<i64>)> = b.iter().map(|x| (*x, vec![0, 1, 2, 3])).collect();
    let mut finished = 0;
    for round in 0..300i64 {
        if finished == 60 {
            break;
        }
        let (p1, p2) = (
            locked(m1, slots.clone(), at(100 + round)),
            locked(m2, slots.clone(), at(100 + round)),
        );
        let (x, y) = tokio::join!(
            s.build_start_available(&p1),
            other.build_start_available(&p2),
        );
        let (x, y) = (x?, y?);
        let locks = s.lock_list().await?;
        ensure!(
            locks[0].held() <= 3,
            "round {round}: {} units held of 3",
            locks[0].held()
        );
        for (m, outcome) in [(m1, x), (m2, y)] {
            let ends: Vec<FinishedBuild> = outcome
                .started
                .iter()
                .map(|st| finish(&st.build, ResultCode::Success, at(100 + round)))
                .collect();
            finished += ends.len();
            s.build_finish_batch(m, &ends).await?;
        }
    }
    ensure!(finished == 60, "every request ran once: {finished}");
    Ok(())
}

pub async fn lock_definitions_and_uses_are_checked(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["x"]).await?;
    ensure!(matches!(
        s.lock_define("zero", 0).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.lock_define(" ", 1).await,
        Err(StorageError::Invalid(_))
    ));
    s.lock_define("odd\u{0}name\u{7}", 2).await?;
    ensure!(s.lock_list().await?[0].name.starts_with("odd"));
    ensure!(matches!(
        s.builder_set_locks(b[0], &[("missing".into(), 1)]).await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(matches!(
        s.builder_set_locks(b[0], &[("odd\u{0}name\u{7}".into(), 3)])
            .await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.builder_set_locks(
            b[0],
            &[
                ("odd\u{0}name\u{7}".into(), 1),
                ("odd\u{0}name\u{7}".into(), 1)
            ]
        )
        .await,
        Err(StorageError::Invalid(_))
    ));
    s.builder_set_locks(b[0], &[("odd\u{0}name\u{7}".into(), 2)])
        .await?;
    // A new list replaces the old; an empty one clears it.
    s.builder_set_locks(b[0], &[]).await?;
    ensure!(s.lock_list().await?[0].users.is_empty());
    ensure!(matches!(
        s.builder_set_locks(BuilderId(999_999), &[]).await,
        Ok(()) | Err(StorageError::NotFound { .. })
    ));
    Ok(())
}
