//! The engine's cargo features: an embedder with Rust jobs on SQLite compiles neither
//! wasmtime nor the PostgreSQL driver, and every combination of `wasm` and `postgres`
//! builds. (The default, both on, is what every other test builds.)
//!
//! Each combination is checked by cargo itself, in a target directory of its own
//! (`target/features`): the build directory of the `cargo test` running this is locked
//! while it runs. `wasm` without `postgres` is compiled only when the engine gates more
//! than its re-export of the plugin host on `wasm`: otherwise it is the bare engine
//! (checked) plus the host (built by every other test, and blind to storage features),
//! and checking wasmtime once more in a second target directory cost over a minute of
//! every CI run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `cargo <args>` in the features' target directory.
fn cargo_in_features_dir(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace())
        .args(args)
        .env("CARGO_TARGET_DIR", workspace().join("target/features"));
    command
}

/// `cargo <args>` for the engine with only `features`, in the features' target directory.
fn cargo(args: &[&str], features: &[&str]) -> Command {
    let mut command = cargo_in_features_dir(args);
    command.args(["-p", "kiln-engine", "--no-default-features"]);
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    command
}

/// The crates a `cargo tree` command lists, one per line.
fn tree(mut command: Command) -> Result<String> {
    let out = command.output().context("running cargo tree")?;
    ensure!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const TREE: &[&str] = &["tree", "-e", "normal", "--prefix", "none"];

/// The crates the engine depends on with only `features`.
fn dependencies(features: &[&str]) -> Result<String> {
    tree(cargo(TREE, features))
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

/// The lines of the engine's sources that gate code on `wasm`, other than the
/// re-export of the plugin host (`pub use kiln_host as wasm;` right after its `cfg`).
fn wasm_gates_beyond_the_reexport() -> Result<Vec<String>> {
    let mut gates = Vec::new();
    let mut dirs = vec![workspace().join("engine/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir:?}"))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let reexport = lines
                    .get(i + 1)
                    .is_some_and(|next| next.trim() == "pub use kiln_host as wasm;");
                if line.replace(' ', "").contains("feature=\"wasm\"") && !reexport {
                    gates.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }
    Ok(gates)
}

#[test]
fn the_plugin_host_does_not_depend_on_storage_so_the_wasm_feature_is_independent_of_postgres()
-> Result<()> {
    let mut command = cargo_in_features_dir(TREE);
    command.args(["-p", "kiln-host"]);
    let host = tree(command)?;
    ensure!(
        !host.lines().any(|l| l.starts_with("kiln-storage")),
        "kiln-host depends on kiln-storage: check the engine with `wasm` alone again"
    );
    Ok(())
}

#[test]
fn the_engine_builds_with_every_combination_of_its_features() -> Result<()> {
    let mut combinations = vec![&[][..], &["postgres"]];
    let gates = wasm_gates_beyond_the_reexport()?;
    if gates.is_empty() {
        println!("`wasm` alone is the bare engine plus the host: not compiled again");
    } else {
        println!("the engine gates code on `wasm`: {gates:#?}");
        combinations.push(&["wasm"]);
    }
    for features in combinations {
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
