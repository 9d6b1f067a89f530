//! Builds the guest plugins in `plugins/` from source for wasm32-wasip2 and embeds them.
//!
//! The plugins have their own cargo workspace and their own target directory
//! (`<target>/plugins`), so this nested cargo never waits on the outer build's lock.
//! This machine's rustup does not auto-install targets, so the wasm32-wasip2 target is
//! added here when it is missing.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every bundled plugin: (name in configs, cargo package directory under plugins/).
const PLUGINS: &[(&str, &str)] = &[
    ("echo", "echo"),
    ("fan-out", "fan-out"),
    ("noop", "noop"),
    ("sleep", "sleep"),
    ("fail", "fail"),
    ("fib", "fib"),
    ("progress-demo", "progress-demo"),
    ("write-artifacts", "write-artifacts"),
    ("sandbox-probe", "sandbox-probe"),
    ("text-writer", "text-writer"),
    ("fetch", "fetch"),
    ("loop-forever", "hostile/loop-forever"),
    ("memory-bomb", "hostile/memory-bomb"),
    ("recursion", "hostile/recursion"),
    ("log-flood", "hostile/log-flood"),
    ("output-flood", "hostile/output-flood"),
    ("huge-return", "hostile/huge-return"),
    ("trap", "hostile/trap"),
    ("not-a-job", "hostile/not-a-job"),
    ("symlink-escape", "hostile/symlink-escape"),
    ("worst-of", "policies/worst-of"),
    ("fail-fast", "policies/fail-fast"),
    ("best-effort", "policies/best-effort"),
    ("any-success", "policies/any-success"),
    ("webhook", "reporters/webhook"),
    ("jsonl", "reporters/jsonl"),
];

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let plugins = manifest
        .parent()
        .expect("plugins/bundle has a parent")
        .to_path_buf();
    let root = plugins
        .parent()
        .expect("plugins/ has a parent")
        .to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"));
    let plugin_target = target_dir.join("plugins");

    for path in ["Cargo.toml", "Cargo.lock", "guest", "policy-logic"]
        .iter()
        .map(|p| plugins.join(p))
    {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for (_, dir) in PLUGINS {
        println!("cargo:rerun-if-changed={}", plugins.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("rust-toolchain.toml").display()
    );

    ensure_target();

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--workspace",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&plugin_target);
    // The outer build's settings are for the host; the guests get a clean environment.
    for (key, _) in env::vars() {
        let host_only =
            key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_NET_OFFLINE"
                || matches!(
                    key.as_str(),
                    "RUSTFLAGS" | "RUSTC" | "RUSTDOC" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER"
                )
                || matches!(
                    key.as_str(),
                    "MAKEFLAGS"
                        | "MFLAGS"
                        | "TARGET"
                        | "HOST"
                        | "OUT_DIR"
                        | "PROFILE"
                        | "OPT_LEVEL"
                        | "DEBUG"
                        | "NUM_JOBS"
                );
        if host_only {
            build.env_remove(&key);
        }
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo to build the guest plugins: {e}"));
    if !status.success() {
        panic!(
            "building the guest plugins in {} failed ({status}); see the output above",
            plugins.display()
        );
    }

    let mut code = String::from(
        "/// Every bundled plugin as (name, component bytes).\npub static BUNDLED: &[(&str, &[u8])] = &[\n",
    );
    for (name, dir) in PLUGINS {
        let file = dir.rsplit('/').next().unwrap_or(dir).replace('-', "_");
        let wasm = plugin_target
            .join(TARGET)
            .join("release")
            .join(format!("{file}.wasm"));
        if !wasm.exists() {
            panic!("the plugin build did not produce {}", wasm.display());
        }
        writeln!(
            code,
            "    ({name:?}, include_bytes!({:?})),",
            wasm.display().to_string()
        )
        .ok();
    }
    code.push_str("];\n");
    std::fs::write(out.join("bundled.rs"), code)
        .unwrap_or_else(|e| panic!("cannot write bundled.rs: {e}"));
}

/// Adds the wasm32-wasip2 target to the active toolchain if it is not there.
fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok();
    let installed = sysroot
        .filter(|o| o.status.success())
        .map(|o| {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                .join("lib/rustlib")
                .join(TARGET)
                .exists()
        })
        .unwrap_or(false);
    if installed {
        return;
    }
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        add.args(["--toolchain", &toolchain]);
    }
    match add.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`rustup target add {TARGET}` failed ({s}); install the target by hand and build again"
        ),
        Err(e) => panic!(
            "the {TARGET} target is missing and rustup could not be run ({e}); install the target by hand"
        ),
    }
}
