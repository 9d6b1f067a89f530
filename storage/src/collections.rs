//! Collection queries as SQL both backends run: every filter, the ordering and the
//! paging run in the database, and the total is one `COUNT(*)` with the same filters.
//! Each field enum says where its fields live ([`Shape`]); the statements differ between
//! backends only in the function that finds a substring.

use super::query::{
    BuildField, BuilderField, BuildsetField, Field, Filter, FilterValue, MasterField, Op, Page,
    Query, RequestField,
};
use super::rows::{BUILD_COLUMNS, REQUEST_FROM, micros};
use super::sql::Sql;
use super::{Result, StorageError};
use kiln_model::LogQuery;

/// Where a field's value lives.
pub(crate) enum Column {
    /// An expression over the entity's row.
    Plain(&'static str),
    /// A column of the sourcestamps of the entity's buildset (`bs` is the buildset id's
    /// expression): matches when any stamp matches.
    Stamp {
        column: &'static str,
        buildset: &'static str,
    },
}

/// How an entity is read: the SELECT (up to FROM and its joins), its id, and where each
/// of its fields lives.
pub(crate) trait Shape: Field {
    /// `SELECT ... FROM ...` with the joins every query needs.
    fn select() -> String;
    /// What follows `FROM` in [`Shape::select`], for counting: by default what follows
    /// its first ` FROM ` (a shape whose select list has a subquery says it itself).
    fn from() -> Result<String> {
        Self::select()
            .split_once(" FROM ")
            .map(|(_, f)| f.to_owned())
            .ok_or_else(|| StorageError::Invalid("a query without FROM".into()))
    }
    /// The id expression: the last ordering key.
    const ID: &'static str;
    /// Where `self` lives.
    fn column(self) -> Column;
}

impl Shape for BuildsetField {
    fn select() -> String {
        format!("SELECT {} FROM buildsets bs", crate::rows::BUILDSET_COLUMNS)
    }
    const ID: &'static str = "bs.id";

    fn column(self) -> Column {
        Column::Plain(match self {
            BuildsetField::Id => "bs.id",
            BuildsetField::Reason => "bs.reason",
            BuildsetField::ExternalIdstring => "bs.external_idstring",
            BuildsetField::SubmittedAt => "bs.submitted_at",
            BuildsetField::Complete => "bs.complete",
            BuildsetField::CompleteAt => "bs.complete_at",
            BuildsetField::Results => "bs.results",
            BuildsetField::ParentBuildId => "bs.parent_buildid",
            BuildsetField::ParentRelationship => "bs.parent_relationship",
            BuildsetField::RebuiltBuildId => "bs.rebuilt_buildid",
            BuildsetField::ResubmittedFrom => "bs.resubmitted_from",
        })
    }
}

impl Shape for RequestField {
    fn select() -> String {
        REQUEST_FROM.into()
    }
    const ID: &'static str = "r.id";

    fn column(self) -> Column {
        Column::Plain(match self {
            RequestField::Id => "r.id",
            RequestField::BuildsetId => "r.buildset_id",
            RequestField::BuilderId => "r.builder_id",
            RequestField::Priority => "r.priority",
            RequestField::SubmittedAt => "r.submitted_at",
            RequestField::WaitedFor => "r.waited_for",
            RequestField::Complete => "r.complete",
            RequestField::CompleteAt => "r.complete_at",
            RequestField::Results => "r.results",
            RequestField::NotBefore => "r.not_before",
            // Buildbot's rule: claimed means a claim row; unclaimed means no claim and
            // not complete. A request completed without a claim (cancelled while
            // queued) is neither, so it matches neither filter.
            RequestField::Claimed => {
                "(CASE WHEN c.master_id IS NOT NULL THEN 1 WHEN r.complete = 0 THEN 0 END)"
            }
            RequestField::ClaimedBy => "c.master_id",
            RequestField::Branch => {
                return Column::Stamp {
                    column: "s.branch",
                    buildset: "r.buildset_id",
                };
            }
            RequestField::Repository => {
                return Column::Stamp {
                    column: "s.repository",
                    buildset: "r.buildset_id",
                };
            }
        })
    }
}

impl Shape for BuildField {
    /// Builds with their request, for the `buildset_id` field.
    fn select() -> String {
        format!(
            "SELECT {BUILD_COLUMNS} FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id"
        )
    }
    const ID: &'static str = "b.id";

    fn column(self) -> Column {
        Column::Plain(match self {
            BuildField::Id => "b.id",
            BuildField::Number => "b.number",
            BuildField::BuilderId => "b.builder_id",
            BuildField::RequestId => "b.buildrequest_id",
            BuildField::BuildsetId => "r.buildset_id",
            BuildField::MasterId => "b.master_id",
            BuildField::WorkerSlot => "b.worker_slot",
            BuildField::StartedAt => "b.started_at",
            BuildField::Complete => "(CASE WHEN b.complete_at IS NULL THEN 0 ELSE 1 END)",
            BuildField::CompleteAt => "b.complete_at",
            BuildField::StateString => "b.state_string",
            BuildField::Results => "b.results",
        })
    }
}

impl Shape for BuilderField {
    fn select() -> String {
        format!(
            "SELECT id, name, description, depends_on, paused, {} AS served FROM builders",
            crate::rows::SERVED
        )
    }
    fn from() -> Result<String> {
        Ok("builders".into())
    }
    const ID: &'static str = "id";

    fn column(self) -> Column {
        Column::Plain(match self {
            BuilderField::Id => "id",
            BuilderField::Name => "name",
            BuilderField::Description => "description",
            BuilderField::Paused => "paused",
            BuilderField::Served => crate::rows::SERVED,
        })
    }
}

impl Shape for MasterField {
    fn select() -> String {
        "SELECT id, name, active, last_active FROM masters".into()
    }
    const ID: &'static str = "id";

    fn column(self) -> Column {
        Column::Plain(match self {
            MasterField::Id => "id",
            MasterField::Name => "name",
            MasterField::Active => "active",
            MasterField::LastActive => "last_active",
        })
    }
}

fn push_value(qb: &mut Sql, value: &FilterValue) {
    match value {
        FilterValue::Int(v) => qb.bind(*v),
        FilterValue::Text(v) => qb.bind(super::text::storable(v).into_owned()),
        // A literal, not a parameter: SQLite uses a partial index (`WHERE complete =
        // 0`) only when the query's term is that same literal.
        FilterValue::Bool(v) => qb.push(if *v { "1" } else { "0" }),
        FilterValue::Time(v) => qb.bind(micros(*v)),
        FilterValue::Result(v) => qb.bind(i64::from(v.code())),
        FilterValue::Null => qb.push("NULL"),
    };
}

/// `col IN (v, ...)` over the non-null values, OR-ed with `col IS NULL` when asked.
fn push_in(qb: &mut Sql, col: &str, values: &[FilterValue], negate: bool) {
    let has_null = values.contains(&FilterValue::Null);
    let concrete: Vec<&FilterValue> = values.iter().filter(|v| **v != FilterValue::Null).collect();
    qb.push("(");
    // One value is `col = v`, not `col IN (v)`: SQLite matches a partial index's
    // `WHERE complete = 0` only against an equality.
    if let ([one], false, false) = (concrete.as_slice(), negate, has_null) {
        qb.push(col).push(" = ");
        push_value(qb, one);
        qb.push(")");
        return;
    }
    let mut first = true;
    if !concrete.is_empty() {
        qb.push(col)
            .push(if negate { " NOT IN (" } else { " IN (" });
        for (i, v) in concrete.iter().enumerate() {
            if i > 0 {
                qb.push(", ");
            }
            push_value(qb, v);
        }
        qb.push(")");
        first = false;
    }
    match (negate, has_null) {
        // "none of these values": a missing value differs from all of them, unless
        // null itself is excluded.
        (true, true) => {
            if !first {
                qb.push(" AND ");
            }
            qb.push(col).push(" IS NOT NULL");
        }
        (true, false) => {
            qb.push(" OR ").push(col).push(" IS NULL");
        }
        (false, true) => {
            if !first {
                qb.push(" OR ");
            }
            qb.push(col).push(" IS NULL");
        }
        (false, false) => {}
    }
    qb.push(")");
}

/// `col op value` for every value of the filter, OR-ed.
fn push_condition(qb: &mut Sql, col: &str, op: Op, values: &[FilterValue], contains: &str) {
    match op {
        Op::Eq | Op::In => push_in(qb, col, values, false),
        Op::Ne | Op::NotIn => push_in(qb, col, values, true),
        Op::Lt | Op::Le | Op::Gt | Op::Ge | Op::Contains => {
            qb.push("(");
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    qb.push(" OR ");
                }
                if op == Op::Contains {
                    qb.push(contains).push("(").push(col).push(", ");
                    push_value(qb, v);
                    qb.push(") > 0");
                } else {
                    let sign = match op {
                        Op::Lt => " < ",
                        Op::Le => " <= ",
                        Op::Gt => " > ",
                        _ => " >= ",
                    };
                    qb.push(col).push(sign);
                    push_value(qb, v);
                }
            }
            qb.push(")");
        }
    }
}

fn push_filter<F: Shape>(qb: &mut Sql, f: &Filter<F>, contains: &str) -> Result<()> {
    let name = f.field.name();
    if f.values.is_empty() {
        return Err(StorageError::Invalid(format!(
            "filter on {name} has no value"
        )));
    }
    if !f.field.kind().allows(f.op) {
        return Err(StorageError::Invalid(format!(
            "the {} operator does not apply to {name}",
            f.op
        )));
    }
    if matches!(f.op, Op::Lt | Op::Le | Op::Gt | Op::Ge | Op::Contains)
        && f.values.contains(&FilterValue::Null)
    {
        return Err(StorageError::Invalid(format!(
            "{name} {} cannot compare with null",
            f.op
        )));
    }
    qb.push(" AND ");
    match f.field.column() {
        Column::Plain(col) => push_condition(qb, col, f.op, &f.values, contains),
        Column::Stamp { column, buildset } => {
            // Any stamp that matches; "none of" means no stamp that matches.
            let (negate, op) = match f.op {
                Op::Ne => (true, Op::Eq),
                Op::NotIn => (true, Op::In),
                op => (false, op),
            };
            qb.push(if negate { "NOT EXISTS" } else { "EXISTS" })
                .push(
                    " (SELECT 1 FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id \
                     WHERE bss.buildset_id = ",
                )
                .push(buildset)
                .push(" AND ");
            push_condition(qb, column, op, &f.values, contains);
            qb.push(")");
        }
    }
    Ok(())
}

fn push_where<F: Shape>(qb: &mut Sql, q: &Query<F>, contains: &str) -> Result<()> {
    qb.push(" WHERE 1 = 1");
    for f in &q.filters {
        push_filter(qb, f, contains)?;
    }
    Ok(())
}

/// `LIMIT`/`OFFSET` as both backends read them (SQLite needs a LIMIT before an OFFSET).
pub(crate) fn push_limit(qb: &mut Sql, limit: Option<u32>, offset: Option<u32>) {
    if limit.is_some() || offset.is_some() {
        qb.push(" LIMIT ").bind(limit.map_or(i64::MAX, i64::from));
        qb.push(" OFFSET ").bind(i64::from(offset.unwrap_or(0)));
    }
}

/// The statements of a collection query: the total (when asked for), and the page.
pub(crate) struct Statements {
    /// `SELECT COUNT(*)` over every match.
    pub count: Option<Sql>,
    /// The page of rows.
    pub select: Sql,
}

/// Builds a collection query; `contains` names the backend's substring-position
/// function (`instr`, `strpos`: both take the haystack first).
pub(crate) fn statements<F: Shape>(
    q: &Query<F>,
    contains: &str,
    byte_order: &str,
) -> Result<Statements> {
    let select_from = F::select();
    let from = F::from()?;
    let count = if q.count {
        let mut count = Sql::new(format!("SELECT COUNT(*) AS total FROM {from}"));
        push_where(&mut count, q, contains)?;
        Some(count)
    } else {
        None
    };
    let mut select = Sql::new(select_from.clone());
    push_where(&mut select, q, contains)?;
    select.push(" ORDER BY ");
    for (field, descending) in &q.order {
        let column = match field.column() {
            Column::Plain(col) => col,
            Column::Stamp { .. } => {
                return Err(StorageError::Invalid(format!(
                    "cannot order by {}: a buildset may have several",
                    field.name()
                )));
            }
        };
        // SQLite's null order and text order, on every backend.
        select.push(column);
        if field.kind() == crate::query::FieldType::Text {
            select.push(byte_order);
        }
        select.push(if *descending {
            " DESC NULLS LAST, "
        } else {
            " ASC NULLS FIRST, "
        });
    }
    select.push(F::ID);
    push_limit(&mut select, q.limit, q.offset);
    Ok(Statements { count, select })
}

/// A page from the rows a backend read, decoded with one of [`super::rows`]' decoders.
pub(crate) fn page<R, T>(
    rows: &[R],
    total: Option<i64>,
    decode: impl Fn(&R) -> Result<T>,
) -> Result<Page<T>> {
    Ok(Page {
        items: rows.iter().map(decode).collect::<Result<_>>()?,
        total: total.map(|t| u64::try_from(t).unwrap_or_default()),
    })
}

/// The statement of `Store::log_list`.
pub(crate) fn log_list(query: &LogQuery) -> Sql {
    let mut qb =
        Sql::new("SELECT id, build_id, at, level, message, fields FROM build_logs WHERE 1 = 1");
    if let Some(b) = query.build_id {
        qb.push(" AND build_id = ").bind(b.0);
    }
    if let Some(level) = query.min_level {
        qb.push(" AND level >= ").bind(i64::from(level.number()));
    }
    if let Some(since) = query.since {
        qb.push(" AND at >= ").bind(micros(since));
    }
    if let Some(until) = query.until {
        qb.push(" AND at < ").bind(micros(until));
    }
    if let Some(after) = query.after_id {
        qb.push(" AND id > ").bind(after);
    }
    qb.push(" ORDER BY id");
    push_limit(&mut qb, query.limit, None);
    qb
}

/// Tables that grow with the work, with the aliases the queries give them: a read may
/// not walk one of these without an index.
#[cfg(test)]
pub(crate) const LARGE_TABLES: &[(&str, &str)] = &[
    ("buildsets", "bs"),
    ("buildrequests", "r"),
    ("builds", "b"),
    ("buildrequest_claims", "c"),
    ("build_logs", "build_logs"),
    ("events", "events"),
    ("buildset_properties", "p"),
    ("buildset_sourcestamps", "bss"),
];

/// One read the dashboard makes, for the plan tests.
#[cfg(test)]
pub(crate) struct DashboardRead {
    /// What the read is, for the failure message.
    pub what: &'static str,
    /// A page of a whole table in its key order, with no filter: walking the table's
    /// own B-tree from one end and stopping at the page's limit is bounded, so a plain
    /// scan in key order is what such a read should do.
    pub key_order_page: bool,
    /// The rows of one buildset: how many there are is bounded by that buildset's
    /// builders and attempts, not by the database, so sorting them is bounded too.
    pub one_buildsets_rows: bool,
    pub sql: Sql,
}

/// The reads the dashboard and the API make on every page, as each backend runs them:
/// a page of each list newest first, filtered as the API lets, and a build's log
/// followed from a record on. Both backends' plan tests check them.
#[cfg(test)]
pub(crate) fn dashboard_reads(contains: &str, byte_order: &str) -> Result<Vec<DashboardRead>> {
    use crate::query::Query;
    use kiln_model::{BuildId, LogLevel};
    fn page<F: Shape>(q: Query<F>, contains: &str, byte_order: &str) -> Result<Sql> {
        Ok(statements(&q.limit(100), contains, byte_order)?.select)
    }
    Ok(vec![
        DashboardRead {
            what: "queued requests per builder (/metrics)",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: Sql::new(crate::common::QUEUE_DEPTHS_SQL),
        },
        DashboardRead {
            what: "buildsets newest first",
            key_order_page: true,
            one_buildsets_rows: false,
            sql: page(
                Query::new().order_by(BuildsetField::Id, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "incomplete buildsets newest first",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: page(
                Query::new()
                    .filter(BuildsetField::Complete, Op::Eq, false)
                    .order_by(BuildsetField::Id, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "builds newest first",
            key_order_page: true,
            one_buildsets_rows: false,
            sql: page(
                Query::new().order_by(BuildField::Id, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "a builder's builds newest first",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: page(
                Query::new()
                    .filter(BuildField::BuilderId, Op::Eq, 1_i64)
                    .order_by(BuildField::Id, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "a buildset's builds",
            key_order_page: false,
            one_buildsets_rows: true,
            sql: page(
                Query::new().filter(BuildField::BuildsetId, Op::Eq, 1_i64),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "a buildset's requests",
            key_order_page: false,
            one_buildsets_rows: true,
            sql: page(
                Query::new().filter(RequestField::BuildsetId, Op::Eq, 1_i64),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "a builder's queue in claim order",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: page(
                Query::new()
                    .filter(RequestField::BuilderId, Op::Eq, 1_i64)
                    .filter(RequestField::Complete, Op::Eq, false)
                    .order_by(RequestField::Priority, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "a builder's requests newest first",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: page(
                Query::new()
                    .filter(RequestField::BuilderId, Op::Eq, 1_i64)
                    .order_by(RequestField::Id, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "requests newest first",
            key_order_page: true,
            one_buildsets_rows: false,
            sql: page(
                Query::new().order_by(RequestField::Id, true),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "builders by name",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: page(
                Query::new().order_by(BuilderField::Name, false),
                contains,
                byte_order,
            )?,
        },
        DashboardRead {
            what: "a build's log from a record on",
            key_order_page: false,
            one_buildsets_rows: false,
            sql: log_list(&LogQuery {
                build_id: Some(BuildId(1)),
                min_level: Some(LogLevel::Info),
                after_id: Some(10),
                limit: Some(500),
                ..LogQuery::default()
            }),
        },
    ])
}
