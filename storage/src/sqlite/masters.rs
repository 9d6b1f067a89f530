//! Masters in SQLite: registration, shutdown and expiry, each taking back the master's
//! earlier work in the same transaction.

use async_trait::async_trait;
use sqlx::{Connection, Row, SqliteConnection};

use super::{SqliteStore, outbox};
use crate::rows::{json_ids, micros};
use crate::seam::MasterWrites;
use crate::text::storable;
use crate::{ExpireMasters, ExpiredMaster, RegisteredMaster, Result, StorageError, validate};
use kiln_model::{BuildId, MasterId, RequestId, ResultCode, Timestamp};

/// Marks a master's earlier work as lost: unfinished builds end as RETRY and claims on
/// incomplete requests are released.
async fn take_back(
    tx: &mut SqliteConnection,
    master: MasterId,
    now: Timestamp,
    why: &str,
) -> Result<(Vec<RequestId>, Vec<BuildId>)> {
    let retried: Vec<i64> = sqlx::query_scalar(
        "UPDATE builds SET complete_at = ?, results = ?, state_string = ?, error = ?
         WHERE master_id = ? AND complete_at IS NULL RETURNING id",
    )
    .bind(micros(now))
    .bind(ResultCode::Retry.code())
    .bind(why)
    .bind(why)
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    let released: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM buildrequest_claims
         WHERE master_id = ? AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)
         RETURNING request_id",
    )
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    outbox::record_finished(&mut *tx, &json_ids(retried.iter().copied())).await?;
    // Its reporter leases go too, so that another master delivers at once.
    sqlx::query("UPDATE reporters SET owner = NULL, lease_until = NULL WHERE owner = ?")
        .bind(master.0)
        .execute(&mut *tx)
        .await?;
    let mut released: Vec<RequestId> = released.into_iter().map(RequestId).collect();
    released.sort();
    let mut retried: Vec<BuildId> = retried.into_iter().map(BuildId).collect();
    retried.sort();
    Ok((released, retried))
}

/// Finds which of a JSON array of buildsets have all their requests complete, with the
/// worst of their results, as one JSON array of `[id, results]`. The ranking is generated

#[async_trait]
impl MasterWrites for SqliteStore {
    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster> {
        validate::name("master", name)?;
        let name = &*storable(name);
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO masters (name, active, last_active) VALUES (?, 1, ?)
             ON CONFLICT (name) DO UPDATE SET active = 1, last_active = excluded.last_active
             RETURNING id",
        )
        .bind(name)
        .bind(micros(now))
        .fetch_one(&mut *tx)
        .await?;
        let (released, retried_builds) = take_back(
            &mut tx,
            MasterId(id),
            now,
            "the master restarted while this build ran",
        )
        .await?;
        tx.commit().await?;
        Ok(RegisteredMaster {
            master_id: MasterId(id),
            released,
            retried_builds,
        })
    }

    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query("UPDATE masters SET active = 0 WHERE id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(StorageError::not_found("master", id));
        }
        let (released, _) = take_back(
            &mut tx,
            id,
            kiln_model::now(),
            "the master shut down while this build ran",
        )
        .await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let stale = sqlx::query(
            "UPDATE masters SET active = 0 WHERE active = 1 AND last_active < ? AND id != ? RETURNING id, name",
        )
        .bind(micros(params.silent_since))
        .bind(params.by.0)
        .fetch_all(&mut *tx)
        .await?;
        let mut expired = Vec::with_capacity(stale.len());
        for row in stale {
            let master_id = MasterId(row.try_get("id")?);
            let name: String = row.try_get("name")?;
            let why = format!("master {name} stopped heartbeating and was expired");
            let (released, retried_builds) =
                take_back(&mut tx, master_id, params.now, &why).await?;
            expired.push(ExpiredMaster {
                master_id,
                name,
                released,
                retried_builds,
            });
        }
        tx.commit().await?;
        Ok(expired)
    }
}
