//! Builders.

use async_trait::async_trait;
use kiln_model::{Builder, BuilderId, MasterId};

use super::{one, query};
use crate::query::{BuilderField, Page, Query};
use crate::rows::{Col, builder_from_row};
use crate::seam::Builders;
use crate::sql::{Dialect, Sql};
use crate::text::storable;
use crate::{Result, StorageError, found_or, validate};

static BUILDER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT id, name, description, depends_on, paused, {} AS served FROM builders WHERE ",
        crate::rows::SERVED
    )
});

#[async_trait]
impl<D: Dialect> Builders for D {
    async fn builder_ensure(&self, name: &str, description: Option<&str>) -> Result<BuilderId> {
        validate::name("builder", name)?;
        let mut sql = Sql::new("INSERT INTO builders (name, description) VALUES (");
        sql.bind(storable(name).into_owned())
            .push(", ")
            .bind(description.map(|d| storable(d).into_owned()))
            .push(
                ") ON CONFLICT (name) DO UPDATE SET description = COALESCE(excluded.description, builders.description)
                 RETURNING id",
            );
        let rows = self.write_returning(sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| StorageError::Invalid("adding a builder returned nothing".into()))?;
        Ok(BuilderId(row.int("id")?))
    }

    async fn builder_get_by_name(&self, name: &str) -> Result<Option<Builder>> {
        let mut sql = Sql::new(BUILDER.as_str());
        sql.push("name = ").bind(storable(name).into_owned());
        self.read_one(sql)
            .await?
            .map(|row| builder_from_row(&row))
            .transpose()
    }

    async fn builder_get(&self, id: BuilderId) -> Result<Builder> {
        let mut sql = Sql::new(BUILDER.as_str());
        sql.push("id = ").bind(id.0);
        one(self, sql, "builder", id, builder_from_row).await
    }

    async fn builder_query(&self, q: &Query<BuilderField>) -> Result<Page<Builder>> {
        query(self, q, builder_from_row).await
    }

    async fn builder_serve(&self, master: MasterId, builder: BuilderId) -> Result<()> {
        let mut sql = Sql::new("INSERT INTO master_builders (master_id, builder_id) VALUES (");
        sql.bind(master.0)
            .push(", ")
            .bind(builder.0)
            .push(") ON CONFLICT (master_id, builder_id) DO NOTHING");
        self.write(sql)
            .await
            .map_err(|e| e.fk_not_found("master or builder", format!("{master}/{builder}")))?;
        Ok(())
    }

    async fn builder_set_depends_on(&self, id: BuilderId, depends_on: &[String]) -> Result<()> {
        let list =
            serde_json::to_string(depends_on).map_err(|e| StorageError::Invalid(e.to_string()))?;
        let mut sql = Sql::new("UPDATE builders SET depends_on = ");
        sql.bind(list).push(" WHERE id = ").bind(id.0);
        found_or(self.write(sql).await?, "builder", id)
    }
}
