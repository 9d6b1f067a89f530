//! Idempotent submission, the part both backends share: which buildsets of a batch are
//! new, which return a buildset that holds their key already, and which repeat a key
//! an earlier buildset of the same batch brings. The backends find the existing keys
//! (under the lock that makes it atomic) and insert only the new buildsets.

use std::collections::{BTreeMap, BTreeSet};

use crate::{AddedBuildset, NewBuildset, Result, StorageError};

/// What one buildset of a batch becomes.
enum Answer {
    /// The buildset that holds its key already.
    Existing(AddedBuildset),
    /// The `n`th of the new buildsets.
    New(usize),
}

/// A batch split into the buildsets to insert and the answers to give.
pub(crate) struct Plan<'a> {
    /// The buildsets to insert, in the order given.
    pub(crate) fresh: Vec<&'a NewBuildset>,
    answers: Vec<Answer>,
}

/// The distinct idempotency keys of a batch, sorted (the order PostgreSQL locks them in).
pub(crate) fn keys(params: &[NewBuildset]) -> Vec<String> {
    params
        .iter()
        .filter_map(|p| p.idempotency_key.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Splits a batch, given the buildsets that hold some of its keys already. A key that
/// two buildsets of the batch bring is taken by the first; the second gets it back.
pub(crate) fn plan<'a>(
    params: &'a [NewBuildset],
    mut existing: BTreeMap<String, AddedBuildset>,
) -> Plan<'a> {
    let mut fresh = Vec::with_capacity(params.len());
    let mut answers = Vec::with_capacity(params.len());
    let mut taken: BTreeMap<&str, usize> = BTreeMap::new();
    for p in params {
        let key = p.idempotency_key.as_deref();
        if let Some(held) = key.and_then(|k| existing.get_mut(k)) {
            held.existing = true;
            answers.push(Answer::Existing(held.clone()));
        } else if let Some(&n) = key.and_then(|k| taken.get(k)) {
            answers.push(Answer::New(n));
        } else {
            if let Some(k) = key {
                taken.insert(k, fresh.len());
            }
            answers.push(Answer::New(fresh.len()));
            fresh.push(p);
        }
    }
    Plan { fresh, answers }
}

impl Plan<'_> {
    /// The answers in the order of the batch, given what inserting `fresh` made. A
    /// buildset that repeats a key of the batch is answered as existing.
    pub(crate) fn answer(self, added: Vec<AddedBuildset>) -> Result<Vec<AddedBuildset>> {
        let mut first = vec![true; added.len()];
        self.answers
            .into_iter()
            .map(|answer| match answer {
                Answer::Existing(held) => Ok(held),
                Answer::New(n) => {
                    let mut made = added.get(n).cloned().ok_or_else(|| {
                        StorageError::Invalid("adding buildsets returned too few".into())
                    })?;
                    made.existing = !std::mem::replace(&mut first[n], false);
                    Ok(made)
                }
            })
            .collect()
    }
}

/// Gathers `(key, buildset id, builder id, request id)` rows, one per request (or one
/// with no request for a buildset without builders), into the buildsets holding keys.
pub(crate) fn gather(
    rows: impl IntoIterator<Item = (String, i64, Option<i64>, Option<i64>)>,
) -> BTreeMap<String, AddedBuildset> {
    let mut held: BTreeMap<String, AddedBuildset> = BTreeMap::new();
    for (key, buildset, builder, request) in rows {
        let entry = held.entry(key).or_insert_with(|| AddedBuildset {
            buildset_id: kiln_model::BuildsetId(buildset),
            requests: BTreeMap::new(),
            existing: true,
        });
        if let (Some(builder), Some(request)) = (builder, request) {
            entry.requests.insert(
                kiln_model::BuilderId(builder),
                kiln_model::RequestId(request),
            );
        }
    }
    held
}
