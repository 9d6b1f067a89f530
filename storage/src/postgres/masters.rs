//! Masters in PostgreSQL: registration, shutdown and expiry, each taking back the
//! master's earlier work in the same transaction.

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::{MAX_TX_ATTEMPTS, PostgresStore, listen, outbox, retryable, retrying};
use crate::rows::micros;
use crate::seam::MasterWrites;
use crate::text::storable;
use crate::{
    ExpireMasters, ExpiredMaster, RegisteredMaster, Result, StorageError, StoreSignal, validate,
};
use kiln_model::{BuildId, MasterId, RequestId, ResultCode, Timestamp};

/// Marks a master's earlier work as lost: unfinished builds end as RETRY and claims on
/// incomplete requests are released.
async fn take_back(
    tx: &mut PgConnection,
    master: MasterId,
    now: Timestamp,
    why: &str,
) -> Result<(Vec<RequestId>, Vec<BuildId>)> {
    let mut retried: Vec<i64> = sqlx::query_scalar(
        "UPDATE builds SET complete_at = $1, results = $2, state_string = $3, error = $3
         WHERE master_id = $4 AND complete_at IS NULL RETURNING id",
    )
    .bind(micros(now))
    .bind(ResultCode::Retry.code())
    .bind(why)
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    retried.sort_unstable();
    let mut released: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM buildrequest_claims c USING buildrequests r
         WHERE c.master_id = $1 AND r.id = c.request_id AND r.complete = 0
         RETURNING c.request_id",
    )
    .bind(master.0)
    .fetch_all(&mut *tx)
    .await?;
    released.sort_unstable();
    sqlx::query("DELETE FROM master_builders WHERE master_id = $1")
        .bind(master.0)
        .execute(&mut *tx)
        .await?;
    let freed = sqlx::query("DELETE FROM lock_holds WHERE master_id = $1")
        .bind(master.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    outbox::record_finished(&mut *tx, &retried).await?;
    // Its reporter leases go too, so that another master delivers at once.
    sqlx::query("UPDATE reporters SET owner = NULL, lease_until = NULL WHERE owner = $1")
        .bind(master.0)
        .execute(&mut *tx)
        .await?;
    if !released.is_empty() || freed > 0 {
        listen::notify(&mut *tx, &[StoreSignal::Work]).await?;
    }
    Ok((
        released.into_iter().map(RequestId).collect(),
        retried.into_iter().map(BuildId).collect(),
    ))
}

#[async_trait]
impl MasterWrites for PostgresStore {
    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster> {
        validate::name("master", name)?;
        let name = &*storable(name);
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO masters (name, active, last_active) VALUES ($1, 1, $2)
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
        })
    }

    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let updated = sqlx::query("UPDATE masters SET active = 0 WHERE id = $1")
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
        })
    }

    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>> {
        retrying!(async {
            let mut tx = self.pool.begin().await?;
            let stale = sqlx::query(
                "UPDATE masters SET active = 0 WHERE active = 1 AND last_active < $1 AND id != $2
                 RETURNING id, name",
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
            expired.sort_by_key(|m| m.master_id);
            Ok(expired)
        })
    }
}
