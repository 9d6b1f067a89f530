//! Wake-ups between masters: `NOTIFY` inside the transactions that make work for
//! others, and one `LISTEN`ing connection per store that turns them into
//! [`StoreSignal`]s.
//!
//! The channel is `kiln.<schema>`, so that stores in different schemas of one database
//! do not wake each other. Every payload starts with the sending store's origin token
//! (set per connection as `kiln.origin`), so that a store ignores its own notifications:
//! its engine already knows what it did.
//!
//! Notifications are a latency optimisation, never the only path: a pooler in
//! transaction mode drops them, and a dropped listening connection loses what was sent
//! meanwhile ([`StoreSignal::Lost`] says so). Engines keep a slow poll as well.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Executor, PgConnection};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::{Result, StoreSignal};
use kiln_model::{BuildsetId, ResultCode};

/// How many signals wait for a slow subscriber before it is told it lagged.
const SIGNAL_CAPACITY: usize = 1024;
/// How long the listener waits before reconnecting after an error.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// How many completed buildsets go into one notification (PostgreSQL limits a payload
/// to 8000 bytes; an entry takes at most 22).
const COMPLETE_PER_PAYLOAD: usize = 300;

/// The session setting that holds a connection's origin token.
pub(super) const ORIGIN_SETTING: &str = "kiln.origin";

/// Sends this transaction's signals (delivered when it commits; PostgreSQL folds
/// identical ones together).
pub(super) async fn notify(tx: &mut PgConnection, signals: &[StoreSignal]) -> Result<()> {
    let payloads: Vec<String> = signals.iter().flat_map(encode).collect();
    if payloads.is_empty() {
        return Ok(());
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_notify('kiln.' || current_schema(), current_setting('{ORIGIN_SETTING}', true) || ' ' || p)
         FROM unnest($1::text[]) p"
    )))
    .bind(payloads)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn encode(signal: &StoreSignal) -> Vec<String> {
    match signal {
        StoreSignal::Work => vec!["work".into()],
        StoreSignal::Cancel => vec!["cancel".into()],
        StoreSignal::Lost => Vec::new(),
        StoreSignal::Complete(done) => done
            .chunks(COMPLETE_PER_PAYLOAD)
            .map(|chunk| {
                let list: Vec<String> = chunk
                    .iter()
                    .map(|(bs, r)| format!("{}:{}", bs.0, r.code()))
                    .collect();
                format!("complete {}", list.join(","))
            })
            .collect(),
    }
}

fn decode(text: &str) -> Option<StoreSignal> {
    let (kind, rest) = text.split_once(' ').unwrap_or((text, ""));
    match kind {
        "work" => Some(StoreSignal::Work),
        "cancel" => Some(StoreSignal::Cancel),
        "complete" => rest
            .split(',')
            .map(|entry| {
                let (bs, r) = entry.split_once(':')?;
                let code = ResultCode::from_code(r.parse().ok()?)?;
                Some((BuildsetId(bs.parse().ok()?), code))
            })
            .collect::<Option<Vec<_>>>()
            .map(StoreSignal::Complete),
        _ => None,
    }
}

/// The listening side: a task that reads notifications and fans them out.
#[derive(Debug)]
pub(super) struct Notifier {
    sender: broadcast::Sender<StoreSignal>,
    /// Stops the listening task when the store goes.
    _task: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Notifier {
    /// Starts listening on the schema's channel with a connection of its own.
    pub(super) async fn start(
        connect: PgConnectOptions,
        schema: &str,
        origin: String,
    ) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(connect);
        let mut listener = PgListener::connect_with(&pool).await?;
        let channel = format!("kiln.{schema}");
        listener.listen(&channel).await?;
        let (sender, _) = broadcast::channel(SIGNAL_CAPACITY);
        let task = tokio::spawn(run(listener, sender.clone(), origin));
        Ok(Notifier {
            sender,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<StoreSignal> {
        self.sender.subscribe()
    }
}

async fn run(mut listener: PgListener, sender: broadcast::Sender<StoreSignal>, origin: String) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                let payload = notification.payload();
                let (from, text) = payload.split_once(' ').unwrap_or(("", payload));
                if from == origin {
                    continue;
                }
                match decode(text) {
                    Some(signal) => {
                        let _ = sender.send(signal);
                    }
                    None => debug!(payload, "ignoring a notification Kiln does not know"),
                }
            }
            Ok(None) => {
                warn!("the listening connection to PostgreSQL dropped; reconnecting");
                let _ = sender.send(StoreSignal::Lost);
            }
            Err(e) => {
                warn!(error = %e, "listening for other masters failed; retrying");
                let _ = sender.send(StoreSignal::Lost);
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// Sets a new connection's origin token.
pub(super) async fn set_origin(conn: &mut PgConnection, origin: &str) -> sqlx::Result<()> {
    conn.execute(sqlx::AssertSqlSafe(format!(
        "SET {ORIGIN_SETTING} = '{origin}'"
    )))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_survive_the_round_trip_through_a_payload() {
        let done: Vec<(BuildsetId, ResultCode)> = (0..700)
            .map(|i| (BuildsetId(i), ResultCode::ALL[(i % 7) as usize]))
            .collect();
        let payloads = encode(&StoreSignal::Complete(done.clone()));
        assert_eq!(payloads.len(), 3);
        assert!(payloads.iter().all(|p| p.len() < 8000 - 40));
        let back: Vec<(BuildsetId, ResultCode)> = payloads
            .iter()
            .flat_map(|p| match decode(p) {
                Some(StoreSignal::Complete(list)) => list,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, done);
        assert_eq!(decode("work"), Some(StoreSignal::Work));
        assert_eq!(decode("cancel"), Some(StoreSignal::Cancel));
        assert_eq!(decode("complete 1:99"), None);
        assert_eq!(decode("bogus"), None);
    }
}
