//! What the engine's end-to-end tests share: a guard that turns a hang into a failure,
//! and a fresh database per test.

#![allow(dead_code)]

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
