//! What builds report while they run: progress and logs.

use async_trait::async_trait;
use kiln_model::{
    BuildId, LogEntry, LogLevel, LogQuery, LogRecord, ProgressRecord, ProgressReport, Timestamp,
};

use super::all;
use crate::collections::log_list;
use crate::rows::{log_from_row, micros, progress_from_row};
use crate::seam::Output;
use crate::sql::{Dialect, Sql};
use crate::text::{logs, report};
use crate::{Result, StorageError, clamp_u64, validate};

/// Log records written by one statement: few enough to stay within every backend's
/// limit on a statement's parameters.
const LOG_INSERT_CHUNK: usize = 200;

#[async_trait]
impl<D: Dialect> Output for D {
    async fn progress_report(
        &self,
        build: BuildId,
        report_: &ProgressReport,
        now: Timestamp,
    ) -> Result<()> {
        validate::progress(report_)?;
        let report_ = report(report_);
        let path = serde_json::to_string(&report_.group)
            .map_err(|e| StorageError::Invalid(e.to_string()))?;
        let mut sql = Sql::new(
            "INSERT INTO build_progress (build_id, group_path, seq, current, total, status, updated_at) VALUES (",
        );
        sql.bind(build.0)
            .push(", ")
            .bind(path)
            .push(", (SELECT COALESCE(MAX(seq), 0) + 1 FROM build_progress WHERE build_id = ")
            .bind(build.0)
            .push("), ")
            .bind(clamp_u64(report_.current))
            .push(", ")
            .bind(clamp_u64(report_.total))
            .push(", ")
            .bind(report_.status.clone())
            .push(", ")
            .bind(micros(now))
            .push(
                ") ON CONFLICT (build_id, group_path) DO UPDATE SET
                     current = excluded.current, total = excluded.total,
                     status = excluded.status, updated_at = excluded.updated_at",
            );
        self.write(sql)
            .await
            .map_err(|e| e.fk_not_found("build", build))?;
        Ok(())
    }

    async fn progress_list(&self, build: BuildId) -> Result<Vec<ProgressRecord>> {
        let mut sql = Sql::new(
            "SELECT group_path, current, total, status, updated_at FROM build_progress WHERE build_id = ",
        );
        sql.bind(build.0).push(" ORDER BY seq");
        all(self, sql, progress_from_row).await
    }

    async fn log_append(&self, build: BuildId, records: &[LogRecord]) -> Result<()> {
        let records = logs(records);
        let statements = records
            .chunks(LOG_INSERT_CHUNK)
            .map(|chunk| {
                let mut sql = Sql::new(
                    "INSERT INTO build_logs (build_id, at, level, message, fields) VALUES ",
                );
                for (i, record) in chunk.iter().enumerate() {
                    sql.push(if i == 0 { "(" } else { ", (" })
                        .bind(build.0)
                        .push(", ")
                        .bind(micros(record.at))
                        .push(", ")
                        .bind(i64::from(record.level.number()))
                        .push(", ")
                        .bind(record.message.clone())
                        .push(", ")
                        .bind(serde_json::Value::Object(record.fields.clone()).to_string())
                        .push(")");
                }
                sql
            })
            .collect::<Vec<_>>();
        if statements.is_empty() {
            return Ok(());
        }
        // All of them or none, as one flush of a build's output.
        self.write_all(statements)
            .await
            .map_err(|e| e.fk_not_found("build", build))?;
        Ok(())
    }

    async fn log_list(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        all(self, log_list(query), log_from_row).await
    }

    async fn log_prune(&self, older_than: Timestamp, below: LogLevel) -> Result<u64> {
        let mut sql = Sql::new("DELETE FROM build_logs WHERE at < ");
        sql.bind(micros(older_than))
            .push(" AND level < ")
            .bind(i64::from(below.number()));
        self.write(sql).await
    }
}
