//! The pipeline config of `kiln run`: builders backed by WASM plugins, and what to
//! submit. Reading it checks everything (fields, names, limits, grants, every plugin
//! against its world) and reports all problems together, before anything runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_engine::model::{Property, SourceStamp};
use kiln_engine::wasm::{DirGrant, Grants, Limits, WasmExecutor, WasmHost};
use kiln_engine::{BuilderConfig, Submission};
use serde::Deserialize;
use serde_json::Value;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Where the run keeps its state.
    #[serde(default)]
    pub run: RunSection,
    /// Limits for every builder that does not set its own.
    #[serde(default)]
    pub defaults: LimitsSection,
    /// The builders.
    #[serde(default, rename = "builder")]
    pub builders: Vec<BuilderSection>,
    /// What to submit.
    #[serde(default, rename = "submit")]
    pub submits: Vec<SubmitSection>,
}

/// `[run]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The database file (relative to the config file); default: the CLI's `--db`.
    pub database: Option<PathBuf>,
    /// Where builds get their result directories; default `kiln-results` next to the
    /// database.
    pub results_dir: Option<PathBuf>,
    /// Where compiled plugins are cached; default `~/.cache/kiln/components`.
    pub cache_dir: Option<PathBuf>,
}

/// Limits in friendly units; each one left out keeps the default.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Wall-clock deadline in seconds.
    pub deadline_s: Option<f64>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Wasm stack in KiB.
    pub stack_kib: Option<u64>,
    /// Captured stdout and stderr, each, in KiB.
    pub output_kib: Option<u64>,
    /// Log volume in KiB.
    pub log_kib: Option<u64>,
    /// Return value size in KiB.
    pub return_kib: Option<u64>,
    /// Calls into the Kiln host.
    pub host_calls: Option<u64>,
}

impl LimitsSection {
    /// These limits on top of `base`.
    fn apply(&self, base: Limits) -> Result<Limits, String> {
        let bytes =
            |v: Option<u64>, unit: u64, name: &str, default: usize| -> Result<usize, String> {
                match v {
                    None => Ok(default),
                    Some(v) => v
                        .checked_mul(unit)
                        .and_then(|b| usize::try_from(b).ok())
                        .ok_or_else(|| format!("{name} = {v} is too large")),
                }
            };
        let deadline = match self.deadline_s {
            None => base.deadline,
            Some(s) if s.is_finite() && s > 0.0 && s <= 7.0 * 86_400.0 => {
                Duration::from_secs_f64(s)
            }
            Some(s) => {
                return Err(format!(
                    "deadline_s = {s} must be more than 0 and at most a week"
                ));
            }
        };
        let limits = Limits {
            deadline,
            memory_bytes: bytes(self.memory_mib, 1 << 20, "memory_mib", base.memory_bytes)?,
            wasm_stack_bytes: bytes(self.stack_kib, 1 << 10, "stack_kib", base.wasm_stack_bytes)?,
            output_bytes: bytes(self.output_kib, 1 << 10, "output_kib", base.output_bytes)?,
            log_bytes: bytes(self.log_kib, 1 << 10, "log_kib", base.log_bytes)?,
            return_bytes: bytes(self.return_kib, 1 << 10, "return_kib", base.return_bytes)?,
            host_calls: self.host_calls.unwrap_or(base.host_calls),
        };
        limits.validate()?;
        Ok(limits)
    }
}

/// `[[builder]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderSection {
    /// Its unique name.
    pub name: String,
    /// `bundled:<name>` or a path to a `.wasm` component (relative to the config file).
    pub plugin: String,
    /// A human description.
    pub description: Option<String>,
    /// Positional arguments (any JSON-like TOML value).
    #[serde(default)]
    pub args: Option<toml::Value>,
    /// Keyword arguments (a table).
    #[serde(default)]
    pub kwargs: Option<toml::Value>,
    /// The most builds of it that run at once.
    pub max_concurrent: Option<u32>,
    /// Limits beyond `[defaults]`.
    #[serde(default)]
    pub limits: LimitsSection,
    /// What its jobs may see.
    #[serde(default)]
    pub grants: GrantsSection,
}

/// `[builder.grants]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsSection {
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Directories.
    #[serde(default)]
    pub dirs: Vec<DirSection>,
}

/// One granted directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSection {
    /// The directory on the host (relative to the config file).
    pub host: PathBuf,
    /// Where the job sees it.
    pub guest: String,
    /// Whether the job may write there.
    #[serde(default)]
    pub writable: bool,
}

/// `[[submit]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitSection {
    /// Why.
    pub reason: Option<String>,
    /// Builder names: one request each.
    pub builders: Vec<String>,
    /// Buildset properties.
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// How many identical buildsets to submit.
    pub count: Option<u32>,
    /// The sourcestamp's repository.
    pub repository: Option<String>,
    /// The sourcestamp's branch.
    pub branch: Option<String>,
    /// The sourcestamp's revision.
    pub revision: Option<String>,
    /// The sourcestamp's project.
    pub project: Option<String>,
    /// The sourcestamp's codebase.
    pub codebase: Option<String>,
}

/// The most buildsets one `[[submit]]` entry may ask for.
const MAX_COUNT: u32 = 1_000_000;

/// A checked pipeline, ready to register and submit.
pub struct Pipeline {
    /// Each builder with its executor, in file order.
    pub builders: Vec<(BuilderConfig, WasmExecutor)>,
    /// The buildsets to submit, in file order.
    pub submissions: Vec<Submission>,
}

/// Reads a pipeline file and checks everything it can without running anything.
pub fn read(path: &Path) -> Result<(PathBuf, PipelineFile)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: PipelineFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((base, file))
}

/// A config path, relative to the config file unless absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn json(value: &toml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Checks the file and loads every plugin, reporting all problems at once.
pub async fn load(base: PathBuf, file: PipelineFile, host: &WasmHost) -> Result<Pipeline> {
    let mut problems: Vec<String> = Vec::new();
    if file.builders.is_empty() {
        problems.push("the file declares no [[builder]]".into());
    }
    if file.submits.is_empty() {
        problems.push("the file declares nothing to [[submit]]".into());
    }
    let defaults = match file.defaults.apply(Limits::default()) {
        Ok(l) => l,
        Err(e) => {
            problems.push(format!("[defaults]: {e}"));
            Limits::default()
        }
    };
    let mut names = BTreeSet::new();
    let mut loading = Vec::new();
    for b in &file.builders {
        let here = format!("builder {:?}", b.name);
        if b.name.trim().is_empty() {
            problems.push("a builder has an empty name".into());
        }
        if !names.insert(b.name.clone()) {
            problems.push(format!("{here} is declared twice"));
        }
        if b.max_concurrent == Some(0) {
            problems.push(format!("{here}: max_concurrent must be at least 1"));
        }
        if let Some(kwargs) = &b.kwargs
            && !kwargs.is_table()
        {
            problems.push(format!("{here}: kwargs must be a table"));
        }
        let limits = match b.limits.apply(defaults) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{here}: {e}"));
                continue;
            }
        };
        let grants = Grants {
            env: b
                .grants
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            dirs: b
                .grants
                .dirs
                .iter()
                .map(|d| DirGrant {
                    host: resolve(&base, &d.host),
                    guest: d.guest.clone(),
                    writable: d.writable,
                })
                .collect(),
        };
        let bytes: Result<Vec<u8>, String> = match b.plugin.strip_prefix("bundled:") {
            Some(name) => kiln_bundled::get(name).map(<[u8]>::to_vec).ok_or_else(|| {
                format!(
                    "{here}: there is no bundled plugin {name:?} (bundled: {})",
                    kiln_bundled::names().collect::<Vec<_>>().join(", ")
                )
            }),
            None => {
                let path = resolve(&base, Path::new(&b.plugin));
                std::fs::read(&path)
                    .map_err(|e| format!("{here}: cannot read plugin {}: {e}", path.display()))
            }
        };
        match bytes {
            Ok(bytes) => loading.push((b, limits, grants, bytes)),
            Err(e) => problems.push(e),
        }
    }
    let mut builders = Vec::new();
    for (b, limits, grants, bytes) in loading {
        let loaded = host.load_job(&b.plugin, Arc::from(bytes), &limits).await;
        match loaded.and_then(|plugin| WasmExecutor::new(plugin, limits, grants)) {
            Ok(executor) => {
                let mut config = BuilderConfig::new(&b.name);
                config.description = b.description.clone();
                config.max_concurrent = b.max_concurrent;
                config.args = b.args.as_ref().map(json).unwrap_or(Value::Null);
                config.kwargs = b.kwargs.as_ref().map(json).unwrap_or(Value::Null);
                builders.push((config, executor));
            }
            Err(e) => problems.push(format!("builder {:?}: {e}", b.name)),
        }
    }
    let mut submissions = Vec::new();
    for (i, s) in file.submits.iter().enumerate() {
        let here = format!("submit #{}", i + 1);
        for name in &s.builders {
            if !names.contains(name) {
                problems.push(format!(
                    "{here} names builder {name:?}, which the file does not declare"
                ));
            }
        }
        let count = s.count.unwrap_or(1);
        if count == 0 || count > MAX_COUNT {
            problems.push(format!("{here}: count must be within 1..={MAX_COUNT}"));
            continue;
        }
        let mut submission = Submission::new(s.reason.clone().unwrap_or_else(|| "kiln run".into()))
            .priority(s.priority);
        submission.builders = s.builders.clone();
        submission.properties = s
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), Property::new(json(v), "config")))
            .collect();
        let has_stamp = s.repository.is_some()
            || s.branch.is_some()
            || s.revision.is_some()
            || s.project.is_some()
            || s.codebase.is_some();
        if has_stamp {
            submission.sourcestamps.push(SourceStamp {
                codebase: s.codebase.clone().unwrap_or_default(),
                repository: s.repository.clone().unwrap_or_default(),
                branch: s.branch.clone(),
                revision: s.revision.clone(),
                project: s.project.clone().unwrap_or_default(),
            });
        }
        submissions.extend(std::iter::repeat_n(submission, count as usize));
    }
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        bail!(
            "the pipeline has {} problem{}:\n{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            list.join("\n")
        );
    }
    Ok(Pipeline {
        builders,
        submissions,
    })
}
