//! The decisions of Kiln's bundled relationship policies, as plain functions.
//!
//! The engine uses [`decide`] for its built-in default policy (`worst-of`), and each
//! bundled policy plugin (`plugins/policies/*`) wraps one of these functions behind the
//! `policy` world, so that the two can never disagree.
#![no_std]

/// A result code, numbered as in Buildbot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 0
    Success,
    /// 1
    Warnings,
    /// 2
    Failure,
    /// 3
    Skipped,
    /// 4
    Exception,
    /// 5
    Retry,
    /// 6
    Cancelled,
}

impl Code {
    /// The "worst" ranking: CANCELLED > RETRY > EXCEPTION > FAILURE > WARNINGS > SUCCESS
    /// > SKIPPED.
    pub fn severity(self) -> u8 {
        match self {
            Code::Skipped => 0,
            Code::Success => 1,
            Code::Warnings => 2,
            Code::Failure => 3,
            Code::Exception => 4,
            Code::Retry => 5,
            Code::Cancelled => 6,
        }
    }

    /// Whether this counts as a failure for fail-fast and best-effort.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Code::Failure | Code::Exception | Code::Cancelled | Code::Retry
        )
    }

    /// Whether this counts as a success for any-success.
    pub fn is_success(self) -> bool {
        matches!(self, Code::Success | Code::Warnings)
    }
}

/// What a policy sees of one child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child {
    /// Whether the child's request is complete.
    pub complete: bool,
    /// Its result, once complete.
    pub result: Option<Code>,
}

/// What a policy decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep waiting.
    Wait,
    /// Let the parent go on with this result.
    Finish(Code),
    /// Cancel the children still running, then let the parent go on with this result.
    CancelRest(Code),
}

/// The names of the bundled policies.
pub const NAMES: [&str; 4] = ["worst-of", "fail-fast", "best-effort", "any-success"];

/// Runs the bundled policy called `name`; `None` for an unknown name.
pub fn decide(name: &str, children: &[Child]) -> Option<Decision> {
    Some(match name {
        "worst-of" => worst_of(children),
        "fail-fast" => fail_fast(children),
        "best-effort" => best_effort(children),
        "any-success" => any_success(children),
        _ => return None,
    })
}

fn worst(results: impl Iterator<Item = Code>) -> Code {
    results
        .max_by_key(|c| c.severity())
        .unwrap_or(Code::Success)
}

fn all_complete(children: &[Child]) -> bool {
    children.iter().all(|c| c.complete)
}

fn results(children: &[Child]) -> impl Iterator<Item = Code> + '_ {
    children.iter().filter_map(|c| c.result)
}

/// Buildbot's trigger step: wait for every child; the parent gets the worst result.
pub fn worst_of(children: &[Child]) -> Decision {
    if all_complete(children) {
        Decision::Finish(worst(results(children)))
    } else {
        Decision::Wait
    }
}

/// The first failed child cancels the rest; the parent gets the worst result so far.
pub fn fail_fast(children: &[Child]) -> Decision {
    if results(children).any(Code::is_failure) {
        let so_far = worst(results(children));
        if all_complete(children) {
            Decision::Finish(so_far)
        } else {
            Decision::CancelRest(so_far)
        }
    } else {
        worst_of(children)
    }
}

/// Wait for every child; failures count as WARNINGS for the parent.
pub fn best_effort(children: &[Child]) -> Decision {
    if !all_complete(children) {
        return Decision::Wait;
    }
    let softened = results(children).map(|c| if c.is_failure() { Code::Warnings } else { c });
    Decision::Finish(worst(softened))
}

/// The parent goes on with SUCCESS as soon as one child succeeds (the others keep
/// running); if none does, it gets the worst result once all are complete.
pub fn any_success(children: &[Child]) -> Decision {
    if results(children).any(Code::is_success) {
        Decision::Finish(Code::Success)
    } else {
        worst_of(children)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(code: Code) -> Child {
        Child {
            complete: true,
            result: Some(code),
        }
    }
    const RUNNING: Child = Child {
        complete: false,
        result: None,
    };

    #[test]
    fn worst_of_waits_for_all_then_takes_the_worst() {
        assert_eq!(worst_of(&[done(Code::Failure), RUNNING]), Decision::Wait);
        assert_eq!(
            worst_of(&[done(Code::Success), done(Code::Warnings)]),
            Decision::Finish(Code::Warnings)
        );
        assert_eq!(
            worst_of(&[done(Code::Skipped)]),
            Decision::Finish(Code::Skipped)
        );
        assert_eq!(worst_of(&[]), Decision::Finish(Code::Success));
    }

    #[test]
    fn fail_fast_cancels_the_rest_at_the_first_failure() {
        assert_eq!(fail_fast(&[done(Code::Success), RUNNING]), Decision::Wait);
        assert_eq!(
            fail_fast(&[done(Code::Failure), RUNNING]),
            Decision::CancelRest(Code::Failure)
        );
        assert_eq!(
            fail_fast(&[done(Code::Failure), done(Code::Success)]),
            Decision::Finish(Code::Failure)
        );
    }

    #[test]
    fn best_effort_turns_failures_into_warnings() {
        assert_eq!(best_effort(&[done(Code::Failure), RUNNING]), Decision::Wait);
        assert_eq!(
            best_effort(&[done(Code::Exception), done(Code::Success)]),
            Decision::Finish(Code::Warnings)
        );
        assert_eq!(
            best_effort(&[done(Code::Success)]),
            Decision::Finish(Code::Success)
        );
    }

    #[test]
    fn any_success_goes_on_at_the_first_success() {
        assert_eq!(any_success(&[done(Code::Failure), RUNNING]), Decision::Wait);
        assert_eq!(
            any_success(&[done(Code::Failure), done(Code::Warnings), RUNNING]),
            Decision::Finish(Code::Success)
        );
        assert_eq!(
            any_success(&[done(Code::Failure), done(Code::Cancelled)]),
            Decision::Finish(Code::Cancelled)
        );
    }
}
