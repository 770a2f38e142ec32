//! Slowing down password guessing and mass registration, per source.
//!
//! Login: every attempt counts against two subjects, the pair (email,
//! source) and the source alone. Past a number of free failures, each
//! further attempt of a subject must wait, twice as long after every
//! failure, up to a maximum; counted failures fade away at a steady rate,
//! and a right password forgets the pair's failures. Nothing is ever
//! locked: an attacker guessing one account from one source slows down only
//! that pair and that source, so the owner logging in from anywhere else is
//! not affected, and every wait ends.
//!
//! Once a subject is at its limit, an attempt is counted *before* its
//! password is checked (and taken back if the password was right), so that
//! concurrent guesses cannot all slip in before the first failure is
//! written: past the free failures, attempts are strictly one per wait.
//! Below the limit a failure is counted after the check, so concurrent
//! logins of someone who never failed do not get in each other's way; the
//! concurrency of one source is bounded anyway (`inflight`).
//!
//! Register: a source may register `burst` accounts at once, then one more
//! per `interval` (the generic cell rate algorithm: one timestamp per
//! source, the moment its whole burst is available again).
//!
//! The counts live in the database, so every replica sees the same ones: an
//! attacker gains nothing by spreading attempts over replicas. Decisions are
//! pure functions of the stored record and the database's clock, below;
//! the SQL around them only reads and writes records under row locks.
//! Records that no longer slow anything down are deleted a few at a time by
//! later writes, so the tables hold only what matters.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::Email;
use crate::source::Source;

/// How failures slow down one kind of subject.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    /// Failures that cost nothing: from this many on, each attempt waits.
    pub(crate) failures_before_delay: u32,
    /// The wait after `failures_before_delay` failures; it doubles with
    /// each failure after that.
    pub(crate) first_delay: Duration,
    pub(crate) max_delay: Duration,
    /// One counted failure is forgotten per `decay` (continuously).
    pub(crate) decay: Duration,
}

/// The backoffs of the two subjects of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LoginThrottle {
    pub(crate) per_account_and_source: Backoff,
    pub(crate) per_source: Backoff,
}

/// How registrations are paced per source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RegistrationPace {
    /// Registrations a source may make at once.
    pub(crate) burst: u32,
    /// Time after which a source may make one more.
    pub(crate) interval: Duration,
}

/// One subject's counted attempts as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Attempts {
    /// Attempts counted and not yet taken back or forgotten, as of
    /// `last_attempt_at` (fractional, because forgetting is continuous).
    pub(crate) failures: f64,
    pub(crate) last_attempt_at: DateTime<Utc>,
}

/// The whole failures, as the delay counts them (tolerating the rounding
/// of a fraction that should be whole).
fn whole(failures: f64) -> u32 {
    let rounded = (failures - 1e-9).ceil().max(0.0);
    if rounded >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // In range and not negative, checked just above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let whole = rounded as u32;
        whole
    }
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// `duration` after `time`, or the end of time (a setting of centuries
/// must not overflow the clock).
fn later(time: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    time.checked_add_signed(to_chrono(duration))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Backoff {
    /// The wait that `failures` counted attempts impose on the next one.
    pub(crate) fn delay(&self, failures: f64) -> Duration {
        let failures = whole(failures);
        if failures < self.failures_before_delay {
            return Duration::ZERO;
        }
        let doublings = (failures - self.failures_before_delay).min(31);
        self.first_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }

    /// `attempts.failures`, less what has faded away by `now`.
    fn remaining(&self, attempts: &Attempts, now: DateTime<Utc>) -> f64 {
        let elapsed = (now - attempts.last_attempt_at)
            .to_std()
            .unwrap_or_default();
        let faded = elapsed.as_secs_f64() / self.decay.as_secs_f64().max(f64::MIN_POSITIVE);
        (attempts.failures - faded).max(0.0)
    }

    /// Checks an attempt at `now` against the stored record: how long it
    /// must wait (and then it counts for nothing), or whether it goes ahead
    /// counted already (`Some`, the record to store: this attempt would
    /// make the next one wait if it failed) or not (`None`: a failure is
    /// counted once known, by [`count_failure`](Self::count_failure)).
    pub(crate) fn check_attempt(
        &self,
        attempts: &Attempts,
        now: DateTime<Utc>,
    ) -> Result<Option<Attempts>, Duration> {
        let allowed_at = later(attempts.last_attempt_at, self.delay(attempts.failures));
        if now < allowed_at {
            return Err((allowed_at - now).to_std().unwrap_or_default());
        }
        let counted = self.count_failure(attempts, now);
        Ok((self.delay(counted.failures) > Duration::ZERO).then_some(counted))
    }

    /// The record after one more failure at `now`.
    pub(crate) fn count_failure(&self, attempts: &Attempts, now: DateTime<Utc>) -> Attempts {
        Attempts {
            failures: self.remaining(attempts, now) + 1.0,
            last_attempt_at: now,
        }
    }

    /// When the record stops mattering: its wait is over and every failure
    /// has faded.
    pub(crate) fn forget_at(&self, attempts: &Attempts) -> DateTime<Utc> {
        let waited = later(attempts.last_attempt_at, self.delay(attempts.failures));
        let fading = Duration::try_from_secs_f64(self.decay.as_secs_f64() * attempts.failures)
            .unwrap_or(Duration::MAX);
        waited.max(later(attempts.last_attempt_at, fading))
    }
}

impl RegistrationPace {
    /// Counts a registration at `now` against a source whose burst is whole
    /// again at `restored_at`: the new such time, or how long to wait.
    pub(crate) fn count(
        &self,
        restored_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, Duration> {
        let after = later(restored_at.max(now), self.interval);
        let allowance = to_chrono(self.interval.saturating_mul(self.burst));
        if after - now > allowance {
            return Err((after - now - allowance).to_std().unwrap_or_default());
        }
        Ok(after)
    }
}

/// The subjects a login attempt counts against.
#[derive(Debug, Clone)]
pub(crate) struct LoginSubjects {
    account_and_source: String,
    source: String,
}

impl LoginSubjects {
    pub(crate) fn new(email: &Email, source: Source) -> Self {
        Self {
            account_and_source: format!("{}{source}", account_prefix(email)),
            source: format!("source:{source}"),
        }
    }

    /// Each subject with its backoff and whether `counted` covers it,
    /// sorted by name, so that concurrent attempts lock the rows in the
    /// same order.
    fn each<'a>(
        &'a self,
        throttle: &'a LoginThrottle,
        counted: Counted,
    ) -> [(&'a str, &'a Backoff, bool); 2] {
        let mut each = [
            (
                self.account_and_source.as_str(),
                &throttle.per_account_and_source,
                counted.account_and_source,
            ),
            (self.source.as_str(), &throttle.per_source, counted.source),
        ];
        each.sort_by(|a, b| a.0.cmp(b.0));
        each
    }
}

/// What every subject of `email` starts with. An email cannot contain `|`
/// in its domain, so no other email's subjects start the same.
fn account_prefix(email: &Email) -> String {
    format!("account:{email}|source:")
}

/// Stale records deleted by each write: more than the records a write
/// creates (two), so the tables shrink back after a burst.
const CLEAN_UP_PER_WRITE: i64 = 8;

/// Which subjects an attempt counted before its password was checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub(crate) struct Counted {
    account_and_source: bool,
    source: bool,
}

/// Checks a login attempt against both subjects: how long it must wait
/// (counting nothing), or which subjects it was counted against already.
/// Run it in the transaction that reads the user, before the password is
/// checked.
pub(crate) async fn check_login_attempt(
    conn: &mut PgConnection,
    subjects: &LoginSubjects,
    throttle: &LoginThrottle,
) -> anyhow::Result<Result<Counted, Duration>> {
    let each = subjects.each(throttle, Counted::default());
    let stored = lock_attempts(conn, &each.map(|(name, _, _)| name)).await?;
    let mut counted = Counted::default();
    let mut writes = Vec::new();
    let mut longest_wait = None::<Duration>;
    for ((name, backoff, _), (attempts, now)) in each.iter().zip(&stored) {
        match backoff.check_attempt(attempts, *now) {
            Err(wait) => longest_wait = Some(longest_wait.unwrap_or_default().max(wait)),
            Ok(None) => {}
            Ok(Some(next)) => {
                if *name == subjects.source {
                    counted.source = true;
                } else {
                    counted.account_and_source = true;
                }
                writes.push((*name, next, backoff.forget_at(&next)));
            }
        }
    }
    if let Some(wait) = longest_wait {
        return Ok(Err(wait));
    }
    store_attempts(conn, &writes).await?;
    Ok(Ok(counted))
}

/// Counts a failed login against the subjects its check did not count it
/// against already.
pub(crate) async fn count_login_failure(
    conn: &mut PgConnection,
    subjects: &LoginSubjects,
    throttle: &LoginThrottle,
    counted: Counted,
) -> anyhow::Result<()> {
    let each = subjects.each(throttle, counted);
    let stored = lock_attempts(conn, &each.map(|(name, _, _)| name)).await?;
    let writes: Vec<_> = each
        .iter()
        .zip(&stored)
        .filter(|((_, _, counted), _)| !counted)
        .map(|((name, backoff, _), (attempts, now))| {
            let next = backoff.count_failure(attempts, *now);
            (*name, next, backoff.forget_at(&next))
        })
        .collect();
    store_attempts(conn, &writes).await
}

/// After a right password: the pair's failures are forgotten (the owner is
/// back), and the source's attempt, if it was counted, is taken back (but
/// not its earlier failures: one good account must not wash a source clean).
pub(crate) async fn forgive_login_attempt(
    conn: &mut PgConnection,
    subjects: &LoginSubjects,
    counted: Counted,
) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM login_attempts WHERE subject = $1")
        .bind(&subjects.account_and_source)
        .execute(&mut *conn)
        .await
        .context("forgetting the account's failed logins")?;
    if counted.source {
        sqlx::query(
            "UPDATE login_attempts SET failures = greatest(failures - 1, 0) WHERE subject = $1",
        )
        .bind(&subjects.source)
        .execute(&mut *conn)
        .await
        .context("taking back the source's login attempt")?;
    }
    Ok(())
}

/// Locks the records of `names` (sorted) and reads them with the database's
/// clock; a subject without a record has no failures.
async fn lock_attempts(
    conn: &mut PgConnection,
    names: &[&str],
) -> anyhow::Result<Vec<(Attempts, DateTime<Utc>)>> {
    /// A subject's record, if it has one, and the database's clock.
    #[derive(sqlx::FromRow)]
    struct Row {
        failures: Option<f64>,
        last_attempt_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.failures, a.last_attempt_at, now() AS now
         FROM unnest($1::text[]) WITH ORDINALITY AS s(subject, n)
         LEFT JOIN LATERAL (
             SELECT failures, last_attempt_at FROM login_attempts
             WHERE subject = s.subject FOR UPDATE
         ) a ON true
         ORDER BY s.n",
    )
    .bind(names)
    .fetch_all(&mut *conn)
    .await
    .context("reading login attempt records")?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let attempts = Attempts {
                failures: row.failures.unwrap_or(0.0),
                last_attempt_at: row.last_attempt_at.unwrap_or(row.now),
            };
            (attempts, row.now)
        })
        .collect())
}

/// Writes records read by [`lock_attempts`] in the same transaction, and
/// deletes a few stale ones. (A record missing when read may have been
/// created since by a concurrent attempt: then one of the two counts is
/// lost, which can happen only while a subject has no failures yet.)
async fn store_attempts(
    conn: &mut PgConnection,
    writes: &[(&str, Attempts, DateTime<Utc>)],
) -> anyhow::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = writes.iter().map(|(name, _, _)| *name).collect();
    let failures: Vec<f64> = writes.iter().map(|(_, a, _)| a.failures).collect();
    let at: Vec<DateTime<Utc>> = writes.iter().map(|(_, a, _)| a.last_attempt_at).collect();
    let forget: Vec<DateTime<Utc>> = writes.iter().map(|(_, _, f)| *f).collect();
    sqlx::query(
        "INSERT INTO login_attempts (subject, failures, last_attempt_at, forget_at)
         SELECT * FROM unnest($1::text[], $2::float8[], $3::timestamptz[], $4::timestamptz[])
         ON CONFLICT (subject) DO UPDATE SET failures = EXCLUDED.failures,
             last_attempt_at = EXCLUDED.last_attempt_at, forget_at = EXCLUDED.forget_at",
    )
    .bind(&names)
    .bind(&failures)
    .bind(&at)
    .bind(&forget)
    .execute(&mut *conn)
    .await
    .context("counting a login attempt")?;
    sqlx::query(
        "DELETE FROM login_attempts WHERE subject IN (
             SELECT subject FROM login_attempts WHERE forget_at < now()
             ORDER BY forget_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(CLEAN_UP_PER_WRITE)
    .execute(&mut *conn)
    .await
    .context("deleting stale login attempt records")?;
    Ok(())
}

/// Forgets the failed logins of `email` from every source (its password
/// was just set by an admin).
pub(crate) async fn forget_account(conn: &mut PgConnection, email: &Email) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM login_attempts WHERE starts_with(subject, $1)")
        .bind(account_prefix(email))
        .execute(conn)
        .await
        .context("forgetting the account's failed logins")?;
    Ok(())
}

/// Counts a registration from `source`, or returns how long it must wait.
/// Its own short transaction: the caller hashes the password afterwards.
pub(crate) async fn count_registration(
    conn: &mut PgConnection,
    source: Source,
    pace: &RegistrationPace,
) -> anyhow::Result<Result<(), Duration>> {
    let source = source.to_string();
    sqlx::query(
        "INSERT INTO registration_pace (source, restored_at) VALUES ($1, now())
         ON CONFLICT (source) DO NOTHING",
    )
    .bind(&source)
    .execute(&mut *conn)
    .await
    .context("creating the registration pace record")?;
    let (restored_at, now): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT restored_at, now() FROM registration_pace WHERE source = $1 FOR UPDATE",
    )
    .bind(&source)
    .fetch_one(&mut *conn)
    .await
    .context("reading the registration pace")?;
    let restored_at = match pace.count(restored_at, now) {
        Ok(restored_at) => restored_at,
        Err(wait) => return Ok(Err(wait)),
    };
    sqlx::query("UPDATE registration_pace SET restored_at = $2 WHERE source = $1")
        .bind(&source)
        .bind(restored_at)
        .execute(&mut *conn)
        .await
        .context("counting a registration")?;
    sqlx::query(
        "DELETE FROM registration_pace WHERE source IN (
             SELECT source FROM registration_pace WHERE restored_at < now()
             ORDER BY restored_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(CLEAN_UP_PER_WRITE)
    .execute(&mut *conn)
    .await
    .context("deleting stale registration pace records")?;
    Ok(Ok(()))
}

/// The purge of login-attempt records forgotten (`forget_at`) longer than
/// `retention` ago. Writes delete a few such rows as they go; this catches
/// the rest when logins stop.
pub(crate) fn login_attempt_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "login_attempts",
        retention,
        // Oldest first through `login_attempts_forget_at`.
        statement: "DELETE FROM login_attempts WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM login_attempts WHERE forget_at < now() - $1
                        ORDER BY forget_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

/// The purge of registration paces whose burst was whole again
/// (`restored_at`) longer than `retention` ago: such a row changes nothing.
pub(crate) fn registration_pace_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "registration_pace",
        retention,
        // Oldest first through `registration_pace_restored_at`.
        statement: "DELETE FROM registration_pace WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM registration_pace WHERE restored_at < now() - $1
                        ORDER BY restored_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

/// The purge of the former login throttle's rows (the table is no longer
/// written) whose window started longer than `retention` ago.
pub(crate) fn login_throttle_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "login_throttle",
        retention,
        // Oldest first through `login_throttle_window_started_at`.
        statement: "DELETE FROM login_throttle WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM login_throttle WHERE window_started_at < now() - $1
                        ORDER BY window_started_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn backoff() -> Backoff {
        Backoff {
            failures_before_delay: 3,
            first_delay: SECOND,
            max_delay: Duration::from_secs(60),
            decay: Duration::from_secs(3600),
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn fresh(now: DateTime<Utc>) -> Attempts {
        Attempts {
            failures: 0.0,
            last_attempt_at: now,
        }
    }

    /// Given `count` failures, each as soon as it was allowed, from t = 0.
    fn after_failures(count: u32) -> Attempts {
        let backoff = backoff();
        let mut record = fresh(at(0));
        for _ in 0..count {
            let now = later(record.last_attempt_at, backoff.delay(record.failures));
            assert!(backoff.check_attempt(&record, now).is_ok());
            record = backoff.count_failure(&record, now);
        }
        record
    }

    #[test]
    fn the_first_failures_cost_nothing_and_are_counted_once_known() {
        let backoff = backoff();
        let mut record = fresh(at(0));
        for n in 1..=2 {
            assert_eq!(
                backoff.check_attempt(&record, at(0)),
                Ok(None),
                "attempt {n} goes ahead, counted only if it fails"
            );
            record = backoff.count_failure(&record, at(0));
        }
        // The third failure would make the next attempt wait: the third
        // attempt is counted before its password is checked.
        let counted = backoff.check_attempt(&record, at(0)).unwrap().unwrap();
        assert_eq!(counted.failures, 3.0);
        assert_eq!(backoff.check_attempt(&counted, at(0)), Err(SECOND));
    }

    #[test]
    fn each_further_failure_doubles_the_wait_up_to_the_maximum() {
        let backoff = backoff();
        let waits: Vec<Duration> = (3..=12)
            .map(|failures| backoff.delay(f64::from(failures)))
            .collect();
        let seconds: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(seconds, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(backoff.delay(1e12), Duration::from_secs(60), "no overflow");
    }

    #[test]
    fn a_wait_that_is_not_over_counts_nothing_and_says_how_long_is_left() {
        let backoff = backoff();
        let record = after_failures(5); // waits 4 s after the fifth
        let early = record.last_attempt_at + chrono::Duration::seconds(1);
        assert_eq!(
            backoff.check_attempt(&record, early),
            Err(Duration::from_secs(3))
        );
        let on_time = record.last_attempt_at + chrono::Duration::seconds(4);
        let next = backoff.check_attempt(&record, on_time).unwrap().unwrap();
        assert!((next.failures - 6.0).abs() < 0.01, "{next:?}");
    }

    #[test]
    fn failures_fade_at_the_decay_rate() {
        let backoff = backoff();
        let record = after_failures(3);
        let two_hours_later = record.last_attempt_at + chrono::Duration::hours(2);
        assert_eq!(
            backoff.check_attempt(&record, two_hours_later),
            Ok(None),
            "one failure left: the next attempt is free again"
        );
        let next = backoff.count_failure(&record, two_hours_later);
        assert!(
            (next.failures - 2.0).abs() < 1e-6,
            "3 - 2 faded + 1: {next:?}"
        );
        assert_eq!(
            backoff.forget_at(&next),
            two_hours_later + chrono::Duration::hours(2),
            "forgotten once both failures have faded"
        );
        let long_wait = after_failures(10);
        assert!(
            backoff.forget_at(&long_wait) >= long_wait.last_attempt_at + chrono::Duration::hours(9),
            "ten failures, minus the little that faded during the waits, fade in over nine hours"
        );
    }

    #[test]
    fn registrations_come_in_a_burst_then_one_per_interval() {
        let pace = RegistrationPace {
            burst: 3,
            interval: Duration::from_secs(10),
        };
        let mut restored_at = at(0);
        for n in 1..=3 {
            restored_at = pace
                .count(restored_at, at(0))
                .unwrap_or_else(|wait| panic!("registration {n} waited {wait:?}"));
        }
        assert_eq!(pace.count(restored_at, at(0)), Err(Duration::from_secs(10)));
        assert_eq!(pace.count(restored_at, at(4)), Err(Duration::from_secs(6)));
        restored_at = pace.count(restored_at, at(10)).unwrap();
        assert_eq!(
            pace.count(restored_at, at(10)),
            Err(Duration::from_secs(10))
        );
        // A quiet source gets its whole burst back, and no more.
        let restored_at = pace.count(restored_at, at(1000)).unwrap();
        assert_eq!(restored_at, at(1010));
    }
}
