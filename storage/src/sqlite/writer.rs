//! The SQLite writer: one thread of its own that owns the synchronous connection and
//! runs every write transaction of the process, several callers' work per commit.
//!
//! Callers hand their work ([`SqliteStore::transaction`](super::SqliteStore)) to the
//! thread and wait for their answer. The thread takes the first queued piece of work
//! and everything else that queued while its previous commit ran (up to
//! [`MAX_JOBS_PER_COMMIT`]), runs each in a savepoint of one `BEGIN IMMEDIATE`
//! transaction, and answers every caller once that transaction has committed. A piece
//! of work that fails is rolled back to its savepoint and answered with its own error;
//! the others commit. A lone piece of work runs without a savepoint and waits for
//! nothing but its own commit.
//!
//! Why a thread and not a blocking task per transaction: the scheduler's claim loop,
//! its finisher and the group committer each want the writer many times a second; as
//! separate transactions each paid a lock hand-off, a wake-up of a blocking thread and a
//! commit of its own (a sync of the log with `synchronous=FULL`). Sharing one commit
//! is what SQLite's own floor does when it writes 100 items per transaction.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::TransactionBehavior;
use sqlx::SqliteConnection;
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::{debug, error};

use crate::{Result, StorageError};

/// The most callers' work one transaction carries: a bound on how long the last of
/// them waits for the first's commit. Under load the group commit, the claim loop and
/// the finisher each hand over one piece at a time (each already batched), so a few
/// dozen is far more than queue at once.
pub(super) const MAX_JOBS_PER_COMMIT: usize = 64;

/// What the writer committed since it started ([`crate::seam::CommitStats`]), counted by
/// the thread and read by anyone.
#[derive(Debug, Default)]
pub(super) struct Counters {
    commits: AtomicU64,
    callers: AtomicU64,
    log_writes: AtomicU64,
}

impl Counters {
    pub(super) fn read(&self) -> crate::seam::CommitStats {
        crate::seam::CommitStats {
            commits: self.commits.load(Ordering::Relaxed),
            callers: self.callers.load(Ordering::Relaxed),
            log_writes: self.log_writes.load(Ordering::Relaxed),
        }
    }

    /// A commit of `conn` that carried `callers` pieces of work that succeeded, counted
    /// before anyone is answered.
    fn committed(&self, conn: &rusqlite::Connection, callers: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.callers.fetch_add(callers as u64, Ordering::Relaxed);
        if let Some(writes) = super::walbuf::log_writes(conn) {
            self.log_writes.store(writes.made, Ordering::Relaxed);
        }
    }
}

/// One caller's transaction work and where its answer goes.
pub(super) trait Job: Send {
    /// Runs the work in `tx`; false when it failed and its writes must be undone.
    fn run(&mut self, tx: &rusqlite::Transaction<'_>) -> bool;
    /// Answers the caller once the fate of the transaction is known: `commit` is the
    /// commit's outcome (or why the transaction was abandoned).
    fn answer(self: Box<Self>, commit: std::result::Result<(), &rusqlite::Error>);
}

/// A job for work returning `T`.
pub(super) struct Pending<T, F> {
    work: Option<F>,
    out: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Pending<T, F> {
    pub(super) fn new(work: F, reply: oneshot::Sender<Result<T>>) -> Self {
        Pending {
            work: Some(work),
            out: None,
            reply,
        }
    }
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send,
{
    fn run(&mut self, tx: &rusqlite::Transaction<'_>) -> bool {
        let out = match self.work.take() {
            // A panic in the work fails this caller only, as a panicking blocking task
            // did; the thread goes on serving the others.
            Some(work) => {
                std::panic::catch_unwind(AssertUnwindSafe(|| work(tx))).unwrap_or_else(|panic| {
                    Err(StorageError::Internal(format!(
                        "the SQLite writer's work panicked: {}",
                        panic_text(&panic)
                    )))
                })
            }
            None => Err(StorageError::Internal(
                "the SQLite writer ran a piece of work twice".into(),
            )),
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, commit: std::result::Result<(), &rusqlite::Error>) {
        let out = match (self.out, commit) {
            (Some(Err(own)), _) => Err(own),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(e)) => Err(copy(e)),
            (None, Ok(())) => Err(StorageError::Internal(
                "the SQLite writer answered work it had not run".into(),
            )),
        };
        // A caller that stopped waiting no longer needs its answer.
        let _ = self.reply.send(out);
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}

/// The same error for every caller of a transaction that failed as a whole.
fn copy(e: &rusqlite::Error) -> StorageError {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            StorageError::Sqlite(rusqlite::Error::SqliteFailure(*code, message.clone()))
        }
        other => StorageError::Internal(format!("the SQLite transaction failed: {other}")),
    }
}

/// Starts the writer thread on `conn`. It serves until every sender of the returned
/// queue is dropped (the store with all its clones), then closes the connection.
///
/// `turn` is the async writer connection's lock: the thread holds it while it writes,
/// so that the few writes that go through sqlx (migrations, `RETURNING` statements
/// shared with PostgreSQL) never meet this connection's write lock and sleep in
/// SQLite's busy handler.
pub(super) fn start(
    mut conn: rusqlite::Connection,
    turn: Arc<Mutex<SqliteConnection>>,
    counters: Arc<Counters>,
) -> std::io::Result<mpsc::UnboundedSender<Box<dyn Job>>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Box<dyn Job>>();
    std::thread::Builder::new()
        .name("kiln-sqlite-writer".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while batch.len() < MAX_JOBS_PER_COMMIT {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let _turn = turn.blocking_lock();
                run_batch(&mut conn, std::mem::take(&mut batch), &counters);
            }
            debug!("the SQLite writer stops: its store was dropped");
        })?;
    Ok(tx)
}

/// Runs `jobs` in as few transactions as they allow (one, unless a savepoint cannot be
/// undone), answers each and counts what committed in `counters`.
fn run_batch(conn: &mut rusqlite::Connection, jobs: Vec<Box<dyn Job>>, counters: &Counters) {
    let mut rest: VecDeque<Box<dyn Job>> = jobs.into();
    while !rest.is_empty() {
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                for job in rest {
                    job.answer(Err(&e));
                }
                return;
            }
        };
        if rest.len() == 1 {
            if let Some(mut job) = rest.pop_front() {
                let commit = match job.run(&tx) {
                    true => tx.commit().map(|()| counters.committed(conn, 1)),
                    false => tx.rollback(),
                };
                job.answer(commit.as_ref().map(|_| ()));
            }
            return;
        }
        let mut ran: Vec<Box<dyn Job>> = Vec::with_capacity(rest.len());
        let mut succeeded = 0;
        let mut broken = None;
        while let Some(mut job) = rest.pop_front() {
            if let Err(e) = tx.execute_batch("SAVEPOINT job") {
                rest.push_front(job);
                broken = Some(e);
                break;
            }
            let ok = job.run(&tx);
            succeeded += usize::from(ok);
            let end = match ok {
                true => tx.execute_batch("RELEASE job"),
                false => tx.execute_batch("ROLLBACK TO job; RELEASE job"),
            };
            ran.push(job);
            if let Err(e) = end {
                broken = Some(e);
                break;
            }
        }
        let commit = match (&broken, succeeded > 0) {
            (Some(e), _) => {
                // The transaction cannot be trusted past a savepoint that failed: what
                // ran in it is undone and answered with the error; the rest is run
                // again in a fresh transaction.
                error!(error = %e, "a savepoint of the SQLite writer failed; rolling back its transaction");
                let _ = tx.rollback();
                // Nothing ran: the savepoint itself fails, and a fresh transaction would
                // fail the same way forever. Everyone waiting gets the error instead.
                let stuck = ran.is_empty();
                for job in ran {
                    job.answer(Err(e));
                }
                if stuck {
                    for job in std::mem::take(&mut rest) {
                        job.answer(Err(e));
                    }
                }
                continue;
            }
            (None, true) => tx.commit().map(|()| counters.committed(conn, succeeded)),
            (None, false) => tx.rollback(),
        };
        let commit = commit.as_ref().map(|_| ());
        for job in ran {
            job.answer(commit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::SqliteStore;
    use crate::{Result, StorageError, StoreOptions};

    async fn store() -> Result<(tempfile::TempDir, SqliteStore)> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Internal(e.to_string()))?;
        let url = format!("sqlite://{}", dir.path().join("writer.db").display());
        let store = SqliteStore::open(&url, &StoreOptions::default()).await?;
        store
            .transaction(|tx| Ok(tx.execute_batch("CREATE TABLE t (v INTEGER NOT NULL)")?))
            .await?;
        Ok((dir, store))
    }

    /// Many callers at once, some of whose work fails after writing (and one of which
    /// panics): each is answered with its own outcome, what failed left nothing behind,
    /// and everything that succeeded was committed, however the writer grouped them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn callers_sharing_a_commit_keep_their_own_outcome() -> Result<()> {
        let seed = std::env::var("KILN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        println!("seed {seed} (KILN_SEED={seed} repeats it)");
        let mut rng = fastrand::Rng::with_seed(seed);
        let (_dir, store) = store().await?;
        let callers: Vec<(i64, u8)> = (0..500).map(|v| (v, rng.u8(0..10))).collect();
        let tasks: Vec<_> = callers
            .iter()
            .map(|&(v, fate)| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .transaction(move |tx| {
                            tx.execute("INSERT INTO t (v) VALUES (?)", [v])?;
                            tx.execute("INSERT INTO t (v) VALUES (?)", [-v - 1])?;
                            match fate {
                                0 => Err(StorageError::Invalid(format!("caller {v} refuses"))),
                                1 if v % 7 == 0 => panic!("caller {v} panics"),
                                _ => Ok(v),
                            }
                        })
                        .await
                })
            })
            .collect();
        let mut expected = Vec::new();
        for (task, &(v, fate)) in tasks.into_iter().zip(&callers) {
            let answer = task
                .await
                .map_err(|e| StorageError::Internal(e.to_string()))?;
            match (fate, answer) {
                (0, Err(StorageError::Invalid(why))) => {
                    assert_eq!(why, format!("caller {v} refuses"))
                }
                (1, Err(StorageError::Internal(why))) if v % 7 == 0 => {
                    assert!(why.contains("panicked"), "{why}")
                }
                (_, Ok(got)) => {
                    assert_eq!(got, v);
                    expected.extend([v, -v - 1]);
                }
                (fate, other) => panic!("caller {v} (fate {fate}) was answered {other:?}"),
            }
        }
        expected.sort();
        let mut stored: Vec<i64> = store
            .transaction(|tx| {
                let mut q = tx.prepare("SELECT v FROM t")?;
                let rows = q.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await?;
        stored.sort();
        assert_eq!(stored, expected, "seed {seed}");
        Ok(())
    }

    /// Work queued while the writer is busy shares its next commit, and the counts say so:
    /// one commit for the caller that held the writer, one for the ten queued behind it
    /// (of which the two that fail are not counted), and nothing for a lone failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_counts_its_commits_and_the_callers_they_carried() -> Result<()> {
        use crate::seam::Store;
        let (_dir, store) = store().await?;
        let before = store.commit_stats().unwrap_or_default();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (running_tx, mut running) = tokio::sync::mpsc::unbounded_channel();
        let holder = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .transaction(move |tx| {
                        tx.execute("INSERT INTO t (v) VALUES (0)", [])?;
                        let _ = running_tx.send(());
                        held.recv()
                            .map_err(|e| StorageError::Internal(e.to_string()))
                    })
                    .await
            }
        });
        // Once the holder's work runs, its commit carries nobody else; whatever queues
        // from now on waits for the next.
        running.recv().await;
        let (queued_tx, mut queued) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        for v in 1..=10i64 {
            let store = store.clone();
            let queued_tx = queued_tx.clone();
            waiting.push(tokio::spawn(async move {
                let work = store.transaction(move |tx| {
                    tx.execute("INSERT INTO t (v) VALUES (?)", [v])?;
                    if v % 5 == 0 {
                        return Err(StorageError::Invalid(format!("{v} refuses")));
                    }
                    Ok(())
                });
                tokio::pin!(work);
                // One poll hands the work to the writer's queue; then say so.
                tokio::select! {
                    biased;
                    done = &mut work => {
                        let _ = queued_tx.send(());
                        return done;
                    }
                    () = std::future::ready(()) => {}
                }
                let _ = queued_tx.send(());
                work.await
            }));
        }
        for _ in 0..10 {
            queued.recv().await;
        }
        release
            .send(())
            .map_err(|e| StorageError::Internal(e.to_string()))?;
        holder
            .await
            .map_err(|e| StorageError::Internal(e.to_string()))??;
        let mut refused = 0;
        for task in waiting {
            match task
                .await
                .map_err(|e| StorageError::Internal(e.to_string()))?
            {
                Ok(()) => {}
                Err(StorageError::Invalid(_)) => refused += 1,
                Err(other) => return Err(other),
            }
        }
        assert_eq!(refused, 2);
        let lone = store
            .transaction(|_| Err::<(), _>(StorageError::Invalid("alone".into())))
            .await;
        assert!(lone.is_err());
        let after = store.commit_stats().unwrap_or_default();
        let grew = (
            after.commits - before.commits,
            after.callers - before.callers,
        );
        assert_eq!(grew, (2, 9), "(commits, callers)");
        // Each commit, a page of the table, reached the log in two writes at most: its
        // frame's header and page (SQLite's own two; more pages would still take one).
        let writes = after.log_writes - before.log_writes;
        assert!(
            (1..=4).contains(&writes),
            "{writes} log writes for 2 commits"
        );
        Ok(())
    }

    /// A lone caller whose work fails leaves nothing behind and the writer goes on.
    #[tokio::test]
    async fn a_failed_lone_transaction_is_rolled_back() -> Result<()> {
        let (_dir, store) = store().await?;
        let failed = store
            .transaction(|tx| {
                tx.execute("INSERT INTO t (v) VALUES (1)", [])?;
                Err::<(), _>(StorageError::Invalid("no".into()))
            })
            .await;
        assert!(
            matches!(failed, Err(StorageError::Invalid(_))),
            "{failed:?}"
        );
        let count: i64 = store
            .transaction(|tx| Ok(tx.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await?;
        assert_eq!(count, 0);
        Ok(())
    }
}
