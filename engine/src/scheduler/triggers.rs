//! Child buildsets and dependencies, as the scheduler runs them.
//!
//! [`SchedulerState::trigger`] (the scheduler's side of
//! [`JobRuntime::trigger`](kiln_job::JobRuntime::trigger)) starts a parent's children (or adopts the ones an earlier run of
//! the same request started), then, when asked to wait, asks the relationship's policy
//! what the children's state means each time some of them complete, until it lets the
//! parent go on. The waiting parent is a suspended future: it holds no thread. Children
//! run anywhere; completions on this engine wake the parent at once, others within one
//! poll interval.
//!
//! [`resolve_dependencies`] runs before a build's executor: it finds each dependency's
//! return value (building missing ones first when the builder says so) and substitutes
//! them into the builder's args and kwargs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tracing::{debug, warn};

use kiln_job::{
    BuildSpec, Decision, Outcome, ParentInfo, Policy, ResolvedDependency, StopReason, TriggerError,
    TriggerSpec, Triggered, relationship_name,
};
use kiln_model::{
    BuildId, BuildsetId, ChildBuildset, DEPENDENCY, Properties, RequestId, ResultCode, TRIGGERS,
};
use kiln_storage::NewBuildset;

use super::{RegisteredBuilder, SchedulerState};
use crate::dependencies::{MissingDependency, substitute_retvals};
use crate::events::Event;

/// The most children one trigger may start (a build's total is its builder's
/// [`BuildLimits::children`](kiln_job::BuildLimits::children)).
pub const MAX_TRIGGER_CHILDREN: usize = 10_000;

/// A builder's args and kwargs with dependencies' return values substituted.
pub(crate) struct Resolved {
    pub(crate) args: Value,
    pub(crate) kwargs: Value,
    pub(crate) dependencies: Vec<ResolvedDependency>,
}

fn storage(e: impl std::fmt::Display) -> TriggerError {
    TriggerError::Storage(e.to_string())
}

/// Cancels a waiting parent's incomplete children if the wait is abandoned (the parent's
/// job trapped or hit its deadline), unless the engine is shutting down or lost the
/// build: then a re-run of the parent adopts them.
struct AbandonGuard {
    shared: Arc<SchedulerState>,
    stop: watch::Receiver<Option<StopReason>>,
    requests: Vec<RequestId>,
    armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.armed || self.requests.is_empty() {
            return;
        }
        if matches!(
            *self.stop.borrow(),
            Some(StopReason::Shutdown | StopReason::MasterLost)
        ) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let requests = std::mem::take(&mut self.requests);
        runtime.spawn(async move {
            if let Err(e) = shared.cancel_requests(&requests).await {
                warn!(error = %e, "could not cancel the children of an abandoned wait");
            }
        });
    }
}

impl SchedulerState {
    /// The policy of a relationship: the registered one, else the bundled worst-of for
    /// the two built-in relationships.
    pub(crate) fn policy(&self, relationship: &str) -> Option<Arc<dyn Policy>> {
        let policies = self
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = policies.get(relationship) {
            return Some(p.clone());
        }
        (relationship == TRIGGERS || relationship == DEPENDENCY)
            .then(|| Arc::new(kiln_job::BundledPolicy::worst_of()) as Arc<dyn Policy>)
    }

    fn relationship_names(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names.insert(TRIGGERS.into());
        names.insert(DEPENDENCY.into());
        names.into_iter().collect()
    }

    /// Starts (or adopts) a parent's children and, with `wait`, waits until the
    /// relationship's policy lets the parent go on.
    pub(crate) async fn trigger(
        self: &Arc<Self>,
        parent: &BuildSpec,
        spec: TriggerSpec,
    ) -> Result<Triggered, TriggerError> {
        let relationship = relationship_name(&spec.relationship).to_owned();
        let policy = self.policy(&relationship).ok_or_else(|| {
            TriggerError::Invalid(format!(
                "no policy for relationship {relationship:?} (known: {})",
                self.relationship_names().join(", ")
            ))
        })?;
        if spec.builders.is_empty() {
            return Err(TriggerError::Invalid("trigger names no builders".into()));
        }
        let max_depth = parent.limits.trigger_depth;
        if parent.depth >= max_depth {
            return Err(TriggerError::LimitExceeded(format!(
                "trigger depth limit exceeded: this build is {} levels deep and its children may be at most {max_depth}",
                parent.depth
            )));
        }
        if spec.builders.len() > MAX_TRIGGER_CHILDREN {
            return Err(TriggerError::Invalid(format!(
                "trigger names {} builders; at most {MAX_TRIGGER_CHILDREN} children per trigger",
                spec.builders.len()
            )));
        }
        let request_id = parent.build.request_id;
        let keys: Vec<String> = (0..spec.builders.len())
            .map(|i| format!("{}.{i}", spec.key_prefix))
            .collect();
        // Subscribed before anything is submitted, so that no completion is missed.
        let mut events = self.events.subscribe();

        // Children an earlier run of this request started under the same keys.
        let mut existing: BTreeMap<String, ChildBuildset> = self
            .store
            .buildset_children(request_id)
            .await
            .map_err(storage)?
            .into_iter()
            .filter_map(|c| c.trigger_key.clone().map(|k| (k, c)))
            .collect();
        existing.retain(|key, child| {
            keys.iter()
                .position(|k| k == key)
                .is_some_and(|i| spec.builders[i] == child.builder)
        });
        let adopt: Vec<BuildsetId> = existing
            .values()
            .filter(|c| c.parent_buildid != Some(parent.build.id))
            .map(|c| c.buildset_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !adopt.is_empty() {
            debug!(build = %parent.build.id, children = adopt.len(), "adopting children an earlier run started");
            self.store
                .buildset_adopt(&adopt, parent.build.id)
                .await
                .map_err(storage)?;
        }

        let missing: Vec<usize> = (0..keys.len())
            .filter(|i| !existing.contains_key(&keys[*i]))
            .collect();
        if !missing.is_empty() {
            let known: BTreeMap<String, kiln_model::BuilderId> = self
                .store
                .builder_list()
                .await
                .map_err(storage)?
                .into_iter()
                .map(|b| (b.name, b.id))
                .collect();
            let now = kiln_model::now();
            let mut new = Vec::with_capacity(missing.len());
            for &i in &missing {
                let name = &spec.builders[i];
                let builder_id = *known
                    .get(name)
                    .ok_or_else(|| TriggerError::Invalid(format!("unknown builder {name:?}")))?;
                new.push(NewBuildset {
                    reason: format!(
                        "{relationship} of {} #{}",
                        parent.builder, parent.build.number
                    ),
                    sourcestamps: parent.sourcestamps.clone(),
                    properties: spec.properties.clone(),
                    builder_ids: vec![builder_id],
                    priority: parent.priority,
                    waited_for: spec.wait,
                    parent_buildid: Some(parent.build.id),
                    parent_relationship: Some(relationship.clone()),
                    parent_request_id: Some(request_id),
                    trigger_key: Some(keys[i].clone()),
                    depth: parent.depth.saturating_add(1),
                    submitted_at: now,
                    ..NewBuildset::default()
                });
            }
            // Announced before any claim that sees these rows announces their builds.
            let announcing = self.announcing.read().await;
            let added = self.store.buildset_add_many(&new).await.map_err(storage)?;
            for (i, a) in missing.iter().zip(&added) {
                self.emit(Event::BuildsetSubmitted {
                    buildset_id: a.buildset_id,
                    reason: new[0].reason.clone(),
                    requests: a
                        .requests
                        .values()
                        .map(|r| (spec.builders[*i].clone(), *r))
                        .collect(),
                });
            }
            drop(announcing);
            self.wake_claims();
        }

        let info = ParentInfo {
            build_id: parent.build.id,
            builder: parent.builder.clone(),
            number: parent.build.number,
            relationship: relationship.clone(),
        };
        let mut children = self.children_in_order(request_id, &keys).await?;
        if !spec.wait {
            return Ok(Triggered {
                verdict: ResultCode::Success,
                children,
            });
        }
        let mut guard = AbandonGuard {
            shared: self.clone(),
            stop: parent.stop.clone(),
            requests: children.iter().map(|c| c.request_id).collect(),
            armed: true,
        };
        let ours: BTreeSet<BuildsetId> = children.iter().map(|c| c.buildset_id).collect();
        let mut stop = parent.stop.clone();
        let _waiting = self.waiting();
        loop {
            let decision = match policy.decide(&info, &children).await {
                Ok(d) => d,
                Err(e) => {
                    warn!(build = %parent.build.id, error = %e, "the policy failed; cancelling the remaining children");
                    self.cancel_incomplete(&children).await;
                    guard.armed = false;
                    return Err(e.into());
                }
            };
            let all_complete = children.iter().all(|c| c.complete);
            let decision = match decision {
                Decision::Wait if all_complete => {
                    // A policy that waits when nothing is left to wait for would hang.
                    warn!(build = %parent.build.id, relationship, "the policy waits although every child is complete; taking the worst result");
                    Decision::Finish(
                        ResultCode::worst_of(children.iter().filter_map(|c| c.results))
                            .unwrap_or(ResultCode::Success),
                    )
                }
                d => d,
            };
            match decision {
                Decision::Wait => {
                    if !wait_for_children(self, &mut events, &ours, &mut stop).await {
                        return Err(TriggerError::Stopped);
                    }
                    children = self.children_in_order(request_id, &keys).await?;
                }
                Decision::Finish(verdict) => {
                    guard.armed = false;
                    return Ok(Triggered { verdict, children });
                }
                Decision::CancelRest(verdict) => {
                    guard.armed = false;
                    self.cancel_incomplete(&children).await;
                    let children = self.children_in_order(request_id, &keys).await?;
                    return Ok(Triggered { verdict, children });
                }
            }
        }
    }

    /// The children with these keys, in key order.
    async fn children_in_order(
        &self,
        request: RequestId,
        keys: &[String],
    ) -> Result<Vec<ChildBuildset>, TriggerError> {
        let mut by_key: BTreeMap<String, ChildBuildset> = self
            .store
            .buildset_children(request)
            .await
            .map_err(storage)?
            .into_iter()
            .filter_map(|c| c.trigger_key.clone().map(|k| (k, c)))
            .collect();
        Ok(keys.iter().filter_map(|k| by_key.remove(k)).collect())
    }

    async fn cancel_incomplete(&self, children: &[ChildBuildset]) {
        let open: Vec<RequestId> = children
            .iter()
            .filter(|c| !c.complete)
            .map(|c| c.request_id)
            .collect();
        if open.is_empty() {
            return;
        }
        if let Err(e) = self.cancel_requests(&open).await {
            warn!(error = %e, "could not cancel the remaining children");
        }
    }
}

/// Waits until one of `ours` completes (or a poll interval passes, for children finished
/// by other processes). False when the parent was asked to stop.
async fn wait_for_children(
    shared: &SchedulerState,
    events: &mut broadcast::Receiver<Event>,
    ours: &BTreeSet<BuildsetId>,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> bool {
    let poll = tokio::time::sleep(shared.config.poll_interval);
    tokio::pin!(poll);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(Event::BuildsetComplete { buildset_id, .. }) if ours.contains(&buildset_id) => break,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
            () = &mut poll => break,
            stopped = stop.wait_for(Option::is_some) => {
                let _ = stopped;
                return false;
            }
        }
    }
    // Completions arrive in batches: take every one already queued before re-reading.
    while let Ok(_event) = events.try_recv() {}
    true
}

/// Resolves a builder's dependencies for one build; an `Err` is the build's outcome.
pub(crate) async fn resolve_dependencies(
    shared: &Arc<SchedulerState>,
    builder: &RegisteredBuilder,
    parent: &BuildSpec,
) -> Result<Resolved, Outcome> {
    let config = &builder.config;
    if config.depends_on.is_empty() {
        return Ok(Resolved {
            args: config.args.clone(),
            kwargs: config.kwargs.clone(),
            dependencies: Vec::new(),
        });
    }
    let mut found = find_dependencies(shared, builder).await?;
    let missing: Vec<String> = config
        .depends_on
        .iter()
        .filter(|d| !found.contains_key(&d.builder))
        .map(|d| d.builder.clone())
        .collect();
    if !missing.is_empty() {
        if config.on_missing_dependency == MissingDependency::Fail {
            return Err(Outcome::failure(format!(
                "missing dependency: {} {} no successful build",
                quote_list(&missing),
                if missing.len() == 1 { "has" } else { "have" }
            )));
        }
        let spec = TriggerSpec {
            builders: missing.clone(),
            properties: Properties::new(),
            wait: true,
            relationship: DEPENDENCY.into(),
            key_prefix: "dep".into(),
        };
        let built = shared.trigger(parent, spec).await.map_err(|e| {
            Outcome::failure(format!(
                "missing dependency: building {} first failed: {e}",
                quote_list(&missing)
            ))
        })?;
        found = find_dependencies(shared, builder).await?;
        if let Some(child) = built
            .children
            .iter()
            .find(|c| !found.contains_key(&c.builder))
        {
            let how = child
                .results
                .map_or_else(|| "did not complete".to_owned(), |r| format!("ended {r}"));
            return Err(Outcome::failure(format!(
                "missing dependency: {:?} was built first but {how}",
                child.builder
            )));
        }
    }
    let values: BTreeMap<String, Value> = found
        .iter()
        .map(|(name, (_, value))| (name.clone(), value.clone()))
        .collect();
    let dependencies = config
        .depends_on
        .iter()
        .filter_map(|d| {
            found.get(&d.builder).map(|(id, value)| ResolvedDependency {
                builder: d.builder.clone(),
                build_id: *id,
                return_value: value.clone(),
            })
        })
        .collect();
    Ok(Resolved {
        args: substitute_retvals(&config.args, &values),
        kwargs: substitute_retvals(&config.kwargs, &values),
        dependencies,
    })
}

fn quote_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each dependency that has a usable build: builder → (build, return value). A pinned
/// build that does not exist or did not succeed is the build's failure.
async fn find_dependencies(
    shared: &SchedulerState,
    builder: &RegisteredBuilder,
) -> Result<BTreeMap<String, (BuildId, Value)>, Outcome> {
    let store = &shared.store;
    let db = |e: kiln_storage::StorageError| {
        Outcome::exception(format!("reading dependencies failed: {e}"), None)
    };
    let mut found = BTreeMap::new();
    for dep in &builder.config.depends_on {
        let Some(dep_builder) = store.builder_get_by_name(&dep.builder).await.map_err(db)? else {
            continue;
        };
        let build = match dep.build {
            Some(number) => {
                let build = store
                    .build_get_by_number(dep_builder.id, number)
                    .await
                    .map_err(|_| {
                        Outcome::failure(format!(
                            "missing dependency: pinned build {:?} #{number} does not exist",
                            dep.builder
                        ))
                    })?;
                if !build.results.is_some_and(ResultCode::is_successful) {
                    return Err(Outcome::failure(format!(
                        "missing dependency: pinned build {:?} #{number} did not succeed ({})",
                        dep.builder,
                        build
                            .results
                            .map_or("still running".into(), |r| r.to_string())
                    )));
                }
                Some(build)
            }
            None => store
                .build_latest_successful(dep_builder.id)
                .await
                .map_err(db)?,
        };
        if let Some(build) = build {
            found.insert(
                dep.builder.clone(),
                (build.id, build.return_value.unwrap_or(Value::Null)),
            );
        }
    }
    Ok(found)
}
