//! Masters: reads and the heartbeat.

use async_trait::async_trait;
use kiln_model::{Master, MasterId, Timestamp};

use super::{one, query};
use crate::query::{MasterField, Page, Query};
use crate::rows::{master_from_row, micros};
use crate::seam::Masters;
use crate::sql::{Dialect, Sql};
use crate::{Result, StorageError};

const MASTER: &str = "SELECT id, name, active, last_active FROM masters WHERE id = ";

#[async_trait]
impl<D: Dialect> Masters for D {
    async fn master_heartbeat(&self, id: MasterId, now: Timestamp) -> Result<()> {
        let mut sql = Sql::new("UPDATE masters SET last_active = ");
        sql.bind(micros(now))
            .push(" WHERE active = 1 AND id = ")
            .bind(id.0);
        if self.write(sql).await? == 1 {
            return Ok(());
        }
        // Not found, or no longer active.
        self.master_get(id).await?;
        Err(StorageError::MasterInactive(id))
    }

    async fn master_get(&self, id: MasterId) -> Result<Master> {
        let mut sql = Sql::new(MASTER);
        sql.bind(id.0);
        one(self, sql, "master", id, master_from_row).await
    }

    async fn master_query(&self, q: &Query<MasterField>) -> Result<Page<Master>> {
        query(self, q, master_from_row).await
    }
}
