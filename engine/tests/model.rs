//! A randomized model test: random workloads against the real engine on every backend,
//! checked against a simple reference model of what must hold.
//!
//! Each seed draws a shape: 1–64 builders with random `max_concurrent`, some of them
//! parents that trigger children under one of the bundled policies; batches of
//! submissions with random priorities; jobs that succeed, warn, fail, skip, panic or
//! ask for a RETRY; cancels and rebuilds; idle gaps longer than every periodic task
//! (the poll, heartbeats, master expiry, the outbox prune); and two masters, either of
//! which may die (dropped without a shutdown) and come back, or be expired by the
//! other. A reporter on both masters collects every event.
//!
//! Two phases per seed:
//! 1. **Order.** One master with room for one build at a time drains a batch that was
//!    queued all at once; the start order must be the reference model's: across
//!    builders the highest queued priority, then the oldest queued request, then the
//!    name; within a builder by priority, then id (RETRY puts a request back).
//! 2. **Chaos.** The workload above, then quiescence, then the invariants: every request
//!    completes exactly once (RETRY re-runs aside) with what its job returned (or as
//!    CANCELLED, or RETRY when its master was lost); a parent's result is the worse of
//!    its own and its policy's verdict; a buildset's result is the worst of its
//!    requests'; build numbers are unique and gap-free per builder; the reporter heard
//!    every lifecycle change, in seq order, at least once and none skipped.
//!
//! CI runs [`CI_SEEDS`]. `KILN_MODEL_SEEDS=1,2,3` runs those seeds;
//! `KILN_MODEL_SOAK=600` runs fresh random seeds for ten minutes. A failure names its
//! seed and backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use kiln_engine::BundledPolicy;
use kiln_engine::model::{
    BuildId, BuildsetId, Properties, Report, ReportKind, RequestId, ResultCode,
};
use kiln_engine::{
    BuilderConfig, Engine, EngineConfig, Event, Executor, FnExecutor, JobError, Outcome, Reporter,
    ReporterConfig, Submission,
};
use kiln_storage::{BuildFilter, BuildsetFilter, RequestFilter};
use serde_json::{Value, json};

mod support;
use support::{Backend, backends, guard};

/// The seeds CI runs on every backend.
const CI_SEEDS: &[u64] = &[1, 2, 3, 4, 5, 6];

fn seeds() -> Vec<u64> {
    if let Ok(list) = std::env::var("KILN_MODEL_SEEDS") {
        return list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
    }
    CI_SEEDS.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workloads_keep_every_invariant_on_every_backend() -> Result<()> {
    // Planned panics are part of the workload; only other panics are worth printing.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() != Some(&"planned panic") {
            default_hook(info);
        }
    }));
    let soak = std::env::var("KILN_MODEL_SOAK")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    let mut seeds = seeds();
    let mut next_random = fastrand::u64(1_000..u64::MAX / 2);
    let mut ran = 0;
    loop {
        let seed = match (seeds.is_empty(), soak) {
            (false, _) => seeds.remove(0),
            (true, Some(limit)) if started.elapsed() < limit => {
                next_random += 1;
                next_random
            }
            _ => break,
        };
        for backend in backends(&format!("model_{seed}")).await? {
            let name = backend.name;
            let began = Instant::now();
            run_seed(&backend, seed).await.with_context(|| {
                format!("seed {seed} on {name} failed; run it again with KILN_MODEL_SEEDS={seed}")
            })?;
            eprintln!("model: seed {seed} on {name} held in {:?}", began.elapsed());
            ran += 1;
        }
    }
    ensure!(ran > 0, "no seed ran");
    Ok(())
}

// ---- what jobs do ----

/// What a job does on one attempt, as the plan in its buildset's properties says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Success,
    Warnings,
    Failure,
    Skipped,
    Panic,
    Retry,
}

impl Act {
    const ALL: [Act; 6] = [
        Act::Success,
        Act::Warnings,
        Act::Failure,
        Act::Skipped,
        Act::Panic,
        Act::Retry,
    ];

    fn name(self) -> &'static str {
        match self {
            Act::Success => "success",
            Act::Warnings => "warnings",
            Act::Failure => "failure",
            Act::Skipped => "skipped",
            Act::Panic => "panic",
            Act::Retry => "retry",
        }
    }

    fn from_name(name: &str) -> Act {
        Act::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .unwrap_or(Act::Success)
    }

    fn result(self) -> ResultCode {
        match self {
            Act::Success => ResultCode::Success,
            Act::Warnings => ResultCode::Warnings,
            Act::Failure => ResultCode::Failure,
            Act::Skipped => ResultCode::Skipped,
            Act::Panic => ResultCode::Exception,
            Act::Retry => ResultCode::Retry,
        }
    }
}

/// What the test process saw jobs do: the result each build's job returned and every
/// build started per request.
#[derive(Default)]
struct Journal {
    /// Build → the result its job returned (before any policy verdict); `None` when its
    /// trigger failed and the job gave up.
    returned: HashMap<BuildId, Option<ResultCode>>,
    /// Request → builds that ran its job, in order.
    attempts: HashMap<RequestId, Vec<BuildId>>,
}

type SharedJournal = Arc<Mutex<Journal>>;

fn lock(shared: &SharedJournal) -> std::sync::MutexGuard<'_, Journal> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The plan of a builder in a buildset: its acts per attempt (the last repeats), a
/// delay in milliseconds, and for parents the children to trigger.
fn plan_of(properties: &Properties, builder: &str) -> (Vec<Act>, u64) {
    let plan = properties
        .get("plan")
        .and_then(|p| p.value.get(builder))
        .cloned()
        .unwrap_or(Value::Null);
    let acts = plan["acts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(Act::from_name)
                .collect()
        })
        .unwrap_or_else(|| vec![Act::Success]);
    (acts, plan["delay_ms"].as_u64().unwrap_or(0))
}

/// A job that does what its plan says; a parent first triggers `children` under
/// `policy` and waits for them.
fn job(journal: SharedJournal, parent: Option<(Vec<String>, &'static str)>) -> FnExecutor {
    FnExecutor::new(move |ctx| {
        let journal = journal.clone();
        let parent = parent.clone();
        async move {
            let attempt = {
                let mut j = lock(&journal);
                let builds = j.attempts.entry(ctx.request_id()).or_default();
                builds.push(ctx.build_id());
                builds.len() - 1
            };
            let (acts, delay) = plan_of(&ctx.properties(), ctx.builder());
            let act = acts[attempt.min(acts.len() - 1)];
            if let Some((children, policy)) = &parent {
                let names: Vec<&str> = children.iter().map(String::as_str).collect();
                // The children get the parent's plan, which names their acts too.
                let mut props = Properties::new();
                if let Some(plan) = ctx.properties().get("plan") {
                    props.insert("plan".into(), plan.clone());
                }
                if let Err(e) = ctx.trigger(&names, props, true, policy).await {
                    lock(&journal).returned.insert(ctx.build_id(), None);
                    return Err(JobError::new(e.to_string()));
                }
            }
            if delay > 0 {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    _ = ctx.stopped() => {}
                }
            }
            lock(&journal)
                .returned
                .insert(ctx.build_id(), Some(act.result()));
            match act {
                Act::Panic => panic!("planned panic"),
                Act::Failure => Err(JobError::new("planned failure")),
                act => Ok(Outcome::with_results(act.result(), None)),
            }
        }
    })
}

struct Collect(Arc<Mutex<Vec<Report>>>);

#[async_trait::async_trait]
impl Reporter for Collect {
    async fn report(&self, event: &Report) -> std::result::Result<(), String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event.clone());
        Ok(())
    }
}

// ---- the shape a seed draws ----

#[derive(Clone)]
struct BuilderShape {
    name: String,
    max_concurrent: Option<u32>,
    /// Children and policy, for parents.
    parent: Option<(Vec<String>, &'static str)>,
}

struct World {
    builders: Vec<BuilderShape>,
    journal: SharedJournal,
    heard: Arc<Mutex<Vec<Report>>>,
    executors: HashMap<String, Arc<dyn Executor>>,
}

impl World {
    fn draw(rng: &mut fastrand::Rng) -> World {
        let n = rng.usize(1..=64);
        let mut builders: Vec<BuilderShape> = (0..n)
            .map(|i| BuilderShape {
                name: format!("b{i:02}"),
                max_concurrent: rng.bool().then(|| rng.u32(1..=3)),
                parent: None,
            })
            .collect();
        // Up to four parents; their children are leaves.
        let leaves: Vec<String> = builders.iter().map(|b| b.name.clone()).collect();
        let parents = rng.usize(0..=4.min(n.saturating_sub(1)));
        for b in builders.iter_mut().take(parents) {
            let count = rng.usize(1..=4);
            let children = (0..count)
                .map(|_| leaves[rng.usize(parents..n)].clone())
                .collect();
            let policy = POLICIES[rng.usize(0..POLICIES.len())];
            b.parent = Some((children, policy));
        }
        let journal: SharedJournal = Arc::default();
        let executors = builders
            .iter()
            .map(|b| {
                let executor: Arc<dyn Executor> = Arc::new(job(journal.clone(), b.parent.clone()));
                (b.name.clone(), executor)
            })
            .collect();
        World {
            builders,
            journal,
            heard: Arc::default(),
            executors,
        }
    }

    /// A plan for a submission to `names` (and the children their parents trigger).
    fn plan(&self, rng: &mut fastrand::Rng, names: &[String], allow: &[Act]) -> Value {
        let mut plan = serde_json::Map::new();
        let mut all: BTreeSet<String> = names.iter().cloned().collect();
        for name in names {
            if let Some(b) = self.builders.iter().find(|b| &b.name == name)
                && let Some((children, _)) = &b.parent
            {
                all.extend(children.iter().cloned());
            }
        }
        for name in all {
            let attempts = rng.usize(1..=2);
            let acts: Vec<&str> = (0..attempts)
                .map(|i| {
                    let act = allow[rng.usize(0..allow.len())];
                    // The last attempt never asks for another.
                    if i + 1 == attempts && act == Act::Retry {
                        Act::Success.name()
                    } else {
                        act.name()
                    }
                })
                .collect();
            plan.insert(name, json!({ "acts": acts, "delay_ms": rng.u64(0..=15) }));
        }
        Value::Object(plan)
    }

    async fn engine(&self, url: &str, master: &str, room: u32) -> Result<Engine> {
        let mut config = EngineConfig::new(url).master_name(master);
        config.poll_interval = Duration::from_millis(25);
        config.heartbeat_interval = Duration::from_millis(40);
        config.master_expiry = Duration::from_millis(400);
        config.outbox_prune_interval = Duration::from_millis(30);
        config.shutdown_grace = Duration::from_secs(2);
        config.cancel_grace = Duration::from_millis(200);
        config.max_running_builds = room;
        let engine = Engine::open(config).await?;
        for policy in POLICIES {
            let bundled = BundledPolicy::named(policy).ok_or_else(|| anyhow!("{policy}"))?;
            engine.set_policy(policy, bundled);
        }
        for b in &self.builders {
            let mut config = BuilderConfig::new(&b.name);
            config.max_concurrent = b.max_concurrent;
            engine
                .register_builder_arc(config, self.executors[&b.name].clone())
                .await?;
        }
        engine
            .register_reporter(ReporterConfig::new("model"), Collect(self.heard.clone()))
            .await?;
        Ok(engine)
    }
}

/// The bundled policies; a parent's relationship is named after its policy.
const POLICIES: [&str; 4] = ["worst-of", "fail-fast", "best-effort", "any-success"];

async fn run_seed(backend: &Backend, seed: u64) -> Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let world = World::draw(&mut rng);
    order_phase(backend, &world, &mut rng)
        .await
        .context("order phase")?;
    chaos_phase(backend, &world, &mut rng)
        .await
        .context("chaos phase")?;
    check(backend, &world).await.context("invariants")
}

// ---- phase 1: order ----

async fn order_phase(backend: &Backend, world: &World, rng: &mut fastrand::Rng) -> Result<()> {
    let engine = world.engine(&backend.url, "orderly", 1).await?;
    // A gate build holds the only room while the others queue.
    let open = support::hold_the_room(&engine).await?;
    let mut events = engine.subscribe();
    // Leaves only (children would start out of order by design), one request each.
    let leaves: Vec<&BuilderShape> = world
        .builders
        .iter()
        .filter(|b| b.parent.is_none())
        .collect();
    let count = rng.usize(1..=24.min(leaves.len() * 2));
    let mut batch = Vec::new();
    let mut acts_of = Vec::new();
    for i in 0..count {
        let b = leaves[rng.usize(0..leaves.len())];
        let names = vec![b.name.clone()];
        let plan = world.plan(rng, &names, &[Act::Success, Act::Retry]);
        acts_of.push(plan[&b.name]["acts"].clone());
        batch.push(
            Submission::new(format!("order {i}"))
                .builder(&b.name)
                .priority(rng.i32(-3..=3))
                .property("plan", plan, "model"),
        );
    }
    let submitted = engine.submit_many(&batch).await?;
    let requests: Vec<RequestId> = submitted
        .iter()
        .map(|s| {
            s.requests
                .values()
                .copied()
                .next()
                .ok_or_else(|| anyhow!("no request"))
        })
        .collect::<Result<_>>()?;
    // The reference: replay the claims one at a time.
    let mut queue: Vec<Queued> = Vec::new();
    for (i, s) in batch.iter().enumerate() {
        let request = engine.client().request(requests[i]).await?;
        let acts: Vec<Act> = acts_of[i]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(Act::from_name)
                    .collect()
            })
            .unwrap_or_default();
        queue.push(Queued {
            request: requests[i],
            builder: s.builders[0].clone(),
            priority: s.priority,
            submitted_at: request.submitted_at,
            retries_left: acts.iter().take_while(|a| **a == Act::Retry).count(),
        });
    }
    let mut expected = Vec::new();
    while let Some(next) = pick(&queue) {
        let mut q = queue.remove(next);
        expected.push(q.request);
        if q.retries_left > 0 {
            q.retries_left -= 1;
            queue.push(q);
        }
    }
    open.send_replace(true);
    let ours: BTreeSet<RequestId> = requests.iter().copied().collect();
    let mut started = Vec::new();
    while started.len() < expected.len() {
        let event = guard("the batch to drain", events.recv()).await??;
        if let Event::BuildStarted { request_id, .. } = event
            && ours.contains(&request_id)
        {
            started.push(request_id);
        }
    }
    ensure!(
        started == expected,
        "start order differs from Buildbot's:\n  started  {started:?}\n  expected {expected:?}"
    );
    for s in &submitted {
        guard("an ordered buildset", engine.wait_buildset(s.buildset_id)).await??;
    }
    engine.shutdown().await;
    Ok(())
}

struct Queued {
    request: RequestId,
    builder: String,
    priority: i32,
    submitted_at: kiln_engine::model::Timestamp,
    retries_left: usize,
}

/// The reference model's next claim: the builder with the highest queued priority, then
/// the oldest queued request, then the lowest name; its most urgent request by
/// priority, then id.
fn pick(queue: &[Queued]) -> Option<usize> {
    let mut builders: BTreeMap<&str, (i32, kiln_engine::model::Timestamp)> = BTreeMap::new();
    for q in queue {
        let entry = builders
            .entry(q.builder.as_str())
            .or_insert((q.priority, q.submitted_at));
        entry.0 = entry.0.max(q.priority);
        entry.1 = entry.1.min(q.submitted_at);
    }
    let (builder, _) = builders
        .iter()
        .min_by(|(an, (ap, at)), (bn, (bp, bt))| bp.cmp(ap).then(at.cmp(bt)).then(an.cmp(bn)))?;
    queue
        .iter()
        .enumerate()
        .filter(|(_, q)| q.builder == *builder)
        .min_by(|(_, a), (_, b)| b.priority.cmp(&a.priority).then(a.request.cmp(&b.request)))
        .map(|(i, _)| i)
}

// ---- phase 2: chaos ----

async fn chaos_phase(backend: &Backend, world: &World, rng: &mut fastrand::Rng) -> Result<()> {
    let room = rng.u32(1..=16);
    let mut masters: [Option<Engine>; 2] = [
        Some(world.engine(&backend.url, "m1", room).await?),
        Some(world.engine(&backend.url, "m2", room).await?),
    ];
    let names: Vec<String> = world.builders.iter().map(|b| b.name.clone()).collect();
    let leaves: Vec<String> = world
        .builders
        .iter()
        .filter(|b| b.parent.is_none())
        .map(|b| b.name.clone())
        .collect();
    let mut submitted: Vec<BuildsetId> = Vec::new();
    let steps = rng.usize(6..=14);
    for _ in 0..steps {
        let live: Vec<usize> = (0..2).filter(|i| masters[*i].is_some()).collect();
        let Some(&m) = live.get(rng.usize(0..live.len().max(1))) else {
            bail!("no master alive");
        };
        let engine = masters[m].as_ref().ok_or_else(|| anyhow!("master gone"))?;
        match rng.u32(0..100) {
            0..=49 => {
                let k = rng.usize(1..=6);
                let mut batch = Vec::new();
                for i in 0..k {
                    let mut chosen = BTreeSet::new();
                    for _ in 0..rng.usize(1..=4) {
                        chosen.insert(names[rng.usize(0..names.len())].clone());
                    }
                    let chosen: Vec<String> = chosen.into_iter().collect();
                    let plan = world.plan(rng, &chosen, &Act::ALL);
                    let mut s = Submission::new(format!("chaos {i}"))
                        .priority(rng.i32(-5..=5))
                        .property("plan", plan, "model");
                    s.builders = chosen;
                    batch.push(s);
                }
                for s in engine.submit_many(&batch).await? {
                    submitted.push(s.buildset_id);
                }
            }
            50..=59 if !submitted.is_empty() => {
                let id = submitted[rng.usize(0..submitted.len())];
                engine.cancel_buildset(id).await?;
            }
            60..=67 => {
                let done = engine
                    .client()
                    .builds(&BuildFilter {
                        complete: Some(true),
                        descending: true,
                        limit: Some(20),
                        ..BuildFilter::default()
                    })
                    .await?;
                let names_by_id: HashMap<_, _> = engine
                    .client()
                    .builders()
                    .await?
                    .into_iter()
                    .map(|b| (b.id, b.name))
                    .collect();
                let leaf = done.iter().find(|b| {
                    names_by_id
                        .get(&b.builder_id)
                        .is_some_and(|n| leaves.contains(n))
                        && b.results != Some(ResultCode::Retry)
                });
                if let Some(b) = leaf {
                    submitted.push(engine.rebuild(b.id).await?.buildset_id);
                }
            }
            68..=84 => {
                // Idle: longer than the poll, a heartbeat, the prune and, at the top,
                // the master expiry.
                tokio::time::sleep(Duration::from_millis(rng.u64(50..=500))).await;
            }
            _ => {
                // A master dies without a word. It comes back now under its own name
                // (taking back what it left), or later after the other expired it.
                masters[m] = None;
                if rng.bool() || live.len() == 1 {
                    let name = if m == 0 { "m1" } else { "m2" };
                    if rng.bool() {
                        // Long enough for the other to expire it first.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    masters[m] = Some(world.engine(&backend.url, name, room).await?);
                }
            }
        }
    }
    // Both masters alive again for the end.
    for (i, name) in ["m1", "m2"].into_iter().enumerate() {
        if masters[i].is_none() {
            masters[i] = Some(world.engine(&backend.url, name, room).await?);
        }
    }
    let engine = masters[0].as_ref().ok_or_else(|| anyhow!("m1"))?;
    // Quiescence: every buildset in the database complete, children included.
    let quiet = guard("every buildset to complete", async {
        loop {
            let open = engine
                .client()
                .buildsets(&BuildsetFilter {
                    complete: Some(false),
                    ..BuildsetFilter::default()
                })
                .await?;
            let Some(bs) = open.first() else {
                return anyhow::Ok(());
            };
            engine.wait_buildset(bs.id).await?;
        }
    })
    .await;
    if let Err(e) = quiet {
        bail!("{e}\n{}", describe(engine).await?);
    }
    quiet??;
    ensure!(
        engine
            .reporters_caught_up(&["model".to_owned()], Duration::from_secs(30))
            .await,
        "the reporter did not catch up"
    );
    for m in masters.into_iter().flatten() {
        m.shutdown().await;
    }
    Ok(())
}

/// What is still open, for a failure message: incomplete buildsets with their requests
/// and builds, and the masters.
async fn describe(engine: &Engine) -> Result<String> {
    let client = engine.client();
    let mut out = String::new();
    let open = client
        .buildsets(&BuildsetFilter {
            complete: Some(false),
            ..BuildsetFilter::default()
        })
        .await?;
    for bs in open.iter().take(10) {
        out += &format!(
            "buildset {} ({:?}, parent build {:?}):\n",
            bs.id, bs.reason, bs.parent_buildid
        );
        let requests = client
            .requests(&RequestFilter {
                buildset_id: Some(bs.id),
                ..RequestFilter::default()
            })
            .await?;
        for r in requests {
            out += &format!(
                "  request {} builder {} complete {} claimed by {:?} cancel {}\n",
                r.id, r.builder_id, r.complete, r.claimed_by, r.cancel_requested
            );
            let builds = client
                .builds(&BuildFilter {
                    request_id: Some(r.id),
                    ..BuildFilter::default()
                })
                .await?;
            for b in builds {
                out += &format!(
                    "    build {} #{} master {} {:?} {:?} {:?}\n",
                    b.id, b.number, b.master_id, b.state_string, b.results, b.error
                );
            }
        }
    }
    for m in client.masters().await? {
        out += &format!(
            "master {} {} active {} last {}\n",
            m.id, m.name, m.active, m.last_active
        );
    }
    Ok(out)
}

// ---- the invariants ----

async fn check(backend: &Backend, world: &World) -> Result<()> {
    let engine = world.engine(&backend.url, "checker", 1).await?;
    let client = engine.client();
    let buildsets = client
        .buildsets(&BuildsetFilter {
            limit: Some(100_000),
            ..BuildsetFilter::default()
        })
        .await?;
    let requests = client
        .requests(&RequestFilter {
            limit: Some(100_000),
            ..RequestFilter::default()
        })
        .await?;
    let builds = client
        .builds(&BuildFilter {
            limit: Some(100_000),
            ..BuildFilter::default()
        })
        .await?;
    let names: HashMap<_, _> = client
        .builders()
        .await?
        .into_iter()
        .map(|b| (b.id, b.name))
        .collect();
    let returned = lock(&world.journal).returned.clone();
    let mut builds_of: BTreeMap<RequestId, Vec<&kiln_engine::model::Build>> = BTreeMap::new();
    for b in &builds {
        builds_of.entry(b.request_id).or_default().push(b);
    }
    let requests_of_buildset =
        |bs: BuildsetId| requests.iter().filter(move |r| r.buildset_id == bs);

    // Every buildset complete, with the worst of its requests' results.
    for bs in &buildsets {
        ensure!(bs.complete, "buildset {} is not complete", bs.id);
        let worst = ResultCode::worst_of(requests_of_buildset(bs.id).filter_map(|r| r.results))
            .unwrap_or(ResultCode::Success);
        ensure!(
            bs.results == Some(worst),
            "buildset {}: {:?}, but the worst of its requests is {worst}",
            bs.id,
            bs.results
        );
    }
    // Build numbers: 1..=n per builder.
    let mut numbers: BTreeMap<_, Vec<i64>> = BTreeMap::new();
    for b in &builds {
        numbers.entry(b.builder_id).or_default().push(b.number);
    }
    for (builder, mut n) in numbers {
        n.sort_unstable();
        let want: Vec<i64> = (1..=n.len() as i64).collect();
        ensure!(n == want, "builder {builder}: numbers {n:?}");
    }
    // Every request completed exactly once, with what its last build's job returned.
    for r in &requests {
        let result = r
            .results
            .ok_or_else(|| anyhow!("request {} has no result", r.id))?;
        ensure!(r.complete, "request {} is not complete", r.id);
        let mine = builds_of.get(&r.id).cloned().unwrap_or_default();
        ensure!(
            mine.iter().all(|b| b.complete_at.is_some()),
            "request {}: a build is still running",
            r.id
        );
        let Some((last, earlier)) = mine.split_last() else {
            ensure!(
                result == ResultCode::Cancelled,
                "request {} never ran but ended {result}",
                r.id
            );
            continue;
        };
        for b in earlier {
            ensure!(
                b.results == Some(ResultCode::Retry),
                "request {}: build {} ended {:?} and another ran after it",
                r.id,
                b.id,
                b.results
            );
        }
        let last_result = last.results.ok_or_else(|| anyhow!("no result"))?;
        if last_result == ResultCode::Retry {
            // Released for RETRY, then cancelled before it ran again.
            ensure!(
                result == ResultCode::Cancelled,
                "request {}: last build RETRY, request {result}",
                r.id
            );
        } else {
            ensure!(
                last_result == result,
                "request {}: last build {last_result}, request {result}",
                r.id
            );
        }
        // Each build ended as its job said, unless it was stopped, lost with its
        // master, or judged by its children's policy.
        let builder = names.get(&r.builder_id).cloned().unwrap_or_default();
        let Some(shape) = world.builders.iter().find(|b| b.name == builder) else {
            continue; // The order phase's gate.
        };
        for b in &mine {
            let recorded = b.results.ok_or_else(|| anyhow!("no result"))?;
            let lost = recorded == ResultCode::Retry
                && b.error.as_deref().is_some_and(|e| {
                    e.contains("master") || e.contains("shut down") || e.contains("expired")
                });
            if lost || recorded == ResultCode::Cancelled {
                continue;
            }
            let said = returned.get(&b.id).copied().ok_or_else(|| {
                anyhow!(
                    "build {} of {builder} ended {recorded}, but its job never returned",
                    b.id
                )
            })?;
            match (&shape.parent, said) {
                (_, None) => ensure!(
                    recorded == ResultCode::Failure,
                    "build {} of {builder}: its trigger failed, recorded {recorded}",
                    b.id
                ),
                (None, Some(said)) => ensure!(
                    recorded == said,
                    "build {} of {builder}: job returned {said}, recorded {recorded}",
                    b.id
                ),
                (Some((_, policy)), Some(said)) => {
                    let children: Vec<ResultCode> = buildsets
                        .iter()
                        .filter(|bs| bs.parent_buildid == Some(b.id))
                        .flat_map(|bs| requests_of_buildset(bs.id))
                        .filter_map(|c| c.results)
                        .collect();
                    verdict_allows(policy, said, &children, recorded).with_context(|| {
                        format!("parent build {} of {builder} ({policy})", b.id)
                    })?;
                }
            }
        }
    }
    // The reporter heard every change, in seq order, at least once, none skipped.
    let heard = world
        .heard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut max_seq = 0;
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    for e in &heard {
        ensure!(
            e.seq > max_seq || seen.contains(&e.seq),
            "event {} heard after {max_seq} without having been heard before",
            e.seq
        );
        max_seq = max_seq.max(e.seq);
        seen.insert(e.seq);
    }
    let count = |kind: ReportKind, key: i64| {
        heard
            .iter()
            .filter(|e| {
                e.kind == kind
                    && match kind {
                        ReportKind::BuildStarted | ReportKind::BuildFinished => {
                            e.build_id.map(|b| b.0) == Some(key)
                        }
                        _ => e.buildset_id.0 == key,
                    }
            })
            .map(|e| e.seq)
            .collect::<BTreeSet<_>>()
            .len()
    };
    for bs in &buildsets {
        ensure!(
            count(ReportKind::BuildsetSubmitted, bs.id.0) == 1,
            "buildset_submitted of {}",
            bs.id
        );
        ensure!(
            count(ReportKind::BuildsetComplete, bs.id.0) == 1,
            "buildset_complete of {}",
            bs.id
        );
    }
    for b in &builds {
        ensure!(
            count(ReportKind::BuildStarted, b.id.0) == 1,
            "build_started of {}",
            b.id
        );
        ensure!(
            count(ReportKind::BuildFinished, b.id.0) == 1,
            "build_finished of {}",
            b.id
        );
    }
    engine.shutdown().await;
    Ok(())
}

/// Whether a parent's recorded result fits its own result and its policy's verdict on
/// its children's final results.
fn verdict_allows(
    policy: &str,
    own: ResultCode,
    children: &[ResultCode],
    recorded: ResultCode,
) -> Result<()> {
    let worst = ResultCode::worst_of(children.iter().copied()).unwrap_or(ResultCode::Success);
    let is_failure = |c: &ResultCode| {
        matches!(
            c,
            ResultCode::Failure | ResultCode::Exception | ResultCode::Cancelled | ResultCode::Retry
        )
    };
    let ok = match policy {
        "worst-of" => recorded == own.worst(worst),
        "best-effort" => {
            let softened = ResultCode::worst_of(children.iter().map(|c| {
                if is_failure(c) {
                    ResultCode::Warnings
                } else {
                    *c
                }
            }))
            .unwrap_or(ResultCode::Success);
            recorded == own.worst(softened)
        }
        // The verdict came at the first failure: the worst of the children so far, which
        // is at least that failure and at most the worst at the end.
        "fail-fast" if children.iter().any(is_failure) => {
            recorded.severity() >= own.severity()
                && recorded.severity() >= ResultCode::Failure.severity()
                && recorded.severity() <= own.worst(worst).severity()
        }
        "fail-fast" => recorded == own.worst(worst),
        // SUCCESS at the first success (a complete child's result never changes, so a
        // success at the end was there when the policy decided).
        "any-success"
            if children
                .iter()
                .any(|c| matches!(c, ResultCode::Success | ResultCode::Warnings)) =>
        {
            recorded == own.worst(ResultCode::Success)
        }
        "any-success" => recorded == own.worst(worst),
        other => bail!("unknown policy {other}"),
    };
    ensure!(ok, "own {own}, children {children:?}, recorded {recorded}");
    Ok(())
}
