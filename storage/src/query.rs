//! Typed collection queries: filters on the fields of one entity, ordering, paging,
//! and the total before paging. Each entity has a field enum; the backends map each
//! field onto its columns and run the whole query in SQL. The names a client uses on
//! the wire (Buildbot's `bsid`, `buildrequestid`, ...) are the HTTP edge's business.

use std::fmt;
use std::str::FromStr;

use kiln_model::{ResultCode, Timestamp};

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
    /// A time.
    Time,
    /// A result code.
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

/// A field of an entity that queries can filter and order by.
pub trait Field: Copy + Eq + fmt::Debug + Send + Sync + 'static {
    /// Every field of the entity.
    const ALL: &'static [Self];
    /// What it holds.
    fn kind(self) -> FieldType;
    /// Its name in messages (the Rust name in snake case).
    fn name(self) -> &'static str;
}

macro_rules! fields {
    ($(#[$doc:meta])* $enum:ident { $($(#[$fdoc:meta])* $variant:ident = ($name:literal, $kind:ident)),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $enum {
            $($(#[$fdoc])* $variant),*
        }

        impl Field for $enum {
            const ALL: &'static [Self] = &[$($enum::$variant),*];

            fn kind(self) -> FieldType {
                match self {
                    $($enum::$variant => FieldType::$kind),*
                }
            }

            fn name(self) -> &'static str {
                match self {
                    $($enum::$variant => $name),*
                }
            }
        }
    };
}

fields!(
    /// The fields of a buildset.
    BuildsetField {
        /// Its id.
        Id = ("id", Int),
        /// Why it was submitted.
        Reason = ("reason", Text),
        /// The submitter's identifier.
        ExternalIdstring = ("external_idstring", Text),
        /// When it was submitted.
        SubmittedAt = ("submitted_at", Time),
        /// Whether it is complete.
        Complete = ("complete", Bool),
        /// When it completed.
        CompleteAt = ("complete_at", Time),
        /// The worst of its requests' results.
        Results = ("results", Result),
        /// The build that started it.
        ParentBuildId = ("parent_buildid", Int),
        /// Its relationship to that build.
        ParentRelationship = ("parent_relationship", Text),
        /// The build it rebuilds.
        RebuiltBuildId = ("rebuilt_buildid", Int),
        /// The buildset it resubmits.
        ResubmittedFrom = ("resubmitted_from", Int),
    }
);

fields!(
    /// The fields of a build request.
    RequestField {
        /// Its id.
        Id = ("id", Int),
        /// Its buildset.
        BuildsetId = ("buildset_id", Int),
        /// Its builder.
        BuilderId = ("builder_id", Int),
        /// Its priority.
        Priority = ("priority", Int),
        /// When it was submitted.
        SubmittedAt = ("submitted_at", Time),
        /// Whether a parent waits for it.
        WaitedFor = ("waited_for", Bool),
        /// Whether it is complete.
        Complete = ("complete", Bool),
        /// When it completed.
        CompleteAt = ("complete_at", Time),
        /// Its result.
        Results = ("results", Result),
        /// Not claimable before this time (a delayed run or a retry's backoff).
        NotBefore = ("not_before", Time),
        /// Buildbot's `claimed`: true with a claim; false with none and not complete (a
        /// request completed without a claim, cancelled while queued, is neither).
        Claimed = ("claimed", Bool),
        /// The master holding its claim.
        ClaimedBy = ("claimed_by", Int),
        /// A branch of one of its buildset's sourcestamps.
        Branch = ("branch", Text),
        /// A repository of one of its buildset's sourcestamps.
        Repository = ("repository", Text),
    }
);

fields!(
    /// The fields of a build.
    BuildField {
        /// Its id.
        Id = ("id", Int),
        /// Its number on its builder.
        Number = ("number", Int),
        /// Its builder.
        BuilderId = ("builder_id", Int),
        /// The request it runs.
        RequestId = ("request_id", Int),
        /// That request's buildset.
        BuildsetId = ("buildset_id", Int),
        /// The master that ran it.
        MasterId = ("master_id", Int),
        /// Its worker slot.
        WorkerSlot = ("worker_slot", Int),
        /// When it started.
        StartedAt = ("started_at", Time),
        /// Whether it finished.
        Complete = ("complete", Bool),
        /// When it finished.
        CompleteAt = ("complete_at", Time),
        /// Its state string.
        StateString = ("state_string", Text),
        /// Its result.
        Results = ("results", Result),
    }
);

fields!(
    /// The fields of a builder.
    BuilderField {
        /// Its id.
        Id = ("id", Int),
        /// Its name.
        Name = ("name", Text),
        /// Its description.
        Description = ("description", Text),
        /// Whether it is paused.
        Paused = ("paused", Bool),
        /// Whether an active master runs it.
        Served = ("served", Bool),
    }
);

fields!(
    /// The fields of a master.
    MasterField {
        /// Its id.
        Id = ("id", Int),
        /// Its name.
        Name = ("name", Text),
        /// Whether it is alive.
        Active = ("active", Bool),
        /// Its last heartbeat.
        LastActive = ("last_active", Time),
    }
);

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
            // Buildbot's spellings, in any case.
            FieldType::Bool => match text.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(FilterValue::Bool(true)),
                "false" | "0" | "no" | "off" => Ok(FilterValue::Bool(false)),
                _ => Err(format!(
                    "{text:?} is not a boolean (true/false, yes/no, on/off, 1/0)"
                )),
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
pub struct Filter<F> {
    /// The field.
    pub field: F,
    /// The operator.
    pub op: Op,
    /// The values, at least one.
    pub values: Vec<FilterValue>,
}

/// A collection query: every filter must hold. Ordered by the given fields, then by id;
/// nulls come first in ascending order and last in descending order, on every backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Query<F> {
    /// The filters.
    pub filters: Vec<Filter<F>>,
    /// The ordering, first key first: (field, descending). By id after these.
    pub order: Vec<(F, bool)>,
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
    /// Whether to count every match (the page's `total`).
    pub count: bool,
}

impl<F> Default for Query<F> {
    fn default() -> Self {
        Query {
            filters: Vec::new(),
            order: Vec::new(),
            limit: None,
            offset: None,
            count: false,
        }
    }
}

impl<F: Field> Query<F> {
    /// Every item, by id, without a total.
    pub fn new() -> Self {
        Query::default()
    }

    /// Adds `field op value`.
    pub fn filter(mut self, field: F, op: Op, value: impl Into<FilterValue>) -> Self {
        self.filters.push(Filter {
            field,
            op,
            values: vec![value.into()],
        });
        self
    }

    /// Adds `field = value`.
    pub fn eq(self, field: F, value: impl Into<FilterValue>) -> Self {
        self.filter(field, Op::Eq, value)
    }

    /// Orders by `field`, after the orderings already given (and before the id).
    pub fn order_by(mut self, field: F, descending: bool) -> Self {
        self.order.push((field, descending));
        self
    }

    /// At most `n` items.
    pub fn limit(mut self, n: u32) -> Self {
        self.limit = Some(n);
        self
    }

    /// Skips `n` items first.
    pub fn offset(mut self, n: u32) -> Self {
        self.offset = Some(n);
        self
    }

    /// Counts every match into the page's `total`.
    pub fn counted(mut self) -> Self {
        self.count = true;
        self
    }
}

/// One page of a query's results, with the total before paging when it was asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// How many items match the filters in all, when the query asked (`count`).
    pub total: Option<u64>,
}

impl From<i64> for FilterValue {
    fn from(v: i64) -> Self {
        FilterValue::Int(v)
    }
}

impl From<bool> for FilterValue {
    fn from(v: bool) -> Self {
        FilterValue::Bool(v)
    }
}

impl From<&str> for FilterValue {
    fn from(v: &str) -> Self {
        FilterValue::Text(v.to_owned())
    }
}

impl From<String> for FilterValue {
    fn from(v: String) -> Self {
        FilterValue::Text(v)
    }
}

impl From<ResultCode> for FilterValue {
    fn from(v: ResultCode) -> Self {
        FilterValue::Result(v)
    }
}

impl From<Timestamp> for FilterValue {
    fn from(v: Timestamp) -> Self {
        FilterValue::Time(v)
    }
}

macro_rules! id_values {
    ($($id:ty),*) => {
        $(impl From<$id> for FilterValue {
            fn from(v: $id) -> Self {
                FilterValue::Int(v.0)
            }
        })*
    };
}
id_values!(
    kiln_model::BuildId,
    kiln_model::BuildsetId,
    kiln_model::BuilderId,
    kiln_model::RequestId,
    kiln_model::MasterId
);
