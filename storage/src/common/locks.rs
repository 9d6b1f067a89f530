//! Locks: definitions, what builders take, and what is held and waiting now. Taking and
//! releasing happen in the backends' claim and finish transactions.

use std::collections::BTreeMap;

use async_trait::async_trait;
use kiln_model::{BuilderId, Lock, LockUser};

use crate::rows::{Col, lock_hold_from_row};
use crate::seam::Locks;
use crate::sql::{Dialect, Sql};
use crate::text::storable;
use crate::{MAX_LOCK_CAPACITY, Result, StorageError, validate};

#[async_trait]
impl<D: Dialect> Locks for D {
    async fn lock_define(&self, name: &str, capacity: u32) -> Result<()> {
        validate::name("lock", name)?;
        if capacity == 0 || capacity > MAX_LOCK_CAPACITY {
            return Err(StorageError::Invalid(format!(
                "lock {name:?}: count {capacity} is outside 1..={MAX_LOCK_CAPACITY}"
            )));
        }
        let mut sql = Sql::new("INSERT INTO locks (name, capacity) VALUES (");
        sql.bind(storable(name).into_owned())
            .push(", ")
            .bind(capacity)
            .push(") ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity");
        self.write(sql).await?;
        Ok(())
    }

    async fn builder_set_locks(&self, id: BuilderId, locks: &[(String, u32)]) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for (name, units) in locks {
            if !seen.insert(name.as_str()) {
                return Err(StorageError::Invalid(format!(
                    "builder {id} lists lock {name:?} twice"
                )));
            }
            if *units == 0 {
                return Err(StorageError::Invalid(format!(
                    "builder {id} takes 0 units of lock {name:?}"
                )));
            }
        }
        if !locks.is_empty() {
            let mut sql = Sql::new("SELECT name, capacity FROM locks WHERE name IN ");
            sql.bind_list(locks.iter().map(|(n, _)| storable(n).into_owned()));
            let capacities: BTreeMap<String, i64> = self
                .read(sql)
                .await?
                .iter()
                .map(|r| Ok((r.text("name")?, r.int("capacity")?)))
                .collect::<Result<_>>()?;
            for (name, units) in locks {
                match capacities.get(storable(name).as_ref()) {
                    None => return Err(StorageError::not_found("lock", name)),
                    Some(capacity) if i64::from(*units) > *capacity => {
                        return Err(StorageError::Invalid(format!(
                            "builder {id} takes {units} units of lock {name:?}, which has {capacity}"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        let mut clear = Sql::new("DELETE FROM builder_locks WHERE builder_id = ");
        clear.bind(id.0);
        let mut statements = vec![clear];
        if !locks.is_empty() {
            let mut insert =
                Sql::new("INSERT INTO builder_locks (builder_id, lock_name, units) VALUES ");
            for (i, (name, units)) in locks.iter().enumerate() {
                if i > 0 {
                    insert.push(", ");
                }
                insert
                    .push("(")
                    .bind(id.0)
                    .push(", ")
                    .bind(storable(name).into_owned())
                    .push(", ")
                    .bind(*units)
                    .push(")");
            }
            statements.push(insert);
        }
        self.write_all(statements)
            .await
            .map_err(|e| e.fk_not_found("builder", id))?;
        Ok(())
    }

    async fn lock_list(&self) -> Result<Vec<Lock>> {
        let rows = self
            .read(Sql::new("SELECT name, capacity FROM locks ORDER BY name"))
            .await?;
        let mut locks: BTreeMap<String, Lock> = BTreeMap::new();
        for row in &rows {
            let name = row.text("name")?;
            locks.insert(
                name.clone(),
                Lock {
                    name,
                    capacity: row.int("capacity")?,
                    users: Vec::new(),
                    holders: Vec::new(),
                    waiting: 0,
                },
            );
        }
        let users = self
            .read(Sql::new(format!(
                "SELECT bl.lock_name, bl.builder_id, b.name, bl.units,
                        (SELECT COUNT(*) FROM (
                             SELECT 1 FROM buildrequests r
                             WHERE r.builder_id = bl.builder_id AND r.complete = 0
                               AND r.lock_wait_since IS NOT NULL
                               AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
                             LIMIT {}) w) AS waiting
                 FROM builder_locks bl JOIN builders b ON b.id = bl.builder_id
                 ORDER BY bl.lock_name, b.name",
                Lock::WAITING_COUNTED
            )))
            .await?;
        for row in &users {
            if let Some(lock) = locks.get_mut(&row.text("lock_name")?) {
                lock.users.push(LockUser {
                    builder_id: BuilderId(row.int("builder_id")?),
                    builder: row.text("name")?,
                    units: row.int("units")?,
                });
                lock.waiting = (lock.waiting + row.int("waiting")?).min(Lock::WAITING_COUNTED);
            }
        }
        let holds = self
            .read(Sql::new(
                "SELECT lock_name, build_id, master_id, units, acquired_at FROM lock_holds
                 ORDER BY lock_name, build_id",
            ))
            .await?;
        for row in &holds {
            if let Some(lock) = locks.get_mut(&row.text("lock_name")?) {
                lock.holders.push(lock_hold_from_row(row)?);
            }
        }
        Ok(locks.into_values().collect())
    }
}
