//! The parts of the seam whose SQL is the same on every backend, written once over a
//! [`Dialect`](crate::sql::Dialect): each file implements one part for every dialect.
//!
//! Architecture invariant: nothing here takes a lock, batches rows or notifies other
//! processes; what does lives in the backends.

mod builders;
mod builds;
mod buildsets;
mod locks;
mod masters;
mod outbox;

pub(crate) use outbox::REPORTER_COLUMNS;
mod output;
mod requests;
mod schedules;
#[cfg(test)]
pub(crate) use requests::QUEUE_DEPTHS_SQL;

/// Tables whose rows Kiln never deletes: a master that stops or dies is marked inactive
/// and kept, because its builds' history names it. A reference to one of them is never
/// looked up from the referenced side, so it needs no index of its own (the plan tests
/// of both backends skip them).
#[cfg(test)]
pub(crate) const NEVER_DELETED: &[&str] = &["masters"];

use crate::Result;
use crate::collections::{Shape, page, statements};
use crate::query::{Page, Query};
use crate::rows::Col;
use crate::sql::{Dialect, Sql};

/// The one row a read by id finds, decoded, or not found.
async fn one<D: Dialect, T>(
    d: &D,
    sql: Sql,
    entity: &'static str,
    id: impl ToString,
    decode: impl Fn(&D::Row) -> Result<T>,
) -> Result<T> {
    match d.read_one(sql).await? {
        Some(row) => decode(&row),
        None => Err(crate::StorageError::not_found(entity, id)),
    }
}

/// Every row a read finds, decoded.
async fn all<D: Dialect, T>(
    d: &D,
    sql: Sql,
    decode: impl Fn(&D::Row) -> Result<T>,
) -> Result<Vec<T>> {
    d.read(sql).await?.iter().map(decode).collect()
}

/// A collection query: the page, and the total when asked for.
async fn query<D: Dialect, F: Shape, T>(
    d: &D,
    q: &Query<F>,
    decode: impl Fn(&D::Row) -> Result<T>,
) -> Result<Page<T>> {
    let statements = statements(q, D::CONTAINS, D::BYTE_ORDER)?;
    let total = match statements.count {
        Some(count) => Some(
            d.read_one(count)
                .await?
                .map(|row| row.int("total"))
                .transpose()?
                .unwrap_or_default(),
        ),
        None => None,
    };
    let rows = d.read(statements.select).await?;
    page(&rows, total, decode)
}
