//! Schedules: registration, what each one fired, and reads.

use async_trait::async_trait;
use kiln_model::{BuildsetId, Schedule, Timestamp};

use super::{all, one};
use crate::rows::{micros, schedule_from_row};
use crate::seam::Schedules;
use crate::sql::{Dialect, Sql};
use crate::text::storable;
use crate::{Result, StorageError, validate};

const SCHEDULE: &str =
    "SELECT name, definition, last_fire, next_fire, last_buildset_id, fires FROM schedules";

#[async_trait]
impl<D: Dialect> Schedules for D {
    async fn schedule_register(
        &self,
        name: &str,
        definition: &str,
        next_fire: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Schedule> {
        validate::name("schedule", name)?;
        let mut sql = Sql::new(
            "INSERT INTO schedules (name, definition, last_fire, next_fire, fires, updated_at) VALUES (",
        );
        sql.bind(storable(name).into_owned())
            .push(", ")
            .bind(storable(definition).into_owned())
            .push(", ")
            .bind(micros(now))
            .push(", ")
            .bind(next_fire.map(micros))
            .push(", 0, ")
            .bind(micros(now))
            .push(
                ") ON CONFLICT (name) DO UPDATE SET definition = excluded.definition,
                   next_fire = excluded.next_fire, updated_at = excluded.updated_at
                 RETURNING name, definition, last_fire, next_fire, last_buildset_id, fires",
            );
        let rows = self.write_returning(sql).await?;
        let row = rows.first().ok_or_else(|| {
            StorageError::Invalid("registering a schedule returned nothing".into())
        })?;
        schedule_from_row(row)
    }

    async fn schedule_fired(
        &self,
        name: &str,
        tick: Timestamp,
        buildset: Option<BuildsetId>,
        next_fire: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<bool> {
        let mut sql = Sql::new("UPDATE schedules SET last_fire = ");
        sql.bind(micros(tick))
            .push(", next_fire = ")
            .bind(next_fire.map(micros))
            .push(", last_buildset_id = COALESCE(")
            .bind(buildset.map(|b| b.0))
            .push(", last_buildset_id), fires = fires + ")
            .bind(i64::from(buildset.is_some()))
            .push(", updated_at = ")
            .bind(micros(now))
            .push(" WHERE name = ")
            .bind(storable(name).into_owned())
            .push(" AND last_fire < ")
            .bind(micros(tick));
        Ok(self.write(sql).await? > 0)
    }

    async fn schedule_get(&self, name: &str) -> Result<Schedule> {
        let mut sql = Sql::new(SCHEDULE);
        sql.push(" WHERE name = ").bind(storable(name).into_owned());
        one(self, sql, "schedule", name, schedule_from_row).await
    }

    async fn schedule_list(&self) -> Result<Vec<Schedule>> {
        let mut sql = Sql::new(SCHEDULE);
        sql.push(" ORDER BY name");
        all(self, sql, schedule_from_row).await
    }
}
