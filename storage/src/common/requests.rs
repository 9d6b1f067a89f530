//! Build requests: reads, priorities, and the cancels a master should look at.

use async_trait::async_trait;
use kiln_model::{BuildRequest, BuilderId, MasterId, RequestId};

use super::{all, one, query};
use crate::query::{Page, Query, RequestField};
use crate::rows::{Col, REQUEST_FROM, request_from_row};
use crate::seam::Requests;
use crate::sql::{Dialect, Sql};
use crate::{Result, StorageError, validate};

/// Queued requests per builder. The queue's partial index holds incomplete requests
/// alone, in builder order: the count reads that index and nothing else.
pub(crate) const QUEUE_DEPTHS_SQL: &str =
    "SELECT r.builder_id, COUNT(*) AS queued FROM buildrequests r
     WHERE r.complete = 0
       AND NOT EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.request_id = r.id)
     GROUP BY r.builder_id ORDER BY r.builder_id";

#[async_trait]
impl<D: Dialect> Requests for D {
    async fn request_get(&self, id: RequestId) -> Result<BuildRequest> {
        let mut sql = Sql::new(REQUEST_FROM);
        sql.push(" WHERE r.id = ").bind(id.0);
        one(self, sql, "build request", id, request_from_row).await
    }

    async fn request_query(&self, q: &Query<RequestField>) -> Result<Page<BuildRequest>> {
        query(self, q, request_from_row).await
    }

    async fn request_set_priority_each(
        &self,
        changes: &[(RequestId, i32)],
    ) -> Result<Vec<Result<()>>> {
        // Out-of-range priorities are answered without a statement; the rest change in
        // one transaction, one statement each, so that each has its own answer.
        let mut statements = Vec::with_capacity(changes.len());
        for (id, priority) in changes {
            if validate::priority(*priority).is_ok() {
                let mut sql = Sql::new("UPDATE buildrequests SET priority = ");
                sql.bind(*priority)
                    .push(" WHERE complete = 0 AND id = ")
                    .bind(id.0);
                statements.push(sql);
            }
        }
        let mut changed = self.write_all(statements).await?.into_iter();
        let mut answers = Vec::with_capacity(changes.len());
        for (id, priority) in changes {
            if let Err(e) = validate::priority(*priority) {
                answers.push(Err(e));
                continue;
            }
            if changed.next() != Some(0) {
                answers.push(Ok(()));
                continue;
            }
            answers.push(match self.request_get(*id).await {
                Ok(_) => Err(StorageError::Invalid(format!(
                    "build request {id} is complete; its priority no longer matters"
                ))),
                Err(e) => Err(e),
            });
        }
        Ok(answers)
    }

    async fn request_queue_depths(&self) -> Result<Vec<(BuilderId, u64)>> {
        let sql = Sql::new(QUEUE_DEPTHS_SQL);
        all(self, sql, |row| {
            Ok((
                BuilderId(row.int("builder_id")?),
                u64::try_from(row.int("queued")?).unwrap_or_default(),
            ))
        })
        .await
    }

    async fn request_cancel_pending(&self, master: MasterId) -> Result<Vec<RequestId>> {
        let mut sql = Sql::new(
            "SELECT r.id FROM buildrequests r JOIN buildrequest_claims c ON c.request_id = r.id
             WHERE r.complete = 0 AND r.cancel_requested = 1 AND c.master_id = ",
        );
        sql.bind(master.0).push(" ORDER BY r.id");
        all(self, sql, |row| Ok(RequestId(row.int("id")?))).await
    }
}
