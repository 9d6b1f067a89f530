//! Result codes and the "worst of" ranking that combines them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The outcome of a build, a build request or a buildset, numbered as in Buildbot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResultCode {
    /// The work succeeded.
    Success,
    /// The work succeeded, with something worth a look.
    Warnings,
    /// The work failed.
    Failure,
    /// The work was not needed and did not run.
    Skipped,
    /// Something went wrong outside the work's own logic (a crash, a trap, a lost engine).
    Exception,
    /// The work should run again; a build ending so puts its request back in the queue.
    Retry,
    /// Somebody cancelled the work.
    Cancelled,
}

impl ResultCode {
    /// Every result code, in numeric order.
    pub const ALL: [ResultCode; 7] = [
        ResultCode::Success,
        ResultCode::Warnings,
        ResultCode::Failure,
        ResultCode::Skipped,
        ResultCode::Exception,
        ResultCode::Retry,
        ResultCode::Cancelled,
    ];

    /// The stable number stored in databases and shown by Buildbot-compatible APIs.
    pub fn code(self) -> i32 {
        match self {
            ResultCode::Success => 0,
            ResultCode::Warnings => 1,
            ResultCode::Failure => 2,
            ResultCode::Skipped => 3,
            ResultCode::Exception => 4,
            ResultCode::Retry => 5,
            ResultCode::Cancelled => 6,
        }
    }

    /// The result code with the given number, if there is one.
    pub fn from_code(code: i64) -> Option<ResultCode> {
        ResultCode::ALL
            .into_iter()
            .find(|r| i64::from(r.code()) == code)
    }

    /// How bad a result is: CANCELLED > RETRY > EXCEPTION > FAILURE > WARNINGS > SUCCESS > SKIPPED.
    pub fn severity(self) -> u8 {
        match self {
            ResultCode::Skipped => 0,
            ResultCode::Success => 1,
            ResultCode::Warnings => 2,
            ResultCode::Failure => 3,
            ResultCode::Exception => 4,
            ResultCode::Retry => 5,
            ResultCode::Cancelled => 6,
        }
    }

    /// The worse of two results.
    pub fn worst(self, other: ResultCode) -> ResultCode {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }

    /// The worst of several results, or `None` when there are none.
    pub fn worst_of(results: impl IntoIterator<Item = ResultCode>) -> Option<ResultCode> {
        results.into_iter().reduce(ResultCode::worst)
    }

    /// Whether the work counts as successful for "latest successful build": SUCCESS or
    /// WARNINGS. SKIPPED never counts.
    pub fn is_successful(self) -> bool {
        matches!(self, ResultCode::Success | ResultCode::Warnings)
    }

    /// The upper-case name, as Buildbot prints it.
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

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no result code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown result {0:?}: expected one of SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY, CANCELLED or 0-6"
)]
pub struct UnknownResult(pub String);

impl FromStr for ResultCode {
    type Err = UnknownResult;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse::<i64>() {
            return ResultCode::from_code(n).ok_or_else(|| UnknownResult(s.to_owned()));
        }
        ResultCode::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownResult(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::ResultCode::*;
    use super::*;

    #[test]
    fn worst_ranks_cancelled_above_everything_and_skipped_below_everything() {
        let order = [
            Skipped, Success, Warnings, Failure, Exception, Retry, Cancelled,
        ];
        for (i, a) in order.iter().enumerate() {
            for b in &order[i..] {
                assert_eq!(a.worst(*b), *b, "{a} vs {b}");
                assert_eq!(b.worst(*a), *b, "{b} vs {a}");
            }
        }
    }

    #[test]
    fn worst_of_nothing_is_none() {
        assert_eq!(ResultCode::worst_of([]), None);
        assert_eq!(ResultCode::worst_of([Success, Skipped]), Some(Success));
    }

    #[test]
    fn codes_round_trip_through_numbers_and_names() {
        for r in ResultCode::ALL {
            assert_eq!(ResultCode::from_code(i64::from(r.code())), Some(r));
            assert_eq!(r.name().parse::<ResultCode>(), Ok(r));
            assert_eq!(r.code().to_string().parse::<ResultCode>(), Ok(r));
        }
        assert!("BROKEN".parse::<ResultCode>().is_err());
        assert!("7".parse::<ResultCode>().is_err());
    }
}
