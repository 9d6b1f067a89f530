//! Kiln's benchmark in one command, round-robin, every figure next to the floor it is
//! measured against in the same run:
//!
//! ```text
//! cargo bench --bench kiln [-- --rounds R] [--jobs N] [--scale] [--no-memory]
//! cargo bench --bench kiln -- --profile lifecycle|lifecycle-streamed|rest|serial|latency|postgres|postgres-floor [--jobs N] [--masters M] [--queued Q]   # one part, once
//! cargo bench --bench kiln -- --retention [--periods P]   # retention under a steady load
//! ```
//!
//! Each round runs, one after another: the raw SQLite floor (rusqlite on Kiln's own
//! schema, the same rows Kiln writes for a job: buildset, request, claim, build, and the
//! finish of build, request and buildset) with one commit per item and with 100 items
//! per commit, at `synchronous=NORMAL` and `FULL`; Kiln's lifecycle of N no-op WASM jobs
//! at NORMAL and FULL, submitted in one call and submitted 100 per call while the engine
//! runs (the floor's shape); 16 HTTP clients each posting one buildset at a time to a `kiln
//! serve` process; one embedder calling `submit` in a loop; submit-to-start latency on
//! an idle engine, alone and with 100,000 requests queued for a builder nobody serves;
//! and, when `KILN_POSTGRES_URL` names a database, PostgreSQL's floor (the same rows
//! through sqlx, 100 per commit, set-based) and Kiln on PostgreSQL with 1 and 2 masters.
//! Before the rounds, a child process measures the resident memory of 10,000 builds
//! suspended in WASM timers. `--scale` adds the lifecycle with 1,000,000 buildsets
//! already in the database.
//!
//! `--retention` runs a steady load (jobs writing a result file and log records) on a
//! builder with a retention policy of one period, and prints the database's and the
//! result directories' size after 10 and after 100 retention periods (`--periods`): they
//! stop growing once retention keeps up.
//!
//! The summary gives each figure's median over the rounds and its ratio to its floor,
//! taken within each round (the median of those ratios): this 2-core machine moves
//! ±20% from one hour to the next, a ratio inside one round much less. Each throughput
//! figure also gives the CPU time one item cost (user and system time of every thread of
//! the process doing the work, `kiln serve`'s for REST, over the same interval): it moves
//! less than a rate, and next to the rate it says whether a figure is bound by the CPU
//! (cores / CPU per item ≈ the rate) or by waiting. It measures and prints; it asserts
//! nothing about speed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kiln_bundled as bundled;
use kiln_engine::wasm::{Grants, Limits, WasmHost, WasmHostConfig};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, Event, Submission};
use kiln_storage::{Durability, NewBuildset, StoreOptions};
use tokio::sync::broadcast;

/// Rounds by default: enough for a median, short enough to run often.
const DEFAULT_ROUNDS: usize = 3;
/// Jobs per lifecycle run by default (the issue's N).
const DEFAULT_JOBS: usize = 20_000;
/// Concurrent REST clients.
const REST_CLIENTS: usize = 16;
/// Submits per REST and serial run.
const SUBMITS: usize = 8_000;
/// Items per commit in the batched floor.
const FLOOR_BATCH: usize = 100;
/// Samples per latency run.
const LATENCY_SAMPLES: usize = 1_000;
/// Requests queued for a builder nobody serves in the loaded latency run.
const FOREIGN_QUEUED: usize = 100_000;
/// Where the CPU-per-item rows start in the summary: after every rate and latency. In
/// the order of the runs: the four floors, the four lifecycle shapes (their own order
/// 1–4 after the floors), REST's server and clients, the serial embedder.
const CPU_ROWS: usize = 30;
/// Builds suspended at once in the memory run.
const SUSPENDED: usize = 10_000;
/// Buildsets in the database for `--scale`.
const SCALE_ROWS: usize = 1_000_000;
/// The retention run: one period of a builder's retention (`keep_for`).
const RETENTION_PERIOD: Duration = Duration::from_secs(1);
/// Jobs submitted per retention period.
const RETENTION_JOBS: usize = 200;
/// Builds every retention keeps however old.
const RETENTION_KEEP_LAST: u32 = 100;

fn arg_value(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn has_arg(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A throughput figure and the CPU time each item cost, summed over every thread of the
/// process that did the work (user and system time, over the same interval). On a
/// shared 2-core machine the rate moves with the neighbours; the CPU per item much less,
/// and it says whether a figure is bound by the CPU (2 cores / CPU per item ≈ the rate)
/// or by waiting.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_sec: f64,
    cpu_us: f64,
}

impl Rate {
    fn new(items: usize, wall: Duration, cpu: Duration) -> Rate {
        Rate {
            per_sec: items as f64 / wall.as_secs_f64(),
            cpu_us: per_item_us(cpu, items),
        }
    }
}

/// `cpu` shared out over `items`, in µs.
fn per_item_us(cpu: Duration, items: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / items as f64
}

/// CPU time this process has used so far, every thread.
fn own_cpu() -> Result<Duration> {
    Ok(cpu_time::ProcessTime::try_now()
        .context("reading the process's CPU time")?
        .as_duration())
}

/// CPU time another process (the `kiln serve` child) has used so far, from
/// `/proc/PID/stat`: its utime and stime, in the kernel's USER_HZ ticks, which Linux
/// fixes at 100 per second for this file whatever the kernel's own tick.
fn child_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it are numbers.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("no command name in /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {}", i + 3))?
            .parse()?)
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

// ---- the floors ----

/// Kiln's schema in a fresh SQLite file, migrated by Kiln itself, with a master and a
/// builder row; returns (master id, builder id).
async fn kiln_schema(path: &Path) -> Result<(i64, i64)> {
    let store = kiln_storage::open(&format!("sqlite://{}", path.display())).await?;
    let master = store
        .master_register("floor", kiln_engine::model::now())
        .await?
        .master_id;
    let builder = store.builder_ensure("noop", None).await?;
    drop(store);
    Ok((master.0, builder.0))
}

/// The raw SQLite floor: the rows of `jobs` lifecycles, `batch` items per transaction
/// for each step (submit; claim and start; finish build, request and buildset).
/// Prepared statements, row at a time, no reads, no JSON, no async: what SQLite itself
/// costs for this work.
fn sqlite_floor(
    path: &Path,
    ids: (i64, i64),
    sync: &str,
    jobs: usize,
    batch: usize,
) -> Result<Rate> {
    use rusqlite::{Connection, params};
    let (master, builder) = ids;
    let conn = Connection::open(path)?;
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA cache_size=-65536;"
    ))?;
    let base: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM buildsets", [], |r| {
        r.get(0)
    })?;
    let t = kiln_engine::model::now().timestamp_micros();
    let jobs = jobs as i64;
    let batch = batch as i64;
    let cpu = own_cpu()?;
    let start = Instant::now();
    let mut i = 1;
    while i <= jobs {
        let end = (i + batch).min(jobs + 1);
        conn.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut s1 = conn.prepare_cached(
                "INSERT INTO buildsets (id, reason, submitted_at) VALUES (?1, 'bench', ?2)",
            )?;
            let mut s2 = conn.prepare_cached(
                "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at)
                 VALUES (?1, ?1, ?2, 0, ?3)",
            )?;
            for k in i..end {
                s1.execute(params![base + k, t])?;
                s2.execute(params![base + k, builder, t])?;
            }
        }
        conn.execute_batch("COMMIT")?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut c = conn.prepare_cached(
                "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at) VALUES (?1, ?2, ?3)",
            )?;
            let mut s = conn.prepare_cached(
                "INSERT INTO builds (id, number, builder_id, buildrequest_id, master_id, worker_slot, started_at)
                 VALUES (?1, ?1, ?2, ?1, ?3, 0, ?4)",
            )?;
            for k in i..end {
                c.execute(params![base + k, master, t])?;
                s.execute(params![base + k, builder, master, t])?;
            }
        }
        conn.execute_batch("COMMIT")?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut f = conn.prepare_cached(
                "UPDATE builds SET complete_at = ?2, results = 0, state_string = 'finished' WHERE id = ?1",
            )?;
            let mut r = conn.prepare_cached(
                "UPDATE buildrequests SET complete = 1, complete_at = ?2, results = 0 WHERE id = ?1 AND complete = 0",
            )?;
            let mut s = conn.prepare_cached(
                "UPDATE buildsets SET complete = 1, complete_at = ?2, results = 0 WHERE id = ?1 AND complete = 0",
            )?;
            for k in i..end {
                f.execute(params![base + k, t])?;
                r.execute(params![base + k, t])?;
                s.execute(params![base + k, t])?;
            }
        }
        conn.execute_batch("COMMIT")?;
        i = end;
    }
    let rate = Rate::new(jobs as usize, start.elapsed(), own_cpu()? - cpu);
    let done: i64 = conn.query_row(
        "SELECT count(*) FROM buildsets WHERE complete = 1 AND id > ?1",
        [base],
        |r| r.get(0),
    )?;
    ensure!(done == jobs, "the floor completed {done} of {jobs}");
    Ok(rate)
}

async fn sqlite_floor_run(sync: &'static str, jobs: usize, batch: usize) -> Result<Rate> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("floor.db");
    let ids = kiln_schema(&path).await?;
    tokio::task::spawn_blocking(move || sqlite_floor(&path, ids, sync, jobs, batch)).await?
}

/// PostgreSQL's floor: the same rows on Kiln's schema through sqlx, 100 items per
/// transaction per step, each step one set-based statement per table (`unnest`).
async fn postgres_floor(base: &str, jobs: usize) -> Result<f64> {
    use kiln_storage::postgres;
    let schema = format!("kiln_floor_{}", std::process::id());
    postgres::drop_schema(base, &schema).await?;
    let url = postgres::create_schema(base, &schema).await?;
    let store = kiln_storage::open(&url).await?;
    let master = store
        .master_register("floor", kiln_engine::model::now())
        .await?
        .master_id
        .0;
    let builder = store.builder_ensure("noop", None).await?.0;
    drop(store);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    // The tables are analyzed as they grow, by Kiln's backend's rule
    // (`analyze_due`): planned from the statistics of empty tables, every
    // `id = ANY($1)` below is a sequential scan and the floor grows quadratic. Even
    // planned afresh per execution, a table never analyzed looks small enough to scan;
    // measured here, that halved the floor, which flattered Kiln's ratio to it.
    let mut analyzed = 0u64;
    let t = kiln_engine::model::now().timestamp_micros();
    let start = Instant::now();
    let mut i = 1i64;
    let jobs_i = jobs as i64;
    while i <= jobs_i {
        let end = (i + FLOOR_BATCH as i64).min(jobs_i + 1);
        let ids: Vec<i64> = (i..end).collect();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO buildsets (id, reason, submitted_at) SELECT x, 'bench', $2 FROM unnest($1::bigint[]) x",
        )
        .bind(&ids)
        .bind(t)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO buildrequests (id, buildset_id, builder_id, priority, submitted_at)
             SELECT x, x, $2, 0, $3 FROM unnest($1::bigint[]) x",
        )
        .bind(&ids)
        .bind(builder)
        .bind(t)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let added = end as u64 - 1;
        if postgres::analyze_due(added, analyzed) {
            sqlx::query("ANALYZE buildsets, buildrequests, buildrequest_claims, builds")
                .execute(&pool)
                .await?;
            analyzed = added;
        }
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at)
             SELECT x, $2, $3 FROM unnest($1::bigint[]) x",
        )
        .bind(&ids)
        .bind(master)
        .bind(t)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO builds (id, number, builder_id, buildrequest_id, master_id, worker_slot, started_at)
             SELECT x, x, $2, x, $3, 0, $4 FROM unnest($1::bigint[]) x",
        )
        .bind(&ids)
        .bind(builder)
        .bind(master)
        .bind(t)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut tx = pool.begin().await?;
        for table in ["builds", "buildrequests", "buildsets"] {
            let done = match table {
                "builds" => "",
                _ => ", complete = 1",
            };
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET complete_at = $2, results = 0{done} WHERE id = ANY($1)"
            )))
            .bind(&ids)
            .bind(t)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        i = end;
    }
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    postgres::drop_schema(base, &schema).await?;
    Ok(rate)
}

// ---- Kiln ----

fn host(dir: &tempfile::TempDir, max_instances: u32) -> Arc<WasmHost> {
    Arc::new(WasmHost::new(WasmHostConfig {
        cache_dir: Some(dir.path().join("cache")),
        max_instances,
    }))
}

fn plugin(name: &str) -> Result<&'static [u8]> {
    bundled::get(name).ok_or_else(|| anyhow!("no bundled plugin {name}"))
}

/// An engine on `url` whose builder "noop" runs the no-op WASM job.
async fn noop_engine(
    url: &str,
    name: &str,
    host: &WasmHost,
    store: StoreOptions,
) -> Result<Engine> {
    let mut config = EngineConfig::new(url).master_name(name);
    config.event_capacity = 1 << 20;
    config.store = store;
    let engine = Engine::open(config).await?;
    let executor = host
        .job_executor(
            "noop",
            plugin("noop")?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(BuilderConfig::new("noop"), executor)
        .await?;
    Ok(engine)
}

async fn count(
    events: &mut broadcast::Receiver<Event>,
    n: usize,
    pick: impl Fn(&Event) -> bool,
) -> Result<()> {
    let mut seen = 0;
    while seen < n {
        let event = events
            .recv()
            .await
            .map_err(|e| anyhow!("event stream: {e}"))?;
        if pick(&event) {
            seen += 1;
        }
    }
    Ok(())
}

fn sqlite_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!(
        "sqlite://{}",
        dir.path().join(format!("{name}.db")).display()
    )
}

/// Fills a database with `rows` complete buildsets (one request and build each) for
/// builder "noop" through the store's batch path, so that a run meets a large table.
async fn prefill(url: &str, rows: usize) -> Result<()> {
    let store = kiln_storage::open(url).await?;
    let builder = store.builder_ensure("noop", None).await?;
    let master = store
        .master_register("prefill", kiln_engine::model::now())
        .await?
        .master_id;
    let one = NewBuildset {
        reason: "history".into(),
        builder_ids: vec![builder],
        submitted_at: kiln_engine::model::now(),
        ..NewBuildset::default()
    };
    let chunk = vec![one; 10_000];
    let mut left = rows;
    while left > 0 {
        let n = left.min(chunk.len());
        let added = store.buildset_add_many(&chunk[..n]).await?;
        let requests: Vec<_> = added.iter().map(|a| a.requests[&builder]).collect();
        let now = kiln_engine::model::now();
        store.request_claim(&requests, master, now).await?;
        store
            .request_complete(&requests, kiln_engine::model::ResultCode::Success, now)
            .await?;
        left -= n;
    }
    store.master_deactivate(master).await?;
    Ok(())
}

/// Kiln's lifecycle: `jobs` buildsets submitted in one call, run by the no-op WASM job;
/// jobs/s from the submit to the last buildset complete.
async fn lifecycle(durability: Durability, jobs: usize, history: usize) -> Result<Rate> {
    lifecycle_in(durability, jobs, history, jobs).await
}

/// Kiln's lifecycle with the `jobs` buildsets submitted in calls of `per_call`, one
/// after another from one task while the engine runs what is already committed (the
/// floor's shape: `FLOOR_BATCH` items per commit, the steps of earlier items overlapping
/// the submits of later ones); jobs/s from the first submit to the last buildset
/// complete. With `per_call = jobs` it is one `submit_many` of everything, whose one
/// transaction commits before the first build can start.
async fn lifecycle_in(
    durability: Durability,
    jobs: usize,
    history: usize,
    per_call: usize,
) -> Result<Rate> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(&dir, "lifecycle");
    if history > 0 {
        prefill(&url, history).await?;
    }
    let host = host(&dir, 64);
    let store = StoreOptions {
        durability,
        ..StoreOptions::default()
    };
    let engine = noop_engine(&url, "lifecycle", &host, store).await?;
    let mut events = engine.subscribe();
    let batch = vec![Submission::new("bench").builder("noop"); jobs];
    let cpu = own_cpu()?;
    let start = Instant::now();
    let submit = async {
        for chunk in batch.chunks(per_call.max(1)) {
            engine.submit_many(chunk).await?;
        }
        anyhow::Ok(())
    };
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let complete = count(&mut events, jobs, |e| match e {
        Event::BuildsetComplete { results, .. } => {
            if *results != kiln_engine::model::ResultCode::Success {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            true
        }
        _ => false,
    });
    tokio::try_join!(submit, complete)?;
    let rate = Rate::new(jobs, start.elapsed(), own_cpu()? - cpu);
    engine.shutdown().await;
    let failed = failed.into_inner();
    ensure!(failed == 0, "{failed} no-op builds did not succeed");
    Ok(rate)
}

/// A counter of the SQLite writer so far (`kiln_sqlite_commits_total`,
/// `kiln_sqlite_log_writes_total`), from the engine's metrics (what an operator scrapes).
async fn sqlite_counter(engine: &Engine, name: &str) -> Result<u64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &engine.metrics().await?)?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no {name} in the metrics"))
}

/// One embedder task calling `submit` in a loop while the engine runs the builds;
/// (submits/s with the CPU each cost, p50, p99 of one call, SQLite commits and log
/// writes per submit until the last buildset completed).
async fn serial(submits: usize) -> Result<(Rate, Duration, Duration, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let host = host(&dir, 64);
    let engine = noop_engine(
        &sqlite_url(&dir, "serial"),
        "serial",
        &host,
        StoreOptions::default(),
    )
    .await?;
    let mut events = engine.subscribe();
    let submission = Submission::new("bench").builder("noop");
    let mut took = Vec::with_capacity(submits);
    let commits_before = sqlite_counter(&engine, "kiln_sqlite_commits_total").await?;
    let writes_before = sqlite_counter(&engine, "kiln_sqlite_log_writes_total").await?;
    let cpu = own_cpu()?;
    let start = Instant::now();
    for _ in 0..submits {
        let one = Instant::now();
        engine.submit(&submission).await?;
        took.push(one.elapsed());
    }
    let rate = Rate::new(submits, start.elapsed(), own_cpu()? - cpu);
    count(&mut events, submits, |e| {
        matches!(e, Event::BuildsetComplete { .. })
    })
    .await?;
    let commits_after = sqlite_counter(&engine, "kiln_sqlite_commits_total").await?;
    let writes_after = sqlite_counter(&engine, "kiln_sqlite_log_writes_total").await?;
    engine.shutdown().await;
    took.sort();
    let per_submit = |before: u64, after: u64| (after - before) as f64 / submits as f64;
    Ok((
        rate,
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        per_submit(commits_before, commits_after),
        per_submit(writes_before, writes_after),
    ))
}

/// Submit-to-start on an idle engine, with `foreign` requests queued for a builder
/// nobody serves; (p50, p99).
async fn latency(foreign: usize) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(&dir, "latency");
    if foreign > 0 {
        let store = kiln_storage::open(&url).await?;
        let nobody = store.builder_ensure("nobody", None).await?;
        let one = NewBuildset {
            reason: "waits".into(),
            builder_ids: vec![nobody],
            submitted_at: kiln_engine::model::now(),
            ..NewBuildset::default()
        };
        for chunk in vec![one; foreign].chunks(10_000) {
            store.buildset_add_many(chunk).await?;
        }
    }
    let host = host(&dir, 64);
    let engine = noop_engine(&url, "latency", &host, StoreOptions::default()).await?;
    let mut events = engine.subscribe();
    let mut took = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let start = Instant::now();
        engine
            .submit(&Submission::new("bench").builder("noop"))
            .await?;
        count(&mut events, 1, |e| matches!(e, Event::BuildStarted { .. })).await?;
        took.push(start.elapsed());
        count(&mut events, 1, |e| {
            matches!(e, Event::BuildsetComplete { .. })
        })
        .await?;
    }
    engine.shutdown().await;
    took.sort();
    Ok((percentile(&took, 0.5), percentile(&took, 0.99)))
}

/// A `kiln serve` process running the no-op builder; stopped when dropped.
struct Server {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKEN: &str = "bench-token";

fn serve() -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("pipeline.toml");
    let log = dir.path().join("serve.log");
    std::fs::write(
        &pipeline,
        "[[builder]]\nname = \"noop\"\nplugin = \"bundled:noop\"\n",
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--db")
        .arg(dir.path().join("serve.db"))
        .args(["serve", "--listen", "127.0.0.1:0", "--token", TOKEN])
        .arg(&pipeline)
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        // Its log (the lifecycle at info, as `kiln serve` logs by default) goes to a file,
        // as a deployment's would: a terminal's speed is not part of the measurement.
        .stderr(std::fs::File::create(&log).context("creating the server's log")?)
        .spawn()
        .context("starting kiln serve")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let Some(line) = lines.next() else {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("kiln serve ended before it listened; its log:\n{said}");
        };
        let line = line?;
        if let Some(rest) = line.split("API at http://").nth(1) {
            break rest
                .split('/')
                .next()
                .ok_or_else(|| anyhow!("no address in {line:?}"))?
                .to_owned();
        }
    };
    // Keep reading its stdout so that the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(Server {
        child,
        address,
        _dir: dir,
    })
}

/// What a REST run measured: submits/s with the server's CPU per submit, the clients'
/// CPU per submit (this process), and p50 and p99 of one POST.
#[derive(Debug)]
struct RestRun {
    server: Rate,
    clients_cpu_us: f64,
    p50: Duration,
    p99: Duration,
}

/// `clients` HTTP clients (keep-alive connections), each posting one buildset at a
/// time to `kiln serve`, `submits` in all.
async fn rest(clients: usize, submits: usize) -> Result<RestRun> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let server = serve()?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build_http();
    let uri: hyper::Uri = format!("http://{}/api/v2/buildsets", server.address).parse()?;
    let body = Bytes::from_static(br#"{"builders": ["noop"], "reason": "bench"}"#);
    let post = {
        let (client, uri, body) = (client.clone(), uri.clone(), body.clone());
        move || {
            let request = hyper::Request::post(uri.clone())
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Full::new(body.clone()));
            let client = client.clone();
            async move {
                let response = client.request(request?).await?;
                let status = response.status();
                let bytes = response.into_body().collect().await?.to_bytes();
                ensure!(
                    status == hyper::StatusCode::CREATED,
                    "POST /buildsets answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
                anyhow::Ok(())
            }
        }
    };
    // Warm the connections and the server's first plugin load.
    post().await?;
    let (cpu, server_cpu) = (own_cpu()?, child_cpu(server.child.id())?);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let post = post.clone();
        let mine = submits / clients + usize::from(c < submits % clients);
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::with_capacity(mine);
            for _ in 0..mine {
                let one = Instant::now();
                post().await?;
                took.push(one.elapsed());
            }
            anyhow::Ok(took)
        }));
    }
    let mut took = Vec::with_capacity(submits);
    for task in tasks {
        took.extend(task.await??);
    }
    let wall = start.elapsed();
    let server_cpu = child_cpu(server.child.id())? - server_cpu;
    let clients_cpu = own_cpu()? - cpu;
    drop(server);
    took.sort();
    Ok(RestRun {
        server: Rate::new(submits, wall, server_cpu),
        clients_cpu_us: per_item_us(clients_cpu, submits),
        p50: percentile(&took, 0.5),
        p99: percentile(&took, 0.99),
    })
}

/// The lifecycle with `masters` engines (each its own pool and master row) sharing one
/// PostgreSQL schema; (jobs/s, requests started more than once).
async fn postgres_lifecycle(base: &str, masters: usize, jobs: usize) -> Result<(f64, usize)> {
    use kiln_storage::postgres;
    let schema = format!("kiln_bench_{}_{masters}", std::process::id());
    postgres::drop_schema(base, &schema).await?;
    let url = postgres::create_schema(base, &schema).await?;
    let dir = tempfile::tempdir()?;
    let host = host(&dir, 64);
    let mut engines = Vec::new();
    let mut events = Vec::new();
    for i in 0..masters {
        let store = StoreOptions {
            max_connections: 8,
            ..StoreOptions::default()
        };
        let engine = noop_engine(&url, &format!("bench-{i}"), &host, store).await?;
        events.push(engine.subscribe());
        engines.push(engine);
    }
    let batch = vec![Submission::new("bench").builder("noop"); jobs];
    let start = Instant::now();
    engines[0].submit_many(&batch).await?;
    // Every engine hears of the builds it finished itself; together they are all.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let mut waits = Vec::new();
    for mut rx in events {
        let (done, all) = (done.clone(), all.clone());
        waits.push(tokio::spawn(async move {
            while let Ok(event) = rx.recv().await {
                if matches!(event, Event::BuildFinished { .. })
                    && done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == jobs
                {
                    all.notify_one();
                }
            }
        }));
    }
    all.notified().await;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    let builds = engines[0].client().builds(&Default::default()).await?;
    let mut per_request: BTreeMap<_, usize> = BTreeMap::new();
    for b in &builds {
        *per_request.entry(b.request_id).or_default() += 1;
    }
    let doubles = per_request.values().filter(|n| **n > 1).count();
    for w in waits {
        w.abort();
    }
    for engine in engines {
        engine.shutdown().await;
    }
    postgres::drop_schema(base, &schema).await?;
    Ok((rate, doubles))
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// In a child process of its own (so that nothing else inflates its peak): `SUSPENDED`
/// builds sleeping in WASM timers at once. Prints one line for the parent.
async fn memory_child() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = EngineConfig::new(sqlite_url(&dir, "memory")).master_name("memory");
    config.event_capacity = 1 << 20;
    // Room for every sleeper, in the engine and in the sandbox pool alike.
    let room = (SUSPENDED + 256) as u32;
    config.max_running_builds = room;
    let engine = Engine::open(config).await?;
    let host = host(&dir, room);
    let executor = host
        .job_executor(
            "sleep",
            plugin("sleep")?,
            Limits::default(),
            Grants::default(),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("sleep").kwargs(serde_json::json!({"seconds": 600})),
            executor,
        )
        .await?;
    let before = status_kib("VmRSS:").unwrap_or(0);
    let mut events = engine.subscribe();
    let batch = vec![Submission::new("sleep").builder("sleep"); SUSPENDED];
    let start = Instant::now();
    engine.submit_many(&batch).await?;
    count(&mut events, SUSPENDED, |e| {
        matches!(e, Event::BuildStarted { .. })
    })
    .await?;
    let started = start.elapsed();
    let rss = status_kib("VmRSS:").unwrap_or(0);
    let peak = status_kib("VmHWM:").unwrap_or(0);
    println!(
        "MEMORY {SUSPENDED} {} {} {} {:.3}",
        before / 1024,
        rss / 1024,
        peak / 1024,
        started.as_secs_f64()
    );
    // The sleepers are not waited for: the process ends here.
    std::process::exit(0);
}

/// Bytes under `path` (a file, or a directory walked), 0 when it is not there.
fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| disk_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// A steady load under retention: every period, `RETENTION_JOBS` jobs that each write a
/// result file and log records; the builder keeps one period and its newest
/// `RETENTION_KEEP_LAST` builds, the logs below WARNING one period. Prints the sizes
/// after 10 periods and after `periods`.
async fn retention(periods: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(&dir, "retention");
    let results = dir.path().join("results");
    let mut config = EngineConfig::new(&url)
        .master_name("retention")
        .results_dir(&results);
    config.retention_interval = RETENTION_PERIOD / 4;
    config.log_retention = Some(kiln_engine::LogRetention {
        keep_for: RETENTION_PERIOD,
        below: kiln_engine::model::LogLevel::Warning,
    });
    config.event_capacity = 1 << 20;
    let engine = Engine::open(config).await?;
    let writer = kiln_engine::FnExecutor::new(|ctx| async move {
        for i in 0..10 {
            ctx.log(kiln_engine::model::LogLevel::Info, &format!("step {i}"))
                .await?;
        }
        if let Some(dir) = ctx.result_dir() {
            tokio::fs::write(dir.join("out.bin"), vec![7u8; 4096])
                .await
                .map_err(|e| kiln_engine::JobError::new(e.to_string()))?;
        }
        Ok(kiln_engine::Outcome::success(serde_json::json!(null)))
    });
    engine
        .register_builder(
            BuilderConfig {
                retention: Some(kiln_engine::RetentionPolicy {
                    keep_for: RETENTION_PERIOD,
                    keep_last: RETENTION_KEEP_LAST,
                }),
                ..BuilderConfig::new("steady")
            },
            writer,
        )
        .await?;
    let db = dir.path().join("retention.db");
    let size = |at: usize| {
        let database = disk_bytes(&db)
            + disk_bytes(&dir.path().join("retention.db-wal"))
            + disk_bytes(&dir.path().join("retention.db-shm"));
        println!(
            "retention: after {at:>3} periods ({} jobs): database {:.1} MiB, result directories {:.1} MiB",
            at * RETENTION_JOBS,
            database as f64 / f64::from(1 << 20),
            disk_bytes(&results) as f64 / f64::from(1 << 20),
        );
    };
    let mut events = engine.subscribe();
    let start = Instant::now();
    for period in 1..=periods {
        let batch: Vec<Submission> = (0..RETENTION_JOBS)
            .map(|i| Submission::new(format!("p{period} j{i}")).builder("steady"))
            .collect();
        engine.submit_many(&batch).await?;
        count(&mut events, RETENTION_JOBS, |e| {
            matches!(e, Event::BuildsetComplete { .. })
        })
        .await?;
        let due = start + RETENTION_PERIOD * u32::try_from(period).unwrap_or(u32::MAX);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        if period == 10 || period == periods {
            size(period);
        }
    }
    engine.shutdown().await;
    Ok(())
}

fn memory() -> Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .arg("--memory-child")
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find(|l| l.starts_with("MEMORY ")) else {
        return Ok(format!(
            "did not finish: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    Ok(format!(
        "{} builds suspended in WASM timers: RSS {} MiB before, {} MiB with all started (peak {} MiB), all started after {} s",
        f[1], f[2], f[3], f[4], f[5]
    ))
}

// ---- the report ----

/// What each figure is measured against.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Floor {
    SqliteNormalBatch,
    SqliteFullBatch,
    SqliteNormalEach,
    Postgres,
}

/// One figure over the rounds.
struct Series {
    unit: String,
    floor: Option<Floor>,
    /// One value per round.
    values: Vec<f64>,
}

#[derive(Default)]
struct Figures {
    /// Per figure (in print order), its series.
    values: BTreeMap<(usize, String), Series>,
    /// Per floor, one value per round.
    floors: BTreeMap<Floor, Vec<f64>>,
    /// Per figure, its ratio to its floor per round.
    ratios: BTreeMap<(usize, String), Vec<f64>>,
}

impl Figures {
    fn floor(&mut self, floor: Floor, value: f64) {
        self.floors.entry(floor).or_default().push(value);
    }

    fn add(&mut self, order: usize, name: &str, unit: &str, floor: Option<Floor>, value: f64) {
        let key = (order, name.to_owned());
        if let Some(f) = floor
            && let Some(base) = self.floors.get(&f).and_then(|v| v.last())
        {
            self.ratios
                .entry(key.clone())
                .or_default()
                .push(value / base);
        }
        self.values
            .entry(key)
            .or_insert_with(|| Series {
                unit: unit.to_owned(),
                floor,
                values: Vec::new(),
            })
            .values
            .push(value);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn span(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> Result<()> {
    // Benchmarks must not pay for backtrace capture on every error value.
    // SAFETY: set before the runtime starts any thread, so nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("RUST_BACKTRACE", "0") };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    if has_arg("--memory-child") {
        return memory_child().await;
    }
    // `--profile WHAT`: only that part, once, for a profiler to watch.
    if let Some(what) = std::env::args().skip_while(|a| a != "--profile").nth(1) {
        let jobs = arg_value("--jobs").unwrap_or(DEFAULT_JOBS);
        match what.as_str() {
            "lifecycle" => {
                let r = lifecycle(Durability::Normal, jobs, 0).await?;
                println!("{:.0} jobs/s, {:.1} µs CPU per job", r.per_sec, r.cpu_us);
            }
            "lifecycle-streamed" => {
                let r = lifecycle_in(Durability::Normal, jobs, 0, FLOOR_BATCH).await?;
                println!("{:.0} jobs/s, {:.1} µs CPU per job", r.per_sec, r.cpu_us);
            }
            "rest" => println!("{:?}", rest(REST_CLIENTS, SUBMITS).await?),
            "serial" => println!("{:?}", serial(SUBMITS / 2).await?),
            "latency" => {
                let queued = arg_value("--queued").unwrap_or(0);
                let (p50, p99) = latency(queued).await?;
                println!(
                    "submit-to-start with {queued} queued elsewhere: p50 {p50:?}, p99 {p99:?}"
                );
            }
            "postgres" => {
                let base = std::env::var("KILN_POSTGRES_URL")?;
                let masters = arg_value("--masters").unwrap_or(1).max(1);
                let (rate, double) = postgres_lifecycle(&base, masters, jobs).await?;
                println!("{masters} master(s): {rate:.0} jobs/s, {double} double claims");
            }
            "postgres-floor" => {
                let base = std::env::var("KILN_POSTGRES_URL")?;
                println!("{:.0} jobs/s", postgres_floor(&base, jobs).await?);
            }
            other => bail!(
                "--profile takes lifecycle, lifecycle-streamed, rest, serial, latency, postgres or postgres-floor, not {other}"
            ),
        }
        return Ok(());
    }
    if has_arg("--retention") {
        return retention(arg_value("--periods").unwrap_or(100).max(10)).await;
    }
    let rounds = arg_value("--rounds").unwrap_or(DEFAULT_ROUNDS).max(1);
    let jobs = arg_value("--jobs").unwrap_or(DEFAULT_JOBS).max(100);
    let postgres = std::env::var("KILN_POSTGRES_URL").ok();
    println!(
        "kiln benchmark: {rounds} rounds, N = {jobs} no-op WASM jobs, {} cores, SQLite {}{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rusqlite::version(),
        if postgres.is_some() {
            ", PostgreSQL from KILN_POSTGRES_URL"
        } else {
            ", no PostgreSQL (set KILN_POSTGRES_URL)"
        }
    );
    if !has_arg("--no-memory") {
        println!("memory: {}", memory()?);
    }
    let mut figures = Figures::default();
    let each = (jobs / 10).max(100);
    for round in 1..=rounds {
        println!("round {round}/{rounds}");
        // The floors; each also gives its CPU per job, printed after the rates.
        let floors = [
            ("NORMAL", jobs, FLOOR_BATCH, Some(Floor::SqliteNormalBatch)),
            ("FULL", jobs, FLOOR_BATCH, Some(Floor::SqliteFullBatch)),
            ("NORMAL", each, 1, Some(Floor::SqliteNormalEach)),
            ("FULL", each, 1, None),
        ];
        for (k, (sync, n, batch, floor)) in floors.into_iter().enumerate() {
            let f = sqlite_floor_run(sync, n, batch).await?;
            let name = format!("floor, SQLite {sync}, {batch} per commit");
            println!(
                "  {name}: {:.0} jobs/s, {:.1} µs CPU per job ({n} jobs)",
                f.per_sec, f.cpu_us
            );
            match floor {
                Some(floor) => figures.floor(floor, f.per_sec),
                None => figures.add(0, &name, "jobs/s", None, f.per_sec),
            }
            figures.add(
                CPU_ROWS + k,
                &format!("CPU, {name}"),
                "µs/job",
                None,
                f.cpu_us,
            );
        }

        // One submit_many of everything, then 100 per call while the engine runs.
        let shapes = [
            (
                1,
                false,
                "NORMAL",
                Durability::Normal,
                Floor::SqliteNormalBatch,
            ),
            (2, false, "FULL", Durability::Full, Floor::SqliteFullBatch),
            (
                3,
                true,
                "NORMAL",
                Durability::Normal,
                Floor::SqliteNormalBatch,
            ),
            (4, true, "FULL", Durability::Full, Floor::SqliteFullBatch),
        ];
        for (order, streamed, sync, durability, floor) in shapes {
            let (per_call, shape) = match streamed {
                true => (FLOOR_BATCH, format!(", submitted {FLOOR_BATCH} per call")),
                false => (jobs, String::new()),
            };
            let v = lifecycle_in(durability, jobs, 0, per_call).await?;
            let name = format!("lifecycle, {sync}{shape}");
            println!(
                "  Kiln {name}: {:.0} jobs/s, {:.1} µs CPU per job",
                v.per_sec, v.cpu_us
            );
            figures.add(order, &name, "jobs/s", Some(floor), v.per_sec);
            figures.add(
                CPU_ROWS + 3 + order,
                &format!("CPU, {name}"),
                "µs/job",
                None,
                v.cpu_us,
            );
        }

        let RestRun {
            server,
            clients_cpu_us,
            p50,
            p99,
        } = rest(REST_CLIENTS, SUBMITS).await?;
        println!(
            "  REST, {REST_CLIENTS} clients: {:.0} submits/s, p50 {p50:.2?}, p99 {p99:.2?}, CPU per submit {:.1} µs in the server and {clients_cpu_us:.1} µs in the clients",
            server.per_sec, server.cpu_us
        );
        figures.add(
            5,
            "REST, 16 clients posting 1 buildset",
            "submits/s",
            Some(Floor::SqliteNormalEach),
            server.per_sec,
        );
        figures.add(6, "REST p50", "µs", None, micros(p50));
        figures.add(7, "REST p99", "µs", None, micros(p99));
        figures.add(
            CPU_ROWS + 8,
            "CPU, REST, kiln serve",
            "µs/submit",
            None,
            server.cpu_us,
        );
        figures.add(
            CPU_ROWS + 9,
            "CPU, REST, the 16 clients",
            "µs/submit",
            None,
            clients_cpu_us,
        );

        let (rate, p50, p99, commits, writes) = serial(SUBMITS / 2).await?;
        println!(
            "  serial embedder: {:.0} submits/s, p50 {p50:.2?}, p99 {p99:.2?}, {:.1} µs CPU per submit, {commits:.2} SQLite commits and {writes:.2} log writes per submit (claims and finishes included)",
            rate.per_sec, rate.cpu_us
        );
        figures.add(
            8,
            "serial embedder calling submit",
            "submits/s",
            Some(Floor::SqliteNormalEach),
            rate.per_sec,
        );
        figures.add(
            CPU_ROWS + 10,
            "CPU, serial embedder",
            "µs/submit",
            None,
            rate.cpu_us,
        );
        figures.add(9, "serial submit p50", "µs", None, micros(p50));
        figures.add(10, "serial submit p99", "µs", None, micros(p99));

        let (p50, p99) = latency(0).await?;
        println!("  submit-to-start, idle: p50 {p50:.2?}, p99 {p99:.2?}");
        figures.add(11, "submit-to-start p50, idle", "µs", None, micros(p50));
        figures.add(12, "submit-to-start p99, idle", "µs", None, micros(p99));
        let (p50, p99) = latency(FOREIGN_QUEUED).await?;
        println!(
            "  submit-to-start, {FOREIGN_QUEUED} queued for nobody: p50 {p50:.2?}, p99 {p99:.2?}"
        );
        figures.add(
            13,
            "submit-to-start p50, 100k queued elsewhere",
            "µs",
            None,
            micros(p50),
        );
        figures.add(
            14,
            "submit-to-start p99, 100k queued elsewhere",
            "µs",
            None,
            micros(p99),
        );

        if let Some(base) = &postgres {
            let f = postgres_floor(base, jobs).await?;
            figures.floor(Floor::Postgres, f);
            println!("  floor, PostgreSQL, {FLOOR_BATCH} per commit: {f:.0} jobs/s");
            for masters in [1, 2] {
                let (rate, doubles) = postgres_lifecycle(base, masters, jobs).await?;
                println!(
                    "  PostgreSQL, {masters} master(s): {rate:.0} jobs/s, {doubles} double claims"
                );
                figures.add(
                    14 + masters,
                    &format!("PostgreSQL lifecycle, {masters} master(s)"),
                    "jobs/s",
                    Some(Floor::Postgres),
                    rate,
                );
                figures.add(
                    17 + masters,
                    &format!("PostgreSQL double claims, {masters} master(s)"),
                    "",
                    None,
                    doubles as f64,
                );
            }
        }
        if has_arg("--scale") {
            let v = lifecycle(Durability::Normal, jobs, SCALE_ROWS)
                .await?
                .per_sec;
            println!(
                "  Kiln lifecycle, NORMAL, {SCALE_ROWS} buildsets already in the database: {v:.0} jobs/s"
            );
            figures.add(
                22,
                "lifecycle, NORMAL, 1M buildsets in the database",
                "jobs/s",
                Some(Floor::SqliteNormalBatch),
                v,
            );
        }
    }
    println!();
    println!(
        "summary over {rounds} rounds (median, min–max; ratio = the median of each round's figure / its floor in that round)"
    );
    for (floor, values) in &figures.floors {
        let (lo, hi) = span(values);
        println!(
            "  {:<52} {:>9.0} jobs/s  ({lo:.0}–{hi:.0})",
            format!("{floor:?} floor"),
            median(values)
        );
    }
    for (
        key,
        Series {
            unit,
            floor,
            values,
        },
    ) in &figures.values
    {
        let (lo, hi) = span(values);
        let ratio = figures
            .ratios
            .get(key)
            .map(|r| {
                format!(
                    "  {:.2}× {:?}",
                    median(r),
                    floor.unwrap_or(Floor::SqliteNormalBatch)
                )
            })
            .unwrap_or_default();
        println!(
            "  {:<52} {:>9.0} {unit:<9} ({lo:.0}–{hi:.0}){ratio}",
            key.1,
            median(values)
        );
    }
    Ok(())
}
