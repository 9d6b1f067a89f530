//! Builders in PostgreSQL: pausing and resuming. Resuming notifies every master, whose
//! claim loops then find the builder's queue claimable again.

use async_trait::async_trait;

use super::{PostgresStore, listen};
use crate::seam::BuilderWrites;
use crate::{Result, StoreSignal, found_or};
use kiln_model::BuilderId;

#[async_trait]
impl BuilderWrites for PostgresStore {
    async fn builder_set_paused(&self, id: BuilderId, paused: bool) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("UPDATE builders SET paused = $1 WHERE id = $2")
            .bind(i64::from(paused))
            .bind(id.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        found_or(rows, "builder", id)?;
        if !paused {
            listen::notify(&mut tx, &[StoreSignal::Work]).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
