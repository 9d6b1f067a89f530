//! Three `kiln serve` processes share one PostgreSQL database and run thousands of
//! builds; one is SIGKILLed in the middle. Its claims must go back to the queue, its
//! unfinished builds must end as RETRY and run again on the others, a parent waiting on
//! children must be re-run and adopt them, and every request must complete exactly once.
//! Meanwhile builds of a builder that takes an exclusive lock never overlap (the victim's
//! hold ends with its expiry), and a schedule firing every second makes exactly one
//! buildset per tick between the masters, before and after the kill.
//!
//! Needs `KILN_POSTGRES_URL` (`.ci/run` sets it); without it the test says so and passes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use kiln_engine::model::{BuilderId, MasterId, ResultCode, now};
use kiln_storage::{
    self as storage, BuildField, BuildFilter, BuildsetField, NewBuildset, Query, Store,
    StoreSignal, postgres,
};
use tokio::sync::broadcast;

/// Builds of the worker builder submitted at once.
const BUILDS: usize = 3_000;
/// Parents that fan out to children, submitted with them.
const PARENTS: usize = 6;
/// Children per parent.
const CHILDREN: usize = 4;
/// The victim is killed once it has finished this many builds (and while it runs a
/// parent that waits on its children).
const KILL_AFTER: u64 = 30;
/// Builds of the builder that takes the exclusive lock.
const DEPLOYS: usize = 20;
/// How far apart two masters' clocks and claim times may put one build's start before
/// the previous holder's recorded end: a claim takes its time before its transaction
/// sees the hold gone. A real overlap would be a whole build (300 ms).
const CLOCK_SLACK: Duration = Duration::from_millis(100);
/// Turns a hang into a failure; never a pacing device.
const GUARD: Duration = Duration::from_secs(180);

const PIPELINE: &str = r#"
[[builder]]
name = "work"
plugin = "bundled:sleep"
kwargs = { seconds = 0.02 }
max_concurrent = 16

# At most two parents per master, so that the victim surely runs some.
[[builder]]
name = "fan"
plugin = "bundled:fan-out"
kwargs = { builders = ["child", "child", "child", "child"] }
max_concurrent = 2

[[builder]]
name = "child"
plugin = "bundled:sleep"
kwargs = { seconds = 4.0 }

[[lock]]
name = "deploy"

[[builder]]
name = "deploy"
plugin = "bundled:sleep"
kwargs = { seconds = 0.3 }
locks = ["deploy"]

[[builder]]
name = "tock"
plugin = "bundled:noop"

[[schedule]]
name = "tick"
every = "1s"
builders = ["tock"]
catch_up = "none"

# Not submitted: `kiln serve` submits only with --submit; the test submits itself.
[[submit]]
builders = ["work"]
"#;

/// A schema of its own in the test database, dropped at the end.
struct Schema {
    base: String,
    name: String,
    url: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(postgres::drop_schema(&base, &name))?;
            anyhow::Ok(())
        })
        .join();
    }
}

/// A `kiln serve` process, killed if the test ends early.
struct Master {
    name: String,
    child: Child,
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &std::path::Path, url: &str, name: &str) -> Result<Master> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("KILN_TOKEN")
        .args([
            "--db",
            url,
            "serve",
            "pipeline.toml",
            "--listen",
            "127.0.0.1:0",
            "--master",
            name,
            "--heartbeat-interval",
            "0.5",
            "--master-expiry",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting kiln serve")?;
    // It prints its address once its builders are registered.
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let master = Master {
        name: name.to_owned(),
        child,
    };
    match lines.next() {
        Some(Ok(line)) if line.starts_with("kiln serve:") => {}
        other => bail!("kiln serve {name} did not start: {other:?}"),
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(master)
}

/// How many builds match, without reading them.
fn count<F: kiln_storage::Field>() -> Query<F> {
    Query::new().counted().limit(0)
}

fn by_master(id: MasterId, complete: bool) -> Query<BuildField> {
    count()
        .eq(BuildField::MasterId, id)
        .eq(BuildField::Complete, complete)
}

fn running_parents(master: MasterId, fan: BuilderId) -> Query<BuildField> {
    count()
        .eq(BuildField::BuilderId, fan)
        .eq(BuildField::MasterId, master)
        .eq(BuildField::Complete, false)
}

fn incomplete_buildsets() -> Query<BuildsetField> {
    count().eq(BuildsetField::Complete, false)
}

/// Waits, on the database's own notifications, until `done` says so.
async fn until<F, Fut>(
    signals: &mut broadcast::Receiver<StoreSignal>,
    what: &str,
    mut done: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    tokio::time::timeout(GUARD, async {
        loop {
            if done().await? {
                return Ok(());
            }
            match signals.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("signals: {e}"),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("timed out waiting for {what}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_share_the_work_and_finish_a_killed_ones_exactly_once() -> Result<()> {
    let Some(base) = std::env::var("KILN_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("skipped: set KILN_POSTGRES_URL to run the multi-master test (.ci/run does)");
        return Ok(());
    };
    let name = format!("kiln_test_masters_{}", std::process::id());
    postgres::drop_schema(&base, &name).await?;
    let schema = Schema {
        url: postgres::create_schema(&base, &name).await?,
        base,
        name,
    };
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pipeline.toml"), PIPELINE)?;

    // The builders exist before the masters start, so that the work can be submitted
    // in one go once all three are up.
    let store: Arc<dyn Store> = storage::open(&schema.url).await?;
    let mut signals = store
        .signals()
        .ok_or_else(|| anyhow!("PostgreSQL relays signals"))?;
    let mut masters = Vec::new();
    for name in ["victim", "second", "third"] {
        masters.push(serve(dir.path(), &schema.url, name)?);
    }
    let work = store.builder_ensure("work", None).await?;
    let fan = store.builder_ensure("fan", None).await?;
    let mut batch: Vec<NewBuildset> = (0..PARENTS)
        .map(|i| NewBuildset {
            reason: format!("parent {i}"),
            builder_ids: vec![fan],
            submitted_at: now(),
            priority: 10,
            ..NewBuildset::default()
        })
        .collect();
    let deploy = store.builder_ensure("deploy", None).await?;
    batch.extend((0..DEPLOYS).map(|i| NewBuildset {
        reason: format!("deploy {i}"),
        builder_ids: vec![deploy],
        submitted_at: now(),
        ..NewBuildset::default()
    }));
    batch.extend((0..BUILDS).map(|i| NewBuildset {
        reason: format!("work {i}"),
        builder_ids: vec![work],
        submitted_at: now(),
        ..NewBuildset::default()
    }));
    store.buildset_add_many(&batch).await?;

    let listed = store.master_list().await?;
    let victim = listed
        .iter()
        .find(|m| m.name == "victim")
        .ok_or_else(|| anyhow!("the victim registered"))?
        .id;
    until(
        &mut signals,
        "the victim to finish some builds while a parent of it waits",
        || {
            let store = store.clone();
            async move {
                Ok(
                    store.build_query(&by_master(victim, true)).await?.total >= Some(KILL_AFTER)
                        && store
                            .build_query(&running_parents(victim, fan))
                            .await?
                            .total
                            > Some(0),
                )
            }
        },
    )
    .await?;
    let waiting = store
        .build_query(&Query {
            limit: None,
            ..running_parents(victim, fan)
        })
        .await?
        .items;
    let running = store
        .build_query(&by_master(victim, false))
        .await?
        .total
        .unwrap_or_default();
    masters[0].child.kill()?;
    masters[0].child.wait()?;
    let killed_at = now();
    eprintln!(
        "killed {} with {running} builds running, {} of them parents waiting on children",
        masters[0].name,
        waiting.len()
    );

    until(&mut signals, "every buildset to complete", || {
        let store = store.clone();
        async move { Ok(store.buildset_query(&incomplete_buildsets()).await?.total == Some(0)) }
    })
    .await?;

    // Exactly once: every request complete with SUCCESS, by exactly one successful
    // build; the only other builds are the victim's, ended as RETRY by its expiry.
    // The schedule goes on firing after the kill: wait for a tick the survivors fired.
    let tock = store.builder_ensure("tock", None).await?;
    until(&mut signals, "a scheduled fire after the kill", || {
        let store = store.clone();
        async move {
            let last = store.schedule_get("tick").await?;
            Ok(last.last_fire > killed_at + chrono::TimeDelta::seconds(1) && last.fires > 0)
        }
    })
    .await?;
    until(&mut signals, "every buildset to complete", || {
        let store = store.clone();
        async move { Ok(store.buildset_query(&incomplete_buildsets()).await?.total == Some(0)) }
    })
    .await?;
    let requests = store.request_list(&Default::default()).await?;
    let scheduled = requests.iter().filter(|r| r.builder_id == tock).count();
    ensure!(requests.len() == BUILDS + DEPLOYS + PARENTS * (1 + CHILDREN) + scheduled);
    let builds = store.build_list(&BuildFilter::default()).await?;
    for request in &requests {
        ensure!(
            request.complete && request.results == Some(ResultCode::Success),
            "request {} ended {:?}",
            request.id,
            request.results
        );
        let of: Vec<_> = builds
            .iter()
            .filter(|b| b.request_id == request.id)
            .collect();
        let succeeded = of
            .iter()
            .filter(|b| b.results == Some(ResultCode::Success))
            .count();
        ensure!(
            succeeded == 1,
            "request {} has {succeeded} successful builds",
            request.id
        );
        for retried in of.iter().filter(|b| b.results != Some(ResultCode::Success)) {
            ensure!(
                retried.results == Some(ResultCode::Retry) && retried.master_id == victim,
                "build {} of request {} ended {:?} on master {}",
                retried.id,
                request.id,
                retried.results,
                retried.master_id
            );
        }
    }
    let retried = builds
        .iter()
        .filter(|b| b.results == Some(ResultCode::Retry))
        .count();
    ensure!(retried > 0, "the victim was killed with builds running");
    // The parents still waiting when the victim died (a parent seen waiting may have
    // finished on the victim in the moment before the kill) ended as RETRY and ran
    // again elsewhere, where they succeeded.
    let mut killed_parents = 0;
    for parent in &waiting {
        let ended = builds
            .iter()
            .find(|b| b.id == parent.id)
            .ok_or_else(|| anyhow!("parent build {} vanished", parent.id))?;
        if ended.results != Some(ResultCode::Retry) {
            continue;
        }
        killed_parents += 1;
        let rerun = builds
            .iter()
            .find(|b| b.request_id == parent.request_id && b.results == Some(ResultCode::Success))
            .ok_or_else(|| anyhow!("parent request {} never succeeded", parent.request_id))?;
        ensure!(
            rerun.master_id != victim,
            "the re-run of parent request {} ran on the dead victim",
            parent.request_id
        );
    }
    ensure!(
        killed_parents > 0,
        "no parent was still waiting on its children when the victim died"
    );
    let mut numbers: Vec<(i64, i64)> = builds.iter().map(|b| (b.builder_id.0, b.number)).collect();
    numbers.sort_unstable();
    numbers.dedup();
    ensure!(
        numbers.len() == builds.len(),
        "build numbers are unique per builder"
    );

    // The victim was expired; the survivors are active and each did a share.
    let listed = store.master_list().await?;
    for master in &listed {
        let finished = builds
            .iter()
            .filter(|b| b.master_id == master.id && b.results == Some(ResultCode::Success))
            .count();
        eprintln!("{}: {finished} builds", master.name);
        ensure!(finished > 0, "{} did some of the work", master.name);
        ensure!(
            master.active == (master.id != victim),
            "{} active: {}",
            master.name,
            master.active
        );
    }
    // Children were started once per parent: a parent re-run adopted its children.
    let children = store
        .buildset_list(&Default::default())
        .await?
        .into_iter()
        .filter(|b| b.parent_relationship.is_some())
        .count();
    ensure!(
        children == PARENTS * CHILDREN,
        "{children} child buildsets for {PARENTS} parents of {CHILDREN}"
    );

    // The lock: deploy builds never overlapped, whichever master ran them, and nothing
    // holds it now.
    let mut deploys: Vec<_> = builds.iter().filter(|b| b.builder_id == deploy).collect();
    deploys.sort_by_key(|b| b.started_at);
    ensure!(deploys.len() >= DEPLOYS);
    for pair in deploys.windows(2) {
        let end = pair[0]
            .complete_at
            .ok_or_else(|| anyhow!("build {} never ended", pair[0].id))?;
        ensure!(
            pair[1].started_at + CLOCK_SLACK >= end,
            "deploy builds {} (master {}) and {} (master {}) overlapped: {} < {end}",
            pair[0].id,
            pair[0].master_id,
            pair[1].id,
            pair[1].master_id,
            pair[1].started_at
        );
    }
    let waited = deploys.iter().filter(|b| b.locks_duration_s > 0.0).count();
    ensure!(waited > 0, "no deploy build waited for the lock");
    let locks = store.lock_list().await?;
    ensure!(locks.len() == 1 && locks[0].holders.is_empty(), "{locks:?}");

    // The schedule: one buildset per tick between three masters, ticks after the kill
    // included.
    let mut ticks = std::collections::BTreeSet::new();
    let mut after_kill = 0;
    for request in requests.iter().filter(|r| r.builder_id == tock) {
        let props = store.buildset_properties(request.buildset_id).await?;
        let tick = props
            .get("scheduled_for")
            .and_then(|p| p.value.as_str())
            .ok_or_else(|| anyhow!("scheduled buildset {} has no tick", request.buildset_id))?
            .to_owned();
        let at = chrono::DateTime::parse_from_rfc3339(&tick)?;
        if at > killed_at {
            after_kill += 1;
        }
        ensure!(ticks.insert(tick.clone()), "tick {tick} fired twice");
    }
    ensure!(after_kill > 0, "no tick fired after the kill");
    eprintln!(
        "{} requests complete once each; {retried} builds retried elsewhere after the kill; \
         {} deploys one at a time ({waited} waited for the lock); {} ticks fired once each \
         ({after_kill} after the kill)",
        requests.len(),
        deploys.len(),
        ticks.len()
    );
    Ok(())
}
