//! The reporters' outbox: reporters, their leases, and the reports they read.

use async_trait::async_trait;
use kiln_model::{MasterId, Report, ReporterState, Timestamp};

use super::{all, one};
use crate::rows::{micros, report_from_row, reporter_from_row};
use crate::seam::Outbox;
use crate::sql::{Dialect, Sql};
use crate::text::storable;
use crate::{Result, StorageError};

/// A reporter's row, with the reports past its cursor counted (the outbox holds only
/// reports some reporter still has to deal with, so the count is bounded by its size).
pub(crate) const REPORTER_COLUMNS: &str =
    "name, cursor, owner, lease_until, attempts, last_error, delivered, dropped,
     (SELECT COUNT(*) FROM events e WHERE e.seq > reporters.cursor) AS pending";

/// `SELECT <a reporter's columns> FROM reporters `.
fn reporters() -> Sql {
    Sql::new(format!("SELECT {REPORTER_COLUMNS} FROM reporters "))
}

#[async_trait]
impl<D: Dialect> Outbox for D {
    async fn reporter_get(&self, name: &str) -> Result<ReporterState> {
        let mut sql = reporters();
        sql.push("WHERE name = ").bind(storable(name).into_owned());
        one(self, sql, "reporter", name, reporter_from_row).await
    }

    async fn reporter_list(&self) -> Result<Vec<ReporterState>> {
        let mut sql = reporters();
        sql.push(format!("ORDER BY name{}", D::BYTE_ORDER));
        all(self, sql, reporter_from_row).await
    }

    async fn reporter_remove(&self, name: &str) -> Result<()> {
        let mut sql = Sql::new("DELETE FROM reporters WHERE name = ");
        sql.bind(storable(name).into_owned());
        if self.write(sql).await? == 0 {
            return Err(StorageError::not_found("reporter", name));
        }
        Ok(())
    }

    async fn reporter_lease(
        &self,
        name: &str,
        master: MasterId,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<ReporterState>> {
        let mut sql = Sql::new("UPDATE reporters SET owner = ");
        sql.bind(master.0)
            .push(", lease_until = ")
            .bind(micros(until))
            .push(" WHERE name = ")
            .bind(storable(name).into_owned())
            .push(" AND (owner IS NULL OR owner = ")
            .bind(master.0)
            .push(" OR lease_until IS NULL OR lease_until < ")
            .bind(micros(now))
            .push(format!(") RETURNING {REPORTER_COLUMNS}"));
        match self.write_returning(sql).await?.first() {
            Some(row) => Ok(Some(reporter_from_row(row)?)),
            None => {
                // Tell "held by another" from "no such reporter".
                self.reporter_get(name).await?;
                Ok(None)
            }
        }
    }

    async fn outbox_read(&self, after: i64, limit: u32) -> Result<Vec<Report>> {
        let mut sql = Sql::new(
            "SELECT seq, kind, buildset_id, build_id, builder, results, at, payload FROM events WHERE seq > ",
        );
        sql.bind(after)
            .push(" ORDER BY seq LIMIT ")
            .bind(i64::from(limit));
        all(self, sql, report_from_row).await
    }

    async fn outbox_prune(&self) -> Result<u64> {
        self.write(Sql::new(
            "DELETE FROM events
             WHERE seq <= COALESCE((SELECT MIN(cursor) FROM reporters), (SELECT MAX(seq) FROM events))",
        ))
        .await
    }
}
