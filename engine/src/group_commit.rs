//! Group commit for submissions: concurrent submits from any number of tasks share one
//! transaction per turn of the writer.
//!
//! A caller hands its buildsets to one committer task per [`Client`](crate::Client) and
//! waits for its own answer. The committer takes the first queued entry and everything
//! else that queued while its previous commit ran (up to
//! [`DEFAULT_MAX_GROUP_COMMIT`](crate::config::DEFAULT_MAX_GROUP_COMMIT) buildsets), writes them with one `buildset_add_many`, and answers each caller once
//! that commit is done at the store's configured durability. There is no timer: a lone
//! caller waits for nothing but its own commit, and under load the group grows by
//! itself to what queued during one commit.
//!
//! Each caller keeps all-or-none for what it submitted: when a group's transaction
//! fails, every entry is written again in a transaction of its own, so that a refused
//! submission answers its own caller only.

use std::sync::{Arc, OnceLock};

use kiln_storage::{AddedBuildset, NewBuildset, Store};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::error::{EngineError, Result};

/// How many callers may wait for the committer before further submits wait to queue:
/// a bound on the memory that a burst of submissions holds.
const QUEUE_CAPACITY: usize = 4_096;

type Answer = Result<Vec<AddedBuildset>>;

struct Entry {
    buildsets: Vec<NewBuildset>,
    reply: oneshot::Sender<Answer>,
}

/// The submit side of a client: a handle on its committer task, started on first use.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    store: Arc<dyn Store>,
    max_group: usize,
    queue: Arc<OnceLock<mpsc::Sender<Entry>>>,
}

impl GroupCommit {
    /// Groups of at most `max_group` buildsets; 0 writes every call on its own.
    pub(crate) fn new(store: Arc<dyn Store>, max_group: usize) -> Self {
        GroupCommit {
            store,
            max_group,
            queue: Arc::new(OnceLock::new()),
        }
    }

    /// Writes `buildsets` (all or none), sharing the transaction with whatever else is
    /// being submitted meanwhile.
    pub(crate) async fn add(&self, buildsets: Vec<NewBuildset>) -> Answer {
        if self.max_group == 0 || buildsets.len() >= self.max_group {
            return Ok(self.store.buildset_add_many(&buildsets).await?);
        }
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(commit_loop(self.store.clone(), rx, self.max_group));
            tx
        });
        let (reply, answer) = oneshot::channel();
        if let Err(refused) = queue.send(Entry { buildsets, reply }).await {
            // The committer is gone (the runtime that started it has ended): write here.
            return Ok(self.store.buildset_add_many(&refused.0.buildsets).await?);
        }
        // The committer answers every entry it takes; no answer means its runtime is
        // shutting down mid-commit, and whether the commit happened is unknown.
        answer.await.unwrap_or(Err(EngineError::ShuttingDown))
    }
}

/// Takes groups off the queue until every handle on it is dropped.
async fn commit_loop(store: Arc<dyn Store>, mut queue: mpsc::Receiver<Entry>, max_group: usize) {
    while let Some(first) = queue.recv().await {
        let mut count = first.buildsets.len();
        let mut group = vec![first];
        while count < max_group {
            match queue.try_recv() {
                Ok(entry) => {
                    count += entry.buildsets.len();
                    group.push(entry);
                }
                Err(_) => break,
            }
        }
        commit(store.as_ref(), group).await;
    }
}

/// Writes one group and answers each of its callers.
async fn commit(store: &dyn Store, mut group: Vec<Entry>) {
    if group.len() == 1 {
        if let Some(entry) = group.pop() {
            let answer = store.buildset_add_many(&entry.buildsets).await;
            let _ = entry.reply.send(answer.map_err(EngineError::from));
        }
        return;
    }
    let lengths: Vec<usize> = group.iter().map(|e| e.buildsets.len()).collect();
    let mut replies = Vec::with_capacity(group.len());
    let mut all = Vec::with_capacity(lengths.iter().sum());
    for entry in group {
        all.extend(entry.buildsets);
        replies.push(entry.reply);
    }
    match store.buildset_add_many(&all).await {
        Ok(added) if added.len() == all.len() => {
            let mut added = added.into_iter();
            for (reply, n) in replies.into_iter().zip(&lengths) {
                let _ = reply.send(Ok(added.by_ref().take(*n).collect()));
            }
        }
        Ok(added) => {
            // Committed, but not one answer per buildset: a backend bug. Writing again
            // would submit twice, so every caller hears of it instead.
            let said = format!(
                "the store answered {} buildsets for {} submitted",
                added.len(),
                all.len()
            );
            for reply in replies {
                let _ = reply.send(Err(EngineError::Internal(said.clone())));
            }
        }
        Err(e) => {
            // One entry may be at fault (a row the backend refuses): give each its own
            // transaction and its own answer.
            debug!(error = %e, entries = replies.len(), "group commit failed; writing entries one by one");
            let mut start = 0;
            for (reply, n) in replies.into_iter().zip(&lengths) {
                let mine = &all[start..start + n];
                start += n;
                let answer = store.buildset_add_many(mine).await;
                let _ = reply.send(answer.map_err(EngineError::from));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::BuilderId;

    fn buildset(reason: &str, builder: BuilderId) -> NewBuildset {
        NewBuildset {
            reason: reason.into(),
            builder_ids: vec![builder],
            submitted_at: kiln_model::now(),
            ..NewBuildset::default()
        }
    }

    fn entry(buildsets: Vec<NewBuildset>) -> (Entry, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        (Entry { buildsets, reply }, answer)
    }

    #[tokio::test]
    async fn a_refused_entry_answers_its_own_caller_and_the_rest_of_its_group_is_written()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("group.db").display());
        let store = kiln_storage::open(&url).await?;
        let builder = store.builder_ensure("b", None).await?;
        let nobody = BuilderId(builder.0 + 1_000);
        let (first, first_answer) = entry(vec![buildset("one", builder), buildset("two", builder)]);
        let (bad, bad_answer) = entry(vec![buildset("bad", nobody)]);
        let (last, last_answer) = entry(vec![buildset("three", builder)]);
        commit(store.as_ref(), vec![first, bad, last]).await;

        let first = first_answer.await??;
        let last = last_answer.await??;
        anyhow::ensure!(bad_answer.await?.is_err(), "the bad entry was written");
        anyhow::ensure!(first.len() == 2 && last.len() == 1);
        for (added, reason) in first.iter().chain(&last).zip(["one", "two", "three"]) {
            let stored = store.buildset_get(added.buildset_id).await?;
            anyhow::ensure!(stored.reason == reason, "{} for {reason}", stored.reason);
        }
        anyhow::ensure!(store.buildset_list(&Default::default()).await?.len() == 3);
        Ok(())
    }

    #[tokio::test]
    async fn a_group_splits_its_answers_in_the_order_the_callers_queued() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("group.db").display());
        let store = kiln_storage::open(&url).await?;
        let builder = store.builder_ensure("b", None).await?;
        let mut group = Vec::new();
        let mut answers = Vec::new();
        for caller in 0..5 {
            let (e, answer) = entry(
                (0..caller)
                    .map(|i| buildset(&format!("{caller}.{i}"), builder))
                    .collect(),
            );
            group.push(e);
            answers.push(answer);
        }
        commit(store.as_ref(), group).await;
        for (caller, answer) in answers.into_iter().enumerate() {
            let added = answer.await??;
            anyhow::ensure!(added.len() == caller);
            for (i, a) in added.iter().enumerate() {
                let stored = store.buildset_get(a.buildset_id).await?;
                anyhow::ensure!(stored.reason == format!("{caller}.{i}"));
            }
        }
        Ok(())
    }
}
