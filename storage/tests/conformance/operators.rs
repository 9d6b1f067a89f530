//! Operators' controls: pausing builders and idempotent submission.

use super::*;

// ---- pausing ----

pub async fn a_paused_builder_keeps_its_queue_until_resumed_while_other_builders_run(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["paused", "running"]).await?;
    for i in 0..4 {
        buildset(s, &b, at(i)).await?;
    }
    let m = master(s, "m").await?;
    s.builder_set_paused(b[0], true).await?;
    // Pausing twice changes nothing; every store on the database sees it.
    s.builder_set_paused(b[0], true).await?;
    let other = h.another().await?;
    ensure!(other.builder_get(b[0]).await?.paused);
    ensure!(!other.builder_get(b[1]).await?.paused);
    let paused = s
        .builder_query(&Query::new().eq(BuilderField::Paused, true))
        .await?;
    ensure!(paused.items.iter().map(|x| x.id).collect::<Vec<_>>() == [b[0]]);

    let slots = vec![(b[0], vec![0, 1, 2, 3]), (b[1], vec![0, 1, 2, 3])];
    let got = s
        .build_start_available(&start_all(m, slots.clone(), at(10)))
        .await?;
    ensure!(
        got.started.len() == 4,
        "the builder not paused runs its 4 requests"
    );
    ensure!(got.started.iter().all(|x| x.build.builder_id == b[1]));
    let again = s
        .build_start_available(&start_all(m, slots.clone(), at(11)))
        .await?;
    ensure!(
        again.started.is_empty(),
        "nothing of a paused builder starts"
    );
    let queued = s
        .request_list(&RequestFilter {
            builder_id: Some(b[0]),
            complete: Some(false),
            ..Default::default()
        })
        .await?;
    ensure!(queued.len() == 4 && queued.iter().all(|r| r.claimed_by.is_none()));

    // Resumed through another store: this one's next claim takes the queue.
    other.builder_set_paused(b[0], false).await?;
    let resumed = s
        .build_start_available(&start_all(m, slots, at(12)))
        .await?;
    ensure!(resumed.started.len() == 4);
    ensure!(resumed.started.iter().all(|x| x.build.builder_id == b[0]));
    ensure!(matches!(
        s.builder_set_paused(BuilderId(999_999), true).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}

// ---- idempotent submission ----

fn keyed(builders: &[BuilderId], key: Option<&str>, reason: &str) -> NewBuildset {
    NewBuildset {
        reason: reason.into(),
        builder_ids: builders.to_vec(),
        idempotency_key: key.map(str::to_owned),
        submitted_at: at(1),
        ..NewBuildset::default()
    }
}

async fn buildset_count(s: &dyn Store) -> Result<u64> {
    let page = s.buildset_query(&Query::new().counted()).await?;
    page.total
        .ok_or_else(|| anyhow!("a counted query returned no total"))
}

pub async fn a_second_submit_with_the_same_idempotency_key_returns_the_first_buildset(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let first = s
        .buildset_add(&keyed(&b, Some("deploy-42"), "first"))
        .await?;
    ensure!(!first.existing);
    // Another reason and other builders: the key decides, and the answer is the buildset
    // holding it, with its own requests.
    let second = s
        .buildset_add(&keyed(&b[..1], Some("deploy-42"), "second"))
        .await?;
    ensure!(second.existing);
    ensure!(second.buildset_id == first.buildset_id && second.requests == first.requests);
    ensure!(s.buildset_get(first.buildset_id).await?.reason == "first");
    ensure!(buildset_count(s).await? == 1);

    // In one batch: the first of two with a new key makes it, the second gets it back;
    // a buildset without a key is always new; odd bytes are keys like any other.
    let odd = "k\u{0}\u{1}\n\u{7f}é";
    let batch = s
        .buildset_add_many(&[
            keyed(&b, Some("fresh"), "one"),
            keyed(&b, Some("fresh"), "two"),
            keyed(&b, None, "three"),
            keyed(&b, Some("deploy-42"), "four"),
            keyed(&b, Some(odd), "five"),
        ])
        .await?;
    ensure!(
        batch.iter().map(|a| a.existing).collect::<Vec<_>>() == [false, true, false, true, false]
    );
    ensure!(batch[0].buildset_id == batch[1].buildset_id && batch[0].requests == batch[1].requests);
    ensure!(batch[3].buildset_id == first.buildset_id);
    ensure!(buildset_count(s).await? == 4);
    let odd_again = s.buildset_add(&keyed(&b, Some(odd), "six")).await?;
    ensure!(odd_again.existing && odd_again.buildset_id == batch[4].buildset_id);
    // A key-less buildset without builders is complete at once; a keyed one answers
    // with no requests the second time too.
    let empty = s.buildset_add(&keyed(&[], Some("empty"), "e")).await?;
    let empty_again = s.buildset_add(&keyed(&b, Some("empty"), "e")).await?;
    ensure!(empty_again.existing && empty_again.buildset_id == empty.buildset_id);
    ensure!(empty_again.requests.is_empty());

    ensure!(matches!(
        s.buildset_add(&keyed(&b, Some("  "), "blank")).await,
        Err(StorageError::Invalid(_))
    ));
    Ok(())
}

pub async fn concurrent_submits_with_shared_keys_from_several_stores_make_one_buildset_per_key(
    h: &Harness,
) -> Result<()> {
    const STORES: usize = 4;
    const SUBMITS: usize = 40;
    const KEYS: u64 = 7;
    let seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    println!("seed {seed}");
    let s = &*h.store;
    let b = builders(s, &["a"]).await?;
    let mut tasks = Vec::new();
    for n in 0..STORES {
        let store = h.another().await?;
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            // A seeded generator per store: keys drawn at random, alone or in batches.
            let mut x = seed ^ (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut answers = Vec::new();
            let mut done = 0;
            while done < SUBMITS {
                let size = (next() % 3 + 1) as usize;
                let batch: Vec<(String, NewBuildset)> = (0..size)
                    .map(|_| {
                        let key = format!("key-{}", next() % KEYS);
                        let params = keyed(&b, Some(&key), "race");
                        (key, params)
                    })
                    .collect();
                let params: Vec<NewBuildset> = batch.iter().map(|(_, p)| p.clone()).collect();
                let added = store.buildset_add_many(&params).await?;
                for ((key, _), a) in batch.into_iter().zip(added) {
                    answers.push((key, a));
                }
                done += size;
            }
            anyhow::Ok(answers)
        }));
    }
    let mut by_key: BTreeMap<String, (BuildsetId, usize)> = BTreeMap::new();
    for task in tasks {
        for (key, added) in task.await?? {
            let entry = by_key.entry(key.clone()).or_insert((added.buildset_id, 0));
            ensure!(
                entry.0 == added.buildset_id,
                "seed {seed}: key {key} answered with buildsets {} and {}",
                entry.0,
                added.buildset_id
            );
            if !added.existing {
                entry.1 += 1;
            }
        }
    }
    for (key, (_, made)) in &by_key {
        ensure!(*made == 1, "seed {seed}: key {key} made {made} buildsets");
    }
    ensure!(
        buildset_count(s).await? == by_key.len() as u64,
        "seed {seed}: one buildset per key"
    );
    Ok(())
}

// ---- delayed runs and retries ----

pub async fn a_delayed_request_waits_for_its_time_while_due_work_runs(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["later", "now"]).await?;
    let m = master(s, "m").await?;
    let (_, delayed) = buildset_with(
        s,
        NewBuildset {
            builder_ids: vec![b[0]],
            submitted_at: at(1),
            not_before: Some(at(100)),
            // The most urgent request of all, and still not before its time.
            priority: 50,
            ..NewBuildset::default()
        },
    )
    .await?;
    let (_, due) = buildset(s, &[b[0], b[1]], at(2)).await?;
    ensure!(s.request_get(delayed[0]).await?.not_before == Some(at(100)));
    let delayed_page = s
        .request_query(&Query::new().filter(RequestField::NotBefore, Op::Gt, at(50)))
        .await?;
    ensure!(delayed_page.items.iter().map(|r| r.id).collect::<Vec<_>>() == delayed);

    let slots = vec![(b[0], vec![0, 1]), (b[1], vec![0])];
    let early = s
        .build_start_available(&start_all(m, slots.clone(), at(50)))
        .await?;
    let started: BTreeSet<RequestId> = early.started.iter().map(|x| x.request.id).collect();
    ensure!(started == BTreeSet::from([due[0], due[1]]), "{started:?}");
    let on_time = s
        .build_start_available(&start_all(m, slots, at(100)))
        .await?;
    ensure!(
        on_time
            .started
            .iter()
            .map(|x| x.request.id)
            .collect::<Vec<_>>()
            == delayed
    );
    Ok(())
}

pub async fn a_retried_build_keeps_its_result_and_its_request_waits_out_the_backoff(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["flaky"]).await?;
    let m = master(s, "m").await?;
    let (bs, r) = buildset(s, &b, at(1)).await?;
    let slots = vec![(b[0], vec![0])];
    let first = s
        .build_start_available(&start_all(m, slots.clone(), at(2)))
        .await?;
    ensure!(first.started.len() == 1);
    let build = &first.started[0].build;
    let outcome = s
        .build_finish_batch(
            m,
            &[FinishedBuild {
                retry_at: Some(at(200)),
                ..finish(build, ResultCode::Exception, at(3))
            }],
        )
        .await?;
    ensure!(outcome.released == r && outcome.completed.is_empty());
    ensure!(s.build_get(build.id).await?.results == Some(ResultCode::Exception));
    let request = s.request_get(r[0]).await?;
    ensure!(!request.complete && request.claimed_by.is_none());
    ensure!(request.not_before == Some(at(200)));
    ensure!(!s.buildset_get(bs).await?.complete);
    let waiting = s
        .build_start_available(&start_all(m, slots.clone(), at(150)))
        .await?;
    ensure!(waiting.started.is_empty(), "claimed during its backoff");
    let second = s
        .build_start_available(&start_all(m, slots, at(200)))
        .await?;
    ensure!(second.started.len() == 1 && second.started[0].build.number == 2);
    s.build_finish_batch(
        m,
        &[finish(
            &second.started[0].build,
            ResultCode::Success,
            at(201),
        )],
    )
    .await?;
    let done = s.buildset_get(bs).await?;
    ensure!(done.complete && done.results == Some(ResultCode::Success));
    Ok(())
}

// ---- retention ----

/// A buildset of `builders` whose every request ran one build that ended at `at`.
async fn finished_buildset(
    s: &dyn Store,
    builders: &[BuilderId],
    m: MasterId,
    at: Timestamp,
) -> Result<(BuildsetId, Vec<kiln_model::Build>)> {
    finished_with_stamps(s, builders, &[], m, at).await
}

/// Claims `requests` for `m` and runs each to one successful build that ends at `at`.
async fn run_to_success(
    s: &dyn Store,
    requests: &[RequestId],
    m: MasterId,
    at: Timestamp,
) -> Result<Vec<kiln_model::Build>> {
    s.request_claim(requests, m, at).await?;
    let mut builds = Vec::new();
    for r in requests {
        let build = start(s, *r, m).await?;
        s.build_finish_batch(m, &[finish(&build, ResultCode::Success, at)])
            .await?;
        builds.push(build);
    }
    Ok(builds)
}

pub async fn deleting_a_buildset_takes_its_builds_and_outputs_and_refuses_unfinished_work(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["a", "b"]).await?;
    let m = master(s, "m").await?;
    let (done, builds) = finished_buildset(s, &b, m, at(5)).await?;
    let record = LogRecord {
        at: at(5),
        level: LogLevel::Info,
        message: "kept until deleted".into(),
        fields: serde_json::Map::new(),
    };
    s.log_append(builds[0].id, &[record]).await?;
    s.build_set_property(builds[0].id, "p", &Property::new(json!(1), "t"))
        .await?;
    let (open, _) = buildset(s, &b, at(6)).await?;
    ensure!(matches!(
        s.buildset_delete(open).await,
        Err(StorageError::Invalid(_))
    ));
    ensure!(matches!(
        s.buildset_delete(BuildsetId(999_999)).await,
        Err(StorageError::NotFound { .. })
    ));
    let gone = s.buildset_delete(done).await?;
    ensure!(
        gone.iter().map(|g| g.id).collect::<BTreeSet<_>>() == builds.iter().map(|g| g.id).collect()
    );
    ensure!(matches!(
        s.buildset_get(done).await,
        Err(StorageError::NotFound { .. })
    ));
    ensure!(matches!(
        s.build_get(builds[0].id).await,
        Err(StorageError::NotFound { .. })
    ));
    let logs = s
        .log_list(&LogQuery {
            build_id: Some(builds[0].id),
            ..LogQuery::default()
        })
        .await?;
    ensure!(logs.is_empty());
    // The open buildset is untouched.
    ensure!(
        s.request_list(&RequestFilter {
            buildset_id: Some(open),
            ..Default::default()
        })
        .await?
        .len()
            == 2
    );
    Ok(())
}

pub async fn retention_keeps_the_newest_and_the_recent_and_deletes_the_rest_in_batches(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["kept", "other"]).await?;
    let m = master(s, "m").await?;
    // A buildset shared with a builder under no retention stays while its request does.
    let (shared, _) = finished_buildset(s, &b, m, at(1)).await?;
    let mut sets = Vec::new();
    for i in 1..=10 {
        sets.push(finished_buildset(s, &b[..1], m, at(i)).await?.0);
    }
    // Queued work is never swept.
    let (queued, _) = buildset(s, &b[..1], at(0)).await?;
    let kept = b[0];
    let sweep = |other: Arc<dyn Store>| async move {
        let mut builds = 0;
        let mut requests = 0;
        let mut buildsets = 0;
        loop {
            let swept = other
                .retention_sweep(&RetentionSweep {
                    builder_id: kept,
                    cutoff: at(8),
                    keep_last: 3,
                    batch: 2,
                })
                .await?;
            if swept.busy {
                tokio::task::yield_now().await;
                continue;
            }
            ensure!(swept.builds.len() <= 2 && swept.requests <= 2);
            builds += swept.builds.len();
            requests += swept.requests;
            buildsets += swept.buildsets;
            if swept.builds.is_empty() && swept.requests == 0 {
                return anyhow::Ok((builds, requests, buildsets));
            }
        }
    };
    // Two stores sweep at once: together they delete each thing once.
    let (one, two) = tokio::join!(sweep(h.another().await?), sweep(h.another().await?));
    let (one, two) = (one?, two?);
    // Builds 1..=7 of "kept" and the shared buildset's build go (the newest 3 stay, and
    // everything after the cutoff); their requests too; buildsets 1..=7 go, the shared
    // one stays for its other request.
    ensure!(one.0 + two.0 == 8, "{one:?} {two:?}");
    ensure!(one.1 + two.1 == 8, "{one:?} {two:?}");
    ensure!(one.2 + two.2 == 7, "{one:?} {two:?}");
    for (i, bs) in sets.iter().enumerate() {
        let exists = s.buildset_get(*bs).await.is_ok();
        ensure!(exists == (i >= 7), "buildset {i}: exists {exists}");
    }
    ensure!(s.buildset_get(shared).await.is_ok() && s.buildset_get(queued).await.is_ok());
    Ok(())
}

/// A buildset of `builders` naming `stamps` whose every request ran one build that
/// ended at `at`.
async fn finished_with_stamps(
    s: &dyn Store,
    builders: &[BuilderId],
    stamps: &[SourceStamp],
    m: MasterId,
    at: Timestamp,
) -> Result<(BuildsetId, Vec<kiln_model::Build>)> {
    let (bs, requests) = buildset_with(
        s,
        NewBuildset {
            builder_ids: builders.to_vec(),
            sourcestamps: stamps.to_vec(),
            submitted_at: at,
            ..NewBuildset::default()
        },
    )
    .await?;
    Ok((bs, run_to_success(s, &requests, m, at).await?))
}

/// The stored stamps, without their ids.
async fn stored_stamps(s: &dyn Store) -> Result<BTreeSet<SourceStamp>> {
    let (page, total) = s.sourcestamp_page(100, 0).await?;
    ensure!(
        page.len() as u64 == total,
        "{total} stamps, {} read",
        page.len()
    );
    Ok(page.into_iter().map(|(_, stamp)| stamp).collect())
}

pub async fn retention_deletes_the_source_stamps_no_buildset_left_names(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["kept"]).await?;
    let m = master(s, "m").await?;
    let only_old = stamp("https://git/x", "main", "1111");
    let shared = stamp("https://git/x", "main", "2222");
    let only_new = stamp("https://git/y", "dev", "3333");
    finished_with_stamps(s, &b, &[only_old.clone(), shared.clone()], m, at(1)).await?;
    finished_with_stamps(s, &b, std::slice::from_ref(&only_old), m, at(2)).await?;
    let (recent, _) =
        finished_with_stamps(s, &b, &[shared.clone(), only_new.clone()], m, at(9)).await?;
    let swept = s
        .retention_sweep(&RetentionSweep {
            builder_id: b[0],
            cutoff: at(8),
            keep_last: 0,
            batch: 10,
        })
        .await?;
    ensure!(
        swept.buildsets == 2 && swept.sourcestamps == 1,
        "{} buildsets, {} stamps",
        swept.buildsets,
        swept.sourcestamps
    );
    // The stamp only the two old buildsets named went; the one the recent buildset
    // shares with them stayed, and the recent buildset still names both of its own.
    ensure!(stored_stamps(s).await? == BTreeSet::from([shared.clone(), only_new.clone()]));
    ensure!(
        s.buildset_sourcestamps(recent)
            .await?
            .into_iter()
            .collect::<BTreeSet<_>>()
            == BTreeSet::from([shared.clone(), only_new.clone()])
    );
    // Deleting the last buildset that names them takes them too.
    s.buildset_delete(recent).await?;
    ensure!(stored_stamps(s).await?.is_empty());
    // A stamp deleted is stored anew by the next buildset that names it.
    let (again, _) =
        finished_with_stamps(s, &b, std::slice::from_ref(&only_old), m, at(10)).await?;
    ensure!(s.buildset_sourcestamps(again).await? == vec![only_old.clone()]);
    ensure!(stored_stamps(s).await? == BTreeSet::from([only_old]));
    Ok(())
}

pub async fn a_buildset_submitted_while_retention_deletes_its_stamp_still_names_it(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["kept"]).await?;
    let m = master(s, "m").await?;
    let x = stamp("https://git/x", "main", "4444");
    let sweeper = h.another().await?;
    // Each round, a finished buildset is the last to name the stamp, and another store
    // sweeps it (and the stamp) away while a new buildset naming the stamp is added.
    finished_with_stamps(s, &b, std::slice::from_ref(&x), m, at(1)).await?;
    let sweep_old = RetentionSweep {
        builder_id: b[0],
        cutoff: at(8),
        keep_last: 0,
        batch: 100,
    };
    for round in 0..100 {
        // Busy while a sweep of another test holds PostgreSQL's (database-wide) lock.
        let sweep = async {
            loop {
                let swept = sweeper.retention_sweep(&sweep_old).await?;
                if !swept.busy {
                    return anyhow::Ok(swept);
                }
                tokio::task::yield_now().await;
            }
        };
        let add = buildset_with(
            s,
            NewBuildset {
                builder_ids: b.clone(),
                sourcestamps: vec![x.clone()],
                submitted_at: at(1),
                ..NewBuildset::default()
            },
        );
        let (swept, added) = tokio::join!(sweep, add);
        let (_, (bs, requests)) = (swept?, added?);
        ensure!(
            s.buildset_sourcestamps(bs).await? == vec![x.clone()],
            "round {round}: the new buildset lost its stamp"
        );
        // Finished in the past, the new buildset is the next round's to sweep.
        run_to_success(s, &requests, m, at(1)).await?;
    }
    Ok(())
}

// ---- collapsing ----

pub async fn a_collapsing_builder_runs_the_newest_of_identical_requests_and_skips_the_rest(
    h: &Harness,
) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["collapsing", "plain"]).await?;
    let m = master(s, "m").await?;
    let main = stamp("https://git/x", "main", "");
    let other = stamp("https://git/x", "dev", "");
    let add = |stamps: Vec<SourceStamp>, builders: Vec<BuilderId>, props: Option<i64>| {
        let mut properties = BTreeMap::new();
        if let Some(v) = props {
            properties.insert("n".to_owned(), Property::new(json!(v), "t"));
        }
        NewBuildset {
            builder_ids: builders,
            sourcestamps: stamps,
            properties,
            submitted_at: at(1),
            ..NewBuildset::default()
        }
    };
    // Three on main (two with n = 1, one with n = 2), one on dev, all for both builders.
    let mut ids = Vec::new();
    for (stamps, props) in [
        (vec![main.clone()], Some(1)),
        (vec![other.clone()], Some(1)),
        (vec![main.clone()], Some(2)),
        (vec![main.clone()], Some(1)),
    ] {
        ids.push(buildset_with(s, add(stamps, b.clone(), props)).await?.1);
    }
    let slots = vec![(b[0], vec![0, 1, 2, 3]), (b[1], vec![0, 1, 2, 3])];
    // With properties: only the two n = 1 requests on main are identical.
    let mut with_props = start_all(m, slots.clone(), at(2));
    with_props.collapse = vec![(b[0], true)];
    let outcome = s.build_start_available(&with_props).await?;
    ensure!(
        outcome.collapsed == [(ids[0][0], ids[3][0])],
        "{:?}",
        outcome.collapsed
    );
    let skipped = s.request_get(ids[0][0]).await?;
    ensure!(skipped.complete && skipped.results == Some(ResultCode::Skipped));
    ensure!(skipped.superseded_by == Some(ids[3][0]));
    // The plain builder collapses nothing: its four run.
    let plain = outcome
        .started
        .iter()
        .filter(|x| x.build.builder_id == b[1])
        .count();
    ensure!(plain == 4, "{plain}");
    // The collapsing builder ran the other three.
    let ran: BTreeSet<RequestId> = outcome
        .started
        .iter()
        .filter(|x| x.build.builder_id == b[0])
        .map(|x| x.request.id)
        .collect();
    ensure!(
        ran == BTreeSet::from([ids[1][0], ids[2][0], ids[3][0]]),
        "{ran:?}"
    );

    // Without properties, stamps alone decide; claimed requests are never collapsed.
    let more: Vec<Vec<RequestId>> = vec![
        buildset_with(s, add(vec![main.clone()], b[..1].to_vec(), Some(5)))
            .await?
            .1,
        buildset_with(s, add(vec![main.clone()], b[..1].to_vec(), Some(6)))
            .await?
            .1,
    ];
    let mut by_stamps = start_all(m, vec![(b[0], vec![4])], at(3));
    by_stamps.collapse = vec![(b[0], false)];
    let outcome = s.build_start_available(&by_stamps).await?;
    ensure!(
        outcome.collapsed == [(more[0][0], more[1][0])],
        "{:?}",
        outcome.collapsed
    );
    ensure!(outcome.started.len() == 1 && outcome.started[0].request.id == more[1][0]);
    // Each collapsed request's buildset completed (its only request was SKIPPED), or
    // waits for its other builder.
    let bs = s.request_get(more[0][0]).await?.buildset_id;
    ensure!(s.buildset_get(bs).await?.results == Some(ResultCode::Skipped));
    Ok(())
}

pub async fn a_builder_is_served_while_an_active_master_runs_it(h: &Harness) -> Result<()> {
    let s = &*h.store;
    let b = builders(s, &["served", "orphan"]).await?;
    let m = master(s, "m").await?;
    ensure!(!s.builder_get(b[0]).await?.served);
    s.builder_serve(m, b[0]).await?;
    s.builder_serve(m, b[0]).await?;
    let other = h.another().await?;
    ensure!(other.builder_get(b[0]).await?.served && !other.builder_get(b[1]).await?.served);
    let unserved = s
        .builder_query(&Query::new().eq(BuilderField::Served, false).counted())
        .await?;
    ensure!(unserved.items.iter().map(|x| x.id).collect::<Vec<_>>() == [b[1]]);
    ensure!(unserved.total == Some(1), "counted: {:?}", unserved.total);
    ensure!(
        s.builder_get_by_name("served")
            .await?
            .is_some_and(|x| x.served),
        "read by name too"
    );
    // A master that shuts down serves nothing any more, nor does one registering anew
    // until it registers its builders again.
    s.master_deactivate(m).await?;
    ensure!(!s.builder_get(b[0]).await?.served);
    s.master_register("m", at(5)).await?;
    ensure!(!s.builder_get(b[0]).await?.served);
    ensure!(matches!(
        s.builder_serve(m, BuilderId(999_999)).await,
        Err(StorageError::NotFound { .. })
    ));
    Ok(())
}
