//! The two steps of building a C component that would otherwise need wit-bindgen-cli
//! and wasm-tools installed (compiling both from source took half an hour of a fresh
//! CI machine): C bindings for a world, and a core module made into a component.
//!
//! ```text
//! kiln-c-tools bindgen WIT_DIR WORLD OUT_DIR     # like `wit-bindgen c WIT_DIR --world WORLD --out-dir OUT_DIR`
//! kiln-c-tools component CORE.wasm OUT.wasm      # like `wasm-tools component new CORE.wasm --adapt <WASI reactor>`
//! ```
//!
//! The WASI adapter is the reactor adapter of wasmtime 48.0.8, the version Kiln embeds,
//! from the crates.io package that ships it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};
use wit_bindgen_core::wit_parser::Resolve;
use wit_bindgen_core::{Files, WorldGenerator};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["bindgen", wit, world, out] => bindgen(Path::new(wit), world, Path::new(out)),
        ["component", core, out] => component(Path::new(core), Path::new(out)),
        _ => bail!(
            "usage: kiln-c-tools bindgen WIT_DIR WORLD OUT_DIR | kiln-c-tools component CORE.wasm OUT.wasm"
        ),
    }
}

/// Writes the C bindings of `world` (a header, a source file and the component type
/// object) into `out`.
fn bindgen(wit: &Path, world: &str, out: &Path) -> Result<()> {
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_dir(wit)
        .with_context(|| format!("reading {}", wit.display()))?;
    let world = resolve.select_world(&[package], Some(world))?;
    let mut generator: Box<dyn WorldGenerator> = wit_bindgen_c::Opts::default().build();
    let mut files = Files::default();
    generator.generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, contents) in files.iter() {
        let path = out.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Makes a component of a core module built against the bindings, adapting its WASI
/// preview 1 imports to preview 2.
fn component(core: &Path, out: &Path) -> Result<()> {
    let module = std::fs::read(core).with_context(|| format!("reading {}", core.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&module)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .encode()
        .with_context(|| format!("making a component of {}", core.display()))?;
    std::fs::write(out, component).with_context(|| format!("writing {}", out.display()))
}
