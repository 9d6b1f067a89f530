//! Builders in SQLite: pausing and resuming (the claim loop of this process is woken by
//! the engine; other processes on the same file find the change at their next poll).

use async_trait::async_trait;

use super::SqliteStore;
use crate::seam::BuilderWrites;
use crate::{Result, found_or};
use kiln_model::BuilderId;

#[async_trait]
impl BuilderWrites for SqliteStore {
    async fn builder_set_paused(&self, id: BuilderId, paused: bool) -> Result<()> {
        let rows = self
            .transaction(move |tx| {
                Ok(tx
                    .prepare_cached("UPDATE builders SET paused = ? WHERE id = ?")?
                    .execute((i64::from(paused), id.0))?)
            })
            .await?;
        found_or(rows as u64, "builder", id)
    }
}
