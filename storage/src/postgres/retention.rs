//! Retention in PostgreSQL: deleting a finished buildset, and one bounded batch of a
//! builder's old work, each in one transaction. One master sweeps at a time: a sweep
//! takes a transaction-scoped advisory lock without waiting, and a master that does not
//! get it sweeps nothing this time.

use async_trait::async_trait;
use sqlx::Row;

use super::{MAX_TX_ATTEMPTS, PostgresStore, retryable, retrying};
use crate::rows::{BUILD_COLUMNS, build_from_row, micros};
use crate::seam::RetentionWrites;
use crate::{Result, RetentionSweep, StorageError, Swept};
use kiln_model::{Build, BuildsetId};

/// The two keys of the advisory lock only the sweeping master holds ("KILN", "RETN").
const RETENTION_LOCK: (i32, i32) = (0x4b49_4c4e, 0x5245_544e);

#[async_trait]
impl RetentionWrites for PostgresStore {
    async fn buildset_delete(&self, id: BuildsetId) -> Result<Vec<Build>> {
        retrying!(self.delete_buildset(id))
    }

    async fn retention_sweep(&self, params: &RetentionSweep) -> Result<Swept> {
        retrying!(self.sweep(params))
    }
}

impl PostgresStore {
    async fn delete_buildset(&self, id: BuildsetId) -> Result<Vec<Build>> {
        let mut tx = self.pool.begin().await?;
        let complete: Option<i64> =
            sqlx::query_scalar("SELECT complete FROM buildsets WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        match complete {
            None => return Err(StorageError::not_found("buildset", id)),
            Some(0) => {
                return Err(StorageError::Invalid(format!(
                    "buildset {id} is not complete; cancel it before deleting it"
                )));
            }
            Some(_) => {}
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM builds b USING buildrequests r
             WHERE b.buildrequest_id = r.id AND r.buildset_id = $1
             RETURNING {BUILD_COLUMNS}"
        )))
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await?;
        let gone = rows
            .iter()
            .map(build_from_row)
            .collect::<Result<Vec<_>>>()?;
        let stamps = stamps_of(&mut tx, &[id.0]).await?;
        sqlx::query("DELETE FROM buildsets WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        prune_stamps(&mut tx, &stamps).await?;
        tx.commit().await?;
        Ok(gone)
    }

    async fn sweep(&self, p: &RetentionSweep) -> Result<Swept> {
        let mut tx = self.pool.begin().await?;
        let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
            .bind(RETENTION_LOCK.0)
            .bind(RETENTION_LOCK.1)
            .fetch_one(&mut *tx)
            .await?;
        if !mine {
            tx.rollback().await?;
            return Ok(Swept {
                busy: true,
                ..Swept::default()
            });
        }
        let keep = i64::from(p.keep_last);
        let batch = i64::from(p.batch.max(1));
        // The (keep_last + 1)th newest build and older may go, if finished before the
        // cutoff: a seek on builds (builder_id, id).
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM builds b WHERE b.id IN (
                 SELECT o.id FROM builds o
                 WHERE o.builder_id = $1 AND o.complete_at IS NOT NULL AND o.complete_at < $2
                   AND o.id <= (SELECT id FROM builds WHERE builder_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $3)
                 ORDER BY o.id LIMIT $4)
             RETURNING {BUILD_COLUMNS}"
        )))
        .bind(p.builder_id.0)
        .bind(micros(p.cutoff))
        .bind(keep)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut gone = rows
            .iter()
            .map(build_from_row)
            .collect::<Result<Vec<_>>>()?;
        gone.sort_by_key(|b| b.id);
        let buildsets: Vec<i64> = sqlx::query(
            "DELETE FROM buildrequests WHERE id IN (
                 SELECT r.id FROM buildrequests r
                 WHERE r.builder_id = $1 AND r.complete = 1 AND r.complete_at < $2
                   AND r.id <= (SELECT id FROM buildrequests WHERE builder_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $3)
                   AND NOT EXISTS (SELECT 1 FROM builds WHERE buildrequest_id = r.id)
                 ORDER BY r.id LIMIT $4)
             RETURNING buildset_id",
        )
        .bind(p.builder_id.0)
        .bind(micros(p.cutoff))
        .bind(keep)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<i64, _>("buildset_id"))
        .collect::<std::result::Result<_, _>>()?;
        let requests = buildsets.len() as u64;
        let (mut deleted, mut sourcestamps) = (0, 0);
        if !buildsets.is_empty() {
            let stamps = stamps_of(&mut tx, &buildsets).await?;
            deleted = sqlx::query(
                "DELETE FROM buildsets bs WHERE bs.id = ANY($1) AND bs.complete = 1
                   AND NOT EXISTS (SELECT 1 FROM buildrequests WHERE buildset_id = bs.id)",
            )
            .bind(&buildsets)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if deleted > 0 {
                sourcestamps = prune_stamps(&mut tx, &stamps).await?;
            }
        }
        tx.commit().await?;
        Ok(Swept {
            builds: gone,
            requests,
            buildsets: deleted,
            sourcestamps,
            busy: false,
        })
    }
}

/// The source stamps the buildsets `ids` name.
async fn stamps_of(tx: &mut sqlx::PgConnection, ids: &[i64]) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT sourcestamp_id FROM buildset_sourcestamps WHERE buildset_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?)
}

/// Deletes those of `stamps` no buildset names any more.
///
/// A submit links a stamp only after locking its row (its insert updates the stamp
/// when it exists), so the stamps are locked first, skipping those a submit holds, and
/// checked for links by a second statement, whose snapshot is taken after the locks:
/// every link to a locked stamp has committed by then and is seen, and no submit can
/// link one until this transaction ends (it would find the row gone and insert the
/// stamp anew).
async fn prune_stamps(tx: &mut sqlx::PgConnection, stamps: &[i64]) -> Result<u64> {
    if stamps.is_empty() {
        return Ok(0);
    }
    let locked: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM sourcestamps WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
    )
    .bind(stamps)
    .fetch_all(&mut *tx)
    .await?;
    if locked.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(
        "DELETE FROM sourcestamps s WHERE s.id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM buildset_sourcestamps WHERE sourcestamp_id = s.id)",
    )
    .bind(&locked)
    .execute(&mut *tx)
    .await?
    .rows_affected())
}
