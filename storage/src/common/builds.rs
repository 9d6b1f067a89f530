//! Builds: reads, what a running build writes of itself, and deletion.

use async_trait::async_trait;
use kiln_model::{Artifact, Build, BuildId, BuilderId, Properties, Property, ResultCode};

use super::{all, one, query};
use crate::query::{BuildField, Page, Query};
use crate::rows::{BUILD_COLUMNS, Col, build_from_row, properties_from_rows};
use crate::seam::Builds;
use crate::sql::{Dialect, Sql};
use crate::text::storable;
use crate::{Result, StorageError, found_or, validate};

/// `SELECT <a build's columns> FROM builds b `.
fn builds() -> Sql {
    Sql::new(format!("SELECT {BUILD_COLUMNS} FROM builds b "))
}

#[async_trait]
impl<D: Dialect> Builds for D {
    async fn build_get(&self, id: BuildId) -> Result<Build> {
        let mut sql = builds();
        sql.push("WHERE b.id = ").bind(id.0);
        one(self, sql, "build", id, build_from_row).await
    }

    async fn build_get_by_number(&self, builder: BuilderId, number: i64) -> Result<Build> {
        let mut sql = builds();
        sql.push("WHERE b.builder_id = ")
            .bind(builder.0)
            .push(" AND b.number = ")
            .bind(number);
        let what = format!("#{number} of builder {builder}");
        one(self, sql, "build", what, build_from_row).await
    }

    async fn build_query(&self, q: &Query<BuildField>) -> Result<Page<Build>> {
        query(self, q, build_from_row).await
    }

    async fn build_set_state(&self, id: BuildId, state: &str) -> Result<()> {
        let mut sql = Sql::new("UPDATE builds SET state_string = ");
        sql.bind(storable(state).into_owned())
            .push(" WHERE id = ")
            .bind(id.0);
        found_or(self.write(sql).await?, "build", id)
    }

    async fn build_add_locks_duration(&self, id: BuildId, seconds: f64) -> Result<()> {
        validate::locks_duration(seconds)?;
        let mut sql = Sql::new("UPDATE builds SET locks_duration_s = locks_duration_s + ");
        sql.bind(seconds).push(" WHERE id = ").bind(id.0);
        found_or(self.write(sql).await?, "build", id)
    }

    async fn build_previous_successful(&self, id: BuildId) -> Result<Option<Build>> {
        let build = self.build_get(id).await?;
        let mut sql = Sql::new(
            "WITH target AS (
                 SELECT bss.sourcestamp_id AS ss FROM buildrequests r
                 JOIN buildset_sourcestamps bss ON bss.buildset_id = r.buildset_id WHERE r.id = ",
        );
        sql.bind(build.request_id.0).push(format!(
            ")
             SELECT {BUILD_COLUMNS} FROM builds b JOIN buildrequests r ON r.id = b.buildrequest_id
             WHERE NOT EXISTS (SELECT 1 FROM buildset_sourcestamps x
                               WHERE x.buildset_id = r.buildset_id AND x.sourcestamp_id NOT IN (SELECT ss FROM target))
               AND NOT EXISTS (SELECT 1 FROM target t
                               WHERE t.ss NOT IN (SELECT y.sourcestamp_id FROM buildset_sourcestamps y
                                                  WHERE y.buildset_id = r.buildset_id))
               AND b.builder_id = "
        ));
        sql.bind(build.builder_id.0)
            .push(" AND b.number < ")
            .bind(build.number)
            .push(" AND b.results = ")
            .bind(i64::from(ResultCode::Success.code()))
            .push(" ORDER BY b.number DESC LIMIT 1");
        self.read_one(sql)
            .await?
            .map(|row| build_from_row(&row))
            .transpose()
    }

    async fn build_latest_successful(&self, builder: BuilderId) -> Result<Option<Build>> {
        self.build_latest_with(builder, &[ResultCode::Success, ResultCode::Warnings])
            .await
    }

    async fn build_latest_with(
        &self,
        builder: BuilderId,
        results: &[ResultCode],
    ) -> Result<Option<Build>> {
        let mut sql = builds();
        sql.push("WHERE b.complete_at IS NOT NULL AND b.builder_id = ")
            .bind(builder.0)
            .push(" AND b.results IN ")
            .bind_list(results.iter().map(|r| i64::from(r.code())))
            .push(" ORDER BY b.complete_at DESC, b.id DESC LIMIT 1");
        self.read_one(sql)
            .await?
            .map(|row| build_from_row(&row))
            .transpose()
    }

    async fn build_delete(&self, id: BuildId) -> Result<()> {
        let build = self.build_get(id).await?;
        if !build.is_complete() {
            return Err(StorageError::Invalid(format!(
                "build {id} is still running; stop it before deleting it"
            )));
        }
        let mut sql = Sql::new("DELETE FROM builds WHERE id = ");
        sql.bind(id.0);
        self.write(sql).await?;
        Ok(())
    }

    async fn build_set_property(&self, id: BuildId, name: &str, property: &Property) -> Result<()> {
        validate::name("property", name)?;
        let mut sql =
            Sql::new("INSERT INTO build_properties (build_id, name, value, source) VALUES (");
        sql.bind(id.0)
            .push(", ")
            .bind(storable(name).into_owned())
            .push(", ")
            .bind(property.value.to_string())
            .push(", ")
            .bind(storable(&property.source).into_owned())
            .push(
                ") ON CONFLICT (build_id, name) DO UPDATE SET value = excluded.value, source = excluded.source",
            );
        self.write(sql)
            .await
            .map_err(|e| e.fk_not_found("build", id))?;
        Ok(())
    }

    async fn build_properties(&self, id: BuildId) -> Result<Properties> {
        self.build_get(id).await?;
        let mut sql =
            Sql::new("SELECT name, value, source FROM build_properties WHERE build_id = ");
        sql.bind(id.0);
        properties_from_rows(&self.read(sql).await?)
    }

    async fn build_artifacts(&self, id: BuildId) -> Result<Vec<Artifact>> {
        self.build_get(id).await?;
        let mut sql =
            Sql::new("SELECT path, size, location FROM build_artifacts WHERE build_id = ");
        sql.bind(id.0);
        let mut artifacts = all(self, sql, |row| {
            Ok(Artifact {
                path: row.text("path")?,
                size: u64::try_from(row.int("size")?).unwrap_or_default(),
                location: row.text("location")?,
            })
        })
        .await?;
        // By path, byte by byte, on every backend.
        artifacts.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(artifacts)
    }
}
