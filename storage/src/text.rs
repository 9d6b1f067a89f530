//! Text as every backend can keep it.
//!
//! PostgreSQL's `text` cannot hold a NUL character, and a NUL in one row used to fail
//! the whole transaction it was part of: a job error with a NUL in it left every build
//! finished in the same batch running. Text that reaches a store from jobs (errors,
//! tracebacks, log messages, state strings, progress status lines, property names and
//! sources, artifact paths) therefore has each NUL replaced by [`NUL_STAND_IN`] on every
//! backend, so that both store the same thing and no write fails for it. JSON values
//! (return values, property values, log fields) keep NUL faithfully: JSON spells it
//! `\u0000`. Text from API clients is checked before it gets here and refused with a
//! message naming the field (see `Submission::validate`).

use std::borrow::Cow;

use super::{FinishedBuild, NewBuildset, ReporterProgress};
use kiln_model::{LogRecord, ProgressReport};

/// What a NUL becomes in stored text: U+2400 SYMBOL FOR NULL, visible wherever the text
/// is shown.
pub const NUL_STAND_IN: char = '\u{2400}';

/// `text` with every NUL replaced by [`NUL_STAND_IN`]; borrowed when there is none.
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', &NUL_STAND_IN.to_string()))
    } else {
        Cow::Borrowed(text)
    }
}

fn has_nul(text: &str) -> bool {
    text.contains('\0')
}

fn opt_has_nul(text: &Option<String>) -> bool {
    text.as_deref().is_some_and(has_nul)
}

fn fix(text: &mut String) {
    if has_nul(text) {
        *text = storable(text).into_owned();
    }
}

fn fix_opt(text: &mut Option<String>) {
    if let Some(text) = text {
        fix(text);
    }
}

/// Cleans a slice, copying it only when some item needs it.
fn clean_all<T: Clone>(
    items: &[T],
    dirty: impl Fn(&T) -> bool,
    fix: impl Fn(&mut T),
) -> Cow<'_, [T]> {
    if !items.iter().any(&dirty) {
        return Cow::Borrowed(items);
    }
    let mut owned = items.to_vec();
    owned.iter_mut().for_each(fix);
    Cow::Owned(owned)
}

/// New buildsets with storable text.
pub(crate) fn buildsets(params: &[NewBuildset]) -> Cow<'_, [NewBuildset]> {
    clean_all(
        params,
        |p| {
            has_nul(&p.reason)
                || opt_has_nul(&p.external_idstring)
                || opt_has_nul(&p.idempotency_key)
                || opt_has_nul(&p.parent_relationship)
                || opt_has_nul(&p.trigger_key)
                || p.properties
                    .iter()
                    .any(|(name, property)| has_nul(name) || has_nul(&property.source))
                || p.sourcestamps.iter().any(|s| {
                    has_nul(&s.codebase)
                        || has_nul(&s.repository)
                        || opt_has_nul(&s.branch)
                        || opt_has_nul(&s.revision)
                        || has_nul(&s.project)
                })
        },
        |p| {
            fix(&mut p.reason);
            fix_opt(&mut p.external_idstring);
            fix_opt(&mut p.idempotency_key);
            fix_opt(&mut p.parent_relationship);
            fix_opt(&mut p.trigger_key);
            p.properties = std::mem::take(&mut p.properties)
                .into_iter()
                .map(|(name, mut property)| {
                    fix(&mut property.source);
                    (storable(&name).into_owned(), property)
                })
                .collect();
            for s in &mut p.sourcestamps {
                fix(&mut s.codebase);
                fix(&mut s.repository);
                fix_opt(&mut s.branch);
                fix_opt(&mut s.revision);
                fix(&mut s.project);
            }
        },
    )
}

/// Finished builds with storable text.
pub(crate) fn finished_all(ends: &[FinishedBuild]) -> Cow<'_, [FinishedBuild]> {
    clean_all(
        ends,
        |e| {
            opt_has_nul(&e.error)
                || opt_has_nul(&e.traceback)
                || opt_has_nul(&e.state_string)
                || e.artifacts
                    .iter()
                    .any(|a| has_nul(&a.path) || has_nul(&a.location))
        },
        |e| {
            fix_opt(&mut e.error);
            fix_opt(&mut e.traceback);
            fix_opt(&mut e.state_string);
            for a in &mut e.artifacts {
                fix(&mut a.path);
                fix(&mut a.location);
            }
        },
    )
}

/// A finished build with storable text.
pub(crate) fn finished(build: &FinishedBuild) -> Cow<'_, FinishedBuild> {
    match finished_all(std::slice::from_ref(build)) {
        Cow::Borrowed(_) => Cow::Borrowed(build),
        Cow::Owned(mut v) => Cow::Owned(v.remove(0)),
    }
}

/// Log records with storable messages.
pub(crate) fn logs(records: &[LogRecord]) -> Cow<'_, [LogRecord]> {
    clean_all(records, |r| has_nul(&r.message), |r| fix(&mut r.message))
}

/// A progress report with a storable status line (group names travel as JSON).
pub(crate) fn report(report: &ProgressReport) -> Cow<'_, ProgressReport> {
    if !has_nul(&report.status) {
        return Cow::Borrowed(report);
    }
    let mut owned = report.clone();
    fix(&mut owned.status);
    Cow::Owned(owned)
}

/// Delivery progress with storable errors.
pub(crate) fn delivery(progress: &ReporterProgress) -> Cow<'_, ReporterProgress> {
    if !(opt_has_nul(&progress.last_error) || progress.dropped.iter().any(|(_, _, e)| has_nul(e))) {
        return Cow::Borrowed(progress);
    }
    let mut owned = progress.clone();
    fix_opt(&mut owned.last_error);
    for (_, _, e) in &mut owned.dropped {
        fix(e);
    }
    Cow::Owned(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_becomes_the_visible_stand_in_and_clean_text_is_borrowed() {
        assert_eq!(storable("a\0b\0"), "a\u{2400}b\u{2400}");
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
    }
}
