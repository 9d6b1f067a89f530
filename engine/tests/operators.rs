//! Operators' controls end to end, on every backend: pausing builders (across a restart
//! and between masters), idempotent submits from several engines at once, and the
//! metrics and readiness an operator scrapes. Tests wait on events; timeouts only turn
//! a hang into a failure.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, ensure};
use kiln_engine::model::ResultCode;
use kiln_engine::storage::RequestFilter;
use kiln_engine::{
    BuilderConfig, Engine, EngineConfig, Event, FnExecutor, Outcome, RetryPolicy, Submission,
};
use serde_json::json;

mod support;
use support::{backends, guard};

fn ok() -> FnExecutor {
    FnExecutor::new(|_| async { Ok(Outcome::success(json!(null))) })
}

async fn engine(url: &str, name: &str) -> Result<Engine> {
    let engine = Engine::open(EngineConfig::new(url).master_name(name)).await?;
    engine
        .register_builder(BuilderConfig::new("held"), ok())
        .await?;
    engine
        .register_builder(BuilderConfig::new("free"), ok())
        .await?;
    Ok(engine)
}

async fn unclaimed(engine: &Engine, builder: &str) -> Result<usize> {
    let id = engine.client().builder_named(builder).await?.id;
    let requests = engine
        .client()
        .requests(&RequestFilter {
            builder_id: Some(id),
            complete: Some(false),
            ..Default::default()
        })
        .await?;
    ensure!(requests.iter().all(|r| r.claimed_by.is_none()));
    Ok(requests.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_builder_keeps_its_queue_across_a_restart_and_runs_it_when_resumed() -> Result<()>
{
    for backend in backends("pause_restart").await? {
        let engine = engine(&backend.url, "m1").await?;
        engine.set_builder_paused("held", true).await?;
        let mut held = Vec::new();
        for i in 0..5 {
            let s = Submission::new(format!("held {i}")).builder("held");
            held.push(engine.submit(&s).await?.buildset_id);
        }
        // The builder that is not paused runs while the paused one waits: by the time
        // its buildset is complete the claim loop has offered both builders' slots.
        let free = engine
            .submit(&Submission::new("free").builder("free"))
            .await?;
        guard("the free builder", engine.wait_buildset(free.buildset_id)).await??;
        ensure!(unclaimed(&engine, "held").await? == 5, "{}", backend.name);
        engine.shutdown().await;

        // Restarted: still paused, still queued.
        let engine = self::engine(&backend.url, "m1").await?;
        ensure!(engine.client().builder_named("held").await?.paused);
        let again = engine
            .submit(&Submission::new("free again").builder("free"))
            .await?;
        guard("the free builder", engine.wait_buildset(again.buildset_id)).await??;
        ensure!(unclaimed(&engine, "held").await? == 5, "{}", backend.name);

        let resumed = engine.set_builder_paused("held", false).await?;
        ensure!(!resumed.paused);
        for id in held {
            let done = guard("a resumed request", engine.wait_buildset(id)).await??;
            ensure!(done.results == Some(ResultCode::Success));
        }
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_one_master_lets_another_master_run_the_queue() -> Result<()> {
    for backend in backends("pause_masters").await? {
        // The master that runs "held" and a second process that only pauses and resumes.
        let runner = engine(&backend.url, "runner").await?;
        let operator = kiln_engine::Client::open(&backend.url).await?;
        operator.set_builder_paused("held", true).await?;
        let queued = runner
            .submit(&Submission::new("queued").builder("held"))
            .await?;
        let free = runner
            .submit(&Submission::new("free").builder("free"))
            .await?;
        guard("the free builder", runner.wait_buildset(free.buildset_id)).await??;
        ensure!(unclaimed(&runner, "held").await? == 1);
        // PostgreSQL notifies the runner; SQLite's runner finds it at its next poll.
        operator.set_builder_paused("held", false).await?;
        let done = guard(
            "the resumed request",
            runner.wait_buildset(queued.buildset_id),
        )
        .await??;
        ensure!(
            done.results == Some(ResultCode::Success),
            "{}",
            backend.name
        );
        runner.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_submits_with_one_key_on_two_masters_make_one_buildset_and_one_event() -> Result<()>
{
    for backend in backends("idempotent_engines").await? {
        let a = std::sync::Arc::new(engine(&backend.url, "a").await?);
        let b = std::sync::Arc::new(engine(&backend.url, "b").await?);
        let mut events = a.subscribe();
        let mut tasks = Vec::new();
        for i in 0..24 {
            let engine = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let s = Submission::new(format!("try {i}"))
                    .builder("free")
                    .idempotency_key("release-1.0");
                engine.submit(&s).await
            }));
        }
        let mut ids = BTreeSet::new();
        let mut new = 0;
        for task in tasks {
            let submitted = task.await??;
            ids.insert(submitted.buildset_id);
            new += usize::from(!submitted.existing);
            ensure!(submitted.requests.contains_key("free"));
        }
        ensure!(
            ids.len() == 1,
            "{}: one buildset, got {ids:?}",
            backend.name
        );
        ensure!(
            new == 1,
            "{}: {new} submits said they made it",
            backend.name
        );
        let Some(&id) = ids.first() else {
            anyhow::bail!("no buildset")
        };
        guard("the keyed buildset", a.wait_buildset(id)).await??;
        // Engine a announced the buildset at most once (once if it made it).
        let mut announced = 0;
        while let Ok(event) = events.try_recv() {
            if matches!(event, Event::BuildsetSubmitted { .. }) {
                announced += 1;
            }
        }
        ensure!(
            announced <= 1,
            "{}: announced {announced} times",
            backend.name
        );
        // A key-less repeat is new work; an empty key is refused.
        let fresh = a.submit(&Submission::new("again").builder("free")).await?;
        ensure!(!fresh.existing && fresh.buildset_id != id);
        ensure!(
            a.submit(
                &Submission::new("blank")
                    .builder("free")
                    .idempotency_key(" ")
            )
            .await
            .is_err()
        );
        a.shutdown().await;
        b.shutdown().await;
    }
    Ok(())
}

/// A build that ends with every queue drained frees a slot nobody waits for: the engine
/// runs no claim for it. (It used to, once per finished build: a transaction that found
/// nothing and made the next submit's claim wait behind it.) Counted by the SQLite
/// writer's callers, one per piece of work it committed: a submit, its claim and its
/// build's finish per job, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_ending_with_the_queues_drained_runs_no_claim_for_its_free_slot() -> Result<()> {
    const JOBS: u64 = 20;
    for backend in backends("drained").await? {
        if backend.name != "sqlite" {
            // Only the SQLite writer counts its callers.
            continue;
        }
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("m")).await?;
        engine
            .register_builder(BuilderConfig::new("b").max_concurrent(4), ok())
            .await?;
        let callers = async || -> Result<u64> {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &engine.metrics().await?)?;
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("kiln_sqlite_commit_callers_total ")?
                        .parse()
                        .ok()
                })
                .ok_or_else(|| anyhow::anyhow!("no callers count in\n{text}"))
        };
        let first = engine.submit(&Submission::new("warm").builder("b")).await?;
        guard(
            "the first buildset",
            engine.wait_buildset(first.buildset_id),
        )
        .await??;
        let before = callers().await?;
        for i in 0..JOBS {
            let s = engine
                .submit(&Submission::new(format!("job {i}")).builder("b"))
                .await?;
            guard("a buildset", engine.wait_buildset(s.buildset_id)).await??;
        }
        let made = callers().await? - before;
        // The first one after the warm-up may still meet the warm-up's claim; a periodic
        // task (a heartbeat) may write once.
        ensure!(
            made <= 3 * JOBS + 2,
            "{made} pieces of work for {JOBS} jobs (a submit, a claim and a finish each)"
        );
        engine.shutdown().await;
    }
    Ok(())
}

/// The other side of the test above: work left queued for want of room starts as builds
/// end, with the poll an hour away. Each way of wanting room on an engine of its own, so
/// that no other one wakes the queue: the engine's cap, a builder's busy slot, a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queued_for_want_of_room_starts_as_builds_end_without_the_poll() -> Result<()> {
    for backend in backends("room").await? {
        for (case, room, builder) in [
            ("the engine's room", 2, BuilderConfig::new("capped")),
            (
                "a busy slot",
                100,
                BuilderConfig::new("narrow").max_concurrent(1),
            ),
            (
                "a lock",
                100,
                BuilderConfig::new("locked").lock(kiln_engine::LockUse::exclusive("one")),
            ),
        ] {
            let mut config = EngineConfig::new(&backend.url).master_name("m");
            config.poll_interval = Duration::from_secs(3600);
            config.max_running_builds = room;
            let engine = Engine::open(config).await?;
            engine.define_lock("one", 1).await?;
            let name = builder.name.clone();
            engine.register_builder(builder, ok()).await?;
            let burst: Vec<Submission> = (0..12)
                .map(|i| Submission::new(format!("{name} {i}")).builder(&name))
                .collect();
            for s in engine.submit_many(&burst).await? {
                guard(
                    &format!("{}: a buildset queued behind {case}", backend.name),
                    engine.wait_buildset(s.buildset_id),
                )
                .await??;
            }
            engine.shutdown().await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_builds_by_builder_and_result_and_read_queues_from_the_database() -> Result<()>
{
    for backend in backends("metrics").await? {
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("m")).await?;
        // A builder name with the bytes a label value must escape.
        let odd = "odd \"name\"\\ with\nnewline";
        engine
            .register_builder(BuilderConfig::new(odd), ok())
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("fails"),
                FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Failure, None)) }),
            )
            .await?;
        engine
            .register_builder(BuilderConfig::new("held"), ok())
            .await?;
        engine.set_builder_paused("held", true).await?;
        for _ in 0..3 {
            let s = engine
                .submit(&Submission::new("m").builder(odd).builder("fails"))
                .await?;
            guard("a buildset", engine.wait_buildset(s.buildset_id)).await??;
        }
        for _ in 0..2 {
            engine.submit(&Submission::new("q").builder("held")).await?;
        }
        engine.ready().await?;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &engine.metrics().await?)?;
        let has = |line: &str| text.lines().any(|l| l == line);
        let escaped = r#"odd \"name\"\\ with\nnewline"#;
        for line in [
            format!(r#"kiln_builds_finished_total{{builder="{escaped}",result="SUCCESS"}} 3"#),
            r#"kiln_builds_finished_total{builder="fails",result="FAILURE"} 3"#.to_owned(),
            format!(r#"kiln_builds_started_total{{builder="{escaped}"}} 3"#),
            "kiln_claims_total 6".to_owned(),
            r#"kiln_requests_queued{builder="held"} 2"#.to_owned(),
            r#"kiln_requests_queued{builder="fails"} 0"#.to_owned(),
            r#"kiln_builder_paused{builder="held"} 1"#.to_owned(),
            "kiln_masters_alive 1".to_owned(),
            "kiln_submit_to_start_seconds_count 6".to_owned(),
            r#"kiln_build_duration_seconds_count{builder="fails"} 3"#.to_owned(),
        ] {
            ensure!(has(&line), "{}: no line {line:?} in\n{text}", backend.name);
        }
        // SQLite's writer counts its commits and the callers' writes they carried: at
        // least one per write this test made (submits, pause, claims, finishes), never
        // more commits than writes. PostgreSQL's server keeps its own figures.
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
        };
        let commits = value("kiln_sqlite_commits_total");
        let callers = value("kiln_sqlite_commit_callers_total");
        if backend.name == "sqlite" {
            let (Some(commits), Some(callers)) = (commits, callers) else {
                anyhow::bail!("no SQLite commit counts in\n{text}");
            };
            ensure!(
                commits >= 1 && callers >= commits,
                "{commits} commits, {callers} callers"
            );
            // 5 submits, 1 pause, 3 claims and 3 finishes at the very least.
            ensure!(callers >= 12, "{callers} callers");
            // Each of these small commits reaches the log in one write (two when it is
            // a single page); SQLite alone makes two a page, several pages a commit.
            let Some(log_writes) = value("kiln_sqlite_log_writes_total") else {
                anyhow::bail!("no SQLite log writes in\n{text}");
            };
            ensure!(
                log_writes >= 1 && log_writes <= 2 * commits,
                "{log_writes} log writes for {commits} commits"
            );
        } else {
            ensure!(commits.is_none() && callers.is_none(), "{text}");
            ensure!(value("kiln_sqlite_log_writes_total").is_none(), "{text}");
        }
        ensure!(text.ends_with("# EOF\n"));
        engine.shutdown().await;
    }
    Ok(())
}

/// A job that fails with an exception until its `n`th attempt, counting attempts by
/// build number.
fn flaky(succeed_at: i64) -> FnExecutor {
    FnExecutor::new(move |ctx| async move {
        if ctx.number() >= succeed_at {
            Ok(Outcome::success(json!(ctx.number())))
        } else {
            Ok(Outcome::exception("not yet", None))
        }
    })
}

fn quick(attempts: u32, on_failure: bool) -> RetryPolicy {
    RetryPolicy {
        attempts,
        on_failure,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(80),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_are_retried_with_backoff_until_the_attempts_run_out() -> Result<()> {
    for backend in backends("retries").await? {
        let mut config = EngineConfig::new(&backend.url).master_name("m");
        config.poll_interval = Duration::from_millis(20);
        let engine = Engine::open(config).await?;
        let name = backend.name;
        engine
            .register_builder(
                BuilderConfig::new("third-time").retry(quick(5, false)),
                flaky(3),
            )
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("hopeless").retry(quick(3, false)),
                flaky(99),
            )
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("fails").retry(quick(3, false)),
                FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Failure, None)) }),
            )
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("fails-retried").retry(quick(2, true)),
                FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Failure, None)) }),
            )
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("asks-again").retry(quick(2, false)),
                FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Retry, None)) }),
            )
            .await?;
        let expect = [
            ("third-time", ResultCode::Success, 3),
            ("hopeless", ResultCode::Exception, 3),
            ("fails", ResultCode::Failure, 1),
            ("fails-retried", ResultCode::Failure, 2),
            (
                "asks-again",
                ResultCode::Exception,
                kiln_engine::retry::DEFAULT_JOB_RETRY_ATTEMPTS as usize,
            ),
        ];
        for (builder, results, builds) in expect {
            let s = engine
                .submit(&Submission::new(builder).builder(builder))
                .await?;
            let done = guard(builder, engine.wait_buildset(s.buildset_id)).await??;
            ensure!(
                done.results == Some(results),
                "{name} {builder}: {:?}",
                done.results
            );
            let request = s.requests[builder];
            let all = engine
                .client()
                .builds(&kiln_engine::storage::BuildFilter {
                    request_id: Some(request),
                    ..Default::default()
                })
                .await?;
            ensure!(
                all.len() == builds,
                "{name} {builder}: {} builds",
                all.len()
            );
            // Each retry waited out its backoff: a build starts no earlier than the
            // previous one ended plus half the first backoff.
            let mut sorted = all.clone();
            sorted.sort_by_key(|b| b.number);
            for pair in sorted.windows(2) {
                let gap = pair[1].started_at - pair[0].complete_at.unwrap_or(pair[0].started_at);
                ensure!(
                    gap >= chrono::TimeDelta::milliseconds(10),
                    "{name} {builder}: {gap}"
                );
            }
            if builder == "asks-again" {
                let last = sorted
                    .last()
                    .and_then(|b| b.error.clone())
                    .unwrap_or_default();
                ensure!(last.contains("gave up"), "{name}: {last}");
            }
        }
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_submission_waits_as_scheduled_and_then_runs() -> Result<()> {
    for backend in backends("delayed").await? {
        let mut config = EngineConfig::new(&backend.url).master_name("m");
        config.poll_interval = Duration::from_millis(50);
        let engine = Engine::open(config).await?;
        engine
            .register_builder(BuilderConfig::new("later"), ok())
            .await?;
        let delay = Duration::from_millis(400);
        let s = engine
            .submit(&Submission::new("later").builder("later").delay(delay))
            .await?;
        let request = engine.client().request(s.requests["later"]).await?;
        let not_before = request
            .not_before
            .ok_or_else(|| anyhow::anyhow!("no not_before"))?;
        ensure!(request.claimed_by.is_none() || kiln_engine::model::now() >= not_before);
        let done = guard("the delayed run", engine.wait_buildset(s.buildset_id)).await??;
        ensure!(done.results == Some(ResultCode::Success));
        let build = engine
            .client()
            .builds(&kiln_engine::storage::BuildFilter {
                request_id: Some(request.id),
                ..Default::default()
            })
            .await?;
        ensure!(
            build.len() == 1 && build[0].started_at >= not_before,
            "{}",
            backend.name
        );
        // Too far ahead is refused, naming the field.
        let far = Submission::new("far")
            .builder("later")
            .delay(Duration::from_secs(400 * 24 * 3600));
        let refused = engine.submit(&far).await;
        ensure!(refused.is_err_and(|e| e.to_string().contains("not_before")));
        engine.shutdown().await;
    }
    Ok(())
}

/// The next buildset submitted with `reason`, from events received since `events` was
/// subscribed.
async fn submitted_with(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    reason: &str,
) -> Result<kiln_engine::model::BuildsetId> {
    loop {
        if let Event::BuildsetSubmitted {
            buildset_id,
            reason: r,
            ..
        } = events.recv().await?
            && r == reason
        {
            return Ok(buildset_id);
        }
    }
}

/// Waits until a schedule's ticks have moved on by two seconds: nothing announces a tick
/// passed over, so this reads the schedule's row until it says so.
async fn two_idle_ticks(engine: &Engine, schedule: &str) -> Result<()> {
    let before = engine.client().schedule(schedule).await?;
    guard("two idle ticks", async {
        loop {
            let now = engine.client().schedule(schedule).await?;
            if now.last_fire.timestamp() >= before.last_fire.timestamp() + 2 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await?
}

async fn scheduled_buildsets(
    engine: &Engine,
    name: &str,
) -> Result<Vec<kiln_engine::model::Buildset>> {
    let all = engine
        .client()
        .buildsets(&kiln_engine::storage::BuildsetFilter {
            limit: Some(1_000),
            ..Default::default()
        })
        .await?;
    let mut mine = Vec::new();
    for b in all {
        let props = engine.client().buildset_properties(b.id).await?;
        if props
            .get("schedule")
            .is_some_and(|p| p.value == json!(name))
            && !props.contains_key("forced")
        {
            mine.push(b);
        }
    }
    Ok(mine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_fire_each_tick_of_a_schedule_once_and_a_restart_repeats_none() -> Result<()> {
    for backend in backends("schedules").await? {
        let name = backend.name;
        let a = engine(&backend.url, "a").await?;
        let b = engine(&backend.url, "b").await?;
        let every = kiln_engine::ScheduleConfig::every(
            "tick",
            Duration::from_secs(1),
            Submission::new("").builder("free"),
        );
        let row = a.register_schedule(every.clone()).await?;
        b.register_schedule(every.clone()).await?;
        ensure!(row.next_fire.is_some(), "{name}: no next fire");
        // Wait, on events, for three fires.
        let mut events = a.subscribe();
        let mut seen = BTreeSet::new();
        guard("three ticks", async {
            while seen.len() < 3 {
                if let Event::BuildsetComplete { buildset_id, .. } = events.recv().await? {
                    seen.insert(buildset_id);
                }
            }
            anyhow::Ok(())
        })
        .await??;
        // Stop both; each tick made one buildset, whichever master fired it.
        a.shutdown().await;
        b.shutdown().await;
        let fired = scheduled_buildsets(&a, "tick").await?;
        let mut ticks = BTreeSet::new();
        for bs in &fired {
            let props = a.client().buildset_properties(bs.id).await?;
            let tick = props["scheduled_for"].value.clone();
            ensure!(
                ticks.insert(tick.to_string()),
                "{name}: tick {tick} fired twice"
            );
            ensure!(bs.reason == "schedule tick", "{name}: {}", bs.reason);
        }
        let recorded = a.client().schedule("tick").await?;
        ensure!(
            recorded.fires as usize == fired.len(),
            "{name}: {} fires recorded, {} made",
            recorded.fires,
            fired.len()
        );

        // Restarted within the same second as the last fire: nothing is fired again.
        let c = engine(&backend.url, "a").await?;
        c.register_schedule(every).await?;
        let again = c.client().schedule("tick").await?;
        ensure!(again.last_fire >= recorded.last_fire);
        c.shutdown().await;
        let after = scheduled_buildsets(&c, "tick").await?;
        let mut again_ticks = BTreeSet::new();
        for bs in &after {
            let props = c.client().buildset_properties(bs.id).await?;
            ensure!(
                again_ticks.insert(props["scheduled_for"].value.to_string()),
                "{name}: a tick repeated after the restart"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_fire_runs_now_and_only_if_changed_skips_an_idle_branch() -> Result<()> {
    for backend in backends("schedules_forced").await? {
        let name = backend.name;
        let engine = engine(&backend.url, "m").await?;
        let stamp = kiln_engine::model::SourceStamp {
            codebase: String::new(),
            repository: "https://git.example/app".into(),
            branch: Some("main".into()),
            revision: None,
            project: String::new(),
        };
        let mut nightly = kiln_engine::ScheduleConfig::cron(
            "nightly",
            "0 2 * * *",
            "Europe/Rome",
            Submission::new("nightly")
                .builder("free")
                .sourcestamp(stamp.clone()),
        );
        nightly.only_if_changed = true;
        let row = engine.register_schedule(nightly.clone()).await?;
        let next = row
            .next_fire
            .ok_or_else(|| anyhow::anyhow!("no next fire"))?;
        ensure!(next > kiln_engine::model::now(), "{name}");
        // Forced: a buildset now, marked as forced, the schedule's ticks untouched.
        let forced = engine.force_schedule("nightly").await?;
        guard("the forced fire", engine.wait_buildset(forced.buildset_id)).await??;
        let props = engine
            .client()
            .buildset_properties(forced.buildset_id)
            .await?;
        ensure!(
            props["forced"].value == json!(true) && props["schedule"].value == json!("nightly")
        );
        ensure!(engine.client().schedule("nightly").await?.last_fire == row.last_fire);
        ensure!(engine.force_schedule("nobody").await.is_err());

        // only_if_changed, with an hourly schedule whose missed tick is caught up.
        let mut watch = kiln_engine::ScheduleConfig::every(
            "watch",
            Duration::from_secs(1),
            Submission::new("watch")
                .builder("free")
                .sourcestamp(stamp.clone()),
        );
        watch.only_if_changed = true;
        // A push to main at revision r1 is what changes the branch.
        let push = |rev: &str| {
            let mut s = stamp.clone();
            s.revision = Some(rev.into());
            Submission::new("push").builder("free").sourcestamp(s)
        };
        let pushed = engine.submit(&push("r1")).await?;
        guard("the push", engine.wait_buildset(pushed.buildset_id)).await??;
        let events = engine.subscribe();
        engine.register_schedule(watch).await?;
        let built = guard("a watched fire", submitted_with(events, "watch")).await??;
        let stamps = engine.client().buildset_sourcestamps(built).await?;
        ensure!(
            stamps[0].revision.as_deref() == Some("r1"),
            "{name}: {stamps:?}"
        );
        // Ticks pass with main idle: no second fire until r2 is pushed.
        two_idle_ticks(&engine, "watch").await?;
        ensure!(
            scheduled_buildsets(&engine, "watch").await?.len() == 1,
            "{name}: an idle branch was rebuilt"
        );
        let events = engine.subscribe();
        engine.submit(&push("r2")).await?;
        let second = guard("a fire for r2", submitted_with(events, "watch")).await??;
        let stamps = engine.client().buildset_sourcestamps(second).await?;
        ensure!(
            stamps[0].revision.as_deref() == Some("r2"),
            "{name}: {stamps:?}"
        );

        // only_if_changed on a property: a publish with version 1.0 makes one fire with
        // it; idle ticks make none; version 1.1 makes the next.
        let mut release = kiln_engine::ScheduleConfig::every(
            "release",
            Duration::from_secs(1),
            Submission::new("release").builder("free"),
        );
        release.only_if_changed = true;
        release.watch_property = Some("version".into());
        let publish = |v: &str| {
            Submission::new("publish")
                .builder("free")
                .property("version", json!(v), "test")
        };
        engine.submit(&publish("1.0")).await?;
        let events = engine.subscribe();
        engine.register_schedule(release).await?;
        let first = guard("a fire for 1.0", submitted_with(events, "release")).await??;
        let props = engine.client().buildset_properties(first).await?;
        ensure!(props["version"].value == json!("1.0"), "{name}: {props:?}");
        two_idle_ticks(&engine, "release").await?;
        ensure!(
            scheduled_buildsets(&engine, "release").await?.len() == 1,
            "{name}: an unchanged property fired again"
        );
        let events = engine.subscribe();
        engine.submit(&publish("1.1")).await?;
        let next = guard("a fire for 1.1", submitted_with(events, "release")).await??;
        let props = engine.client().buildset_properties(next).await?;
        ensure!(props["version"].value == json!("1.1"), "{name}: {props:?}");
        let mut bad = kiln_engine::ScheduleConfig::every(
            "bad",
            Duration::from_secs(1),
            Submission::new("bad").builder("free"),
        );
        bad.watch_property = Some("version".into());
        ensure!(engine.register_schedule(bad).await.is_err(), "{name}");
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_a_builders_newest_builds_and_removes_the_rest_with_their_directories()
-> Result<()> {
    for backend in backends("retention").await? {
        let name = backend.name;
        let dir = tempfile::tempdir()?;
        let results = dir.path().join("results");
        let mut config = EngineConfig::new(&backend.url)
            .master_name("m")
            .results_dir(&results);
        config.log_retention = Some(kiln_engine::LogRetention {
            keep_for: Duration::ZERO,
            below: kiln_engine::model::LogLevel::Info,
        });
        let engine = Engine::open(config).await?;
        let writes = FnExecutor::new(|ctx| async move {
            ctx.log(kiln_engine::model::LogLevel::Debug, "chatter")
                .await?;
            ctx.log(kiln_engine::model::LogLevel::Warning, "kept")
                .await?;
            if let Some(dir) = ctx.result_dir() {
                tokio::fs::write(dir.join("out.txt"), "x")
                    .await
                    .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
            }
            Ok(Outcome::success(json!(null)))
        });
        engine
            .register_builder(
                BuilderConfig {
                    retention: Some(kiln_engine::RetentionPolicy {
                        keep_for: Duration::ZERO,
                        keep_last: 2,
                    }),
                    ..BuilderConfig::new("pruned")
                },
                writes,
            )
            .await?;
        engine
            .register_builder(BuilderConfig::new("kept"), ok())
            .await?;
        let mut sets = Vec::new();
        for i in 0..5 {
            let s = engine
                .submit(&Submission::new(format!("{i}")).builder("pruned"))
                .await?;
            guard("a build", engine.wait_buildset(s.buildset_id)).await??;
            sets.push(s.buildset_id);
        }
        let other = engine
            .submit(&Submission::new("other").builder("kept"))
            .await?;
        guard("a build", engine.wait_buildset(other.buildset_id)).await??;
        let round = engine.apply_retention().await?;
        ensure!(
            round.builds == 3 && round.buildsets == 3,
            "{name}: {round:?}"
        );
        // The kept builds' debug records; the deleted builds' went with them.
        ensure!(round.log_records == 2, "{name}: {round:?}");
        for (i, bs) in sets.iter().enumerate() {
            let exists = engine.client().buildset(*bs).await.is_ok();
            ensure!(exists == (i >= 3), "{name}: buildset {i} exists: {exists}");
        }
        ensure!(engine.client().buildset(other.buildset_id).await.is_ok());
        for number in 1..=5 {
            let dir = results.join("pruned").join(number.to_string());
            ensure!(dir.exists() == (number >= 4), "{name}: result dir {number}");
        }
        let pruned = engine.client().builder_named("pruned").await?.id;
        let builds = engine
            .client()
            .builds(&kiln_engine::storage::BuildFilter {
                builder_id: Some(pruned),
                ..Default::default()
            })
            .await?;
        ensure!(
            builds.iter().map(|b| b.number).collect::<Vec<_>>() == [4, 5],
            "{name}"
        );
        // A second round finds nothing more to do.
        ensure!(engine.apply_retention().await?.builds == 0);
        // By hand: a running buildset is refused, a finished one goes with its directory.
        let last = sets[4];
        let gone = engine.delete_buildset(last).await?;
        ensure!(gone.len() == 1 && !results.join("pruned").join("5").exists());
        let waiting = engine
            .submit(
                &Submission::new("later")
                    .builder("kept")
                    .delay(Duration::from_secs(3600)),
            )
            .await?;
        ensure!(engine.delete_buildset(waiting.buildset_id).await.is_err());
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collapsing_builder_runs_only_the_newest_of_a_queued_burst() -> Result<()> {
    for backend in backends("collapse").await? {
        let name = backend.name;
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("m")).await?;
        engine
            .register_builder(
                BuilderConfig {
                    collapse: Some(kiln_engine::Collapse { properties: false }),
                    ..BuilderConfig::new("deploy")
                },
                ok(),
            )
            .await?;
        // Paused while a burst of pushes to main queues up.
        engine.set_builder_paused("deploy", true).await?;
        let stamp = kiln_engine::model::SourceStamp {
            codebase: String::new(),
            repository: "https://git.example/app".into(),
            branch: Some("main".into()),
            revision: None,
            project: String::new(),
        };
        let mut burst = Vec::new();
        for i in 0..4 {
            let s = Submission::new(format!("push {i}"))
                .builder("deploy")
                .sourcestamp(stamp.clone());
            burst.push(engine.submit(&s).await?);
        }
        engine.set_builder_paused("deploy", false).await?;
        for s in &burst {
            guard("the burst", engine.wait_buildset(s.buildset_id)).await??;
        }
        let newest = burst[3].requests["deploy"];
        for (i, s) in burst.iter().enumerate() {
            let r = engine.client().request(s.requests["deploy"]).await?;
            if i == 3 {
                ensure!(
                    r.results == Some(ResultCode::Success) && r.superseded_by.is_none(),
                    "{name}: {r:?}"
                );
            } else {
                ensure!(r.results == Some(ResultCode::Skipped), "{name}: {r:?}");
                ensure!(r.superseded_by == Some(newest), "{name}: {r:?}");
            }
        }
        engine.shutdown().await;
    }
    Ok(())
}

/// An executor whose builds wait until `open` says so.
fn gated(open: &tokio::sync::watch::Sender<bool>) -> FnExecutor {
    let gate = open.subscribe();
    FnExecutor::new(move |_| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok(Outcome::success(json!(null)))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_lock_holds_no_room_and_its_build_records_the_wait() -> Result<()> {
    for backend in backends("locks").await? {
        let name = backend.name;
        // Room for two builds: one holds the lock, the waiting one must not take the
        // other's room from the lock-free builder.
        let mut config = EngineConfig::new(&backend.url).master_name("m");
        config.max_running_builds = 2;
        let engine = Engine::open(config).await?;
        engine.define_lock("deploy", 1).await?;
        let (open, _) = tokio::sync::watch::channel(false);
        engine
            .register_builder(
                BuilderConfig::new("prod").lock(kiln_engine::LockUse::exclusive("deploy")),
                gated(&open),
            )
            .await?;
        engine
            .register_builder(
                BuilderConfig::new("staging").lock(kiln_engine::LockUse::one("deploy")),
                ok(),
            )
            .await?;
        engine
            .register_builder(BuilderConfig::new("free"), ok())
            .await?;
        let mut events = engine.subscribe();
        let prod = engine
            .submit(&Submission::new("prod").builder("prod"))
            .await?;
        guard("the lock holder", support::started(&mut events, "prod")).await??;
        let staging = engine
            .submit(&Submission::new("staging").builder("staging"))
            .await?;
        // Three lock-free buildsets run one after another in the one room left.
        for i in 0..3 {
            let free = engine
                .submit(&Submission::new(format!("free {i}")).builder("free"))
                .await?;
            guard("a lock-free build", engine.wait_buildset(free.buildset_id)).await??;
        }
        ensure!(
            unclaimed(&engine, "staging").await? == 1,
            "{name}: staging waits"
        );
        // The holder's builder is building, and this engine serves it.
        let prod_builder = engine.client().builder_named("prod").await?;
        ensure!(prod_builder.served, "{name}");
        ensure!(
            engine.client().builder_status(&prod_builder).await?
                == kiln_engine::model::BuilderStatus::Building,
            "{name}"
        );
        let locks = engine.client().locks().await?;
        ensure!(
            locks.len() == 1 && locks[0].held() == 1 && locks[0].waiting == 1,
            "{name}: {locks:?}"
        );

        open.send_replace(true);
        guard("the holder", engine.wait_buildset(prod.buildset_id)).await??;
        guard("the waiter", engine.wait_buildset(staging.buildset_id)).await??;
        let waited = engine
            .client()
            .builds(&kiln_engine::storage::BuildFilter {
                builder_id: Some(engine.client().builder_named("staging").await?.id),
                ..Default::default()
            })
            .await?;
        ensure!(
            waited.len() == 1 && waited[0].locks_duration_s > 0.0,
            "{name}: {waited:?}"
        );
        ensure!(engine.client().locks().await?[0].holders.is_empty());
        // An undefined lock, or more units than it has, is refused at registration.
        let undefined = engine
            .register_builder(
                BuilderConfig::new("x").lock(kiln_engine::LockUse::one("nope")),
                ok(),
            )
            .await;
        ensure!(undefined.is_err(), "{name}");
        let too_many = engine
            .register_builder(
                BuilderConfig::new("y").lock(kiln_engine::LockUse {
                    name: "deploy".into(),
                    units: kiln_engine::LockUnits::Count(2),
                }),
                ok(),
            )
            .await;
        ensure!(too_many.is_err(), "{name}");
        engine.shutdown().await;
    }
    Ok(())
}

/// Builds run in a staging directory of their slot, reused while builds leave it empty:
/// a build that leaves nothing keeps no directory, one that leaves files keeps them
/// under its number, and every build starts with an empty directory whatever the one
/// before it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_start_in_an_empty_result_directory_and_keep_one_only_when_they_leave_files()
-> Result<()> {
    for backend in backends("staging").await? {
        let name = backend.name;
        let dir = tempfile::tempdir()?;
        let results = dir.path().join("results");
        let engine = Engine::open(
            EngineConfig::new(&backend.url)
                .master_name("m")
                .results_dir(&results),
        )
        .await?;
        let writes = FnExecutor::new(|ctx| async move {
            let Some(dir) = ctx.result_dir() else {
                return Ok(Outcome::with_results(ResultCode::Failure, None));
            };
            let left = std::fs::read_dir(dir)
                .map_err(|e| kiln_engine::JobError::new(e.to_string()))?
                .count();
            if left != 0 {
                return Ok(Outcome::with_results(ResultCode::Failure, None));
            }
            if ctx.reason() == "write" {
                std::fs::create_dir_all(dir.join("sub"))
                    .and_then(|()| std::fs::write(dir.join("sub").join("out.txt"), "x"))
                    .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
            } else if ctx.reason() == "empty dir" {
                std::fs::create_dir(dir.join("nothing"))
                    .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
            }
            Ok(Outcome::success(json!(null)))
        });
        engine
            .register_builder(
                BuilderConfig {
                    max_concurrent: Some(1),
                    ..BuilderConfig::new("one-slot")
                },
                writes,
            )
            .await?;
        let reasons = ["write", "nothing", "empty dir", "write", "nothing"];
        for reason in reasons {
            let s = engine
                .submit(&Submission::new(reason).builder("one-slot"))
                .await?;
            let done = guard("a build", engine.wait_buildset(s.buildset_id)).await??;
            ensure!(
                done.results == Some(ResultCode::Success),
                "{name}: the build for {reason:?} did not start in an empty directory"
            );
        }
        let builder = results.join("one-slot");
        for (i, reason) in reasons.iter().enumerate() {
            let number = i + 1;
            let kept = builder.join(number.to_string());
            ensure!(
                kept.exists() == (*reason == "write"),
                "{name}: build {number} ({reason}) kept a directory: {}",
                kept.exists()
            );
        }
        let builds = engine.client().builds(&Default::default()).await?;
        let first = builds
            .iter()
            .find(|b| b.number == 1)
            .ok_or_else(|| anyhow::anyhow!("{name}: no build 1"))?;
        let artifacts = engine.client().build_artifacts(first.id).await?;
        let expected = builder.join("1").join("sub").join("out.txt");
        ensure!(
            artifacts.len() == 1
                && artifacts[0].path == "sub/out.txt"
                && artifacts[0].location == expected.display().to_string()
                && expected.exists(),
            "{name}: {artifacts:?}"
        );
        engine.shutdown().await;
        // The empty staging directory goes with the engine.
        let staged: Vec<_> = std::fs::read_dir(&builder)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".building-"))
            .collect();
        ensure!(staged.is_empty(), "{name}: left behind: {staged:?}");
    }
    Ok(())
}
