//! The rules every backend checks before it writes, written once.

use std::collections::BTreeSet;

use kiln_model::{MAX_PRIORITY, MIN_PRIORITY, ProgressReport, ResultCode};

use crate::{NewBuildset, Result, StorageError};

/// A name (of a builder, master, reporter or property) must not be blank.
pub(crate) fn name(what: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(StorageError::Invalid(format!("{what} name is empty")));
    }
    Ok(())
}

/// A priority within [`MIN_PRIORITY`]..=[`MAX_PRIORITY`].
pub(crate) fn priority(priority: i32) -> Result<()> {
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(StorageError::Invalid(format!(
            "priority {priority} is outside {MIN_PRIORITY}..={MAX_PRIORITY}"
        )));
    }
    Ok(())
}

/// The rules every backend checks before it adds a buildset.
pub(crate) fn buildset(params: &NewBuildset) -> Result<()> {
    priority(params.priority)?;
    let distinct: BTreeSet<_> = params.builder_ids.iter().collect();
    if distinct.len() != params.builder_ids.len() {
        return Err(StorageError::Invalid(
            "a buildset names the same builder twice".into(),
        ));
    }
    if params
        .idempotency_key
        .as_deref()
        .is_some_and(|k| k.trim().is_empty())
    {
        return Err(StorageError::Invalid("the idempotency key is empty".into()));
    }
    if let Some(name) = params.properties.keys().find(|k| k.trim().is_empty()) {
        return Err(StorageError::Invalid(format!(
            "property name {name:?} is empty"
        )));
    }
    Ok(())
}

/// A progress report's group names must not be empty.
pub(crate) fn progress(report: &ProgressReport) -> Result<()> {
    if report.group.iter().any(|g| g.is_empty()) {
        return Err(StorageError::Invalid(format!(
            "progress group {:?} has an empty name",
            report.group
        )));
    }
    Ok(())
}

/// Time spent waiting for locks is a non-negative number of seconds.
pub(crate) fn locks_duration(seconds: f64) -> Result<()> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(StorageError::Invalid(format!(
            "locks duration {seconds} is not a non-negative number"
        )));
    }
    Ok(())
}

/// RETRY puts a request back in the queue: it is not a result a request completes with.
pub(crate) fn completion(results: ResultCode) -> Result<()> {
    if results == ResultCode::Retry {
        return Err(StorageError::Invalid(
            "RETRY is not a completion result: unclaim the request so that it runs again".into(),
        ));
    }
    Ok(())
}
