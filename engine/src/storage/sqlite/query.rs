//! The API's collection queries in SQLite: every filter, the ordering and the paging
//! run in SQL, and the total is one `COUNT(*)` with the same filters.

use sqlx::{QueryBuilder, Sqlite, sqlite::SqliteRow};

use super::rows::{
    BUILD_COLUMNS, REQUEST_FROM, build_from_row, buildset_from_row, master_from_row,
    request_from_row, us,
};
use super::{SqliteStore, push_limit};
use crate::model::{Build, BuildRequest, Builder, Buildset, Master};
use crate::storage::query::{Collection, Filter, FilterValue, Op, Page, Query};
use crate::storage::{Result, StorageError};

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
                ("claimed", "(c.master_id IS NOT NULL)"),
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
                ("complete", "(b.complete_at IS NOT NULL)"),
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

fn push_value(qb: &mut QueryBuilder<Sqlite>, value: &FilterValue) {
    match value {
        FilterValue::Int(v) => qb.push_bind(*v),
        FilterValue::Text(v) => qb.push_bind(v.clone()),
        FilterValue::Bool(v) => qb.push_bind(i64::from(*v)),
        FilterValue::Time(v) => qb.push_bind(us(*v)),
        FilterValue::Result(v) => qb.push_bind(i64::from(v.code())),
        FilterValue::Null => qb.push("NULL"),
    };
}

/// `col IN (v, ...)` over the non-null values, OR-ed with `col IS NULL` when asked.
fn push_in(qb: &mut QueryBuilder<Sqlite>, col: &str, values: &[FilterValue], negate: bool) {
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

fn push_filter(qb: &mut QueryBuilder<Sqlite>, shape: &Shape, f: &Filter) -> Result<()> {
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
                    qb.push("instr(").push(col).push(", ");
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

fn push_where(qb: &mut QueryBuilder<Sqlite>, shape: &Shape, q: &Query) -> Result<()> {
    qb.push(" WHERE 1 = 1");
    for f in &q.filters {
        push_filter(qb, shape, f)?;
    }
    Ok(())
}

impl SqliteStore {
    async fn run_query(&self, collection: Collection, q: &Query) -> Result<(Vec<SqliteRow>, u64)> {
        let shape = shape(collection);
        let from = shape
            .select
            .split_once(" FROM ")
            .map(|(_, f)| f)
            .ok_or_else(|| StorageError::Invalid("a query without FROM".into()))?;

        let mut count = QueryBuilder::<Sqlite>::new(format!("SELECT COUNT(*) FROM {from}"));
        push_where(&mut count, &shape, q)?;
        let total: i64 = count.build_query_scalar().fetch_one(&self.reader).await?;

        let mut qb = QueryBuilder::<Sqlite>::new(shape.select.clone());
        push_where(&mut qb, &shape, q)?;
        qb.push(" ORDER BY ");
        for (field, descending) in &q.order {
            qb.push(column(&shape, field)?)
                .push(if *descending { " DESC, " } else { " ASC, " });
        }
        qb.push(shape.id);
        push_limit(&mut qb, q.limit, q.offset);
        let rows = qb.build().fetch_all(&self.reader).await?;
        Ok((rows, u64::try_from(total).unwrap_or_default()))
    }

    pub(super) async fn query_buildsets_impl(&self, q: &Query) -> Result<Page<Buildset>> {
        let (rows, total) = self.run_query(Collection::Buildsets, q).await?;
        let items = rows.iter().map(buildset_from_row).collect::<Result<_>>()?;
        Ok(Page { items, total })
    }

    pub(super) async fn query_requests_impl(&self, q: &Query) -> Result<Page<BuildRequest>> {
        let (rows, total) = self.run_query(Collection::BuildRequests, q).await?;
        let items = rows.iter().map(request_from_row).collect::<Result<_>>()?;
        Ok(Page { items, total })
    }

    pub(super) async fn query_builds_impl(&self, q: &Query) -> Result<Page<Build>> {
        let (rows, total) = self.run_query(Collection::Builds, q).await?;
        let items = rows.iter().map(build_from_row).collect::<Result<_>>()?;
        Ok(Page { items, total })
    }

    pub(super) async fn query_builders_impl(&self, q: &Query) -> Result<Page<Builder>> {
        let (rows, total) = self.run_query(Collection::Builders, q).await?;
        let items = rows
            .iter()
            .map(super::rows::builder_from_row)
            .collect::<Result<_>>()?;
        Ok(Page { items, total })
    }

    pub(super) async fn query_masters_impl(&self, q: &Query) -> Result<Page<Master>> {
        let (rows, total) = self.run_query(Collection::Masters, q).await?;
        let items = rows.iter().map(master_from_row).collect::<Result<_>>()?;
        Ok(Page { items, total })
    }
}
