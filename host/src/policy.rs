//! Relationship policies as WebAssembly components (the `policy` world).
//!
//! A policy is pure: it gets no WASI capabilities and no host interface. Toolchains that
//! import WASI anyway (Rust's wasm32-wasip2 std does) link, but any WASI call traps.
//! Each decision runs in a fresh store under a short deadline and a memory cap.

use std::sync::Arc;

use async_trait::async_trait;
use wasmtime::Store;
use wasmtime::component::Linker;

use super::bindings::policy::kiln::plugin::types as wit;
use super::bindings::policy::{Policy as PolicyWorld, PolicyPre};
use super::limits::{EPOCH_TICK, Limits};
use super::state::MemoryLimiter;
use super::{EngineCtx, WasmError};
use kiln_job::{Decision, ParentInfo, Policy, PolicyError};
use kiln_model::ChildBuildset;

/// The store data of one decision.
pub(crate) struct PolicyState {
    limiter: MemoryLimiter,
}

/// A policy plugin, checked, compiled and pre-instantiated.
pub struct PolicyPlugin {
    name: String,
    engine: Arc<EngineCtx>,
    pre: PolicyPre<PolicyState>,
}

impl PolicyPlugin {
    pub(crate) fn new(name: String, engine: Arc<EngineCtx>, pre: PolicyPre<PolicyState>) -> Self {
        PolicyPlugin { name, engine, pre }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Pre-instantiates a component as a policy: every import it has (WASI, for toolchains
/// that always import it) is linked to a function that traps.
pub(crate) fn pre_instantiate(
    engine: &EngineCtx,
    component: &wasmtime::component::Component,
) -> Result<PolicyPre<PolicyState>, Vec<String>> {
    let problems =
        super::check::world_problems(super::check::World::Policy, &engine.engine, component);
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut linker: Linker<PolicyState> = Linker::new(&engine.engine);
    linker
        .define_unknown_imports_as_traps(component)
        .map_err(|e| vec![format!("its imports cannot be stubbed: {e:#}")])?;
    let instance = linker
        .instantiate_pre(component)
        .map_err(|e| vec![format!("it does not link as a policy: {e:#}")])?;
    PolicyPre::new(instance).map_err(|e| vec![format!("it does not match the policy world: {e:#}")])
}

/// A policy plugin with its limits: what an engine is given for a relationship.
pub struct WasmPolicy {
    plugin: Arc<PolicyPlugin>,
    limits: Limits,
}

impl WasmPolicy {
    /// A policy running `plugin` under `limits` (deadline and memory apply).
    pub fn new(plugin: Arc<PolicyPlugin>, limits: Limits) -> Result<Self, WasmError> {
        limits.validate().map_err(WasmError::Invalid)?;
        Ok(WasmPolicy { plugin, limits })
    }
}

result_code_conversions!(super::bindings::policy::kiln::plugin::types);

#[async_trait]
impl Policy for WasmPolicy {
    async fn decide(
        &self,
        parent: &ParentInfo,
        children: &[ChildBuildset],
    ) -> Result<Decision, PolicyError> {
        let fail = |reason: String| PolicyError {
            policy: self.plugin.name.clone(),
            reason,
        };
        let _live = self.plugin.engine.live.enter();
        let mut store = Store::new(
            &self.plugin.engine.engine,
            PolicyState {
                limiter: MemoryLimiter::new(self.limits.memory_bytes),
            },
        );
        store.limiter(|s| &mut s.limiter);
        let ticks = (self.limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();
        let parent = wit::ParentBuild {
            build_id: parent.build_id.0,
            builder: parent.builder.clone(),
            number: parent.number,
            relationship: parent.relationship.clone(),
        };
        let children: Vec<wit::Child> = children
            .iter()
            .map(|c| wit::Child {
                builder: c.builder.clone(),
                buildset_id: c.buildset_id.0,
                complete: c.complete,
                results: c.results.map(to_wit),
                build_id: c.build_id.map(|b| b.0),
                return_value: c
                    .return_value
                    .as_ref()
                    .map_or_else(|| "null".to_owned(), ToString::to_string),
            })
            .collect();
        let call = async {
            let policy: PolicyWorld = self.plugin.pre.instantiate_async(&mut store).await?;
            policy.call_decide(&mut store, &parent, &children).await
        };
        let backstop = self.limits.deadline + 2 * EPOCH_TICK;
        let decision = match tokio::time::timeout(backstop, call).await {
            Ok(Ok(d)) => d,
            Ok(Err(trap)) => {
                let limit = store.data().limiter.refused;
                return Err(fail(match (limit, trap.downcast_ref::<wasmtime::Trap>()) {
                    (Some(asked), _) => format!(
                        "memory limit exceeded: it tried to grow to {} MiB",
                        asked >> 20
                    ),
                    (None, Some(wasmtime::Trap::Interrupt)) => format!(
                        "deadline exceeded: it ran longer than {:?}",
                        self.limits.deadline
                    ),
                    (None, _) => format!(
                        "it trapped: {}",
                        trap.to_string().lines().next().unwrap_or("")
                    ),
                }));
            }
            Err(_) => {
                return Err(fail(format!(
                    "deadline exceeded: it ran longer than {:?}",
                    self.limits.deadline
                )));
            }
        };
        Ok(match decision {
            wit::Decision::Wait => Decision::Wait,
            wit::Decision::Finish(c) => Decision::Finish(from_wit(c)),
            wit::Decision::CancelRest(c) => Decision::CancelRest(from_wit(c)),
        })
    }
}
