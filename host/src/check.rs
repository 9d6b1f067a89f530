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

/// Kiln's plugin worlds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum World {
    /// A job function.
    Job,
    /// A relationship policy.
    Policy,
    /// A result reporter.
    Reporter,
}

impl World {
    /// Every world, in the order `kiln plugin check` tries them.
    pub const ALL: [World; 3] = [World::Job, World::Policy, World::Reporter];

    /// The world's name in the WIT package.
    pub fn name(self) -> &'static str {
        match self {
            World::Job => "job",
            World::Policy => "policy",
            World::Reporter => "reporter",
        }
    }

    /// The function the world's components export, with its signature.
    fn export(self) -> (&'static str, &'static str) {
        match self {
            World::Job => (
                "run",
                "run: func(ctx: build-context) -> result<outcome, job-error>",
            ),
            World::Policy => (
                "decide",
                "decide: func(parent: parent-build, children: list<child>) -> decision",
            ),
            World::Reporter => (
                "report",
                "report: func(config: json, event: event) -> result<_, string>",
            ),
        }
    }
}

/// Problems that stop a component from belonging to `world`, by name and kind of its
/// imports and exports. An empty list means the names fit; the types are checked when
/// the component is pre-instantiated.
pub(crate) fn world_problems(
    world: World,
    engine: &wasmtime::Engine,
    component: &Component,
) -> Vec<String> {
    let ty = component.component_type();
    let mut problems = Vec::new();
    let exports: Vec<(String, ComponentItem)> = ty
        .exports(engine)
        .map(|(n, e)| (n.to_owned(), e.ty))
        .collect();
    let (export, signature) = world.export();
    match exports.iter().find(|(name, _)| name == export) {
        Some((_, ComponentItem::ComponentFunc(_))) => {}
        Some((_, other)) => problems.push(format!(
            "its `{export}` export is {}, not a function",
            item_kind(other)
        )),
        None => {
            let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
            problems.push(format!(
                "it does not export `{signature}` (it exports: {})",
                if names.is_empty() {
                    "nothing".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        }
    }
    for (name, _) in ty.imports(engine) {
        if name.starts_with("wasi:") || name == TYPES_INTERFACE {
            continue;
        }
        if name == HOST_INTERFACE {
            if world != World::Job {
                problems.push(format!(
                    "it imports {name}, which only jobs may use (a {} gets no host interface)",
                    world.name()
                ));
            }
            continue;
        }
        if name.starts_with("kiln:plugin/") {
            problems.push(format!(
                "it imports {name}, but this host speaks {PACKAGE}@{VERSION}"
            ));
        } else {
            problems.push(format!(
                "it imports {name}, which the {} world does not offer",
                world.name()
            ));
        }
    }
    problems
}

/// The world whose export a component has, if any: the one to report problems against.
pub(crate) fn likely_world(engine: &wasmtime::Engine, component: &Component) -> Option<World> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_owned()).collect();
    World::ALL
        .into_iter()
        .find(|w| exports.iter().any(|e| e == w.export().0))
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

/// Which toolchain produced a component, when its bytes tell: the `producers` custom
/// sections its modules carry (language, and tools with versions), and the marks each
/// language runtime leaves (componentize-py's runtime module, QuickJS, StarlingMonkey).
pub fn toolchain(wasm: &[u8]) -> Option<String> {
    let contains = |needle: &[u8]| wasm.windows(needle.len()).any(|w| w == needle);
    let mut languages: Vec<String> = Vec::new();
    let mut tools: Vec<(String, String)> = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let Ok(wasmparser::Payload::CustomSection(section)) = payload else {
            continue;
        };
        let wasmparser::KnownCustom::Producers(reader) = section.as_known() else {
            continue;
        };
        for field in reader.into_iter().flatten() {
            for value in field.values.into_iter().flatten() {
                match field.name {
                    "language" => languages.push(value.name.to_owned()),
                    "processed-by" | "sdk" => {
                        tools.push((value.name.to_owned(), value.version.to_owned()))
                    }
                    _ => {}
                }
            }
        }
    }
    let tool = |name: &str| {
        tools
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.split_whitespace().next().unwrap_or(v).to_owned())
    };
    if contains(b"componentize_py_runtime") {
        return Some("Python (componentize-py)".into());
    }
    if contains(b"rquickjs") {
        return Some("JavaScript (QuickJS, e.g. componentize-qjs)".into());
    }
    if contains(b"StarlingMonkey") {
        return Some("JavaScript (StarlingMonkey, componentize-js)".into());
    }
    if let Some(v) = tool("wit-bindgen-rust") {
        let rustc = tool("rustc")
            .map(|r| format!(", rustc {r}"))
            .unwrap_or_default();
        return Some(format!("Rust (wit-bindgen-rust {v}{rustc})"));
    }
    let written_in_c = languages
        .iter()
        .any(|l| l.starts_with('C') && !l.starts_with("C++"));
    if written_in_c && let Some(v) = tool("wit-bindgen-c") {
        let clang = tools
            .iter()
            .find(|(n, _)| n.contains("clang"))
            .map(|(n, v)| format!(", {n} {v}"))
            .unwrap_or_default();
        return Some(format!("C (wit-bindgen-c {v}{clang})"));
    }
    languages
        .first()
        .map(|l| format!("{l} (from its producers section)"))
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
    /// The toolchain that produced it, when the bytes tell ([`toolchain`]).
    pub toolchain: Option<String>,
}
