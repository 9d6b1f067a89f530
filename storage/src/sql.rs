//! The dialect layer: SQL written once for both backends.
//!
//! [`Sql`] is a statement with its parameters, built without knowing how a backend
//! spells a placeholder (`?` or `$1`) or binds a value. A backend implements [`Dialect`]:
//! how it reads (its pool of readers) and how it writes one statement (SQLite: on its one
//! writer connection; PostgreSQL: on any pooled connection). Everything that is the same
//! SQL on both — reads by id, collection queries, single-statement writes, the reporters'
//! cursors — is written once over a `Dialect` (in `common/`); what truly differs (the
//! hot path's batch statements, locking, the outbox, notifications) stays per backend.

use async_trait::async_trait;

use crate::Result;
use crate::rows::Col;

/// A value bound to a statement.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Param {
    /// An integer (ids, times in microseconds, flags, counts).
    Int(i64),
    /// A real number.
    Float(f64),
    /// Text.
    Text(String),
    /// SQL NULL.
    Null,
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl From<i32> for Param {
    fn from(v: i32) -> Self {
        Param::Int(i64::from(v))
    }
}

impl From<u32> for Param {
    fn from(v: u32) -> Self {
        Param::Int(i64::from(v))
    }
}

impl From<f64> for Param {
    fn from(v: f64) -> Self {
        Param::Float(v)
    }
}

impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Param::Text(v.to_owned())
    }
}

impl From<String> for Param {
    fn from(v: String) -> Self {
        Param::Text(v)
    }
}

impl<T: Into<Param>> From<Option<T>> for Param {
    fn from(v: Option<T>) -> Self {
        v.map_or(Param::Null, Into::into)
    }
}

/// One piece of a statement.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Part {
    /// SQL text.
    Text(String),
    /// A placeholder for this value.
    Param(Param),
}

/// A statement with its parameters, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Sql {
    parts: Vec<Part>,
}

impl Sql {
    /// A statement starting with `text`.
    pub(crate) fn new(text: impl Into<String>) -> Sql {
        Sql {
            parts: vec![Part::Text(text.into())],
        }
    }

    /// Appends SQL text.
    pub(crate) fn push(&mut self, text: impl Into<String>) -> &mut Sql {
        self.parts.push(Part::Text(text.into()));
        self
    }

    /// Appends a placeholder for `value`.
    pub(crate) fn bind(&mut self, value: impl Into<Param>) -> &mut Sql {
        self.parts.push(Part::Param(value.into()));
        self
    }

    /// Appends `(v1, v2, ...)`: a list for `IN`. An empty list is `(NULL)`, which matches
    /// nothing.
    pub(crate) fn bind_list<T: Into<Param>>(
        &mut self,
        values: impl IntoIterator<Item = T>,
    ) -> &mut Sql {
        self.push("(");
        let mut any = false;
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(v);
            any = true;
        }
        if !any {
            self.push("NULL");
        }
        self.push(")")
    }

    /// The pieces, for a backend to turn into its own statement.
    pub(crate) fn parts(self) -> Vec<Part> {
        self.parts
    }
}

/// What a backend must do for the SQL written once: run a statement and hand back rows
/// that [`Col`] decodes.
#[async_trait]
pub(crate) trait Dialect: Send + Sync + 'static {
    /// A row of this backend.
    type Row: Col + Send + Sync;
    /// Follows a text column in `ORDER BY` so that text sorts by its bytes on every
    /// backend (SQLite's order).
    const BYTE_ORDER: &'static str;
    /// The substring-position function: `f(haystack, needle) > 0` when it contains it.
    const CONTAINS: &'static str;

    /// Runs a read, on a reader.
    async fn read(&self, sql: Sql) -> Result<Vec<Self::Row>>;
    /// Runs one write statement (it commits on its own) and says how many rows it
    /// changed.
    async fn write(&self, sql: Sql) -> Result<u64>;
    /// Runs several write statements in one transaction: all of them or none. Says how
    /// many rows each changed, in order.
    async fn write_all(&self, statements: Vec<Sql>) -> Result<Vec<u64>>;
    /// Runs one write statement with a `RETURNING` clause.
    async fn write_returning(&self, sql: Sql) -> Result<Vec<Self::Row>>;

    /// The first row of a read, if any.
    async fn read_one(&self, sql: Sql) -> Result<Option<Self::Row>> {
        Ok(self.read(sql).await?.into_iter().next())
    }
}

/// Turns [`Sql`] into a `QueryBuilder` of one sqlx backend, binding each parameter with
/// the type that backend stores it as.
macro_rules! sqlx_builder {
    ($db:ty) => {
        /// A statement of the dialect layer as this backend's query.
        pub(crate) fn builder(sql: crate::sql::Sql) -> sqlx::QueryBuilder<$db> {
            let mut qb = sqlx::QueryBuilder::<$db>::new("");
            for part in sql.parts() {
                match part {
                    crate::sql::Part::Text(text) => {
                        qb.push(text);
                    }
                    crate::sql::Part::Param(crate::sql::Param::Int(v)) => {
                        qb.push_bind(v);
                    }
                    crate::sql::Part::Param(crate::sql::Param::Float(v)) => {
                        qb.push_bind(v);
                    }
                    crate::sql::Part::Param(crate::sql::Param::Text(v)) => {
                        qb.push_bind(v);
                    }
                    // A literal, not a bound NULL: PostgreSQL types a bound value, and
                    // a NULL typed as an integer does not go into a text column.
                    crate::sql::Part::Param(crate::sql::Param::Null) => {
                        qb.push("NULL");
                    }
                }
            }
            qb
        }
    };
}
pub(crate) use sqlx_builder;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_binds_each_value_and_an_empty_list_matches_nothing() {
        let mut sql = Sql::new("SELECT 1 WHERE x IN ");
        sql.bind_list([1_i64, 2]);
        assert_eq!(sql.clone().parts().len(), 6);
        let mut empty = Sql::new("SELECT 1 WHERE x IN ");
        empty.bind_list(Vec::<i64>::new());
        assert!(
            empty
                .parts()
                .iter()
                .any(|p| *p == Part::Text("NULL".into()))
        );
    }
}
