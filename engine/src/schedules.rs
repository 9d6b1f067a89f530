//! Schedules (Buildbot's schedulers, River's and Oban's periodic jobs): a named
//! submission made every interval or at the times of a cron pattern in a time zone.
//!
//! Every tick is a point in time all masters compute alike: multiples of the interval
//! since the Unix epoch, or the cron pattern's times. A master fires a due tick by
//! submitting with the idempotency key `schedule:<name>:<tick>`, so that masters firing
//! the same tick make one buildset between them, and a master that dies between the
//! submit and recording the fire makes no second one when it fires the tick again. The
//! latest tick dealt with is stored (`schedules.last_fire`): a restart neither skips
//! nor repeats a fire. Ticks missed while no master ran are caught up as [`CatchUp`]
//! says.

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::client::Submission;
use crate::error::{EngineError, Result};
use kiln_model::{Property, SourceStamp, Timestamp};

/// The shortest interval of an `every` schedule.
pub const MIN_SCHEDULE_INTERVAL: Duration = Duration::from_secs(1);
/// The most missed ticks one catch-up fires (`catch_up = "all"`): the latest ones.
pub const MAX_CATCH_UP: usize = 100;
/// With `catch_up = "none"`, a tick found due later than this after its time is passed
/// over instead of fired.
pub const SCHEDULE_GRACE: Duration = Duration::from_secs(60);
/// The most cron times looked at when counting missed ticks: a bound on the work a
/// long outage of a fine-grained pattern causes (a year of every-minute ticks is half
/// of it).
const MAX_TICK_SCAN: usize = 1_000_000;

/// When a schedule fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    /// Every so many seconds, at multiples of the interval since the Unix epoch (every
    /// 15 minutes: at :00, :15, :30 and :45).
    Every {
        /// The interval.
        seconds: u64,
    },
    /// At the times of a cron pattern (minute hour day-of-month month day-of-week, with
    /// an optional leading seconds field) in a time zone.
    Cron {
        /// The pattern, such as `0 2 * * *`.
        pattern: String,
        /// An IANA time zone such as `Europe/Rome`; UTC by default.
        timezone: String,
    },
}

/// What a schedule does about ticks missed while no master ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Fire once for all of them (the latest).
    #[default]
    One,
    /// Fire none of them (a tick is still fired up to [`SCHEDULE_GRACE`] late).
    None,
    /// Fire each of them, at most [`MAX_CATCH_UP`] (the latest).
    All,
}

/// A schedule: its name, its timing, the submission it makes and its options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Its unique name.
    pub name: String,
    /// When it fires.
    pub timing: Timing,
    /// What each fire submits (builders, reason, properties, priority, sourcestamps).
    /// Each fire adds the properties `schedule` (the name) and `scheduled_for` (the
    /// tick, RFC 3339), and the idempotency key of its tick.
    pub submission: Submission,
    /// See [`CatchUp`].
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Fire only when the submission's sourcestamp (its repository and branch) has a
    /// newer revision than the schedule last built: the newest revision any buildset was
    /// submitted with on that repository and branch. The fire builds that revision. An
    /// idle branch is not rebuilt.
    #[serde(default)]
    pub only_if_changed: bool,
    /// With `only_if_changed`, watch this buildset property instead of a sourcestamp:
    /// fire only when the newest value any buildset was submitted with differs from the
    /// value the schedule last built, and build with that value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_property: Option<String>,
}

/// A timing parsed and ready to compute ticks.
enum Ticks {
    Every(i64),
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

impl ScheduleConfig {
    /// A schedule firing every `interval`.
    pub fn every(name: impl Into<String>, interval: Duration, submission: Submission) -> Self {
        ScheduleConfig {
            name: name.into(),
            timing: Timing::Every {
                seconds: interval.as_secs(),
            },
            submission,
            catch_up: CatchUp::One,
            only_if_changed: false,
            watch_property: None,
        }
    }

    /// A schedule firing at the times of a cron pattern in a time zone.
    pub fn cron(
        name: impl Into<String>,
        pattern: impl Into<String>,
        timezone: impl Into<String>,
        submission: Submission,
    ) -> Self {
        ScheduleConfig {
            name: name.into(),
            timing: Timing::Cron {
                pattern: pattern.into(),
                timezone: timezone.into(),
            },
            submission,
            catch_up: CatchUp::One,
            only_if_changed: false,
            watch_property: None,
        }
    }

    /// Checks the name, the timing and the options.
    pub fn check(&self) -> Result<()> {
        let here = format!("schedule {:?}", self.name);
        if self.name.trim().is_empty() {
            return Err(EngineError::Invalid("a schedule has an empty name".into()));
        }
        if self.submission.builders.is_empty() {
            return Err(EngineError::Invalid(format!("{here} names no builder")));
        }
        self.ticks()
            .map_err(|e| EngineError::Invalid(format!("{here}: {e}")))?;
        match &self.watch_property {
            Some(name) if name.trim().is_empty() => {
                return Err(EngineError::Invalid(format!(
                    "{here}: the watched property has an empty name"
                )));
            }
            Some(_) if !self.only_if_changed => {
                return Err(EngineError::Invalid(format!(
                    "{here}: a watched property needs only_if_changed"
                )));
            }
            Some(_) => {}
            None if self.only_if_changed && self.tracked().is_none() => {
                return Err(EngineError::Invalid(format!(
                    "{here}: only_if_changed needs a property, or a sourcestamp with a repository and a branch, to watch"
                )));
            }
            None => {}
        }
        Ok(())
    }

    fn ticks(&self) -> std::result::Result<Ticks, String> {
        match &self.timing {
            Timing::Every { seconds } => {
                if *seconds < MIN_SCHEDULE_INTERVAL.as_secs() {
                    return Err(format!(
                        "every {seconds} s is shorter than the {} s allowed",
                        MIN_SCHEDULE_INTERVAL.as_secs()
                    ));
                }
                let micros = i64::try_from(*seconds)
                    .ok()
                    .and_then(|s| s.checked_mul(1_000_000))
                    .ok_or_else(|| format!("every {seconds} s is too long"))?;
                Ok(Ticks::Every(micros))
            }
            Timing::Cron { pattern, timezone } => {
                let cron = croner::Cron::from_str(pattern)
                    .map_err(|e| format!("cron pattern {pattern:?}: {e}"))?;
                let tz = chrono_tz::Tz::from_str(timezone)
                    .map_err(|_| format!("unknown time zone {timezone:?}"))?;
                Ok(Ticks::Cron(Box::new(cron), tz))
            }
        }
    }

    /// The sourcestamp `only_if_changed` watches: the first with a repository and a
    /// branch.
    fn tracked(&self) -> Option<&SourceStamp> {
        self.submission.sourcestamps.iter().find(|s| {
            !s.repository.is_empty() && s.branch.as_deref().is_some_and(|b| !b.is_empty())
        })
    }

    /// The first tick after `t`.
    pub fn next_after(&self, t: Timestamp) -> Result<Option<Timestamp>> {
        let ticks = self.ticks().map_err(EngineError::Invalid)?;
        Ok(next_tick(&ticks, t))
    }

    /// The ticks in (`after`, `until`], at most the latest `max` of them, oldest first.
    pub fn ticks_between(
        &self,
        after: Timestamp,
        until: Timestamp,
        max: usize,
    ) -> Result<Vec<Timestamp>> {
        let ticks = self.ticks().map_err(EngineError::Invalid)?;
        if max == 0 || until <= after {
            return Ok(Vec::new());
        }
        let mut out = std::collections::VecDeque::new();
        match ticks {
            Ticks::Every(step) => {
                let last = until.timestamp_micros().div_euclid(step) * step;
                let first = after.timestamp_micros().div_euclid(step) * step + step;
                let mut t = last;
                while t >= first && out.len() < max {
                    if let Some(ts) = chrono::DateTime::from_timestamp_micros(t) {
                        out.push_front(ts);
                    }
                    t -= step;
                }
            }
            Ticks::Cron(..) => {
                let mut t = after;
                for _ in 0..MAX_TICK_SCAN {
                    match next_tick(&ticks, t) {
                        Some(next) if next <= until => {
                            out.push_back(next);
                            if out.len() > max {
                                out.pop_front();
                            }
                            t = next;
                        }
                        _ => break,
                    }
                }
            }
        }
        Ok(out.into())
    }

    /// Of the ticks due at `now` since `last_fire`, those to fire as [`CatchUp`] says,
    /// oldest first, and the latest due tick (recorded as dealt with even when passed
    /// over).
    pub fn due(
        &self,
        last_fire: Timestamp,
        now: Timestamp,
    ) -> Result<(Vec<Timestamp>, Option<Timestamp>)> {
        let window = match self.catch_up {
            CatchUp::All => MAX_CATCH_UP,
            CatchUp::One | CatchUp::None => 1,
        };
        let due = self.ticks_between(last_fire, now, window)?;
        let latest = due.last().copied();
        let fire = match self.catch_up {
            CatchUp::None => due
                .into_iter()
                .filter(|t| {
                    now - *t <= TimeDelta::from_std(SCHEDULE_GRACE).unwrap_or(TimeDelta::MAX)
                })
                .collect(),
            CatchUp::One | CatchUp::All => due,
        };
        Ok((fire, latest))
    }

    /// The submission of one fire: the schedule's own, with its properties, the
    /// idempotency key of the tick and, for `only_if_changed`, the revision to build.
    pub fn submission_for(&self, tick: Timestamp, revision: Option<&SourceStamp>) -> Submission {
        let mut s = self.submission.clone();
        if s.reason.is_empty() {
            s.reason = format!("schedule {}", self.name);
        }
        s.properties.insert(
            "schedule".into(),
            Property::new(serde_json::json!(self.name), "schedule"),
        );
        s.properties.insert(
            "scheduled_for".into(),
            Property::new(
                serde_json::json!(tick.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                "schedule",
            ),
        );
        s.idempotency_key = Some(tick_key(&self.name, tick));
        if let (Some(latest), Some(tracked)) = (revision, self.tracked()) {
            let tracked = tracked.clone();
            for stamp in &mut s.sourcestamps {
                if *stamp == tracked {
                    stamp.revision = latest.revision.clone();
                }
            }
        }
        s
    }

    /// What `only_if_changed` watches: the repository and branch.
    pub fn watched(&self) -> Option<(&str, &str)> {
        self.tracked().map(|s| {
            (
                s.repository.as_str(),
                s.branch.as_deref().unwrap_or_default(),
            )
        })
    }
}

/// The idempotency key of a schedule's tick. Bounded by the name, which is bounded like
/// any builder name.
pub fn tick_key(name: &str, tick: Timestamp) -> String {
    format!("schedule:{name}:{}", tick.timestamp_micros())
}

fn next_tick(ticks: &Ticks, t: Timestamp) -> Option<Timestamp> {
    match ticks {
        Ticks::Every(step) => {
            let next = t
                .timestamp_micros()
                .div_euclid(*step)
                .checked_add(1)?
                .checked_mul(*step)?;
            chrono::DateTime::from_timestamp_micros(next)
        }
        Ticks::Cron(cron, tz) => cron
            .find_next_occurrence(&t.with_timezone(tz), false)
            .ok()
            .map(|n| n.with_timezone(&Utc)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Timestamp {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap_or_default()
    }

    fn nightly(tz: &str) -> ScheduleConfig {
        ScheduleConfig::cron(
            "nightly",
            "0 2 * * *",
            tz,
            Submission::new("n").builder("b"),
        )
    }

    #[test]
    fn intervals_tick_at_multiples_since_the_epoch_whoever_computes_them() {
        let s = ScheduleConfig::every(
            "q",
            Duration::from_secs(900),
            Submission::new("q").builder("b"),
        );
        let ticks = s.ticks_between(at(2026, 3, 1, 10, 7), at(2026, 3, 1, 11, 0), 10);
        assert_eq!(
            ticks.ok(),
            Some(vec![
                at(2026, 3, 1, 10, 15),
                at(2026, 3, 1, 10, 30),
                at(2026, 3, 1, 10, 45),
                at(2026, 3, 1, 11, 0)
            ])
        );
        assert_eq!(
            s.next_after(at(2026, 3, 1, 11, 0)).ok().flatten(),
            Some(at(2026, 3, 1, 11, 15))
        );
    }

    #[test]
    fn a_nightly_cron_fires_at_two_in_its_own_time_zone_across_summer_time() {
        let rome = nightly("Europe/Rome");
        // 02:00 in Rome is 01:00 UTC in winter and 00:00 UTC in summer.
        assert_eq!(
            rome.next_after(at(2026, 1, 10, 12, 0)).ok().flatten(),
            Some(at(2026, 1, 11, 1, 0))
        );
        assert_eq!(
            rome.next_after(at(2026, 7, 10, 12, 0)).ok().flatten(),
            Some(at(2026, 7, 11, 0, 0))
        );
        let week = rome.ticks_between(at(2026, 1, 1, 0, 0), at(2026, 1, 8, 0, 0), 100);
        assert_eq!(week.map(|w| w.len()).ok(), Some(7));
    }

    #[test]
    fn missed_ticks_are_caught_up_once_all_or_not_at_all() {
        let mut s = ScheduleConfig::every(
            "h",
            Duration::from_secs(3600),
            Submission::new("h").builder("b"),
        );
        let down = at(2026, 3, 1, 0, 30);
        let back = at(2026, 3, 1, 5, 10);
        let (one, latest) = s.due(down, back).unwrap_or_default();
        assert_eq!(one, vec![at(2026, 3, 1, 5, 0)]);
        assert_eq!(latest, Some(at(2026, 3, 1, 5, 0)));
        s.catch_up = CatchUp::All;
        assert_eq!(s.due(down, back).map(|d| d.0.len()).ok(), Some(5));
        s.catch_up = CatchUp::None;
        let (none, latest) = s.due(down, back).unwrap_or_default();
        assert!(none.is_empty() && latest == Some(at(2026, 3, 1, 5, 0)));
        // On time (within the grace) it fires all the same.
        let (on_time, _) = s
            .due(down, at(2026, 3, 1, 5, 0) + TimeDelta::seconds(5))
            .unwrap_or_default();
        assert_eq!(on_time.len(), 1);
        // A year of every-second ticks stays bounded.
        s.catch_up = CatchUp::All;
        s.timing = Timing::Every { seconds: 1 };
        let (many, _) = s
            .due(at(2025, 1, 1, 0, 0), at(2026, 1, 1, 0, 0))
            .unwrap_or_default();
        assert_eq!(many.len(), MAX_CATCH_UP);
    }

    #[test]
    fn bad_timings_are_refused_with_the_reason() {
        let b = || Submission::new("x").builder("b");
        for (s, why) in [
            (
                ScheduleConfig::cron("c", "61 * * * *", "UTC", b()),
                "cron pattern",
            ),
            (
                ScheduleConfig::cron("c", "0 2 * * *", "Mars/Olympus", b()),
                "time zone",
            ),
            (ScheduleConfig::every("e", Duration::ZERO, b()), "shorter"),
            (
                ScheduleConfig::every("", Duration::from_secs(60), b()),
                "empty name",
            ),
            (
                ScheduleConfig::every("n", Duration::from_secs(60), Submission::new("x")),
                "no builder",
            ),
        ] {
            let e = s.check().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(why), "{e}");
        }
        let mut watch = ScheduleConfig::every("w", Duration::from_secs(60), b());
        watch.only_if_changed = true;
        assert!(watch.check().is_err());
    }

    #[test]
    fn each_fire_carries_its_tick_as_key_and_properties() {
        let s = nightly("UTC");
        let tick = at(2026, 3, 1, 2, 0);
        let fire = s.submission_for(tick, None);
        assert_eq!(
            fire.idempotency_key.as_deref(),
            Some(tick_key("nightly", tick).as_str())
        );
        assert_eq!(
            fire.properties["schedule"].value,
            serde_json::json!("nightly")
        );
        assert_eq!(fire.reason, "n");
    }
}

/// The schedules registered on one engine, and what wakes their service.
#[derive(Default)]
pub(crate) struct ScheduleSet {
    configs: std::sync::RwLock<std::collections::BTreeMap<String, ScheduleConfig>>,
    wake: tokio::sync::Notify,
    started: std::sync::atomic::AtomicBool,
}

impl ScheduleSet {
    /// Adds or replaces a schedule; `true` when the service still has to be started.
    pub(crate) fn insert(&self, config: ScheduleConfig) -> bool {
        self.configs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(config.name.clone(), config);
        self.wake.notify_one();
        !self.started.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    fn all(&self) -> Vec<ScheduleConfig> {
        self.configs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// How long the service waits before trying a schedule again after the database
/// failed it.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest the service sleeps without looking (a clock stepped forward is noticed
/// within it).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Fires the engine's schedules as their ticks come, until the engine stops.
pub(crate) async fn service(
    set: std::sync::Arc<ScheduleSet>,
    engine: std::sync::Weak<crate::engine::Shared>,
) {
    loop {
        let Some(shared) = engine.upgrade() else {
            return;
        };
        let now = kiln_model::now();
        let mut wait = MAX_SLEEP;
        for config in set.all() {
            let next = match fire_due(&shared, &config, now).await {
                Ok(next) => next.and_then(|n| (n - now).to_std().ok()),
                Err(e) => {
                    tracing::warn!(schedule = %config.name, error = %e, "a schedule could not fire; trying again soon");
                    Some(RETRY_AFTER)
                }
            };
            if let Some(next) = next {
                wait = wait.min(next);
            }
        }
        let mut stopping = shared.stopping();
        drop(shared);
        // A millisecond past the tick, so that it is due when the loop looks again.
        let wait = wait + Duration::from_millis(1);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = set.wake.notified() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Fires what is due of one schedule; returns when it fires next.
async fn fire_due(
    shared: &crate::engine::Shared,
    config: &ScheduleConfig,
    now: Timestamp,
) -> Result<Option<Timestamp>> {
    let client = &shared.client;
    let row = client.schedule(&config.name).await?;
    let (fire, latest) = config.due(row.last_fire, now)?;
    let next = config.next_after(now)?;
    let Some(latest) = latest else {
        return Ok(next);
    };
    let mut last_built = row.last_buildset_id;
    for tick in fire {
        let mut watched = None;
        if let Some(name) = config.watch_property.as_deref() {
            match changed_property(client, name, last_built).await? {
                Some(value) => watched = Some((name, value)),
                None => {
                    tracing::debug!(schedule = %config.name, %tick, property = name, "property unchanged; not fired");
                    client
                        .schedule_fired(&config.name, tick, None, next)
                        .await?;
                    continue;
                }
            }
        }
        let revision = if config.only_if_changed && watched.is_none() {
            match changed(client, config, last_built).await? {
                Some(stamp) => Some(stamp),
                None => {
                    tracing::debug!(schedule = %config.name, %tick, "nothing changed; not fired");
                    client
                        .schedule_fired(&config.name, tick, None, next)
                        .await?;
                    continue;
                }
            }
        } else {
            None
        };
        let mut submission = config.submission_for(tick, revision.as_ref());
        if let Some((name, value)) = watched {
            submission.properties.insert(name.to_owned(), value);
        }
        let submitted = shared.submit(std::slice::from_ref(&submission)).await?;
        let buildset = submitted.first().map(|s| s.buildset_id);
        if submitted.first().is_some_and(|s| !s.existing) {
            tracing::info!(schedule = %config.name, %tick, buildset = ?buildset, "schedule fired");
        }
        client
            .schedule_fired(&config.name, tick, buildset, next)
            .await?;
        last_built = buildset.or(last_built);
    }
    // Passed-over ticks (catch_up = "none") are dealt with too.
    client
        .schedule_fired(&config.name, latest, None, next)
        .await?;
    Ok(next)
}

/// For `only_if_changed` on a property: its newest submitted value, if that is not the
/// value of the buildset the schedule last built (a deleted or property-less one counts
/// as changed).
async fn changed_property(
    client: &crate::Client,
    name: &str,
    last_built: Option<kiln_model::BuildsetId>,
) -> Result<Option<Property>> {
    let Some((newest, latest)) = client.latest_property(name).await? else {
        return Ok(None);
    };
    if let Some(built) = last_built {
        if built == newest {
            return Ok(None);
        }
        let before = match client.buildset_properties(built).await {
            Ok(props) => props.get(name).cloned(),
            Err(EngineError::Storage(kiln_storage::StorageError::NotFound { .. })) => None,
            Err(e) => return Err(e),
        };
        if before.is_some_and(|b| b.value == latest.value) {
            return Ok(None);
        }
    }
    Ok(Some(latest))
}

/// For `only_if_changed`: the watched stamp at the newest revision any buildset was
/// submitted with on its repository and branch, if that is not what the schedule last
/// built.
async fn changed(
    client: &crate::Client,
    config: &ScheduleConfig,
    last_built: Option<kiln_model::BuildsetId>,
) -> Result<Option<SourceStamp>> {
    use kiln_storage::{Query, RequestField};
    let Some((repository, branch)) = config.watched() else {
        return Ok(None);
    };
    let newest = client
        .query_requests(
            &Query::new()
                .eq(RequestField::Repository, repository)
                .eq(RequestField::Branch, branch)
                .order_by(RequestField::Id, true)
                .limit(1),
        )
        .await?;
    let Some(request) = newest.items.first() else {
        return Ok(None);
    };
    let on_branch = |stamps: Vec<SourceStamp>| {
        stamps
            .into_iter()
            .find(|s| s.repository == repository && s.branch.as_deref() == Some(branch))
    };
    let Some(latest) = on_branch(client.buildset_sourcestamps(request.buildset_id).await?) else {
        return Ok(None);
    };
    if let Some(built) = last_built {
        let built = match client.buildset_sourcestamps(built).await {
            Ok(stamps) => on_branch(stamps),
            // The last buildset may have been deleted since: then it counts as changed.
            Err(EngineError::Storage(kiln_storage::StorageError::NotFound { .. })) => None,
            Err(e) => return Err(e),
        };
        if built.is_some_and(|b| b.revision == latest.revision) {
            return Ok(None);
        }
    }
    Ok(Some(latest))
}
