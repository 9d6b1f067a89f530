//! `kiln plugin check`: which world a component satisfies, or why none.

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use serde_json::json;

/// `kiln plugin check`: which world a component satisfies, or why none.
pub(super) fn check(file: &str, json_out: bool) -> Result<ExitCode> {
    let bytes = match file.strip_prefix("bundled:") {
        Some(name) => kiln_bundled::get(name)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| anyhow!("there is no bundled plugin {name:?}"))?,
        None => std::fs::read(file).with_context(|| format!("cannot read {file}"))?,
    };
    let host = kiln_engine::wasm::WasmHost::new(kiln_engine::wasm::WasmHostConfig::default());
    let report = host.check(&bytes)?;
    if json_out {
        let value = json!({
            "file": file,
            "world": report.world,
            "package": "kiln:plugin",
            "package_versions": report.package_versions,
            "imports": report.imports,
            "exports": report.exports,
            "problems": report.problems,
            "toolchain": report.toolchain,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match report.world {
            Some(world) => {
                let versions = if report.package_versions.is_empty() {
                    "?".to_owned()
                } else {
                    report.package_versions.join(", ")
                };
                println!("{file}: a `{world}` component, built against kiln:plugin@{versions}");
            }
            None => println!("{file}: not a Kiln plugin"),
        }
        if let Some(toolchain) = &report.toolchain {
            println!("built with: {toolchain}");
        }
        for problem in &report.problems {
            println!("  - {problem}");
        }
        if !report.imports.is_empty() {
            println!("imports: {}", report.imports.join(", "));
        }
        if !report.exports.is_empty() {
            println!("exports: {}", report.exports.join(", "));
        }
    }
    Ok(if report.world.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
