//! The engine's cargo features: an embedder with Rust jobs on SQLite compiles neither
//! wasmtime nor the PostgreSQL driver, and every combination of `wasm` and `postgres`
//! builds. (The default, both on, is what every other test builds.)
//!
//! Each combination is checked by cargo itself, in a target directory of its own
//! (`target/features`): the build directory of the `cargo test` running this is locked
//! while it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `cargo <args>` for the engine with only `features`, in the features' target directory.
fn cargo(args: &[&str], features: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace())
        .args(args)
        .args(["-p", "kiln-engine", "--no-default-features"])
        .env("CARGO_TARGET_DIR", workspace().join("target/features"));
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    command
}

/// The crates the engine depends on with only `features`.
fn dependencies(features: &[&str]) -> Result<String> {
    let out = cargo(&["tree", "-e", "normal", "--prefix", "none"], features)
        .output()
        .context("running cargo tree")?;
    ensure!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn without_features_the_engine_depends_on_neither_wasmtime_nor_the_postgres_driver() -> Result<()> {
    let bare = dependencies(&[])?;
    for absent in ["wasmtime", "cranelift", "kiln-host", "sqlx-postgres"] {
        ensure!(
            !bare.lines().any(|l| l.starts_with(absent)),
            "{absent} is a dependency without features"
        );
    }
    ensure!(bare.lines().any(|l| l.starts_with("sqlx-sqlite")));
    let full = dependencies(&["wasm", "postgres"])?;
    for present in ["wasmtime", "kiln-host", "sqlx-postgres"] {
        ensure!(
            full.lines().any(|l| l.starts_with(present)),
            "{present} is missing with both features"
        );
    }
    Ok(())
}

#[test]
fn the_engine_builds_with_every_combination_of_its_features() -> Result<()> {
    for features in [&[][..], &["postgres"], &["wasm"]] {
        let status = cargo(&["check", "--quiet", "--lib"], features)
            .status()
            .context("running cargo check")?;
        ensure!(
            status.success(),
            "kiln-engine does not build with features {features:?}"
        );
    }
    Ok(())
}
