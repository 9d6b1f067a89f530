//! What one sandboxed build may use. Every limit has a named default and may be
//! overridden per builder.

use std::time::Duration;

/// Wall-clock time a build may run before it is interrupted: long enough for real
/// jobs, short enough that a stuck one does not hold a slot for hours.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
/// Linear memory a build may grow to: generous for jobs that process data, small
/// enough that a few hundred concurrent builds fit in a modest machine.
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;
/// Wasm call stack per build. wasmtime's default is 512 KiB; Rust guests with
/// serde_json recursion need a little more.
pub const DEFAULT_WASM_STACK_BYTES: usize = 1 << 20;
/// Captured stdout and stderr, each: enough for a helpful panic message or a short
/// report; logs belong in the structured log.
pub const DEFAULT_OUTPUT_BYTES: usize = 256 << 10;
/// Structured log volume (message bytes) per build.
pub const DEFAULT_LOG_BYTES: usize = 4 << 20;
/// Size of the JSON return value: it lives in the database row of the build.
pub const DEFAULT_RETURN_BYTES: usize = 1 << 20;
/// Calls into the Kiln host interface per build: stops host-call spam that stays
/// within every other limit.
pub const DEFAULT_HOST_CALLS: u64 = 1_000_000;

/// Outbound HTTP requests one build (or one reporter delivery) may make, to the hosts
/// its grant lists: enough to fetch sources and post results, a bound on a guest that
/// loops on the network.
pub const DEFAULT_HTTP_REQUESTS: u32 = 100;
/// Bytes of HTTP bodies one build (or delivery) may send and receive together.
pub const DEFAULT_HTTP_BYTES: u64 = 256 << 20;

/// Wall-clock time one policy decision may take: policies only look at a list.
pub const DEFAULT_POLICY_DEADLINE: Duration = Duration::from_secs(1);
/// Linear memory of a policy.
pub const DEFAULT_POLICY_MEMORY_BYTES: usize = 16 << 20;
/// Wall-clock time one reporter delivery may take, network included.
pub const DEFAULT_REPORTER_DEADLINE: Duration = Duration::from_secs(30);

/// How often the engine's epoch advances. A running guest checks for cancellation and
/// its deadline, and yields its thread, once per tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The limits of one build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// See [`DEFAULT_DEADLINE`].
    pub deadline: Duration,
    /// See [`DEFAULT_MEMORY_BYTES`].
    pub memory_bytes: usize,
    /// See [`DEFAULT_WASM_STACK_BYTES`].
    pub wasm_stack_bytes: usize,
    /// See [`DEFAULT_OUTPUT_BYTES`].
    pub output_bytes: usize,
    /// See [`DEFAULT_LOG_BYTES`].
    pub log_bytes: usize,
    /// See [`DEFAULT_RETURN_BYTES`].
    pub return_bytes: usize,
    /// See [`DEFAULT_HOST_CALLS`].
    pub host_calls: u64,
    /// See [`DEFAULT_HTTP_REQUESTS`].
    pub http_requests: u32,
    /// See [`DEFAULT_HTTP_BYTES`].
    pub http_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            wasm_stack_bytes: DEFAULT_WASM_STACK_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            log_bytes: DEFAULT_LOG_BYTES,
            return_bytes: DEFAULT_RETURN_BYTES,
            host_calls: DEFAULT_HOST_CALLS,
            http_requests: DEFAULT_HTTP_REQUESTS,
            http_bytes: DEFAULT_HTTP_BYTES,
        }
    }
}

/// The smallest wasm stack a build may ask for: below this even a trivial guest fails.
pub const MIN_WASM_STACK_BYTES: usize = 64 << 10;
/// The largest wasm stack a build may ask for (the async stack is sized from it).
pub const MAX_WASM_STACK_BYTES: usize = 64 << 20;
/// The largest memory a build may ask for. It is also the virtual address space each
/// pooling slot reserves: thousands of slots of wasmtime's default 4 GiB would take
/// tens of terabytes of address space; the price of smaller slots is explicit bounds
/// checks in compiled code.
pub const MAX_MEMORY_BYTES: usize = 1 << 30;

impl Limits {
    /// The defaults for a relationship policy: [`DEFAULT_POLICY_DEADLINE`] and
    /// [`DEFAULT_POLICY_MEMORY_BYTES`].
    pub fn policy() -> Limits {
        Limits {
            deadline: DEFAULT_POLICY_DEADLINE,
            memory_bytes: DEFAULT_POLICY_MEMORY_BYTES,
            ..Limits::default()
        }
    }

    /// The defaults for a reporter: [`DEFAULT_REPORTER_DEADLINE`], otherwise a job's.
    pub fn reporter() -> Limits {
        Limits {
            deadline: DEFAULT_REPORTER_DEADLINE,
            ..Limits::default()
        }
    }

    /// Checks that the limits are usable, naming the first one that is not.
    pub fn validate(&self) -> Result<(), String> {
        if self.deadline.is_zero() {
            return Err("deadline must be longer than zero".into());
        }
        if !(MIN_WASM_STACK_BYTES..=MAX_WASM_STACK_BYTES).contains(&self.wasm_stack_bytes) {
            return Err(format!(
                "wasm stack {} bytes is outside {MIN_WASM_STACK_BYTES}..={MAX_WASM_STACK_BYTES}",
                self.wasm_stack_bytes
            ));
        }
        if self.memory_bytes < (1 << 20) || self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(format!(
                "memory {} bytes is outside 1 MiB..=1 GiB",
                self.memory_bytes
            ));
        }
        if self.return_bytes == 0 || self.host_calls == 0 {
            return Err("return value size and host calls must be at least 1".into());
        }
        Ok(())
    }
}
