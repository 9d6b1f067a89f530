//! The storage conformance suite on PostgreSQL, plus what only a shared server can get
//! wrong. Each test gets a schema of its own in the database named by `KILN_POSTGRES_URL`
//! (`.ci/run` sets it); without it these tests say so and pass without running.

mod conformance;
mod support;

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use conformance::Harness;
use kiln_engine::model::{ResultCode, now};
use kiln_engine::storage::{self, NewBuildset, StorageError, StoreSignal};
use support::postgres::{Schema, postgres_url};

async fn postgres() -> Result<Option<Harness>> {
    let Some(schema) = Schema::create("conformance").await? else {
        return Ok(None);
    };
    let store = storage::open(&schema.url).await?;
    Ok(Some(Harness {
        store,
        url: schema.url.clone(),
        keep: Box::new(schema),
    }))
}

conformance_tests!(postgres);

#[tokio::test]
async fn a_store_wakes_other_stores_when_work_arrives_or_buildsets_complete() -> Result<()> {
    let Some(schema) = Schema::create("signals").await? else {
        return Ok(());
    };
    let submitter = storage::open(&schema.url).await?;
    let watcher = storage::open(&schema.url).await?;
    let mut own = submitter
        .signals()
        .ok_or_else(|| anyhow!("PostgreSQL relays signals"))?;
    let mut signals = watcher
        .signals()
        .ok_or_else(|| anyhow!("PostgreSQL relays signals"))?;
    let builder = submitter.builder_ensure("b", None).await?;
    let added = submitter
        .buildset_add(&NewBuildset {
            reason: "signal".into(),
            builder_ids: vec![builder],
            submitted_at: now(),
            ..NewBuildset::default()
        })
        .await?;
    let signal = tokio::time::timeout(Duration::from_secs(10), signals.recv()).await??;
    ensure!(signal == StoreSignal::Work, "{signal:?}");
    let request = added.requests[&builder];
    submitter
        .request_complete(&[request], ResultCode::Warnings, now())
        .await?;
    let signal = tokio::time::timeout(Duration::from_secs(10), signals.recv()).await??;
    ensure!(
        signal == StoreSignal::Complete(vec![(added.buildset_id, ResultCode::Warnings)]),
        "{signal:?}"
    );
    ensure!(
        own.try_recv().is_err(),
        "a store does not signal itself what it did"
    );
    Ok(())
}

#[tokio::test]
async fn stores_in_other_schemas_do_not_hear_each_other() -> Result<()> {
    let (Some(one), Some(other)) = (
        Schema::create("quiet").await?,
        Schema::create("quiet").await?,
    ) else {
        return Ok(());
    };
    let submitter = storage::open(&one.url).await?;
    let neighbour = storage::open(&other.url).await?;
    let listener = storage::open(&one.url).await?;
    let mut heard = neighbour.signals().ok_or_else(|| anyhow!("signals"))?;
    let mut same = listener.signals().ok_or_else(|| anyhow!("signals"))?;
    let builder = submitter.builder_ensure("b", None).await?;
    submitter
        .buildset_add(&NewBuildset {
            reason: "x".into(),
            builder_ids: vec![builder],
            submitted_at: now(),
            ..NewBuildset::default()
        })
        .await?;
    // The store on the same schema hears it; by then the neighbour would have too.
    tokio::time::timeout(Duration::from_secs(10), same.recv()).await??;
    ensure!(heard.try_recv().is_err(), "the other schema heard nothing");
    Ok(())
}

#[tokio::test]
async fn a_database_that_does_not_exist_is_missing_not_created() -> Result<()> {
    let Some(base) = postgres_url() else {
        return Ok(());
    };
    let (server, _) = base
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("{base} names no database"))?;
    let url = format!("{server}/kiln_no_such_database_{}", std::process::id());
    let err = storage::open(&url)
        .await
        .err()
        .ok_or_else(|| anyhow!("{url} opened"))?;
    ensure!(matches!(err, StorageError::Missing(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_schema_of_another_program_is_refused() -> Result<()> {
    let Some(schema) = Schema::create("foreign").await? else {
        return Ok(());
    };
    schema
        .execute("CREATE TABLE customers (id BIGINT PRIMARY KEY)")
        .await?;
    let err = storage::open(&schema.url)
        .await
        .err()
        .ok_or_else(|| anyhow!("a foreign schema opened"))?;
    ensure!(matches!(err, StorageError::NotKilnDatabase(_)), "{err}");
    ensure!(err.to_string().contains("customers"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_schema_from_a_newer_kiln_is_refused() -> Result<()> {
    let Some(schema) = Schema::create("newer").await? else {
        return Ok(());
    };
    drop(storage::open(&schema.url).await?);
    schema
        .execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', true, '\\x00', 0)",
        )
        .await?;
    let err = storage::open(&schema.url)
        .await
        .err()
        .ok_or_else(|| anyhow!("a newer schema opened"))?;
    ensure!(matches!(err, StorageError::NotKilnDatabase(_)), "{err}");
    ensure!(err.to_string().contains("newer Kiln"), "{err}");
    Ok(())
}
