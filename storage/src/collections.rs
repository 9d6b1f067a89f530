//! The API's collection queries, as SQL both backends run: every filter, the ordering
//! and the paging run in the database, and the total is one `COUNT(*)` with the same
//! filters. The statements differ only in the function that finds a substring.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::query::{Collection, Filter, FilterValue, Op, Page, Query};
use super::rows::{BUILD_COLUMNS, REQUEST_FROM, us};
use super::{
    BuildFilter, BuildsetFilter, ClaimFilter, RequestFilter, RequestOrderField, Result,
    StorageError,
};
use kiln_model::LogQuery;

/// How a collection is read: the SELECT (up to FROM and its joins) and the column of
/// each API field.
struct Shape {
    select: String,
    id: &'static str,
    columns: &'static [(&'static str, &'static str)],
}

fn shape(collection: Collection) -> Shape {
    match collection {
        Collection::Buildsets => Shape {
            select: "SELECT bs.* FROM buildsets bs".into(),
            id: "bs.id",
            columns: &[
                ("bsid", "bs.id"),
                ("reason", "bs.reason"),
                ("external_idstring", "bs.external_idstring"),
                ("submitted_at", "bs.submitted_at"),
                ("complete", "bs.complete"),
                ("complete_at", "bs.complete_at"),
                ("results", "bs.results"),
                ("parent_buildid", "bs.parent_buildid"),
                ("parent_relationship", "bs.parent_relationship"),
                ("rebuilt_buildid", "bs.rebuilt_buildid"),
            ],
        },
        Collection::BuildRequests => Shape {
            select: REQUEST_FROM.into(),
            id: "r.id",
            columns: &[
                ("buildrequestid", "r.id"),
                ("buildsetid", "r.buildset_id"),
                ("builderid", "r.builder_id"),
                ("priority", "r.priority"),
                ("submitted_at", "r.submitted_at"),
                ("waited_for", "r.waited_for"),
                ("complete", "r.complete"),
                ("complete_at", "r.complete_at"),
                ("results", "r.results"),
                // Buildbot's rule: claimed means a claim row; unclaimed means no claim
                // and not complete. A request completed without a claim (cancelled
                // while queued) is neither, so it matches neither filter.
                (
                    "claimed",
                    "(CASE WHEN c.master_id IS NOT NULL THEN 1 WHEN r.complete = 0 THEN 0 END)",
                ),
                ("claimed_by_masterid", "c.master_id"),
            ],
        },
        Collection::Builds => Shape {
            select: format!(
                "SELECT {BUILD_COLUMNS} FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id"
            ),
            id: "b.id",
            columns: &[
                ("buildid", "b.id"),
                ("number", "b.number"),
                ("builderid", "b.builder_id"),
                ("buildrequestid", "b.buildrequest_id"),
                ("buildsetid", "r.buildset_id"),
                ("masterid", "b.master_id"),
                ("workerslot", "b.worker_slot"),
                ("started_at", "b.started_at"),
                (
                    "complete",
                    "(CASE WHEN b.complete_at IS NULL THEN 0 ELSE 1 END)",
                ),
                ("complete_at", "b.complete_at"),
                ("state_string", "b.state_string"),
                ("results", "b.results"),
            ],
        },
        Collection::Builders => Shape {
            select: "SELECT id, name, description, depends_on FROM builders".into(),
            id: "id",
            columns: &[
                ("builderid", "id"),
                ("name", "name"),
                ("description", "description"),
            ],
        },
        Collection::Masters => Shape {
            select: "SELECT id, name, active, last_active FROM masters".into(),
            id: "id",
            columns: &[
                ("masterid", "id"),
                ("name", "name"),
                ("active", "active"),
                ("last_active", "last_active"),
            ],
        },
    }
}

fn column(shape: &Shape, field: &str) -> Result<&'static str> {
    shape
        .columns
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, c)| *c)
        .ok_or_else(|| StorageError::Invalid(format!("unknown field {field:?}")))
}

fn push_value<DB: Database>(qb: &mut QueryBuilder<DB>, value: &FilterValue)
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    match value {
        FilterValue::Int(v) => qb.push_bind(*v),
        FilterValue::Text(v) => qb.push_bind(super::text::storable(v).into_owned()),
        FilterValue::Bool(v) => qb.push_bind(i64::from(*v)),
        FilterValue::Time(v) => qb.push_bind(us(*v)),
        FilterValue::Result(v) => qb.push_bind(i64::from(v.code())),
        FilterValue::Null => qb.push("NULL"),
    };
}

/// `col IN (v, ...)` over the non-null values, OR-ed with `col IS NULL` when asked.
fn push_in<DB: Database>(qb: &mut QueryBuilder<DB>, col: &str, values: &[FilterValue], negate: bool)
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let has_null = values.contains(&FilterValue::Null);
    let concrete: Vec<&FilterValue> = values.iter().filter(|v| **v != FilterValue::Null).collect();
    qb.push("(");
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

fn push_filter<DB: Database>(
    qb: &mut QueryBuilder<DB>,
    shape: &Shape,
    f: &Filter,
    contains: &str,
) -> Result<()>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let col = column(shape, &f.field)?;
    if f.values.is_empty() {
        return Err(StorageError::Invalid(format!(
            "filter on {:?} has no value",
            f.field
        )));
    }
    qb.push(" AND ");
    match f.op {
        Op::Eq | Op::In => push_in(qb, col, &f.values, false),
        Op::Ne | Op::NotIn => push_in(qb, col, &f.values, true),
        Op::Lt | Op::Le | Op::Gt | Op::Ge | Op::Contains => {
            if f.values.contains(&FilterValue::Null) {
                return Err(StorageError::Invalid(format!(
                    "{}__{} cannot compare with null",
                    f.field, f.op
                )));
            }
            qb.push("(");
            for (i, v) in f.values.iter().enumerate() {
                if i > 0 {
                    qb.push(" OR ");
                }
                if f.op == Op::Contains {
                    qb.push(contains).push("(").push(col).push(", ");
                    push_value(qb, v);
                    qb.push(") > 0");
                } else {
                    let sign = match f.op {
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
    Ok(())
}

fn push_where<DB: Database>(
    qb: &mut QueryBuilder<DB>,
    shape: &Shape,
    q: &Query,
    contains: &str,
) -> Result<()>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    qb.push(" WHERE 1 = 1");
    for f in &q.filters {
        push_filter(qb, shape, f, contains)?;
    }
    Ok(())
}

/// `LIMIT`/`OFFSET` as both backends read them (SQLite needs a LIMIT before an OFFSET).
pub(crate) fn push_limit<DB: Database>(
    qb: &mut QueryBuilder<DB>,
    limit: Option<u32>,
    offset: Option<u32>,
) where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
{
    if limit.is_some() || offset.is_some() {
        qb.push(" LIMIT ")
            .push_bind(limit.map_or(i64::MAX, i64::from));
        qb.push(" OFFSET ")
            .push_bind(i64::from(offset.unwrap_or(0)));
    }
}

/// The two statements of a collection query: the total, and the page.
pub(crate) struct Statements<DB: Database> {
    /// `SELECT COUNT(*)` over every match.
    pub count: QueryBuilder<DB>,
    /// The page of rows.
    pub select: QueryBuilder<DB>,
}

/// Builds a collection query; `contains` names the backend's substring-position
/// function (`instr`, `strpos`: both take the haystack first).
pub(crate) fn statements<DB: Database>(
    collection: Collection,
    q: &Query,
    contains: &str,
) -> Result<Statements<DB>>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let shape = shape(collection);
    let from = shape
        .select
        .split_once(" FROM ")
        .map(|(_, f)| f)
        .ok_or_else(|| StorageError::Invalid("a query without FROM".into()))?;
    let mut count = QueryBuilder::<DB>::new(format!("SELECT COUNT(*) FROM {from}"));
    push_where(&mut count, &shape, q, contains)?;
    let mut select = QueryBuilder::<DB>::new(shape.select.clone());
    push_where(&mut select, &shape, q, contains)?;
    select.push(" ORDER BY ");
    for (field, descending) in &q.order {
        select
            .push(column(&shape, field)?)
            .push(if *descending { " DESC, " } else { " ASC, " });
    }
    select.push(shape.id);
    push_limit(&mut select, q.limit, q.offset);
    Ok(Statements { count, select })
}

/// A page from the rows a backend read, decoded with one of [`super::rows`]' decoders.
pub(crate) fn page<R, T>(
    rows: &[R],
    total: i64,
    decode: impl Fn(&R) -> Result<T>,
) -> Result<Page<T>> {
    Ok(Page {
        items: rows.iter().map(decode).collect::<Result<_>>()?,
        total: u64::try_from(total).unwrap_or_default(),
    })
}

/// The statement of `Store::buildset_list`.
pub(crate) fn buildset_list<DB: Database>(filter: &BuildsetFilter) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::<DB>::new("SELECT * FROM buildsets WHERE 1 = 1");
    if let Some(complete) = filter.complete {
        qb.push(" AND complete = ").push_bind(i64::from(complete));
    }
    if let Some(parent) = filter.parent_buildid {
        qb.push(" AND parent_buildid = ").push_bind(parent.0);
    }
    if let Some(ext) = &filter.external_idstring {
        qb.push(" AND external_idstring = ")
            .push_bind(super::text::storable(ext).into_owned());
    }
    qb.push(" ORDER BY id DESC");
    push_limit(&mut qb, filter.limit, filter.offset);
    qb
}

/// The statement of `Store::request_list`.
pub(crate) fn request_list<DB: Database>(filter: &RequestFilter) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::<DB>::new(REQUEST_FROM);
    qb.push(" WHERE 1 = 1");
    if let Some(b) = filter.builder_id {
        qb.push(" AND r.builder_id = ").push_bind(b.0);
    }
    if let Some(bs) = filter.buildset_id {
        qb.push(" AND r.buildset_id = ").push_bind(bs.0);
    }
    if let Some(complete) = filter.complete {
        qb.push(" AND r.complete = ").push_bind(i64::from(complete));
    }
    match filter.claimed {
        ClaimFilter::Any => {}
        ClaimFilter::Claimed => {
            qb.push(" AND c.master_id IS NOT NULL");
        }
        ClaimFilter::Unclaimed => {
            qb.push(" AND c.master_id IS NULL AND r.complete = 0");
        }
        ClaimFilter::ClaimedBy(m) => {
            qb.push(" AND c.master_id = ").push_bind(m.0);
        }
    }
    for (column, value) in [
        ("branch", &filter.branch),
        ("repository", &filter.repository),
    ] {
        if let Some(value) = value {
            qb.push(format!(
                " AND EXISTS (SELECT 1 FROM buildset_sourcestamps bss JOIN sourcestamps s ON s.id = bss.sourcestamp_id
                   WHERE bss.buildset_id = r.buildset_id AND s.{column} = "
            ));
            qb.push_bind(super::text::storable(value).into_owned())
                .push(")");
        }
    }
    qb.push(" ORDER BY ");
    for order in &filter.order {
        let column = match order.field {
            RequestOrderField::Id => "r.id",
            RequestOrderField::Priority => "r.priority",
            RequestOrderField::SubmittedAt => "r.submitted_at",
            RequestOrderField::BuilderId => "r.builder_id",
            RequestOrderField::BuildsetId => "r.buildset_id",
            RequestOrderField::CompleteAt => "r.complete_at",
        };
        // SQLite sorts NULLs first ascending and last descending; so does this.
        qb.push(column).push(if order.descending {
            " DESC NULLS LAST, "
        } else {
            " ASC NULLS FIRST, "
        });
    }
    qb.push("r.id ASC");
    push_limit(&mut qb, filter.limit, filter.offset);
    qb
}

/// The statement of `Store::build_list`.
pub(crate) fn build_list<DB: Database>(filter: &BuildFilter) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut qb =
        QueryBuilder::<DB>::new(format!("SELECT {BUILD_COLUMNS} FROM builds b WHERE 1 = 1"));
    if let Some(b) = filter.builder_id {
        qb.push(" AND b.builder_id = ").push_bind(b.0);
    }
    if let Some(r) = filter.request_id {
        qb.push(" AND b.buildrequest_id = ").push_bind(r.0);
    }
    if let Some(bs) = filter.buildset_id {
        qb.push(" AND b.buildrequest_id IN (SELECT id FROM buildrequests WHERE buildset_id = ")
            .push_bind(bs.0)
            .push(")");
    }
    match filter.complete {
        Some(true) => {
            qb.push(" AND b.complete_at IS NOT NULL");
        }
        Some(false) => {
            qb.push(" AND b.complete_at IS NULL");
        }
        None => {}
    }
    qb.push(if filter.descending {
        " ORDER BY b.id DESC"
    } else {
        " ORDER BY b.id ASC"
    });
    push_limit(&mut qb, filter.limit, filter.offset);
    qb
}

/// The statement of `Store::log_list`.
pub(crate) fn log_list<DB: Database>(query: &LogQuery) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::<DB>::new(
        "SELECT id, build_id, at, level, message, fields FROM build_logs WHERE 1 = 1",
    );
    if let Some(b) = query.build_id {
        qb.push(" AND build_id = ").push_bind(b.0);
    }
    if let Some(level) = query.min_level {
        qb.push(" AND level >= ")
            .push_bind(i64::from(level.number()));
    }
    if let Some(since) = query.since {
        qb.push(" AND at >= ").push_bind(us(since));
    }
    if let Some(until) = query.until {
        qb.push(" AND at < ").push_bind(us(until));
    }
    if let Some(after) = query.after_id {
        qb.push(" AND id > ").push_bind(after);
    }
    qb.push(" ORDER BY id");
    push_limit(&mut qb, query.limit, None);
    qb
}
