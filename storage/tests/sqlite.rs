//! The storage conformance suite on SQLite, plus what only SQLite files can get wrong.

mod conformance;

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use conformance::Harness;
use kiln_storage::{self as storage, NewBuildset, StorageError};

/// A fresh SQLite file per test, in its own temporary directory.
async fn sqlite() -> Result<Harness> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let store = storage::open(&url).await?;
    Ok(Harness {
        store,
        url,
        keep: Box::new(dir),
    })
}

conformance_tests!(sqlite);

async fn open_err(url: &str) -> Result<StorageError> {
    storage::open(url)
        .await
        .err()
        .ok_or_else(|| anyhow!("{url} opened"))
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_as_not_kiln() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notes.db");
    std::fs::write(
        &path,
        "these are my notes, not a database at all ".repeat(200),
    )?;
    let err = open_err(&path.display().to_string()).await?;
    ensure!(matches!(err, StorageError::NotKilnDatabase(_)), "{err}");
    ensure!(err.to_string().contains("not a SQLite database"), "{err}");
    let after = std::fs::read_to_string(&path)?;
    ensure!(
        after.starts_with("these are my notes"),
        "the file is untouched"
    );
    Ok(())
}

#[tokio::test]
async fn a_sqlite_database_of_another_program_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("other.db").display());
    {
        use sqlx::ConnectOptions;
        use std::str::FromStr;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .connect()
            .await?;
        sqlx::query("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
            .execute(&mut conn)
            .await?;
    }
    let err = open_err(&url).await?;
    ensure!(matches!(err, StorageError::NotKilnDatabase(_)), "{err}");
    ensure!(
        err.to_string().contains("customers"),
        "the message names what is there: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_database_from_a_newer_kiln_is_refused() -> Result<()> {
    let h = sqlite().await?;
    {
        use sqlx::ConnectOptions;
        use std::str::FromStr;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str(&h.url)?
            .connect()
            .await?;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await?;
    }
    let err = open_err(&h.url).await?;
    ensure!(
        matches!(err, StorageError::NotKilnDatabase(_)) && err.to_string().contains("newer Kiln"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn reopening_a_kiln_database_keeps_its_data() -> Result<()> {
    let h = sqlite().await?;
    let id = h.store.builder_ensure("kept", None).await?;
    drop(h.store);
    let again = storage::open(&h.url).await?;
    ensure!(again.builder_get_by_name("kept").await?.map(|b| b.id) == Some(id));
    Ok(())
}

#[tokio::test]
async fn unsupported_urls_are_refused_with_a_reason() -> Result<()> {
    let err = open_err("mysql://localhost/kiln").await?;
    ensure!(
        matches!(err, StorageError::BadUrl { .. }) && err.to_string().contains("mysql"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn an_in_memory_database_works() -> Result<()> {
    let store = storage::open("sqlite::memory:").await?;
    store.builder_ensure("m", None).await?;
    ensure!(store.builder_list().await?.len() == 1);
    Ok(())
}

#[tokio::test]
async fn opening_a_missing_file_without_create_is_a_missing_error_and_creates_nothing() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("typo.db");
    let options = storage::StoreOptions {
        create_if_missing: false,
        ..Default::default()
    };
    let err = storage::open_with(&path.display().to_string(), &options)
        .await
        .err()
        .ok_or_else(|| anyhow!("a missing database opened"))?;
    ensure!(matches!(err, StorageError::Missing(_)), "{err}");
    ensure!(!path.exists(), "no file was created");
    Ok(())
}

/// Writes about 8 MiB (some 2,000 pages, past SQLite's own 1,000-page checkpoint mark) in
/// one transaction and returns the database file's size afterwards: whatever the writer
/// checkpointed on its own turn is in it, the rest is still in the write-ahead log.
async fn main_file_after_a_large_write(checkpoint_interval: Duration) -> Result<u64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kiln.db");
    let options = storage::StoreOptions {
        checkpoint_interval,
        ..Default::default()
    };
    let store = storage::open_with(&path.display().to_string(), &options).await?;
    let builder = store.builder_ensure("b", None).await?;
    let reason = "x".repeat(1_000);
    let batch: Vec<NewBuildset> = (0..8_000)
        .map(|_| NewBuildset {
            reason: reason.clone(),
            builder_ids: vec![builder],
            ..NewBuildset::default()
        })
        .collect();
    store.buildset_add_many(&batch).await?;
    Ok(std::fs::metadata(&path)?.len())
}

#[tokio::test]
async fn the_writer_leaves_checkpoints_to_the_background_and_checkpoints_itself_without_it()
-> Result<()> {
    // A background interval longer than the test: only the writer could checkpoint.
    let background = main_file_after_a_large_write(Duration::from_secs(3_600)).await?;
    let writer = main_file_after_a_large_write(Duration::ZERO).await?;
    ensure!(
        background < 1 << 20,
        "the writer checkpointed on its own turn: the file holds {background} bytes"
    );
    ensure!(
        writer > 4 << 20,
        "without background checkpoints the writer checkpoints itself: {writer} bytes"
    );
    Ok(())
}
