//! The storage conformance suite on PostgreSQL, plus what only a shared server can get
//! wrong. Each test gets a schema of its own in the database named by `KILN_POSTGRES_URL`
//! (`.ci/run` sets it); without it these tests say so and pass without running.

mod conformance;

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use conformance::Harness;
use kiln_model::{ResultCode, now};
use kiln_storage::{self as storage, NewBuildset, StorageError, StoreSignal};
use kiln_testdb::postgres::{Schema, postgres_url};
use sqlx::Connection;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_waits_for_a_claimer_sees_its_claim() -> Result<()> {
    use sqlx::Connection;
    let Some(schema) = Schema::create("cancel_race").await? else {
        return Ok(());
    };
    let store = storage::open(&schema.url).await?;
    let builder = store.builder_ensure("b", None).await?;
    let master = store.master_register("claimer", now()).await?.master_id;
    let added = store
        .buildset_add(&NewBuildset {
            reason: "race".into(),
            builder_ids: vec![builder],
            submitted_at: now(),
            ..NewBuildset::default()
        })
        .await?;
    let request = added.requests[&builder];
    // A claimer as the scheduler's is: it locks the request row, inserts its claim, and
    // has not committed yet when the cancel arrives.
    let mut claimer = sqlx::PgConnection::connect(&schema.url).await?;
    let mut tx = claimer.begin().await?;
    sqlx::query("SELECT id FROM buildrequests WHERE id = $1 FOR UPDATE")
        .bind(request.0)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO buildrequest_claims (request_id, master_id, claimed_at) VALUES ($1, $2, 0)",
    )
    .bind(request.0)
    .bind(master.0)
    .execute(&mut *tx)
    .await?;
    let canceller = store.clone();
    let cancel = tokio::spawn(async move { canceller.request_cancel(&[request], now()).await });
    // Only once the cancel waits on the claimer's row lock does the claimer commit.
    let mut watcher = sqlx::PgConnection::connect(&schema.url).await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%FOR UPDATE OF r%'",
            )
            .fetch_one(&mut watcher)
            .await?;
            if waiting > 0 {
                return anyhow::Ok(());
            }
            tokio::task::yield_now().await;
        }
    })
    .await??;
    tx.commit().await?;
    let outcome = tokio::time::timeout(Duration::from_secs(10), cancel).await???;
    // The claim committed first, so the request is flagged for its master, not
    // completed as CANCELLED under a running build.
    ensure!(
        outcome.flagged == [request] && outcome.completed.is_empty(),
        "{outcome:?}"
    );
    let after = store.request_get(request).await?;
    ensure!(!after.complete && after.cancel_requested, "{after:?}");
    Ok(())
}

/// A queue's tables go from empty to thousands of rows in seconds, long before
/// autovacuum looks; the store has them analyzed as they grow, so that the planner stops
/// planning for empty tables.
#[tokio::test]
async fn the_queues_tables_are_analyzed_as_they_grow() -> Result<()> {
    let Some(schema) = Schema::create("analyze").await? else {
        return Ok(());
    };
    let store = storage::open(&schema.url).await?;
    let builder = store.builder_ensure("b", None).await?;
    let one = NewBuildset {
        reason: "growth".into(),
        builder_ids: vec![builder],
        submitted_at: now(),
        ..NewBuildset::default()
    };
    // 3,000 buildsets with a request each: 6,000 rows, past the first threshold.
    store.buildset_add_many(&vec![one; 3_000]).await?;
    let mut conn = sqlx::PgConnection::connect(&schema.url).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let analyzed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_user_tables
                            WHERE relname = 'buildrequests' AND schemaname = current_schema()
                              AND last_analyze IS NOT NULL)",
        )
        .fetch_one(&mut conn)
        .await?;
        if analyzed {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "buildrequests was not analyzed within 30 s of growing by 3,000 rows"
        );
        // Polls the catalogue: the ANALYZE runs on the store's own task.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
