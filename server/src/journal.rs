//! The event stream's journal: every engine event in the API's vocabulary with a number,
//! the latest [`REPLAY_EVENTS`](crate::REPLAY_EVENTS) kept, so that a client that lost
//! its connection resumes after the last event it saw (`Last-Event-ID`, which browsers'
//! EventSource sends by itself) instead of missing what happened meanwhile.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use kiln_engine::{Engine, Event};
use tokio::sync::broadcast;

use crate::wire::StreamEvent;

/// One numbered event: its id, its SSE name and its JSON data (shared by the kept copy
/// and every live client, not copied per client).
#[derive(Clone, Debug)]
pub(crate) struct Numbered {
    pub(crate) id: u64,
    pub(crate) kind: &'static str,
    pub(crate) data: Arc<str>,
}

/// The numbered events, the latest kept, and the live feed of new ones.
pub(crate) struct Journal {
    kept: Mutex<(u64, VecDeque<Numbered>)>,
    live: broadcast::Sender<Numbered>,
    capacity: usize,
}

/// What a client resuming after `last` gets: the kept events after it, whether some it
/// missed are gone, and the live feed from there.
pub(crate) struct Resume {
    pub(crate) replay: Vec<Numbered>,
    pub(crate) gap: Option<u64>,
    pub(crate) live: broadcast::Receiver<Numbered>,
}

impl Journal {
    /// A journal fed by the engine's events for as long as the engine lives.
    pub(crate) fn start(engine: &Engine, capacity: usize) -> Arc<Journal> {
        let capacity = capacity.max(1);
        let journal = Arc::new(Journal {
            kept: Mutex::new((0, VecDeque::with_capacity(capacity.min(4096)))),
            live: broadcast::channel(capacity).0,
            capacity,
        });
        let mut events = engine.subscribe();
        let weak = Arc::downgrade(&journal);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => wire(&event),
                    Err(broadcast::error::RecvError::Lagged(n)) => StreamEvent::Lagged {
                        missed: i64::try_from(n).unwrap_or(i64::MAX),
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(journal) = weak.upgrade() else {
                    return;
                };
                journal.push(&event);
            }
        });
        journal
    }

    fn push(&self, event: &StreamEvent) {
        // Written straight to text (no `serde_json::Value` on the way), once per event
        // whether or not a client listens, and shared from then on. The wire types have
        // only string map keys, so this cannot fail; `null` stands in if it ever did.
        let data: Arc<str> = serde_json::to_string(event)
            .unwrap_or_else(|_| "null".to_owned())
            .into();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.0 += 1;
        let numbered = Numbered {
            id: kept.0,
            kind: event.name(),
            data,
        };
        if kept.1.len() == self.capacity {
            kept.1.pop_front();
        }
        kept.1.push_back(numbered.clone());
        // Sent under the lock, so that a client taking the replay and subscribing under
        // it too sees each event once: in the replay or live, never both, never neither.
        let _ = self.live.send(numbered);
    }

    /// Resumes after event `last` (`None`: from now on).
    pub(crate) fn resume(&self, last: Option<u64>) -> Resume {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let live = self.live.subscribe();
        let Some(last) = last else {
            return Resume {
                replay: Vec::new(),
                gap: None,
                live,
            };
        };
        let oldest = kept.1.front().map_or(kept.0 + 1, |n| n.id);
        let gap = if last > kept.0 {
            // An id this server never gave: the client saw another run of it. What it
            // missed is unknown.
            Some(0)
        } else {
            (last + 1 < oldest).then(|| oldest - last - 1)
        };
        let replay = kept.1.iter().filter(|n| n.id > last).cloned().collect();
        Resume { replay, gap, live }
    }
}

/// An engine event in the API's vocabulary.
fn wire(event: &Event) -> StreamEvent {
    let results = |r: kiln_engine::model::ResultCode| i64::from(r.code());
    match event {
        Event::BuildsetSubmitted {
            buildset_id,
            reason,
            requests,
        } => StreamEvent::BuildsetSubmitted {
            bsid: buildset_id.0,
            reason: reason.clone(),
            brids: requests.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        },
        Event::BuildStarted {
            build_id,
            number,
            builder,
            request_id,
            buildset_id,
        } => StreamEvent::BuildStarted {
            buildid: build_id.0,
            number: *number,
            builder: builder.clone(),
            buildrequestid: request_id.0,
            bsid: buildset_id.0,
        },
        Event::BuildFinished {
            build_id,
            number,
            builder,
            request_id,
            buildset_id,
            results: r,
        } => StreamEvent::BuildFinished {
            buildid: build_id.0,
            number: *number,
            builder: builder.clone(),
            buildrequestid: request_id.0,
            bsid: buildset_id.0,
            results: results(*r),
        },
        Event::RequestCompleted {
            request_id,
            results: r,
        } => StreamEvent::RequestCompleted {
            buildrequestid: request_id.0,
            results: results(*r),
        },
        Event::BuildsetComplete {
            buildset_id,
            results: r,
        } => StreamEvent::BuildsetComplete {
            bsid: buildset_id.0,
            results: results(*r),
        },
        Event::BuildLog { build_id, records } => StreamEvent::BuildLog {
            buildid: build_id.0,
            records: i64::try_from(*records).unwrap_or(i64::MAX),
        },
        Event::BuildProgress { build_id } => StreamEvent::BuildProgress {
            buildid: build_id.0,
        },
        Event::ReporterProgress {
            reporter,
            cursor,
            delivered,
            dropped,
            last_error,
        } => StreamEvent::ReporterProgress {
            reporter: reporter.clone(),
            cursor: *cursor,
            delivered: i64::try_from(*delivered).unwrap_or(i64::MAX),
            dropped: i64::try_from(*dropped).unwrap_or(i64::MAX),
            last_error: last_error.clone(),
        },
        Event::OutboxPruned { events } => StreamEvent::OutboxPruned {
            events: i64::try_from(*events).unwrap_or(i64::MAX),
        },
        Event::MasterExpired {
            master_id,
            name,
            released,
        } => StreamEvent::MasterExpired {
            masterid: master_id.0,
            name: name.clone(),
            brids: released.iter().map(|r| r.0).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(capacity: usize) -> Journal {
        Journal {
            kept: Mutex::new((0, VecDeque::new())),
            live: broadcast::channel(16).0,
            capacity,
        }
    }

    fn progress(n: i64) -> StreamEvent {
        StreamEvent::BuildProgress { buildid: n }
    }

    #[test]
    fn a_client_resumes_after_its_last_event_and_hears_of_a_gap() {
        let j = journal(3);
        for n in 1..=5 {
            j.push(&progress(n));
        }
        // Kept: 3, 4, 5.
        let r = j.resume(Some(3));
        assert_eq!(r.replay.iter().map(|n| n.id).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(r.gap, None);
        let r = j.resume(Some(1));
        assert_eq!(r.replay.iter().map(|n| n.id).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(r.gap, Some(1), "event 2 is gone");
        let r = j.resume(Some(5));
        assert!(r.replay.is_empty() && r.gap.is_none());
        let mut r = j.resume(None);
        assert!(r.replay.is_empty());
        j.push(&progress(6));
        assert_eq!(r.live.try_recv().map(|n| n.id).ok(), Some(6));
        assert!(j.resume(Some(5)).replay[0].data.contains("\"buildid\":6"));
    }

    #[test]
    fn every_event_is_named_as_its_data_names_it() {
        let events = [
            StreamEvent::BuildsetSubmitted {
                bsid: 1,
                reason: "r".into(),
                brids: Default::default(),
            },
            StreamEvent::BuildStarted {
                buildid: 1,
                number: 1,
                builder: "b".into(),
                buildrequestid: 1,
                bsid: 1,
            },
            StreamEvent::BuildFinished {
                buildid: 1,
                number: 1,
                builder: "b".into(),
                buildrequestid: 1,
                bsid: 1,
                results: 0,
            },
            StreamEvent::RequestCompleted {
                buildrequestid: 1,
                results: 0,
            },
            StreamEvent::BuildsetComplete {
                bsid: 1,
                results: 0,
            },
            StreamEvent::BuildLog {
                buildid: 1,
                records: 1,
            },
            progress(1),
            StreamEvent::ReporterProgress {
                reporter: "r".into(),
                cursor: 0,
                delivered: 0,
                dropped: 0,
                last_error: None,
            },
            StreamEvent::OutboxPruned { events: 1 },
            StreamEvent::MasterExpired {
                masterid: 1,
                name: "m".into(),
                brids: Vec::new(),
            },
            StreamEvent::Lagged { missed: 1 },
        ];
        let j = journal(events.len());
        for event in &events {
            j.push(event);
        }
        for kept in j.resume(Some(0)).replay {
            let data: serde_json::Value = serde_json::from_str(&kept.data).unwrap();
            assert_eq!(data["event"], kept.kind, "{}", kept.data);
        }
    }
}
