//! Generic collection queries for the HTTP API (Buildbot's data API): filters on named
//! fields, ordering, paging, and the total before paging. The field names and types are
//! defined here once; each backend maps them onto its columns and runs the whole query
//! in SQL.

use std::fmt;
use std::str::FromStr;

use kiln_model::{ResultCode, Timestamp};

/// A collection the API can query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Collection {
    /// Buildsets.
    Buildsets,
    /// Build requests.
    BuildRequests,
    /// Builds.
    Builds,
    /// Builders.
    Builders,
    /// Masters.
    Masters,
}

/// What kind of value a field holds, which decides how filter values are read and which
/// operators apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// A whole number (ids, numbers, priorities).
    Int,
    /// Text.
    Text,
    /// true or false.
    Bool,
    /// A time: seconds since the Unix epoch, or RFC 3339.
    Time,
    /// A result code: its number (0..6) or its name (SUCCESS, ...).
    Result,
}

impl FieldType {
    /// Whether `op` applies to this type.
    pub fn allows(self, op: Op) -> bool {
        match op {
            Op::Eq | Op::Ne | Op::In | Op::NotIn => true,
            Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                matches!(self, FieldType::Int | FieldType::Time | FieldType::Result)
            }
            Op::Contains => self == FieldType::Text,
        }
    }
}

impl Collection {
    /// The filterable and orderable fields of each collection, with their types.
    pub fn fields(self) -> &'static [(&'static str, FieldType)] {
        use FieldType::*;
        match self {
            Collection::Buildsets => &[
                ("bsid", Int),
                ("reason", Text),
                ("external_idstring", Text),
                ("submitted_at", Time),
                ("complete", Bool),
                ("complete_at", Time),
                ("results", Result),
                ("parent_buildid", Int),
                ("parent_relationship", Text),
                ("rebuilt_buildid", Int),
            ],
            Collection::BuildRequests => &[
                ("buildrequestid", Int),
                ("buildsetid", Int),
                ("builderid", Int),
                ("priority", Int),
                ("submitted_at", Time),
                ("waited_for", Bool),
                ("complete", Bool),
                ("complete_at", Time),
                ("results", Result),
                ("claimed", Bool),
                ("claimed_by_masterid", Int),
            ],
            Collection::Builds => &[
                ("buildid", Int),
                ("number", Int),
                ("builderid", Int),
                ("buildrequestid", Int),
                ("buildsetid", Int),
                ("masterid", Int),
                ("workerslot", Int),
                ("started_at", Time),
                ("complete", Bool),
                ("complete_at", Time),
                ("state_string", Text),
                ("results", Result),
            ],
            Collection::Builders => &[("builderid", Int), ("name", Text), ("description", Text)],
            Collection::Masters => &[
                ("masterid", Int),
                ("name", Text),
                ("active", Bool),
                ("last_active", Time),
            ],
        }
    }

    /// The type of a field, if the collection has it.
    pub fn field(self, name: &str) -> Option<FieldType> {
        self.fields()
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }

    /// The collection's name in the API (`buildsets`, `buildrequests`, ...).
    pub fn plural(self) -> &'static str {
        match self {
            Collection::Buildsets => "buildsets",
            Collection::BuildRequests => "buildrequests",
            Collection::Builds => "builds",
            Collection::Builders => "builders",
            Collection::Masters => "masters",
        }
    }
}

/// A filter operator (Buildbot's `field__op=value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Equal (`field=v` or `field__eq=v`).
    Eq,
    /// Not equal.
    Ne,
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
    /// Text containing the value.
    Contains,
    /// Any of the values.
    In,
    /// None of the values.
    NotIn,
}

impl Op {
    /// Every operator, as spelled in a query string.
    pub const ALL: [(&'static str, Op); 9] = [
        ("eq", Op::Eq),
        ("ne", Op::Ne),
        ("lt", Op::Lt),
        ("le", Op::Le),
        ("gt", Op::Gt),
        ("ge", Op::Ge),
        ("contains", Op::Contains),
        ("in", Op::In),
        ("notin", Op::NotIn),
    ];
}

/// An operator name that is not one of [`Op::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown operator {0:?} (known: eq, ne, lt, le, gt, ge, contains, in, notin)")]
pub struct UnknownOp(pub String);

impl FromStr for Op {
    type Err = UnknownOp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, op)| *op)
            .ok_or_else(|| UnknownOp(s.to_owned()))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Op::ALL
            .iter()
            .find(|(_, op)| op == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// A typed filter value.
#[derive(Clone, Debug, PartialEq)]
pub enum FilterValue {
    /// For Int fields.
    Int(i64),
    /// For Text fields.
    Text(String),
    /// For Bool fields.
    Bool(bool),
    /// For Time fields.
    Time(Timestamp),
    /// For Result fields.
    Result(ResultCode),
    /// "No value" (`field=null`): matches absent values.
    Null,
}

impl FilterValue {
    /// Reads a query-string value as a value of `ty`.
    pub fn parse(ty: FieldType, text: &str) -> Result<FilterValue, String> {
        if text == "null" {
            return Ok(FilterValue::Null);
        }
        match ty {
            FieldType::Int => text
                .parse()
                .map(FilterValue::Int)
                .map_err(|_| format!("{text:?} is not a whole number")),
            // No stored text holds a NUL (see `storage::text`), so a filter with one
            // could only ever match by accident: refused, as a client's NUL is anywhere.
            FieldType::Text if text.contains('\0') => {
                Err("contains a NUL character, which Kiln does not store".into())
            }
            FieldType::Text => Ok(FilterValue::Text(text.to_owned())),
            FieldType::Bool => match text {
                "true" | "1" | "yes" => Ok(FilterValue::Bool(true)),
                "false" | "0" | "no" => Ok(FilterValue::Bool(false)),
                _ => Err(format!("{text:?} is not true or false")),
            },
            FieldType::Time => {
                if let Ok(secs) = text.parse::<f64>() {
                    let micros = (secs * 1e6).round();
                    if micros.is_finite()
                        && micros.abs() < 1e17
                        && let Some(t) = chrono::DateTime::from_timestamp_micros(micros as i64)
                    {
                        return Ok(FilterValue::Time(t));
                    }
                    return Err(format!("{text:?} is out of range for a time"));
                }
                chrono::DateTime::parse_from_rfc3339(text)
                    .map(|t| FilterValue::Time(t.with_timezone(&chrono::Utc)))
                    .map_err(|_| {
                        format!("{text:?} is not a time (seconds since the epoch, or RFC 3339)")
                    })
            }
            FieldType::Result => {
                if let Ok(n) = text.parse::<i32>() {
                    return ResultCode::from_code(i64::from(n))
                        .map(FilterValue::Result)
                        .ok_or_else(|| format!("{text:?} is not a result code (0..6)"));
                }
                text.parse::<ResultCode>()
                    .map(FilterValue::Result)
                    .map_err(|_| format!("{text:?} is not a result (SUCCESS, ..., or 0..6)"))
            }
        }
    }
}

/// One filter: `field op values`. Several values mean "any of" (for `ne` and `notin`:
/// "none of").
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    /// The field's name, one of [`Collection::fields`].
    pub field: String,
    /// The operator.
    pub op: Op,
    /// The values, at least one.
    pub values: Vec<FilterValue>,
}

/// A collection query: every filter must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Query {
    /// The filters.
    pub filters: Vec<Filter>,
    /// The ordering, first key first: (field, descending). By id when empty.
    pub order: Vec<(String, bool)>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

/// One page of a query's results, with the total before paging.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// How many items match the filters in all.
    pub total: u64,
}
