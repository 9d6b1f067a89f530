//! Masters in SQLite: registration, shutdown and expiry, each taking back the master's
//! earlier work in the same transaction.

use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::{SqliteStore, outbox};
use crate::rows::micros;
use crate::seam::MasterWrites;
use crate::text::storable;
use crate::{ExpireMasters, ExpiredMaster, RegisteredMaster, Result, StorageError, validate};
use kiln_model::{BuildId, MasterId, RequestId, ResultCode, Timestamp};

/// Marks a master's earlier work as lost: unfinished builds end as RETRY and claims on
/// incomplete requests are released.
fn take_back(
    tx: &Connection,
    master: MasterId,
    now: Timestamp,
    why: &str,
) -> Result<(Vec<RequestId>, Vec<BuildId>)> {
    let retried = tx
        .prepare_cached(
            "UPDATE builds SET complete_at = ?, results = ?, state_string = ?, error = ?
             WHERE master_id = ? AND complete_at IS NULL RETURNING id",
        )?
        .query_map(
            params![micros(now), ResultCode::Retry.code(), why, why, master.0],
            |r| r.get::<_, i64>(0),
        )?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    let released = tx
        .prepare_cached(
            "DELETE FROM buildrequest_claims
             WHERE master_id = ? AND request_id IN (SELECT id FROM buildrequests WHERE complete = 0)
             RETURNING request_id",
        )?
        .query_map([master.0], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    tx.prepare_cached("DELETE FROM lock_holds WHERE master_id = ?")?
        .execute([master.0])?;
    tx.prepare_cached("DELETE FROM master_builders WHERE master_id = ?")?
        .execute([master.0])?;
    outbox::record_finished(tx, &retried)?;
    // Its reporter leases go too, so that another master delivers at once.
    tx.prepare_cached("UPDATE reporters SET owner = NULL, lease_until = NULL WHERE owner = ?")?
        .execute([master.0])?;
    let mut released: Vec<RequestId> = released.into_iter().map(RequestId).collect();
    released.sort();
    let mut retried: Vec<BuildId> = retried.into_iter().map(BuildId).collect();
    retried.sort();
    Ok((released, retried))
}

#[async_trait]
impl MasterWrites for SqliteStore {
    async fn master_register(&self, name: &str, now: Timestamp) -> Result<RegisteredMaster> {
        validate::name("master", name)?;
        let name = storable(name).into_owned();
        self.transaction(move |tx| {
            let id: i64 = tx
                .prepare_cached(
                    "INSERT INTO masters (name, active, last_active) VALUES (?, 1, ?)
                     ON CONFLICT (name) DO UPDATE SET active = 1, last_active = excluded.last_active
                     RETURNING id",
                )?
                .query_row(params![name, micros(now)], |r| r.get(0))?;
            let (released, retried_builds) = take_back(
                tx,
                MasterId(id),
                now,
                "the master restarted while this build ran",
            )?;
            Ok(RegisteredMaster {
                master_id: MasterId(id),
                released,
                retried_builds,
            })
        })
        .await
    }

    async fn master_deactivate(&self, id: MasterId) -> Result<Vec<RequestId>> {
        self.transaction(move |tx| {
            let updated = tx
                .prepare_cached("UPDATE masters SET active = 0 WHERE id = ?")?
                .execute([id.0])?;
            if updated == 0 {
                return Err(StorageError::not_found("master", id));
            }
            let (released, _) = take_back(
                tx,
                id,
                kiln_model::now(),
                "the master shut down while this build ran",
            )?;
            Ok(released)
        })
        .await
    }

    async fn master_expire_stale(&self, params: &ExpireMasters) -> Result<Vec<ExpiredMaster>> {
        let params = params.clone();
        self.transaction(move |tx| {
            let stale = tx
                .prepare_cached(
                    "UPDATE masters SET active = 0
                     WHERE active = 1 AND last_active < ? AND id != ? RETURNING id, name",
                )?
                .query_map(params![micros(params.silent_since), params.by.0], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut expired = Vec::with_capacity(stale.len());
            for (id, name) in stale {
                let master_id = MasterId(id);
                let why = format!("master {name} stopped heartbeating and was expired");
                let (released, retried_builds) = take_back(tx, master_id, params.now, &why)?;
                expired.push(ExpiredMaster {
                    master_id,
                    name,
                    released,
                    retried_builds,
                });
            }
            Ok(expired)
        })
        .await
    }
}
