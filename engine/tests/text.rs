//! Odd bytes in every text field a guest or a client can set, on every backend: NUL,
//! control characters, huge strings, characters outside the BMP. Nothing a guest writes
//! may fail a database write or hold back another build; what a backend cannot store
//! faithfully is stored visibly escaped, the same on every backend; what a client sends
//! that cannot be stored is refused with a message naming the field.

use std::sync::Arc;

use anyhow::{Result, anyhow, ensure};
use kiln_engine::model::{Build, LogQuery, Property, ResultCode, SourceStamp};
use kiln_engine::storage::NUL_STAND_IN;
use kiln_engine::wasm::{Grants, Limits, WasmHost, WasmHostConfig};
use kiln_engine::{
    BuilderConfig, Engine, EngineConfig, EngineError, FnExecutor, JobError, Outcome, Submission,
};
use kiln_storage::BuildFilter;
use serde_json::json;

mod support;
use support::{Backend, backends, guard};

/// The texts every field is tried with, by name.
fn odd_texts() -> Vec<(&'static str, String)> {
    vec![
        ("nul", "before\0after\0".to_owned()),
        ("only nul", "\0".to_owned()),
        (
            "control characters",
            "bell\x07 tab\t cr\r lf\n esc\x1b[31m del\x7f c1\u{85}".to_owned(),
        ),
        ("outside the BMP", "😀 𝄞 \u{10FFFF}".to_owned()),
        (
            "quotes and backslashes",
            "'\"\\ \\u0000 %00 ' OR 1=1 --".to_owned(),
        ),
        // As long as a status line may be; longer ones have a test of their own.
        ("4 KiB", "x".repeat(4 << 10)),
    ]
}

/// What a backend keeps of a guest's text: NUL visibly replaced, the rest exact.
fn stored(text: &str) -> String {
    text.replace('\0', &NUL_STAND_IN.to_string())
}

/// A Rust job doing what the text-writer guest does, through the same context calls.
fn rust_writer() -> FnExecutor {
    FnExecutor::new(|ctx| async move {
        let text = ctx.kwargs()["text"].as_str().unwrap_or_default().to_owned();
        for level in [
            kiln_engine::model::LogLevel::Debug,
            kiln_engine::model::LogLevel::Info,
            kiln_engine::model::LogLevel::Warning,
            kiln_engine::model::LogLevel::Error,
        ] {
            ctx.log(level, text.clone()).await?;
        }
        let group = format!("group {text}");
        ctx.progress(&[group.as_str()], 1, 2, text.clone()).await?;
        ctx.set_state(&text).await?;
        ctx.set_property(&format!("p{text}"), json!(text), &text)
            .await?;
        if ctx.kwargs()["fail"].as_bool().unwrap_or(false) {
            return Err(JobError {
                message: text.clone(),
                details: Some(text),
            });
        }
        Ok(Outcome::success(json!({ "text": text })))
    })
}

async fn engine_with_writers(backend: &Backend, host: &WasmHost) -> Result<Engine> {
    let engine = Engine::open(EngineConfig::new(&backend.url).master_name("text")).await?;
    let wasm = kiln_bundled::get("text-writer").ok_or_else(|| anyhow!("no text-writer"))?;
    for (i, (_, text)) in odd_texts().into_iter().enumerate() {
        for fail in [false, true] {
            let kwargs = json!({ "text": text, "fail": fail });
            engine
                .register_builder(
                    BuilderConfig::new(format!("rust-{i}-{fail}")).kwargs(kwargs.clone()),
                    rust_writer(),
                )
                .await?;
            let executor = host
                .job_executor("text-writer", wasm, Limits::default(), Grants::default())
                .await?;
            engine
                .register_builder(
                    BuilderConfig::new(format!("wasm-{i}-{fail}")).kwargs(kwargs),
                    executor,
                )
                .await?;
        }
    }
    Ok(engine)
}

async fn check_build(engine: &Engine, build: &Build, text: &str, fail: bool) -> Result<()> {
    let want = stored(text);
    let client = engine.client();
    ensure!(build.complete_at.is_some(), "still running: {build:?}");
    if fail {
        ensure!(
            build.results == Some(ResultCode::Failure),
            "{:?}: {:?}",
            build.results,
            build.error
        );
        ensure!(build.error.as_deref() == Some(want.as_str()), "error");
        ensure!(
            build.traceback.as_deref() == Some(want.as_str()),
            "traceback"
        );
        let first_line = want.lines().next().unwrap_or("");
        let state = if first_line.is_empty() {
            "failed".to_owned()
        } else {
            format!("failed: {first_line}")
        };
        ensure!(
            build.state_string == state,
            "state {:?}",
            build.state_string
        );
    } else {
        ensure!(
            build.results == Some(ResultCode::Success),
            "{:?}: {:?}",
            build.results,
            build.error
        );
        // JSON keeps every character, NUL included.
        ensure!(
            build.return_value == Some(json!({ "text": text })),
            "return value"
        );
    }
    let logs = client
        .logs(&LogQuery {
            build_id: Some(build.id),
            ..LogQuery::default()
        })
        .await?;
    let messages: Vec<&str> = logs.iter().map(|l| l.record.message.as_str()).collect();
    ensure!(
        messages.len() >= 4 && messages[..4].iter().all(|m| *m == want),
        "log messages: {} records",
        messages.len()
    );
    let properties = client.build_properties(build.id).await?;
    let property = properties
        .get(&stored(&format!("p{text}")))
        .ok_or_else(|| anyhow!("no property named after the text"))?;
    ensure!(
        *property == Property::new(json!(text), want.clone()),
        "property"
    );
    let progress = client.progress(build.id).await?;
    let group = &progress.children[0];
    ensure!(
        group.name == format!("group {text}") && group.status.as_deref() == Some(want.as_str()),
        "progress group {:?}",
        group.name
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_text_from_guests_and_rust_jobs_is_stored_and_fails_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = WasmHost::new(WasmHostConfig {
        cache_dir: Some(dir.path().join("cache")),
        max_instances: 64,
    });
    for backend in backends("text").await? {
        let engine = engine_with_writers(&backend, &host).await?;
        // Every builder in one buildset: the odd builds finish in the same batches as
        // the ordinary ones.
        let mut all = Submission::new("odd text");
        for (i, _) in odd_texts().iter().enumerate() {
            for fail in [false, true] {
                all.builders.push(format!("rust-{i}-{fail}"));
                all.builders.push(format!("wasm-{i}-{fail}"));
            }
        }
        let submitted = engine.submit(&all).await?;
        guard(
            "every odd-text build",
            engine.wait_buildset(submitted.buildset_id),
        )
        .await??;
        let builds = engine
            .client()
            .builds(&BuildFilter {
                buildset_id: Some(submitted.buildset_id),
                ..BuildFilter::default()
            })
            .await?;
        let names = engine.client().builders().await?;
        ensure!(builds.len() == all.builders.len());
        for build in &builds {
            let name = &names
                .iter()
                .find(|b| b.id == build.builder_id)
                .ok_or_else(|| anyhow!("builder"))?
                .name;
            let mut parts = name.splitn(3, '-');
            let kind = parts.next().unwrap_or_default();
            let i: usize = parts.next().unwrap_or_default().parse()?;
            let fail: bool = parts.next().unwrap_or_default().parse()?;
            let (what, text) = &odd_texts()[i];
            check_build(&engine, build, text, fail)
                .await
                .map_err(|e| anyhow!("{}: {kind} job, {what}, fail={fail}: {e}", backend.name))?;
        }
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_writing_a_mebibyte_status_line_ends_as_exception_and_others_go_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = Arc::new(WasmHost::new(WasmHostConfig {
        cache_dir: Some(dir.path().join("cache")),
        max_instances: 8,
    }));
    for backend in backends("mebibyte").await? {
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("mib")).await?;
        let wasm = kiln_bundled::get("text-writer").ok_or_else(|| anyhow!("no text-writer"))?;
        let huge = "\0x".repeat(512 << 10);
        for (name, text) in [("huge", huge.as_str()), ("small", "fine")] {
            let executor = host
                .job_executor("text-writer", wasm, Limits::default(), Grants::default())
                .await?;
            engine
                .register_builder(
                    BuilderConfig::new(name).kwargs(json!({ "text": text })),
                    executor,
                )
                .await?;
        }
        let submitted = engine
            .submit(&Submission::new("mib").builder("huge").builder("small"))
            .await?;
        guard("both builds", engine.wait_buildset(submitted.buildset_id)).await??;
        let builds = engine
            .client()
            .builds(&BuildFilter {
                buildset_id: Some(submitted.buildset_id),
                ..BuildFilter::default()
            })
            .await?;
        let by_results: Vec<Option<ResultCode>> = builds.iter().map(|b| b.results).collect();
        ensure!(
            by_results.contains(&Some(ResultCode::Exception))
                && by_results.contains(&Some(ResultCode::Success)),
            "{}: {by_results:?}",
            backend.name
        );
        let huge_build = builds
            .iter()
            .find(|b| b.results == Some(ResultCode::Exception))
            .ok_or_else(|| anyhow!("no exception"))?;
        let error = huge_build.error.as_deref().unwrap_or_default();
        ensure!(error.contains("status limit exceeded"), "{error}");
        engine.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_text_that_cannot_be_stored_is_refused_naming_the_field() -> Result<()> {
    for backend in backends("client_text").await? {
        let engine = Engine::open(EngineConfig::new(&backend.url).master_name("c")).await?;
        engine
            .register_builder(
                BuilderConfig::new("b"),
                FnExecutor::new(|_| async { Ok(Outcome::success(json!(null))) }),
            )
            .await?;
        let base = || Submission::new("fine").builder("b");
        let stamp = |f: &dyn Fn(&mut SourceStamp)| {
            let mut s = SourceStamp {
                repository: "r".into(),
                ..SourceStamp::default()
            };
            f(&mut s);
            base().sourcestamp(s)
        };
        let nul = "a\0b".to_owned();
        let huge = "y".repeat((64 << 10) + 1);
        let cases: Vec<(&str, Submission)> = vec![
            ("reason", Submission::new(nul.clone()).builder("b")),
            ("reason", Submission::new(huge.clone()).builder("b")),
            ("external_idstring", base().external_idstring(nul.clone())),
            ("builders", Submission::new("x").builder(nul.clone())),
            ("properties", base().property(nul.clone(), json!(1), "src")),
            (
                "properties.p.source",
                base().property("p", json!(1), nul.clone()),
            ),
            (
                "properties",
                base().property("p", json!("z".repeat(1 << 20)), "src"),
            ),
            (
                "sourcestamps.repository",
                stamp(&|s| s.repository = nul.clone()),
            ),
            (
                "sourcestamps.branch",
                stamp(&|s| s.branch = Some(huge.clone())),
            ),
            (
                "sourcestamps.revision",
                stamp(&|s| s.revision = Some(nul.clone())),
            ),
        ];
        for (field, submission) in cases {
            let err = engine
                .submit(&submission)
                .await
                .err()
                .ok_or_else(|| anyhow!("{}: {field} was accepted", backend.name))?;
            ensure!(
                matches!(err, EngineError::Invalid(ref m) if m.starts_with(&format!("invalid input: {field}")) || m.starts_with(field)),
                "{}: {field}: {err}",
                backend.name
            );
        }
        // What can be stored is stored exactly: control characters in text, NUL inside
        // a JSON value.
        let odd = "tab\t bell\x07 esc\x1b 😀".to_owned();
        let submitted = engine
            .submit(
                &Submission::new(odd.clone())
                    .builder("b")
                    .external_idstring(odd.clone())
                    .property("p", json!("nul \0 inside"), odd.clone()),
            )
            .await?;
        let buildset = engine.client().buildset(submitted.buildset_id).await?;
        ensure!(buildset.reason == odd && buildset.external_idstring == Some(odd.clone()));
        let props = engine
            .client()
            .buildset_properties(submitted.buildset_id)
            .await?;
        ensure!(props["p"] == Property::new(json!("nul \0 inside"), odd.clone()));
        engine.shutdown().await;
    }
    Ok(())
}
