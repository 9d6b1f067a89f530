//! Write Kiln job plugins in Rust.
//!
//! A job is a type implementing [`Guest`] plus one [`export_job!`] line:
//!
//! ```ignore
//! use kiln_guest::{BuildContext, Guest, JobError, Outcome};
//!
//! struct Echo;
//!
//! impl Guest for Echo {
//!     fn run(ctx: BuildContext) -> Result<Outcome, JobError> {
//!         kiln_guest::info(&format!("echoing build {}", ctx.number));
//!         Ok(Outcome::success_json(ctx.args_value()))
//!     }
//! }
//!
//! kiln_guest::export_job!(Echo);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` as a `cdylib`; the
//! `.wasm` file is a component for Kiln's `job` world. See `plugins/README.md`.
//!
//! Relationship policies use [`policy`] and [`export_policy!`]; result reporters use
//! [`reporter`] and [`export_reporter!`].

pub mod http;

/// The generated bindings. They live in a module because a `#[macro_export]`ed export
/// macro and wit-bindgen's own re-export of it would collide at the crate root.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "job",
        default_bindings_module: "kiln_guest::bindings",
        pub_export_macro: true,
        export_macro_name: "export_job",
    });
}

pub use bindings::kiln::plugin::host;
pub use bindings::kiln::plugin::host::Triggered;
pub use bindings::kiln::plugin::types::{
    Child, Dependency, JobResult, LogLevel, Property, ResultCode, Sourcestamp,
};
pub use bindings::{BuildContext, Guest, JobError, Outcome, export_job};
pub use policy::bindings::export_policy;
pub use reporter::bindings::export_reporter;

/// Relationship policies: the `policy` world.
pub mod policy {
    /// The generated bindings of the `policy` world.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../../wit",
            world: "policy",
            default_bindings_module: "kiln_guest::policy::bindings",
            pub_export_macro: true,
            export_macro_name: "export_policy",
        });
    }

    pub use bindings::Guest;
    pub use bindings::kiln::plugin::types::{Child, Decision, ParentBuild, ResultCode};
    use kiln_policy_logic as logic;

    fn to_logic(code: ResultCode) -> logic::Code {
        match code {
            ResultCode::Success => logic::Code::Success,
            ResultCode::Warnings => logic::Code::Warnings,
            ResultCode::Failure => logic::Code::Failure,
            ResultCode::Skipped => logic::Code::Skipped,
            ResultCode::Exception => logic::Code::Exception,
            ResultCode::Retry => logic::Code::Retry,
            ResultCode::Cancelled => logic::Code::Cancelled,
        }
    }

    fn from_logic(code: logic::Code) -> ResultCode {
        match code {
            logic::Code::Success => ResultCode::Success,
            logic::Code::Warnings => ResultCode::Warnings,
            logic::Code::Failure => ResultCode::Failure,
            logic::Code::Skipped => ResultCode::Skipped,
            logic::Code::Exception => ResultCode::Exception,
            logic::Code::Retry => ResultCode::Retry,
            logic::Code::Cancelled => ResultCode::Cancelled,
        }
    }

    /// Runs one of Kiln's bundled policies by name (`worst-of`, `fail-fast`,
    /// `best-effort`, `any-success`); an unknown name waits for every child and takes
    /// the worst, as `worst-of` does.
    pub fn bundled(name: &str, children: &[Child]) -> Decision {
        let children: Vec<logic::Child> = children
            .iter()
            .map(|c| logic::Child { complete: c.complete, result: c.results.map(to_logic) })
            .collect();
        match logic::decide(name, &children).unwrap_or_else(|| logic::worst_of(&children)) {
            logic::Decision::Wait => Decision::Wait,
            logic::Decision::Finish(code) => Decision::Finish(from_logic(code)),
            logic::Decision::CancelRest(code) => Decision::CancelRest(from_logic(code)),
        }
    }
}

/// Result reporters: the `reporter` world.
pub mod reporter {
    /// The generated bindings of the `reporter` world.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../../wit",
            world: "reporter",
            default_bindings_module: "kiln_guest::reporter::bindings",
            pub_export_macro: true,
            export_macro_name: "export_reporter",
        });
    }

    pub use bindings::Guest;
    pub use bindings::kiln::plugin::types::{Event, EventKind, ResultCode};
}

use serde_json::Value;

impl Outcome {
    /// SUCCESS with a JSON return value.
    pub fn success_json(value: Value) -> Self {
        Outcome { code: JobResult::Success, return_value: value.to_string() }
    }

    /// WARNINGS with a JSON return value.
    pub fn warnings_json(value: Value) -> Self {
        Outcome { code: JobResult::Warnings, return_value: value.to_string() }
    }

    /// SKIPPED, returning nothing.
    pub fn skipped() -> Self {
        Outcome { code: JobResult::Skipped, return_value: "null".into() }
    }
}

impl JobError {
    /// A job error with a message and no details.
    pub fn new(message: impl Into<String>) -> Self {
        JobError { message: message.into(), details: None }
    }

    /// Adds details (kept as the build's traceback).
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }
}

impl BuildContext {
    /// The builder's positional arguments as JSON (`null` if unreadable).
    pub fn args_value(&self) -> Value {
        serde_json::from_str(&self.args).unwrap_or(Value::Null)
    }

    /// The builder's keyword arguments as JSON (`null` if unreadable).
    pub fn kwargs_value(&self) -> Value {
        serde_json::from_str(&self.kwargs).unwrap_or(Value::Null)
    }

    /// One keyword argument, if present.
    pub fn kwarg(&self, name: &str) -> Option<Value> {
        self.kwargs_value().get(name).cloned()
    }

    /// A buildset property's JSON value, if present.
    pub fn property(&self, name: &str) -> Option<Value> {
        self.properties.iter().find(|p| p.name == name).and_then(|p| serde_json::from_str(&p.value).ok())
    }
}

impl ResultCode {
    /// The upper-case name Kiln shows ("SUCCESS", "FAILURE", ...).
    pub fn name(self) -> &'static str {
        match self {
            ResultCode::Success => "SUCCESS",
            ResultCode::Warnings => "WARNINGS",
            ResultCode::Failure => "FAILURE",
            ResultCode::Skipped => "SKIPPED",
            ResultCode::Exception => "EXCEPTION",
            ResultCode::Retry => "RETRY",
            ResultCode::Cancelled => "CANCELLED",
        }
    }
}

/// Logs at debug level.
pub fn debug(message: &str) {
    host::log(LogLevel::Debug, message);
}

/// Logs at info level.
pub fn info(message: &str) {
    host::log(LogLevel::Info, message);
}

/// Logs at warning level.
pub fn warning(message: &str) {
    host::log(LogLevel::Warning, message);
}

/// Logs at error level.
pub fn error(message: &str) {
    host::log(LogLevel::Error, message);
}

/// Reports progress in a nested group (`&["compile", "core"]`).
pub fn progress(group: &[&str], current: u64, total: u64, status: &str) {
    let group: Vec<String> = group.iter().map(|g| (*g).to_owned()).collect();
    host::progress(&group, current, total, status);
}

/// Sets a build property to a JSON value.
pub fn set_property(name: &str, value: &Value, source: &str) -> Result<(), String> {
    host::set_property(name, &value.to_string(), source)
}

/// A property's JSON value as the build sees it (its own, else the buildset's).
pub fn get_property(name: &str) -> Option<Value> {
    host::get_property(name).and_then(|p| serde_json::from_str(&p.value).ok())
}

/// Starts one child buildset per builder under the default relationship ("triggers");
/// with `wait`, returns once its policy lets this build go on.
pub fn trigger(builders: &[&str], wait: bool) -> Result<Triggered, String> {
    trigger_as("", builders, &[], wait)
}

/// Starts child buildsets under a named relationship, with properties.
pub fn trigger_as(
    relationship: &str,
    builders: &[&str],
    properties: &[(&str, Value)],
    wait: bool,
) -> Result<Triggered, String> {
    let builders: Vec<String> = builders.iter().map(|b| (*b).to_owned()).collect();
    let properties: Vec<Property> = properties
        .iter()
        .map(|(name, value)| Property {
            name: (*name).to_owned(),
            value: value.to_string(),
            source: "trigger".into(),
        })
        .collect();
    host::trigger(&builders, &properties, wait, relationship)
}
