//! Fresh databases for Kiln's tests: a SQLite file in a temporary directory, a
//! PostgreSQL schema of its own in the database `KILN_POSTGRES_URL` names (dropped when
//! the test ends), one of each at once ([`backends`]), and a guard that turns a hang into
//! a failure. A dev-dependency of the storage, engine and binary tests, nothing else.

pub mod postgres;

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};

/// Turns a hang into a failure; never a pacing device.
pub const GUARD: Duration = Duration::from_secs(60);

/// Awaits `fut`, failing with "timed out waiting for {what}" after [`GUARD`].
pub async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(GUARD, fut)
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))
}

/// A SQLite database in a temporary directory, removed with it.
pub struct Db {
    pub url: String,
    pub dir: tempfile::TempDir,
}

/// A new, empty database.
pub fn db() -> Result<Db> {
    let dir = tempfile::tempdir()?;
    Ok(Db {
        url: format!("sqlite://{}", dir.path().join("kiln.db").display()),
        dir,
    })
}

/// A fresh database of one backend: its URL, and what keeps it alive.
pub struct Backend {
    /// "sqlite" or "postgres".
    pub name: &'static str,
    /// The database URL.
    pub url: String,
    _keep: Box<dyn std::any::Any + Send>,
}

/// A fresh database on every backend under test: SQLite always, PostgreSQL when
/// `KILN_POSTGRES_URL` names one (`.ci/run` sets it).
pub async fn backends(what: &str) -> Result<Vec<Backend>> {
    let sqlite = db()?;
    let mut all = vec![Backend {
        name: "sqlite",
        url: sqlite.url.clone(),
        _keep: Box::new(sqlite),
    }];
    if let Some(schema) = postgres::Schema::create(what).await? {
        all.push(Backend {
            name: "postgres",
            url: schema.url.clone(),
            _keep: Box::new(schema),
        });
    }
    Ok(all)
}

impl Backend {
    /// Runs SQL on the backend's database behind Kiln's back (to plant a fault).
    pub async fn execute(&self, sql: &str) -> Result<()> {
        use sqlx::Connection;
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        if self.name == "postgres" {
            let mut conn = sqlx::PgConnection::connect(&self.url).await?;
            sqlx::raw_sql(sql).execute(&mut conn).await?;
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
            sqlx::raw_sql(sql).execute(&mut conn).await?;
        }
        Ok(())
    }
}
