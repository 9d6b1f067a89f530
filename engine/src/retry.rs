//! Automatic retries (Oban's, Sidekiq's): when a build ends in a way its builder's
//! [`RetryPolicy`] retries, its request goes back to the queue, not claimable before an
//! exponential, jittered backoff has passed; each attempt is its own build, and the
//! request completes with the last attempt's result.
//!
//! A job's own RETRY result runs its request again at once, Buildbot's meaning, when
//! the builder has no policy (`attempts` 1), and after the policy's backoff when it has
//! one; either way at most `attempts.max(DEFAULT_JOB_RETRY_ATTEMPTS)` builds run, and
//! the request then completes as EXCEPTION.

use std::time::Duration;

use kiln_model::ResultCode;

use crate::error::{EngineError, Result};

/// The wait before the first retry; it doubles for each later one.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between attempts.
pub const DEFAULT_MAX_RETRY_BACKOFF: Duration = Duration::from_secs(600);
/// The most builds one request may run in all, retries included: a bound on what a
/// pipeline file may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 100;
/// The most builds a request runs while its job keeps answering RETRY, when the
/// builder's policy allows fewer attempts: a job asking to run again forever would
/// otherwise never let its request complete.
pub const DEFAULT_JOB_RETRY_ATTEMPTS: u32 = 10;

/// How a builder's builds are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Builds one request may run in all, the first included: 1 (the default) retries
    /// nothing automatically. EXCEPTION is retried while attempts remain.
    pub attempts: u32,
    /// Whether FAILURE is retried too.
    pub on_failure: bool,
    /// See [`DEFAULT_RETRY_BACKOFF`].
    pub backoff: Duration,
    /// See [`DEFAULT_MAX_RETRY_BACKOFF`].
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            on_failure: false,
            backoff: DEFAULT_RETRY_BACKOFF,
            max_backoff: DEFAULT_MAX_RETRY_BACKOFF,
        }
    }
}

/// What becomes of a request whose build just ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// It completes with the build's result.
    Complete,
    /// It runs again after this wait (zero: at once).
    Retry(Duration),
    /// It completes as EXCEPTION: the job asked to run again once too often.
    GiveUp(String),
}

impl RetryPolicy {
    /// Checks the policy against its bounds.
    pub fn check(&self) -> Result<()> {
        if !(1..=MAX_RETRY_ATTEMPTS).contains(&self.attempts) {
            return Err(EngineError::Invalid(format!(
                "retry attempts {} is outside 1..={MAX_RETRY_ATTEMPTS}",
                self.attempts
            )));
        }
        if self.backoff > self.max_backoff {
            return Err(EngineError::Invalid(format!(
                "retry backoff {:?} is longer than its maximum {:?}",
                self.backoff, self.max_backoff
            )));
        }
        Ok(())
    }

    /// Whether a result might be retried: only then does the engine count attempts.
    pub fn may_retry(&self, results: ResultCode) -> bool {
        match results {
            ResultCode::Retry => true,
            ResultCode::Exception => self.attempts > 1,
            ResultCode::Failure => self.attempts > 1 && self.on_failure,
            _ => false,
        }
    }

    /// What becomes of a request whose `attempt`th build (1 for the first) ended with
    /// `results`. `jitter` in [0, 1) picks the wait within its upper half ("equal
    /// jitter"), so that requests failing together do not come back together.
    pub fn verdict(&self, results: ResultCode, attempt: u32, jitter: f64) -> Verdict {
        let limit = match results {
            ResultCode::Retry => self.attempts.max(DEFAULT_JOB_RETRY_ATTEMPTS),
            _ if self.may_retry(results) => self.attempts,
            _ => return Verdict::Complete,
        };
        if attempt >= limit {
            return match results {
                ResultCode::Retry => Verdict::GiveUp(format!(
                    "gave up after {attempt} attempts: the job asked to run again every time"
                )),
                _ => Verdict::Complete,
            };
        }
        if results == ResultCode::Retry && self.attempts == 1 {
            return Verdict::Retry(Duration::ZERO);
        }
        Verdict::Retry(self.wait(attempt, jitter))
    }

    /// The wait after the `attempt`th build: the backoff doubled `attempt - 1` times, at
    /// most the maximum, then between half of it and all of it.
    pub fn wait(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(63);
        let full = self
            .backoff
            .checked_mul(1u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, on_failure: bool) -> RetryPolicy {
        RetryPolicy {
            attempts,
            on_failure,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn exceptions_retry_while_attempts_remain_and_failures_only_when_asked() {
        let p = policy(3, false);
        assert_eq!(
            p.verdict(ResultCode::Exception, 1, 0.0),
            Verdict::Retry(Duration::from_millis(500))
        );
        assert_eq!(
            p.verdict(ResultCode::Exception, 2, 1.0),
            Verdict::Retry(Duration::from_secs(2))
        );
        assert_eq!(p.verdict(ResultCode::Exception, 3, 0.0), Verdict::Complete);
        assert_eq!(p.verdict(ResultCode::Failure, 1, 0.0), Verdict::Complete);
        assert!(matches!(
            policy(3, true).verdict(ResultCode::Failure, 1, 0.0),
            Verdict::Retry(_)
        ));
        for done in [
            ResultCode::Success,
            ResultCode::Warnings,
            ResultCode::Skipped,
            ResultCode::Cancelled,
        ] {
            assert_eq!(
                policy(5, true).verdict(done, 1, 0.5),
                Verdict::Complete,
                "{done}"
            );
        }
        // The default retries nothing but a job's own RETRY.
        assert_eq!(
            RetryPolicy::default().verdict(ResultCode::Exception, 1, 0.0),
            Verdict::Complete
        );
    }

    #[test]
    fn a_job_asking_to_retry_forever_is_given_up_on() {
        let p = RetryPolicy::default();
        for attempt in 1..DEFAULT_JOB_RETRY_ATTEMPTS {
            // Without a policy, at once; with one, after its backoff.
            assert_eq!(
                p.verdict(ResultCode::Retry, attempt, 0.3),
                Verdict::Retry(Duration::ZERO)
            );
            assert!(matches!(
                policy(2, false).verdict(ResultCode::Retry, attempt, 0.3),
                Verdict::Retry(wait) if !wait.is_zero()
            ));
        }
        assert!(matches!(
            p.verdict(ResultCode::Retry, DEFAULT_JOB_RETRY_ATTEMPTS, 0.3),
            Verdict::GiveUp(_)
        ));
        assert!(matches!(
            policy(20, false).verdict(ResultCode::Retry, 15, 0.3),
            Verdict::Retry(_)
        ));
    }

    #[test]
    fn waits_double_up_to_the_maximum_within_the_jitter_band_at_any_attempt() {
        let p = RetryPolicy::default();
        let mut previous = Duration::ZERO;
        for attempt in 1..=200 {
            let low = p.wait(attempt, 0.0);
            let high = p.wait(attempt, 0.999_999);
            assert!(
                low <= high && high <= p.max_backoff,
                "{attempt}: {low:?} {high:?}"
            );
            assert!(high >= previous || high >= p.max_backoff.mul_f64(0.99));
            previous = high;
        }
        assert_eq!(p.wait(u32::MAX, 1.0), p.max_backoff);
        assert!(policy(0, false).check().is_err());
        assert!(policy(MAX_RETRY_ATTEMPTS + 1, false).check().is_err());
        let inverted = RetryPolicy {
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert!(inverted.check().is_err());
    }
}
