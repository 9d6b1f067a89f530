//! Buildsets: reads, and hanging children from a new parent build.

use async_trait::async_trait;
use kiln_model::{
    BuildId, BuilderId, Buildset, BuildsetId, ChildBuildset, Properties, Property, RequestId,
    SourceStamp, SourceStampId,
};

use super::{all, one, query};
use crate::Result;
use crate::query::{BuildsetField, Page, Query};
use crate::rows::{
    Col, buildset_from_row, from_json, properties_from_rows, result_code, sourcestamp_from_row,
};
use crate::seam::Buildsets;
use crate::sql::{Dialect, Sql};
use crate::text::storable;

#[async_trait]
impl<D: Dialect> Buildsets for D {
    async fn buildset_get(&self, id: BuildsetId) -> Result<Buildset> {
        let mut sql = Sql::new(format!(
            "SELECT {} FROM buildsets bs WHERE bs.id = ",
            crate::rows::BUILDSET_COLUMNS
        ));
        sql.bind(id.0);
        one(self, sql, "buildset", id, buildset_from_row).await
    }

    async fn buildset_query(&self, q: &Query<BuildsetField>) -> Result<Page<Buildset>> {
        query(self, q, buildset_from_row).await
    }

    async fn buildset_properties(&self, id: BuildsetId) -> Result<Properties> {
        self.buildset_get(id).await?;
        let mut sql =
            Sql::new("SELECT name, value, source FROM buildset_properties WHERE buildset_id = ");
        sql.bind(id.0);
        properties_from_rows(&self.read(sql).await?)
    }

    async fn buildset_property_latest(&self, name: &str) -> Result<Option<(BuildsetId, Property)>> {
        let mut sql = Sql::new(
            "SELECT buildset_id, name, value, source FROM buildset_properties WHERE name = ",
        );
        sql.bind(storable(name).into_owned())
            .push(" ORDER BY buildset_id DESC LIMIT 1");
        let Some(row) = self.read_one(sql).await? else {
            return Ok(None);
        };
        let id = BuildsetId(row.int("buildset_id")?);
        let props = properties_from_rows(std::slice::from_ref(&row))?;
        Ok(props.into_iter().next().map(|(_, p)| (id, p)))
    }

    async fn buildset_sourcestamps(&self, id: BuildsetId) -> Result<Vec<SourceStamp>> {
        self.buildset_get(id).await?;
        let mut sql = Sql::new(
            "SELECT s.codebase, s.repository, s.branch, s.revision, s.project
             FROM buildset_sourcestamps bs JOIN sourcestamps s ON s.id = bs.sourcestamp_id
             WHERE bs.buildset_id = ",
        );
        sql.bind(id.0);
        let mut stamps = all(self, sql, sourcestamp_from_row).await?;
        // Sorted here, so that text sorts by its bytes on every backend.
        stamps.sort();
        Ok(stamps)
    }

    async fn sourcestamp_page(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<(SourceStampId, SourceStamp)>, u64)> {
        let mut sql = Sql::new(
            "SELECT id, codebase, repository, branch, revision, project FROM sourcestamps ORDER BY id LIMIT ",
        );
        sql.bind(i64::from(limit))
            .push(" OFFSET ")
            .bind(i64::from(offset));
        let stamps = all(self, sql, |row| {
            Ok((SourceStampId(row.int("id")?), sourcestamp_from_row(row)?))
        })
        .await?;
        let total = self
            .read_one(Sql::new("SELECT COUNT(*) AS total FROM sourcestamps"))
            .await?
            .map(|row| row.int("total"))
            .transpose()?
            .unwrap_or_default();
        Ok((stamps, u64::try_from(total).unwrap_or_default()))
    }

    async fn sourcestamp_get(&self, id: SourceStampId) -> Result<SourceStamp> {
        let mut sql = Sql::new(
            "SELECT codebase, repository, branch, revision, project FROM sourcestamps WHERE id = ",
        );
        sql.bind(id.0);
        one(self, sql, "sourcestamp", id.0, sourcestamp_from_row).await
    }

    async fn buildset_sourcestamp_ids(&self, id: BuildsetId) -> Result<Vec<SourceStampId>> {
        self.buildset_get(id).await?;
        let mut sql =
            Sql::new("SELECT sourcestamp_id FROM buildset_sourcestamps WHERE buildset_id = ");
        sql.bind(id.0).push(" ORDER BY sourcestamp_id");
        all(self, sql, |row| {
            Ok(SourceStampId(row.int("sourcestamp_id")?))
        })
        .await
    }

    async fn buildset_children(&self, parent_request: RequestId) -> Result<Vec<ChildBuildset>> {
        let mut sql = Sql::new(
            "SELECT bs.id AS buildset_id, bs.trigger_key, bs.parent_relationship, r.waited_for,
                    bs.parent_buildid, r.id AS request_id, r.builder_id, bl.name AS builder,
                    r.complete, r.results, lb.id AS build_id, lb.return_value
             FROM buildsets bs JOIN buildrequests r ON r.buildset_id = bs.id
             JOIN builders bl ON bl.id = r.builder_id
             LEFT JOIN builds lb ON lb.id = (SELECT MAX(b.id) FROM builds b WHERE b.buildrequest_id = r.id)
             WHERE bs.parent_request_id = ",
        );
        sql.bind(parent_request.0).push(" ORDER BY bs.id, r.id");
        all(self, sql, |row| {
            Ok(ChildBuildset {
                buildset_id: BuildsetId(row.int("buildset_id")?),
                trigger_key: row.opt_text("trigger_key")?,
                relationship: row.opt_text("parent_relationship")?,
                waited_for: row.flag("waited_for")?,
                parent_buildid: row.opt_int("parent_buildid")?.map(BuildId),
                request_id: RequestId(row.int("request_id")?),
                builder_id: BuilderId(row.int("builder_id")?),
                builder: row.text("builder")?,
                complete: row.flag("complete")?,
                results: result_code(row.opt_int("results")?)?,
                build_id: row.opt_int("build_id")?.map(BuildId),
                return_value: row
                    .opt_text("return_value")?
                    .as_deref()
                    .map(from_json)
                    .transpose()?,
            })
        })
        .await
    }

    async fn buildset_adopt(&self, ids: &[BuildsetId], parent_build: BuildId) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sql = Sql::new("UPDATE buildsets SET parent_buildid = ");
        sql.bind(parent_build.0)
            .push(" WHERE id IN ")
            .bind_list(ids.iter().map(|b| b.0));
        self.write(sql)
            .await
            .map_err(|e| e.fk_not_found("build", parent_build))?;
        Ok(())
    }
}
