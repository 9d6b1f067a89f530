//! Checking components against Kiln's worlds before anything runs them.

use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

/// The WIT package this host speaks.
pub const PACKAGE: &str = "kiln:plugin";
/// Its version.
pub const VERSION: &str = "0.1.0";

/// The host interface a job imports.
pub(crate) const HOST_INTERFACE: &str = "kiln:plugin/host@0.1.0";
/// The shared types interface a job may import.
pub(crate) const TYPES_INTERFACE: &str = "kiln:plugin/types@0.1.0";

/// What a file looks like from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WasmKind {
    /// A WebAssembly component.
    Component,
    /// A core WebAssembly module (not a component).
    CoreModule,
    /// Not WebAssembly at all.
    NotWasm,
}

/// Tells a component from a core module from anything else by the 8-byte header.
pub fn kind(bytes: &[u8]) -> WasmKind {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => WasmKind::CoreModule,
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => WasmKind::Component,
        _ => WasmKind::NotWasm,
    }
}

/// Problems that stop a component from being a job, by name and kind of its imports
/// and exports. An empty list means the names fit; the types are checked when the
/// component is pre-instantiated.
pub(crate) fn job_world_problems(engine: &wasmtime::Engine, component: &Component) -> Vec<String> {
    let ty = component.component_type();
    let mut problems = Vec::new();
    let exports: Vec<(String, ComponentItem)> = ty
        .exports(engine)
        .map(|(n, e)| (n.to_owned(), e.ty))
        .collect();
    match exports.iter().find(|(name, _)| name == "run") {
        Some((_, ComponentItem::ComponentFunc(_))) => {}
        Some((_, other)) => problems.push(format!(
            "its `run` export is {}, not a function",
            item_kind(other)
        )),
        None => {
            let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
            problems.push(format!(
                "it does not export `run: func(ctx: build-context) -> result<outcome, job-error>` (it exports: {})",
                if names.is_empty() { "nothing".to_owned() } else { names.join(", ") }
            ));
        }
    }
    for (name, _) in ty.imports(engine) {
        if name.starts_with("wasi:") || name == HOST_INTERFACE || name == TYPES_INTERFACE {
            continue;
        }
        if name.starts_with("kiln:plugin/") {
            problems.push(format!(
                "it imports {name}, but this host speaks {PACKAGE}@{VERSION}"
            ));
        } else {
            problems.push(format!(
                "it imports {name}, which the job world does not offer"
            ));
        }
    }
    problems
}

fn item_kind(item: &ComponentItem) -> &'static str {
    match item {
        ComponentItem::ComponentFunc(_) => "a function",
        ComponentItem::CoreFunc(_) => "a core function",
        ComponentItem::Module(_) => "a core module",
        ComponentItem::Component(_) => "a component",
        ComponentItem::ComponentInstance(_) => "an instance",
        ComponentItem::Type(_) => "a type",
        ComponentItem::Resource(_) => "a resource",
    }
}

/// What `kiln plugin check` says about a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldReport {
    /// The world the component satisfies, if any ("job").
    pub world: Option<&'static str>,
    /// The kiln:plugin versions it was built against, from its import names.
    pub package_versions: Vec<String>,
    /// Its imports.
    pub imports: Vec<String>,
    /// Its exports.
    pub exports: Vec<String>,
    /// Why it satisfies no world (empty when it satisfies one).
    pub problems: Vec<String>,
}
