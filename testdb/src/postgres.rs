//! A PostgreSQL schema per test, in the database `KILN_POSTGRES_URL` names, dropped when
//! the test ends.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;
use kiln_storage::postgres;

/// The variable that names the test database (`.ci/run` sets it).
pub const URL_VAR: &str = "KILN_POSTGRES_URL";

/// The test database's URL, or `None` (after saying so) when none is configured.
pub fn postgres_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipped: set {URL_VAR}=postgres://postgres@127.0.0.1:5432/test to run the PostgreSQL tests (.ci/run does)"
            );
            None
        }
    }
}

/// A fresh schema, and a URL that puts Kiln's tables in it.
pub struct Schema {
    pub base: String,
    pub name: String,
    pub url: String,
}

impl Schema {
    /// Creates `kiln_test_<what>_<pid>_<n>`, or `None` when no database is configured.
    pub async fn create(what: &str) -> Result<Option<Schema>> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let Some(base) = postgres_url() else {
            return Ok(None);
        };
        let name = format!(
            "kiln_test_{what}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        postgres::drop_schema(&base, &name).await?;
        let url = postgres::create_schema(&base, &name).await?;
        Ok(Some(Schema { base, name, url }))
    }

    /// Runs one statement in the schema.
    pub async fn execute(&self, sql: &str) -> Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

impl Drop for Schema {
    /// Drops the schema on a thread of its own (a test's runtime may be shutting down).
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(postgres::drop_schema(&base, &name))?;
            anyhow::Ok(())
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}
