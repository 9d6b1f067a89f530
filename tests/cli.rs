//! The `kiln` command line, run as a process against a database an engine filled.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Result, anyhow, ensure};
use kiln_engine::model::{LogLevel, ResultCode};
use kiln_engine::{BuilderConfig, Engine, EngineConfig, FnExecutor, JobError, Outcome, Submission};
use serde_json::{Value, json};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).map_err(|e| anyhow!("not JSON ({e}): {}", self.stdout))
    }

    fn ok(self) -> Result<Self> {
        ensure!(self.code == 0, "exit {}: {}", self.code, self.stderr);
        Ok(self)
    }

    fn fails_with(self, message: &str) -> Result<Self> {
        ensure!(self.code != 0, "expected a failure, got: {}", self.stdout);
        ensure!(
            self.stderr.contains(message),
            "expected {message:?} in: {}",
            self.stderr
        );
        Ok(self)
    }
}

fn from_output(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn kiln(db: &Path, args: &[&str]) -> Result<Run> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("KILN_DATABASE")
        .env("RUST_LOG", "off")
        .output()?;
    Ok(from_output(out))
}

/// A database with one finished buildset over three builders ("ok", "warn", "fail") and
/// one builder nobody runs ("idle"), so its requests stay queued.
async fn filled() -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kiln.db");
    let engine =
        Engine::open(EngineConfig::new(path.display().to_string()).master_name("cli-test")).await?;
    engine
        .register_builder(
            BuilderConfig::new("ok"),
            FnExecutor::new(|ctx| async move {
                ctx.log(LogLevel::Debug, "quiet detail").await?;
                ctx.log(LogLevel::Error, "loud problem").await?;
                ctx.progress(&["stage", "one"], 1, 2, "half").await?;
                ctx.set_property("made", json!("yes"), "ok-job").await?;
                Ok(Outcome::success(json!({"answer": 42})))
            }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("warn"),
            FnExecutor::new(|_| async { Ok(Outcome::with_results(ResultCode::Warnings, None)) }),
        )
        .await?;
    engine
        .register_builder(
            BuilderConfig::new("fail"),
            FnExecutor::new(|_| async { Err::<Outcome, _>(JobError::new("it broke")) }),
        )
        .await?;
    // A builder the database knows but no engine runs.
    kiln_storage::open(&path.display().to_string())
        .await?
        .builder_ensure("idle", None)
        .await?;
    let s = engine
        .submit(
            &Submission::new("first")
                .builder("ok")
                .builder("warn")
                .builder("fail"),
        )
        .await?;
    engine.wait_buildset(s.buildset_id).await?;
    engine.shutdown().await;
    Ok((dir, path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_and_showing_work_in_tables_and_json() -> Result<()> {
    let (_dir, db) = filled().await?;
    let table = kiln(&db, &["list", "buildsets"])?.ok()?;
    ensure!(
        table.stdout.contains("FAILURE") && table.stdout.contains("first"),
        "{}",
        table.stdout
    );

    let buildsets = kiln(&db, &["list", "buildsets", "--json"])?.ok()?.json()?;
    ensure!(
        buildsets["buildsets"][0]["results"] == 2 && buildsets["meta"]["total"] == 1,
        "{buildsets}"
    );

    let builds = kiln(&db, &["--json", "list", "builds", "--builder", "ok"])?
        .ok()?
        .json()?;
    ensure!(builds["builds"].as_array().map(Vec::len) == Some(1));
    ensure!(builds["builds"][0]["return_value"] == json!({"answer": 42}));

    let build = kiln(&db, &["show", "build", "ok/1", "--json"])?
        .ok()?
        .json()?;
    ensure!(
        build["builder"] == "ok" && build["builds"][0]["properties"]["made"][1] == "ok-job",
        "{build}"
    );
    ensure!(build["progress"]["children"][0]["name"] == "stage");
    let human = kiln(&db, &["show", "build", "fail/1"])?.ok()?;
    ensure!(
        human.stdout.contains("error:     it broke"),
        "{}",
        human.stdout
    );

    let bs = kiln(&db, &["show", "buildset", "1", "--json"])?
        .ok()?
        .json()?;
    ensure!(bs["buildrequests"].as_array().map(Vec::len) == Some(3));
    let req = kiln(&db, &["show", "request", "1", "--json"])?
        .ok()?
        .json()?;
    ensure!(req["builds"].as_array().map(Vec::len) == Some(1));

    let builders = kiln(&db, &["list", "builders", "--json"])?.ok()?.json()?;
    ensure!(builders["builders"].as_array().map(Vec::len) == Some(4));
    let masters = kiln(&db, &["list", "masters"])?.ok()?;
    ensure!(
        masters.stdout.contains("cli-test") && masters.stdout.contains("false"),
        "{}",
        masters.stdout
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_filter_by_level() -> Result<()> {
    let (_dir, db) = filled().await?;
    let all = kiln(&db, &["logs", "ok/1"])?.ok()?;
    ensure!(all.stdout.contains("quiet detail") && all.stdout.contains("loud problem"));
    let errors = kiln(&db, &["logs", "ok/1", "--level", "error", "--json"])?
        .ok()?
        .json()?;
    ensure!(
        errors["logs"].as_array().map(Vec::len) == Some(1)
            && errors["logs"][0]["message"] == "loud problem"
    );
    let window = kiln(&db, &["logs", "ok/1", "--since", "1h", "--json"])?
        .ok()?
        .json()?;
    ensure!(window["logs"].as_array().map(Vec::len) == Some(2));
    let future = kiln(
        &db,
        &["logs", "ok/1", "--since", "2999-01-01T00:00:00Z", "--json"],
    )?
    .ok()?
    .json()?;
    ensure!(future["logs"].as_array().is_some_and(Vec::is_empty));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_cancel_and_rebuild_change_the_database() -> Result<()> {
    let (_dir, db) = filled().await?;
    let args = [
        "submit",
        "-b",
        "idle",
        "-b",
        "ok",
        "--reason",
        "by hand",
        "-p",
        "n=3",
        "-p",
        r#"tags=["a","b"]"#,
        "--priority",
        "-5",
        "--repository",
        "https://git/x",
        "--branch",
        "dev",
        "--json",
    ];
    let submitted = kiln(&db, &args)?.ok()?.json()?;
    let buildset = submitted["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{submitted}"))?;
    let queued = kiln(
        &db,
        &[
            "list",
            "requests",
            "--claimed",
            "unclaimed",
            "--branch",
            "dev",
            "--json",
        ],
    )?
    .ok()?
    .json()?;
    ensure!(
        queued["buildrequests"].as_array().map(Vec::len) == Some(2),
        "{queued}"
    );
    ensure!(queued["buildrequests"][0]["priority"] == -5);
    let shown = kiln(&db, &["show", "buildset", &buildset.to_string(), "--json"])?
        .ok()?
        .json()?;
    ensure!(
        shown["buildsets"][0]["properties"]["tags"][0] == json!(["a", "b"])
            && shown["buildsets"][0]["properties"]["n"][1] == "cli"
    );
    ensure!(shown["buildsets"][0]["sourcestamps"][0]["branch"] == "dev");

    let idle = submitted["brids"]["idle"]
        .as_i64()
        .ok_or_else(|| anyhow!("{submitted}"))?;
    let cancelled = kiln(&db, &["cancel", "request", &idle.to_string(), "--json"])?
        .ok()?
        .json()?;
    ensure!(cancelled["cancelled"] == json!([idle]), "{cancelled}");
    let rest = kiln(
        &db,
        &["cancel", "buildset", &buildset.to_string(), "--json"],
    )?
    .ok()?
    .json()?;
    ensure!(
        rest["buildsets_completed"][0]["results"] == 6
            && rest["buildsets_completed"][0]["bsid"] == buildset,
        "{rest}"
    );
    let again = kiln(&db, &["cancel", "buildset", &buildset.to_string()])?.ok()?;
    ensure!(again.stdout.contains("nothing to cancel"));

    let rebuilt = kiln(&db, &["rebuild", "fail/1", "--json"])?.ok()?.json()?;
    let id = rebuilt["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{rebuilt}"))?;
    let new = kiln(&db, &["show", "buildset", &id.to_string(), "--json"])?
        .ok()?
        .json()?;
    ensure!(
        new["buildsets"][0]["rebuilt_buildid"].is_i64()
            && new["buildrequests"][0]["complete"] == json!(false)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_an_idempotency_key_are_kept_in_the_database() -> Result<()> {
    let (_dir, db) = filled().await?;
    let paused = kiln(&db, &["pause", "idle"])?.ok()?;
    ensure!(
        paused.stdout.contains("builder idle paused"),
        "{}",
        paused.stdout
    );
    let listed = kiln(&db, &["list", "builders", "--json"])?.ok()?.json()?;
    let idle = listed["builders"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "idle"))
        .ok_or_else(|| anyhow!("{listed}"))?;
    ensure!(idle["paused"] == true, "{listed}");
    let table = kiln(&db, &["list", "builders"])?.ok()?;
    ensure!(table.stdout.contains("paused"), "{}", table.stdout);
    let resumed = kiln(&db, &["resume", "idle", "--json"])?.ok()?.json()?;
    ensure!(resumed["paused"] == false, "{resumed}");
    kiln(&db, &["pause", "nobody"])?.fails_with("unknown builder")?;

    let args = [
        "submit",
        "-b",
        "idle",
        "--idempotency-key",
        "nightly-7",
        "--json",
    ];
    let first = kiln(&db, &args)?.ok()?.json()?;
    let second = kiln(&db, &args)?.ok()?.json()?;
    ensure!(
        first["existing"] == false && second["existing"] == true,
        "{second}"
    );
    ensure!(first["bsid"] == second["bsid"], "{first} {second}");
    let later = kiln(
        &db,
        &["submit", "-b", "idle", "--not-before", "2h", "--json"],
    )?
    .ok()?
    .json()?;
    let request = later["brids"]["idle"]
        .as_i64()
        .ok_or_else(|| anyhow!("{later}"))?;
    let shown = kiln(&db, &["show", "request", &request.to_string(), "--json"])?
        .ok()?
        .json()?;
    ensure!(shown.to_string().contains("not_before"), "{shown}");
    kiln(&db, &["submit", "-b", "idle", "--not-before", "soon"])?.fails_with("bad time")?;
    let pruned = kiln(
        &db,
        &[
            "prune",
            "logs",
            "--older-than",
            "0s",
            "--below",
            "info",
            "--json",
        ],
    )?
    .ok()?
    .json()?;
    ensure!(
        pruned["pruned"].as_u64().is_some_and(|n| n >= 1),
        "{pruned}"
    );
    kiln(
        &db,
        &["prune", "logs", "--older-than", "0s", "--below", "loud"],
    )?
    .fails_with("--below")?;
    let finished = kiln(&db, &["list", "buildsets", "--complete", "true", "--json"])?
        .ok()?
        .json()?;
    let bsid = finished["buildsets"][0]["bsid"]
        .as_i64()
        .ok_or_else(|| anyhow!("{finished}"))?;
    let deleted = kiln(&db, &["delete", "buildset", &bsid.to_string(), "--json"])?
        .ok()?
        .json()?;
    ensure!(
        deleted["builds"].as_array().is_some_and(|b| !b.is_empty()),
        "{deleted}"
    );
    kiln(&db, &["delete", "buildset", &bsid.to_string()])?.fails_with("not found")?;
    let said = kiln(&db, &args[..args.len() - 1])?.ok()?;
    ensure!(
        said.stdout.contains("holds this idempotency key already"),
        "{}",
        said.stdout
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_a_clear_message_and_writes_nothing() -> Result<()> {
    let (dir, db) = filled().await?;
    kiln(&db, &["submit", "-b", "nope"])?.fails_with("unknown builder \"nope\"")?;
    kiln(&db, &["submit", "-b", "ok", "-p", "x=text"])?.fails_with("is not valid JSON")?;
    kiln(&db, &["submit", "-b", "ok", "-p", "novalue"])?.fails_with("NAME=JSON")?;
    kiln(&db, &["submit", "-b", "ok", "--priority", "5000"])?.fails_with("priority: 5000")?;
    kiln(&db, &["submit", "-b", "ok", "--priority", "high"])?.fails_with("invalid value")?;
    kiln(&db, &["list", "requests", "--order", "colour"])?
        .fails_with("cannot order by \"colour\"")?;
    kiln(&db, &["list", "requests", "--claimed", "maybe"])?.fails_with("invalid value")?;
    kiln(&db, &["list", "requests", "--claimed-by", "nobody"])?.fails_with("unknown master")?;
    kiln(&db, &["show", "build", "999"])?.fails_with("build 999 not found")?;
    kiln(&db, &["show", "build", "ok/x"])?.fails_with("not a build number")?;
    kiln(&db, &["show", "buildset", "77"])?.fails_with("buildset 77 not found")?;
    kiln(&db, &["logs", "1", "--level", "loud"])?.fails_with("unknown log level")?;
    kiln(&db, &["logs", "1", "--since", "yesterday"])?.fails_with("bad time")?;
    kiln(&db, &["cancel", "request", "4040"])?.fails_with("not found")?;
    kiln(&db, &["rebuild", "4040"])?.fails_with("not found")?;
    let count = kiln(&db, &["list", "buildsets", "--json"])?.ok()?.json()?;
    ensure!(
        count["buildsets"].as_array().map(Vec::len) == Some(1),
        "nothing was written: {count}"
    );

    let missing = dir.path().join("typo.db");
    kiln(&missing, &["list", "builds"])?.fails_with("no Kiln database")?;
    ensure!(!missing.exists(), "a mistyped path creates no file");
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "not a database, just words ".repeat(100))?;
    kiln(&junk, &["list", "builds"])?.fails_with("not a Kiln database")?;
    Ok(())
}

#[test]
fn the_embedding_example_runs_and_the_cli_reads_its_database() -> Result<()> {
    // `cargo test` builds the examples next to the test binaries.
    let exe = std::env::current_exe()?;
    let example = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| {
            dir.join("examples")
                .join(format!("embedded{}", std::env::consts::EXE_SUFFIX))
        })
        .ok_or_else(|| anyhow!("no examples directory next to {}", exe.display()))?;
    ensure!(
        example.exists(),
        "{} is missing: run `cargo test`, which builds it",
        example.display()
    );
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("example.db");
    let run = from_output(
        Command::new(&example)
            .arg(&db)
            .env("RUST_LOG", "off")
            .output()?,
    )
    .ok()?;
    ensure!(
        run.stdout.contains("buildset 1: WARNINGS"),
        "{}",
        run.stdout
    );
    for builder in ["fetch", "compile", "test", "docs"] {
        ensure!(
            run.stdout.contains(&format!("finished {builder} #1")),
            "{builder}: {}",
            run.stdout
        );
    }
    let builds = kiln(&db, &["list", "builds", "--json"])?.ok()?.json()?;
    ensure!(builds["builds"].as_array().map(Vec::len) == Some(4));
    let compile = kiln(&db, &["show", "build", "compile/1", "--json"])?
        .ok()?
        .json()?;
    ensure!(
        compile["progress"]["total"] == 15 && compile["progress"]["current"] == 15,
        "{compile}"
    );
    Ok(())
}

// ---- kiln run and kiln plugin check ----

fn kiln_in(dir: &Path, args: &[&str]) -> Result<Run> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .args(args)
        .env_remove("KILN_DATABASE")
        .env("RUST_LOG", "off")
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()?;
    Ok(from_output(out))
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("pipeline.toml")
}

#[test]
fn the_example_pipeline_runs_and_its_builds_are_in_the_database() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A copy, so that the reporter's file lands in the temporary directory.
    let examples = dir.path().join("examples");
    std::fs::create_dir_all(examples.join("data"))?;
    let source = example();
    let source_dir = source
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no examples dir"))?;
    std::fs::copy(&source, examples.join("pipeline.toml"))?;
    std::fs::copy(
        source_dir.join("data/input.txt"),
        examples.join("data/input.txt"),
    )?;
    let run = kiln_in(dir.path(), &["run", "examples/pipeline.toml"])?.ok()?;
    ensure!(run.stdout.contains("result: SUCCESS"), "{}", run.stdout);
    for builder in ["echo", "fib", "progress", "artifacts", "nap", "inspect"] {
        ensure!(
            run.stdout
                .contains(&format!("finished {builder} #1: SUCCESS")),
            "{builder}: {}",
            run.stdout
        );
    }
    ensure!(
        run.stdout.contains("kiln-results/artifacts/1/summary.json"),
        "artifact paths: {}",
        run.stdout
    );
    ensure!(
        dir.path()
            .join("kiln-results/artifacts/1/summary.json")
            .exists()
    );
    let db = dir.path().join("kiln.db");
    let inspect = kiln(&db, &["show", "build", "inspect/1", "--json"])?
        .ok()?
        .json()?;
    ensure!(
        inspect["builds"][0]["return_value"]["env"] == json!({"PIPELINE": "example"}),
        "{inspect}"
    );
    let builds = kiln(&db, &["list", "builds", "--json"])?.ok()?.json()?;
    // 8 builders, 3 more naps, fan-out's 3 children, and artifacts once more if summary
    // started before it and built its dependency first.
    let count = builds["builds"].as_array().map_or(0, Vec::len);
    ensure!((14..=15).contains(&count), "{count} builds");
    // The trigger: fan-out's children are listed under it and it saw their results.
    ensure!(run.stdout.contains("└ echo"), "{}", run.stdout);
    let fan_out = kiln(&db, &["show", "build", "fan-out/1", "--json"])?
        .ok()?
        .json()?;
    let rv = &fan_out["builds"][0]["return_value"];
    ensure!(
        rv["verdict"] == "SUCCESS" && rv["children"].as_array().map(Vec::len) == Some(3),
        "{rv}"
    );
    // The dependency: summary got artifacts' return value through $retval.
    let summary = kiln(&db, &["show", "build", "summary/1", "--json"])?
        .ok()?
        .json()?;
    let args = &summary["builds"][0]["return_value"];
    ensure!(
        args[0] == "artifacts wrote" && args[1].as_array().is_some_and(|w| w.len() == 4),
        "{args}"
    );
    // The reporter: every finished build and complete buildset, one JSON line each.
    let log = std::fs::read_to_string(examples.join("reports/events.jsonl"))?;
    let finished = log
        .lines()
        .filter(|l| l.contains("\"build_finished\""))
        .count();
    ensure!(
        finished == count,
        "{finished} build_finished lines for {count} builds"
    );
    let reporters = kiln(&db, &["list", "reporters", "--json"])?.ok()?.json()?;
    let events_log = &reporters["reporters"][0];
    ensure!(
        events_log["name"] == "events-log" && events_log["pending"] == 0,
        "{reporters}"
    );
    kiln(&db, &["reporter", "remove", "events-log"])?.ok()?;
    kiln(&db, &["reporter", "remove", "events-log"])?
        .fails_with("reporter events-log not found")?;
    let list = kiln(&db, &["list", "builders", "--json"])?.ok()?.json()?;
    let status = list["builders"]
        .as_array()
        .and_then(|b| b.iter().find(|x| x["name"] == "summary").cloned())
        .ok_or_else(|| anyhow::anyhow!("no summary builder"))?;
    ensure!(
        status["status"] == "success" && status["depends_on"] == json!(["artifacts"]),
        "{status}"
    );
    Ok(())
}

#[test]
fn a_pipelines_relations_are_checked_when_it_is_loaded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = r#"
[[builder]]
name = "a"
plugin = "bundled:echo"
depends_on = ["b"]

[[builder]]
name = "b"
plugin = "bundled:echo"
depends_on = ["a"]

[[builder]]
name = "c"
plugin = "bundled:echo"
args = [{ "$retval" = "a" }]

[[builder]]
name = "d"
plugin = "bundled:echo"
depends_on = ["nobody"]

[relationships]
strict = "bundled:echo"

[[reporter]]
name = "r"
plugin = "bundled:webhook"
events = ["build_exploded"]
[reporter.grants]
http = ["http://example.invalid/"]

[[submit]]
builders = ["a"]
"#;
    std::fs::write(dir.path().join("rel.toml"), config)?;
    let run = kiln_in(dir.path(), &["run", "rel.toml"])?;
    ensure!(run.code != 0, "{}", run.stdout);
    for expected in [
        "dependency cycle: a -> b -> a",
        "reference the return value of \"a\", which is not in its depends_on",
        "depends on \"nobody\", which the file does not declare",
        "relationship \"strict\"",
        "does not export `decide",
        "unknown event kind \"build_exploded\"",
        "must be a host name or host:port",
    ] {
        ensure!(
            run.stderr.contains(expected),
            "expected {expected:?} in: {}",
            run.stderr
        );
    }
    ensure!(!dir.path().join("kiln.db").exists());
    Ok(())
}

#[test]
fn resubmit_runs_the_failed_builders_of_a_buildset_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = r#"
[[builder]]
name = "good"
plugin = "bundled:echo"

[[builder]]
name = "bad"
plugin = "bundled:fail"

[[submit]]
builders = ["good", "bad"]
"#;
    std::fs::write(dir.path().join("p.toml"), config)?;
    ensure!(kiln_in(dir.path(), &["run", "p.toml"])?.code == 1);
    let db = dir.path().join("kiln.db");
    let again = kiln(&db, &["resubmit", "1", "--json"])?.ok()?.json()?;
    ensure!(
        again["brids"]
            .as_object()
            .map(|r| r.keys().cloned().collect::<Vec<_>>())
            == Some(vec!["bad".to_owned()]),
        "{again}"
    );
    let all = kiln(&db, &["resubmit", "1", "--all"])?.ok()?;
    ensure!(all.stdout.contains("for bad, good"), "{}", all.stdout);
    kiln(&db, &["resubmit", "99"])?.fails_with("buildset 99 not found")?;
    Ok(())
}

#[test]
fn a_pipeline_with_a_failing_build_exits_non_zero_with_a_summary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = r#"
[[builder]]
name = "good"
plugin = "bundled:echo"

[[builder]]
name = "bad"
plugin = "bundled:fail"
kwargs = { message = "broken on purpose" }

[[builder]]
name = "bomb"
plugin = "bundled:memory-bomb"
[builder.limits]
memory_mib = 16

[[submit]]
builders = ["good", "bad", "bomb"]
"#;
    std::fs::write(dir.path().join("p.toml"), config)?;
    let run = kiln_in(dir.path(), &["run", "p.toml", "--json"])?;
    ensure!(run.code == 1, "exit {}: {}", run.code, run.stderr);
    let summary = run.json()?;
    ensure!(summary["results"] == 4, "{summary}");
    let by_builder = |name: &str| {
        summary["builds"]
            .as_array()
            .and_then(|b| b.iter().find(|x| x["builder"] == name).cloned())
    };
    ensure!(by_builder("good").is_some_and(|b| b["build"]["results"] == 0));
    ensure!(by_builder("bad").is_some_and(|b| b["build"]["error"] == "broken on purpose"));
    ensure!(by_builder("bomb").is_some_and(|b| {
        b["build"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("memory limit exceeded"))
    }));
    Ok(())
}

#[test]
fn a_bad_pipeline_reports_every_problem_together_and_runs_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("not.wasm"), b"\0asm\x01\0\0\0")?;
    let config = r#"
[[builder]]
name = "a"
plugin = "bundled:no-such-plugin"

[[builder]]
name = "b"
plugin = "not.wasm"

[[builder]]
name = "c"
plugin = "bundled:not-a-job"

[[builder]]
name = "d"
plugin = "bundled:echo"
[builder.limits]
stack_kib = 1
[builder.grants]
dirs = [{ host = "missing", guest = "/m" }]

[[builder]]
name = "e"
plugin = "bundled:echo"
retry = { attempts = 0 }

[[builder]]
name = "f"
plugin = "bundled:echo"
retry = { attempts = 3, backoff_s = 60, max_backoff_s = 1 }

[[builder]]
name = "g"
plugin = "bundled:echo"
retention = { keep_days = -1 }

[[builder]]
name = "h"
plugin = "bundled:echo"
retention = {}

[retention]
batch = 0
logs_keep_days = 7
logs_below = "loud"

[[submit]]
builders = ["a", "ghost"]
"#;
    std::fs::write(dir.path().join("bad.toml"), config)?;
    let run = kiln_in(dir.path(), &["run", "bad.toml"])?;
    ensure!(run.code != 0, "{}", run.stdout);
    for expected in [
        "no bundled plugin \"no-such-plugin\"",
        "core WebAssembly module, not a component",
        "does not export `run",
        "stack",
        "names builder \"ghost\"",
        "builder \"e\": retry: retry attempts 0 is outside 1..=100",
        "builder \"f\": retry: retry backoff 60s is longer than its maximum 1s",
        "builder \"g\": retention: keep_days = -1 must be within 0..=36500 days",
        "builder \"h\": retention: retention keeps nothing",
        "[retention]: batch must be at least 1",
        "[retention]: logs_below = \"loud\"",
    ] {
        ensure!(
            run.stderr.contains(expected),
            "expected {expected:?} in: {}",
            run.stderr
        );
    }
    ensure!(
        !dir.path().join("kiln.db").exists(),
        "nothing ran, no database was made"
    );

    std::fs::write(
        dir.path().join("typo.toml"),
        "[[builder]]\nname = \"x\"\nplugin = \"bundled:echo\"\nmax_concurent = 2\n",
    )?;
    kiln_in(dir.path(), &["run", "typo.toml"])?.fails_with("unknown field `max_concurent`")?;
    kiln_in(dir.path(), &["run", "nowhere.toml"])?.fails_with("cannot read nowhere.toml")?;
    Ok(())
}

#[test]
fn plugin_check_names_the_world_or_says_why_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = kiln_in(dir.path(), &["plugin", "check", "bundled:echo"])?.ok()?;
    ensure!(
        good.stdout
            .contains("a `job` component, built against kiln:plugin@0.1.0")
            && good.stdout.contains("built with: Rust (wit-bindgen-rust"),
        "{}",
        good.stdout
    );
    let report = kiln_in(dir.path(), &["plugin", "check", "bundled:fib", "--json"])?
        .ok()?
        .json()?;
    ensure!(
        report["world"] == "job" && report["exports"] == json!(["run"]),
        "{report}"
    );
    let bad = kiln_in(dir.path(), &["plugin", "check", "bundled:not-a-job"])?;
    ensure!(
        bad.code == 1
            && bad.stdout.contains("not a Kiln plugin")
            && bad.stdout.contains("does not export `run"),
        "{}",
        bad.stdout
    );
    for (plugin, world) in [
        ("bundled:fail-fast", "policy"),
        ("bundled:webhook", "reporter"),
    ] {
        let report = kiln_in(dir.path(), &["plugin", "check", plugin, "--json"])?
            .ok()?
            .json()?;
        ensure!(report["world"] == world, "{plugin}: {report}");
    }
    std::fs::write(dir.path().join("x.wasm"), "plain text")?;
    let text = kiln_in(dir.path(), &["plugin", "check", "x.wasm"])?;
    ensure!(
        text.code == 1 && text.stdout.contains("not WebAssembly"),
        "{}",
        text.stdout
    );
    Ok(())
}

/// A `kiln serve` child in `dir` on a free port, killed when dropped, with the first
/// line it printed and the address that line names.
struct Served {
    child: std::process::Child,
    line: String,
    address: String,
}

impl Served {
    fn start(dir: &Path, pipeline: &Path) -> Result<Served> {
        let (child, line, address) =
            spawn_serve_with(dir, &[], &[&pipeline.display().to_string()])?;
        Ok(Served {
            child,
            line,
            address,
        })
    }
}

/// Starts `kiln [before…] serve [args…] --listen 127.0.0.1:0` in `dir` and reads its
/// first line: the child, that line, and the address it names.
fn spawn_serve_with(
    dir: &Path,
    before: &[&str],
    args: &[&str],
) -> Result<(std::process::Child, String, String)> {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .args(before)
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_owned();
    if address.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("kiln serve did not listen: {line:?}");
    }
    Ok((child, line, address))
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET; returns the status line and the body.
fn http_get(address: &str, path: &str) -> Result<(String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply.lines().next().unwrap_or_default().to_owned();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[test]
fn kiln_serve_serves_the_dashboard_and_the_api_over_the_example_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let served = Served::start(dir.path(), &example())?;
    let (line, address) = (&served.line, served.address.as_str());
    ensure!(line.contains("read-only: no --token"), "{line}");
    let (status, page) = http_get(address, "/")?;
    ensure!(
        status.contains("200") && page.contains("<title>Kiln</title>"),
        "{status}"
    );
    let (status, body) = http_get(address, "/api/v2/builders?field=name&order=name")?;
    ensure!(status.contains("200"), "{status}: {body}");
    let builders: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(builders["meta"]["total"] == 8, "{builders}");
    ensure!(builders["builders"][0] == json!({"name": "artifacts"}));
    let (status, _) = http_get(address, "/api/v2/builds?colour=red")?;
    ensure!(status.contains("400"), "{status}");
    Ok(())
}

/// A pipeline file with one bundled no-op builder and nothing to submit.
fn noop_pipeline(dir: &Path) -> Result<PathBuf> {
    let pipeline = dir.join("builders.toml");
    std::fs::write(
        &pipeline,
        "[[builder]]\nname = \"noop\"\nplugin = \"bundled:noop\"\n",
    )?;
    Ok(pipeline)
}

/// `kiln serve` at its default log level says what went wrong and stays quiet about
/// what went well: a failing build and its buildset are logged at info, the successful
/// build of the same buildset and every start and submit only at debug. (The log follows
/// the engine's events in order, and the buildset completes after both builds: every
/// line about them comes before its own.)
#[test]
fn kiln_serve_logs_failures_at_info_and_successes_only_at_debug() -> Result<()> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("mixed.toml");
    std::fs::write(
        &pipeline,
        r#"
[[builder]]
name = "ok"
plugin = "bundled:noop"

[[builder]]
name = "bad"
plugin = "bundled:fail"

[[submit]]
reason = "one goes well, one does not"
builders = ["ok", "bad"]
"#,
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir.path())
        .args(["serve", "--submit", "--listen", "127.0.0.1:0"])
        .arg(&pipeline)
        .env_remove("RUST_LOG")
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The buildset's completion is the last lifecycle event; a guard turns a hang into
    // a failure.
    let mut seen = Vec::new();
    let outcome = loop {
        match lines.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(line) => {
                let done = line.contains("buildset complete");
                seen.push(line);
                if done {
                    break Ok(());
                }
            }
            Err(e) => break Err(anyhow!("no buildset complete line ({e}): {seen:#?}")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome?;
    let log = seen.join("\n");
    for wanted in [
        ["build finished build=", "results=FAILURE"],
        ["buildset complete buildset=1", "results=FAILURE"],
    ] {
        ensure!(
            seen.iter()
                .any(|l| l.contains(" INFO ") && wanted.iter().all(|w| l.contains(w))),
            "no {wanted:?} at info in:\n{log}"
        );
    }
    for quiet in ["results=SUCCESS", "build started", "buildset submitted"] {
        ensure!(
            !log.contains(quiet),
            "{quiet:?} logged at the default level:\n{log}"
        );
    }
    Ok(())
}

/// What operators' tooling probes: liveness, readiness and Prometheus metrics.
#[test]
fn kiln_serve_answers_health_readiness_and_metrics_probes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pipeline = noop_pipeline(dir.path())?;
    let served = Served::start(dir.path(), &pipeline)?;
    let (status, body) = http_get(&served.address, "/healthz")?;
    ensure!(
        status.contains("200") && body.contains("ok"),
        "{status}: {body}"
    );
    let (status, body) = http_get(&served.address, "/readyz")?;
    ensure!(
        status.contains("200") && body.contains("ready"),
        "{status}: {body}"
    );
    let (status, body) = http_get(&served.address, "/metrics")?;
    ensure!(status.contains("200"), "{status}: {body}");
    for line in [
        "kiln_masters_alive 1",
        r#"kiln_requests_queued{builder="noop"} 0"#,
        "kiln_sandboxes_in_use 0",
        "# EOF",
    ] {
        ensure!(body.lines().any(|l| l == line), "no {line:?} in {body}");
    }
    Ok(())
}

/// A pipeline's schedules run under `kiln serve`, list from the database and fire on
/// demand from the command line.
#[test]
fn a_served_pipelines_schedules_list_and_fire_from_the_command_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("scheduled.toml");
    std::fs::write(
        &pipeline,
        r#"
[[builder]]
name = "noop"
plugin = "bundled:noop"

[[schedule]]
name = "nightly"
cron = "0 2 * * *"
timezone = "Europe/Rome"
builders = ["noop"]

[[schedule]]
name = "quarterly"
every = "15m"
builders = ["noop"]
catch_up = "all"
"#,
    )?;
    let _served = Served::start(dir.path(), &pipeline)?;
    let db = dir.path().join("kiln.db");
    let listed = kiln(&db, &["list", "schedules", "--json"])?.ok()?.json()?;
    let names: Vec<&str> = listed["schedules"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    ensure!(names == ["nightly", "quarterly"], "{listed}");
    let table = kiln(&db, &["list", "schedules"])?.ok()?;
    ensure!(
        table.stdout.contains("0 2 * * * (Europe/Rome)") && table.stdout.contains("every 900 s"),
        "{}",
        table.stdout
    );
    let fired = kiln(&db, &["fire", "nightly", "--json"])?.ok()?.json()?;
    ensure!(fired["bsid"].is_i64(), "{fired}");
    kiln(&db, &["fire", "nobody"])?.fails_with("not found")?;

    std::fs::write(
        dir.path().join("bad.toml"),
        "[[builder]]\nname = \"noop\"\nplugin = \"bundled:noop\"\n\n[[schedule]]\nname = \"x\"\nevery = \"soon\"\nbuilders = [\"noop\", \"ghost\"]\n\n[[schedule]]\nname = \"y\"\ncron = \"0 2 * * *\"\ntimezone = \"Mars/Olympus\"\nbuilders = [\"noop\"]\n",
    )?;
    let mut bad = kiln_in(
        dir.path(),
        &["serve", "bad.toml", "--listen", "127.0.0.1:0"],
    )?;
    for expected in [
        "every = \"soon\" is not an interval",
        "names builder \"ghost\"",
        "unknown time zone \"Mars/Olympus\"",
    ] {
        bad = bad.fails_with(expected)?;
    }
    Ok(())
}

/// A server runs what its clients submit: a pipeline file with builders and nothing to
/// `[[submit]]` is enough for `kiln serve` (and not for `kiln run`, which would have
/// nothing to do).
#[test]
fn kiln_serve_takes_a_pipeline_with_builders_and_nothing_to_submit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pipeline = noop_pipeline(dir.path())?;
    let run = kiln_in(dir.path(), &["run", &pipeline.display().to_string()])?;
    ensure!(
        run.code != 0 && run.stderr.contains("nothing to [[submit]]"),
        "{}",
        run.stderr
    );
    let served = Served::start(dir.path(), &pipeline)?;
    let (status, body) = http_get(&served.address, "/api/v2/builders?field=name")?;
    ensure!(status.contains("200"), "{status}: {body}");
    let builders: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        builders["builders"] == json!([{"name": "noop"}]),
        "{builders}"
    );
    Ok(())
}

#[test]
fn kiln_serve_stops_on_sigterm_even_with_an_event_stream_open() -> Result<()> {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("kiln.db");
    let (mut child, _, address) =
        spawn_serve_with(dir.path(), &["--db", &db.display().to_string()], &[])?;
    // A browser's event stream, left open.
    let mut stream = std::net::TcpStream::connect(&address)?;
    write!(
        stream,
        "GET /api/v2/events HTTP/1.1\r\nHost: {address}\r\n\r\n"
    )?;
    let mut first = [0u8; 12];
    stream.read_exact(&mut first)?;
    ensure!(first.starts_with(b"HTTP/1.1 200"));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    ensure!(status.success());
    // A hang guard: the server must exit by itself.
    let pid = child.id().to_string();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    match exited.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(status) => ensure!(status?.success(), "kiln serve exited with an error"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            anyhow::bail!("kiln serve did not stop while an event stream was open");
        }
    }
    Ok(())
}

/// `kiln serve --private-reads` without a token would refuse every read: it is refused
/// at once instead of starting.
#[test]
fn private_reads_without_a_token_are_refused_before_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir.path())
        .args(["serve", "--private-reads", "--listen", "127.0.0.1:0"])
        .env_remove("KILN_TOKEN")
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    // Waits for the process on a thread, so that a server that starts anyway is a
    // failure after a while, not a hang.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        let _ = tx.send(text);
    });
    let stderr = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(text) => text,
        Err(_) => {
            let _ = child.kill();
            anyhow::bail!("kiln serve --private-reads without a token started serving");
        }
    };
    let status = child.wait()?;
    ensure!(
        !status.success() && stderr.contains("--private-reads needs --token"),
        "{stderr}"
    );
    Ok(())
}

/// A closed pipe ends the CLI quietly (`kiln ... | head -1`), not with a panic.
#[test]
fn a_closed_pipe_ends_the_command_without_a_panic() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plugin", "check", "bundled:noop"])
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The reading end goes away before the command prints.
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() != Some(101) && !stderr.contains("panicked"),
        "{:?}: {stderr}",
        out.status
    );
    ensure!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
    Ok(())
}

/// Locks from the pipeline file: builders that share an exclusive lock run one at a
/// time, the wait is recorded, the lock lists from the command line, and mistakes in
/// `[[lock]]` and `locks` are reported before anything runs.
#[test]
fn builders_sharing_a_pipeline_lock_take_turns_and_the_lock_lists() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = r#"
[[lock]]
name = "deploy"

[[lock]]
name = "db"
count = 3

[[builder]]
name = "one"
plugin = "bundled:sleep"
kwargs = { seconds = 0.2 }
locks = ["deploy", { name = "db", count = 2 }]

[[builder]]
name = "two"
plugin = "bundled:sleep"
kwargs = { seconds = 0.2 }
locks = [{ name = "deploy", exclusive = true }]

[[submit]]
builders = ["one", "two"]
"#;
    std::fs::write(dir.path().join("p.toml"), config)?;
    kiln_in(dir.path(), &["run", "p.toml"])?.ok()?;
    let db = dir.path().join("kiln.db");
    let listed = kiln(&db, &["list", "locks", "--json"])?.ok()?.json()?;
    let locks = listed["locks"].as_array().cloned().unwrap_or_default();
    ensure!(locks.len() == 2, "{listed}");
    ensure!(
        locks[0]["name"] == "db" && locks[0]["count"] == 3,
        "{listed}"
    );
    ensure!(
        locks[1]["users"].as_array().map(Vec::len) == Some(2),
        "{listed}"
    );
    let table = kiln(&db, &["list", "locks"])?.ok()?;
    ensure!(
        table.stdout.contains("0/1") && table.stdout.contains("one (1), two (1)"),
        "{}",
        table.stdout
    );
    // The two builds did not overlap: one waited for the other's lock.
    let builds = kiln(&db, &["list", "builds", "--json"])?.ok()?.json()?;
    let waited: Vec<f64> = builds["builds"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|x| x["locks_duration_s"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        waited.len() == 2 && waited.iter().filter(|w| **w > 0.0).count() == 1,
        "{builds}"
    );

    std::fs::write(
        dir.path().join("bad.toml"),
        r#"
[[lock]]
name = "deploy"
count = 0

[[lock]]
name = "db"
count = 2

[[builder]]
name = "x"
plugin = "bundled:noop"
locks = ["ghost", { name = "db", count = 3 }, { name = "db", count = 1, exclusive = true }]

[[submit]]
builders = ["x"]
"#,
    )?;
    let mut bad = kiln_in(dir.path(), &["run", "bad.toml"])?;
    for expected in [
        "lock \"deploy\": count must be within",
        "takes lock \"ghost\", which the file does not declare",
        "lock \"db\" has 2 units; a build cannot take 3",
        "says both count and exclusive",
    ] {
        bad = bad.fails_with(expected)?;
    }
    Ok(())
}

/// A builder's `grants.http` and HTTP limits reach its jobs: with the host granted the
/// job connects (here to a closed port, so it fails on its own), without it Kiln refuses
/// the request before connecting and the build ends as EXCEPTION naming the host.
#[test]
fn a_pipelines_http_grant_decides_whether_a_job_may_connect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = format!(
        r#"
[[builder]]
name = "granted"
plugin = "bundled:fetch"
kwargs = {{ url = "http://127.0.0.1:{port}/" }}
[builder.grants]
http = ["127.0.0.1:{port}"]
[builder.limits]
http_requests = 5
http_mib = 1

[[builder]]
name = "ungranted"
plugin = "bundled:fetch"
kwargs = {{ url = "http://127.0.0.1:{port}/" }}

[[submit]]
builders = ["granted", "ungranted"]
"#
    );
    std::fs::write(dir.path().join("p.toml"), config)?;
    ensure!(kiln_in(dir.path(), &["run", "p.toml"])?.code == 1);
    let db = dir.path().join("kiln.db");
    let builds = kiln(&db, &["list", "builds", "--json"])?.ok()?.json()?;
    let builders = kiln(&db, &["list", "builders", "--json"])?.ok()?.json()?;
    let by = |name: &str| -> Option<serde_json::Value> {
        let id = builders["builders"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == name)?["builderid"]
            .clone();
        builds["builds"]
            .as_array()?
            .iter()
            .find(|b| b["builderid"] == id)
            .cloned()
    };
    let granted = by("granted").ok_or_else(|| anyhow::anyhow!("{builds}"))?;
    let ungranted = by("ungranted").ok_or_else(|| anyhow::anyhow!("{builds}"))?;
    ensure!(granted["results"] == 2, "{granted}");
    ensure!(
        ungranted["results"] == 4
            && ungranted["error"].as_str().is_some_and(
                |e| e.contains(&format!("outbound HTTP to 127.0.0.1:{port} was refused"))
            ),
        "{ungranted}"
    );
    Ok(())
}

/// Work for a builder no active master runs is accepted, and says so: the submit warns
/// (and `--json` lists it), and `kiln list builders` shows it.
#[test]
fn submitting_to_a_builder_nobody_serves_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("p.toml"),
        "[[builder]]\nname = \"noop\"\nplugin = \"bundled:noop\"\n\n[[submit]]\nbuilders = [\"noop\"]\n",
    )?;
    // The run registers the builder, then shuts its master down.
    kiln_in(dir.path(), &["run", "p.toml"])?.ok()?;
    let db = dir.path().join("kiln.db");
    let submitted = kiln(&db, &["submit", "-b", "noop"])?.ok()?;
    ensure!(
        submitted
            .stderr
            .contains("warning: no active master runs noop: their requests wait"),
        "{}",
        submitted.stderr
    );
    let json = kiln(&db, &["submit", "-b", "noop", "--json"])?
        .ok()?
        .json()?;
    ensure!(json["unserved"] == serde_json::json!(["noop"]), "{json}");
    let listed = kiln(&db, &["list", "builders"])?.ok()?;
    ensure!(
        listed.stdout.contains("no active master"),
        "{}",
        listed.stdout
    );
    let listed = kiln(&db, &["list", "builders", "--json"])?.ok()?.json()?;
    ensure!(listed["builders"][0]["served"] == false, "{listed}");
    Ok(())
}

/// The habits of kubectl and gh: `submit --wait` exits with the buildset's result,
/// `logs BUILDER --follow` prints the latest build's records until it ends, and the
/// binary writes its shell completions and man pages.
#[test]
fn submit_waits_for_the_result_logs_follow_a_builders_latest_build_and_completions_print()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("served.toml");
    std::fs::write(
        &pipeline,
        r#"
[[builder]]
name = "good"
plugin = "bundled:echo"
args = ["hello"]

[[builder]]
name = "slow"
plugin = "bundled:progress-demo"
kwargs = { steps = 6, step_ms = 50 }

[[builder]]
name = "bad"
plugin = "bundled:fail"
kwargs = { message = "broken on purpose" }
"#,
    )?;
    let _served = Served::start(dir.path(), &pipeline)?;
    let db = dir.path().join("kiln.db");
    let good = kiln(&db, &["submit", "-b", "good", "--wait"])?;
    ensure!(
        good.code == 0 && good.stdout.contains("complete: SUCCESS"),
        "{} {}",
        good.stdout,
        good.stderr
    );
    let bad = kiln(&db, &["submit", "-b", "bad", "--wait", "--json"])?;
    ensure!(bad.code == 1, "exit {}: {}", bad.code, bad.stderr);
    ensure!(
        bad.json()?["buildsets"][0]["results"] == 2,
        "{}",
        bad.stdout
    );

    // Followed from the start of a running build to its end.
    kiln(&db, &["submit", "-b", "slow"])?.ok()?;
    let followed = kiln(&db, &["logs", "slow", "--follow"])?.ok()?;
    let all = kiln(&db, &["logs", "slow", "--json"])?.ok()?.json()?;
    let records = all["logs"].as_array().map(Vec::len).unwrap_or_default();
    ensure!(
        records > 0 && followed.stdout.lines().count() == records,
        "followed {} lines of {records}: {}",
        followed.stdout.lines().count(),
        followed.stdout
    );
    kiln(&db, &["logs", "nobody"])?.fails_with("neither an id")?;

    let bash = kiln(&db, &["completions", "bash"])?.ok()?;
    ensure!(bash.stdout.contains("_kiln()"), "{}", bash.stdout);
    let man = dir.path().join("man");
    kiln(&db, &["man", "--dir", &man.display().to_string()])?.ok()?;
    for page in ["kiln.1", "kiln-submit.1", "kiln-logs.1"] {
        ensure!(man.join(page).is_file(), "no {page}");
    }
    Ok(())
}

/// SIGHUP reloads the pipeline file of a running `kiln serve`: a builder and a lock
/// added to the file appear, the server keeps serving, and a file that no longer loads
/// changes nothing. The test waits on the server's own log lines.
#[cfg(unix)]
#[test]
fn sighup_reloads_the_pipeline_file_and_a_broken_file_changes_nothing() -> Result<()> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("p.toml");
    let first = "[[builder]]\nname = \"noop\"\nplugin = \"bundled:noop\"\n";
    std::fs::write(&pipeline, first)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir.path())
        .args(["serve", "p.toml", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "kiln=info")
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let guard = KillOnDrop(child.id());
    // Its first line says it listens, once its builders are registered.
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut started = String::new();
    std::io::BufReader::new(stdout).read_line(&mut started)?;
    ensure!(started.starts_with("kiln serve:"), "{started:?}");
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut wait_for = |needle: &str| -> Result<String> {
        for line in lines.by_ref() {
            let line = line?;
            if line.contains(needle) {
                return Ok(line);
            }
        }
        anyhow::bail!("kiln serve ended before logging {needle:?}")
    };
    let hangup = || -> Result<()> {
        let sent = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()?;
        ensure!(sent.success(), "kill -HUP failed");
        Ok(())
    };
    let db = dir.path().join("kiln.db");
    std::fs::write(
        &pipeline,
        format!(
            "{first}\n[[lock]]\nname = \"deploy\"\n\n[[builder]]\nname = \"added\"\nplugin = \"bundled:echo\"\nlocks = [\"deploy\"]\n"
        ),
    )?;
    hangup()?;
    let reloaded = wait_for("SIGHUP: reloaded")?;
    ensure!(reloaded.contains("1 new builder(s) (added)"), "{reloaded}");
    let builders = kiln(&db, &["list", "builders", "--json"])?.ok()?.json()?;
    let added = builders["builders"]
        .as_array()
        .and_then(|b| b.iter().find(|x| x["name"] == "added").cloned())
        .ok_or_else(|| anyhow::anyhow!("{builders}"))?;
    ensure!(added["served"] == true, "{added}");
    let locks = kiln(&db, &["list", "locks", "--json"])?.ok()?.json()?;
    ensure!(locks["locks"][0]["name"] == "deploy", "{locks}");
    let ran = kiln(&db, &["submit", "-b", "added", "--wait"])?;
    ensure!(ran.code == 0, "{} {}", ran.stdout, ran.stderr);

    std::fs::write(&pipeline, "[[builder]]\nname = \n")?;
    hangup()?;
    let refused = wait_for("SIGHUP: the file does not load")?;
    ensure!(refused.contains("nothing changed"), "{refused}");
    ensure!(
        child.try_wait()?.is_none(),
        "kiln serve died on a bad reload"
    );
    ensure!(kiln(&db, &["submit", "-b", "noop", "--wait"])?.code == 0);
    drop(guard);
    let _ = child.wait();
    Ok(())
}

/// Kills a process when dropped (a failed assertion must not leave a server behind).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}

/// The first use of a plugin says that it is compiling (a big one takes many seconds);
/// a later run loads it from the cache and says nothing.
#[test]
fn a_first_compile_says_so_and_a_cached_run_does_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("p.toml"),
        "[[builder]]\nname = \"fib\"\nplugin = \"bundled:fib\"\nargs = [5]\n\n[[submit]]\nbuilders = [\"fib\"]\n",
    )?;
    // As a user runs it: no RUST_LOG, the binary's default filter.
    let run = || -> Result<Run> {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(dir.path())
            .args(["run", "p.toml"])
            .env_remove("KILN_DATABASE")
            .env_remove("RUST_LOG")
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()?;
        Ok(from_output(out))
    };
    let first = run()?.ok()?;
    ensure!(
        first.stderr.contains("compiling plugin bundled:fib")
            && first.stderr.contains("later runs load it from the cache")
            && first.stderr.contains("compiled plugin bundled:fib in"),
        "{}",
        first.stderr
    );
    let again = run()?.ok()?;
    ensure!(!again.stderr.contains("compiling"), "{}", again.stderr);
    Ok(())
}

/// One vocabulary: what `--json` prints of builds, buildsets, requests and builders is,
/// entity for entity, what the API answers (Buildbot's ids, results as numbers, epoch
/// seconds).
#[test]
fn the_cli_json_and_the_api_say_the_same_of_every_entity() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("served.toml");
    std::fs::write(
        &pipeline,
        "[[builder]]\nname = \"good\"\nplugin = \"bundled:echo\"\nargs = [1]\n\n[[builder]]\nname = \"bad\"\nplugin = \"bundled:fail\"\n",
    )?;
    let served = Served::start(dir.path(), &pipeline)?;
    let db = dir.path().join("kiln.db");
    kiln(&db, &["submit", "-b", "good", "-b", "bad", "--wait"])?;
    for (cli, api, plural, id) in [
        (
            vec!["list", "builds", "--json"],
            "/api/v2/builds",
            "builds",
            "buildid",
        ),
        (
            vec!["list", "buildsets", "--json"],
            "/api/v2/buildsets",
            "buildsets",
            "bsid",
        ),
        (
            vec!["list", "requests", "--json"],
            "/api/v2/buildrequests",
            "buildrequests",
            "buildrequestid",
        ),
        (
            vec!["list", "builders", "--json"],
            "/api/v2/builders",
            "builders",
            "builderid",
        ),
    ] {
        let from_cli = kiln(&db, &cli)?.ok()?.json()?;
        let (status, body) = http_get(&served.address, api)?;
        ensure!(status.contains("200"), "{api}: {status}");
        let from_api: Value = serde_json::from_str(&body)?;
        let by_id = |v: &Value| -> std::collections::BTreeMap<i64, Value> {
            v[plural]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let mut e = e.clone();
                    // The API adds where a buildset is; the listing is the same otherwise.
                    if let Some(o) = e.as_object_mut() {
                        o.remove("state");
                    }
                    Some((e[id].as_i64()?, e))
                })
                .collect()
        };
        let (a, b) = (by_id(&from_cli), by_id(&from_api));
        ensure!(!a.is_empty(), "{plural}: {from_cli}");
        ensure!(
            a == b,
            "{plural}: the CLI says {from_cli}\nthe API says {from_api}"
        );
    }
    Ok(())
}

/// Listings are newest first; `--results` keeps any of the given results and `--order`
/// orders by any field, with clear errors for anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_newest_first_and_filter_by_results_and_order_by_any_field() -> Result<()> {
    let (_dir, db) = filled().await?;
    let ids = |v: &Value, plural: &str, key: &str| -> Vec<i64> {
        v[plural]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[key].as_i64())
            .collect()
    };
    for (what, plural, key) in [
        ("builds", "builds", "buildid"),
        ("buildsets", "buildsets", "bsid"),
        ("requests", "buildrequests", "buildrequestid"),
    ] {
        let listed = kiln(&db, &["list", what, "--json"])?.ok()?.json()?;
        let got = ids(&listed, plural, key);
        ensure!(
            !got.is_empty() && got.windows(2).all(|w| w[0] > w[1]),
            "{what} not newest first: {got:?}"
        );
    }
    let failed = kiln(
        &db,
        &[
            "list",
            "builds",
            "--results",
            "failure",
            "--results",
            "4",
            "--json",
        ],
    )?
    .ok()?
    .json()?;
    let results: Vec<i64> = failed["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["results"].as_i64())
        .collect();
    ensure!(
        !results.is_empty() && results.iter().all(|r| *r == 2 || *r == 4),
        "{failed}"
    );
    let oldest = kiln(
        &db,
        &[
            "list",
            "builds",
            "--order",
            "started_at",
            "--order",
            "id",
            "--json",
        ],
    )?
    .ok()?
    .json()?;
    let got = ids(&oldest, "builds", "buildid");
    ensure!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    kiln(&db, &["list", "builds", "--order", "nope"])?.fails_with("cannot order by \"nope\"")?;
    kiln(&db, &["list", "buildsets", "--results", "great"])?.fails_with("--results \"great\"")?;
    Ok(())
}
