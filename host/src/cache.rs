//! A cache of compiled components on disk, so that a plugin compiles once per wasm file
//! and wasmtime build, not once per start.
//!
//! Entries are keyed by the SHA-256 of the wasm bytes and the engine's
//! `precompile_compatibility_hash`, written atomically (temporary file, then rename)
//! and only ever loaded from the cache directory this host writes.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use wasmtime::component::Component;

/// Where compiled components go when nothing else is configured:
/// `$XDG_CACHE_HOME/kiln/components`, else `~/.cache/kiln/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("kiln").join("components"))
}

/// The cache file for some wasm bytes on this engine.
fn entry(dir: &Path, engine: &wasmtime::Engine, wasm: &[u8]) -> PathBuf {
    let digest = Sha256::digest(wasm);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{hex}-{:016x}.cwasm", hasher.finish()))
}

/// How many components a host compiled, and how many it loaded from its cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Components compiled from wasm.
    pub compiled: u64,
    /// Components loaded already compiled from the cache directory.
    pub loaded: u64,
}

/// The counters behind [`CacheStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    compiled: AtomicU64,
    loaded: AtomicU64,
}

impl Counters {
    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            loaded: self.loaded.load(Ordering::Relaxed),
        }
    }
}

/// Compiles `wasm`, or loads its compiled form from `dir` if an earlier run stored it.
/// Cache failures only cost time: they are logged and compilation goes on.
pub(crate) fn compile(
    engine: &wasmtime::Engine,
    name: &str,
    wasm: &[u8],
    dir: Option<&Path>,
    counters: &Counters,
) -> wasmtime::Result<Component> {
    let Some(dir) = dir else {
        counters.compiled.fetch_add(1, Ordering::Relaxed);
        return compile_now(engine, name, wasm, false);
    };
    let path = entry(dir, engine, wasm);
    if path.exists() {
        // SAFETY: files in the cache directory are written only by `store` below, from
        // `Component::serialize` of this same wasmtime build (the compatibility hash is
        // part of the name), so they are valid serialized components for this engine.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                debug!(path = %path.display(), "loaded a compiled component from the cache");
                counters.loaded.fetch_add(1, Ordering::Relaxed);
                return Ok(component);
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring an unreadable cache entry")
            }
        }
    }
    let component = compile_now(engine, name, wasm, true)?;
    counters.compiled.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = store(&component, dir, &path) {
        warn!(dir = %dir.display(), error = %e, "could not cache a compiled component");
    }
    Ok(component)
}

/// Compiles, saying so: a big component (a Python or JavaScript runtime) takes many
/// seconds on a small machine, and a command waiting on it must not look hung. The
/// binary shows these lines by default.
fn compile_now(
    engine: &wasmtime::Engine,
    name: &str,
    wasm: &[u8],
    cached_after: bool,
) -> wasmtime::Result<Component> {
    let started = std::time::Instant::now();
    tracing::info!(
        "compiling plugin {name} ({} KiB){}",
        wasm.len() >> 10,
        if cached_after {
            "; later runs load it from the cache"
        } else {
            ""
        }
    );
    let component = Component::new(engine, wasm)?;
    tracing::info!(
        "compiled plugin {name} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(component)
}

fn store(component: &Component, dir: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
