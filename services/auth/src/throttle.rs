//! Rate limiting of failed logins, per email and per peer address.
//!
//! The counts live in the database, so every replica sees the same ones: an
//! attacker gains nothing by spreading attempts over replicas. Within a
//! window of `window`, the `limit`-th failure for a subject blocks it for
//! `window`; a successful login clears the email's count.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::Email;

/// How failed logins are limited.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThrottlePolicy {
    pub(crate) max_failures_per_email: u32,
    pub(crate) max_failures_per_peer: u32,
    pub(crate) window: Duration,
}

/// The subjects a login attempt counts against.
pub(crate) struct Subjects {
    email: String,
    peer: Option<String>,
}

impl Subjects {
    pub(crate) fn new(email: &Email, peer: Option<IpAddr>) -> Self {
        Self {
            email: format!("email:{email}"),
            peer: peer.map(|ip| format!("peer:{ip}")),
        }
    }

    fn all(&self) -> Vec<String> {
        std::iter::once(self.email.clone())
            .chain(self.peer.clone())
            .collect()
    }
}

/// How long the attempt must wait, if either subject is blocked.
pub(crate) async fn blocked_for(
    conn: &mut PgConnection,
    subjects: &Subjects,
) -> anyhow::Result<Option<Duration>> {
    let until: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT max(blocked_until) FROM login_throttle WHERE subject = ANY($1) AND blocked_until > now()",
    )
    .bind(subjects.all())
    .fetch_one(conn)
    .await
    .context("reading the login throttle")?;
    Ok(until.map(|until| (until - Utc::now()).to_std().unwrap_or_default()))
}

/// Counts a failure against each subject, blocking those that reach their limit.
pub(crate) async fn record_failure(
    conn: &mut PgConnection,
    subjects: &Subjects,
    policy: &ThrottlePolicy,
) -> anyhow::Result<()> {
    let window = chrono::Duration::from_std(policy.window)?;
    let limits = std::iter::once((&subjects.email, policy.max_failures_per_email)).chain(
        subjects
            .peer
            .as_ref()
            .map(|peer| (peer, policy.max_failures_per_peer)),
    );
    for (subject, limit) in limits {
        sqlx::query(
            "INSERT INTO login_throttle AS t (subject, failures, window_started_at, blocked_until)
             VALUES ($1, 1, now(), CASE WHEN $3 <= 1 THEN now() + $2 END)
             ON CONFLICT (subject) DO UPDATE SET
                 failures = CASE WHEN t.window_started_at + $2 <= now() THEN 1 ELSE t.failures + 1 END,
                 window_started_at = CASE WHEN t.window_started_at + $2 <= now() THEN now() ELSE t.window_started_at END,
                 blocked_until = CASE
                     WHEN (CASE WHEN t.window_started_at + $2 <= now() THEN 1 ELSE t.failures + 1 END) >= $3
                     THEN now() + $2
                 END",
        )
        .bind(subject)
        .bind(window)
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .execute(&mut *conn)
        .await
        .context("recording a failed login")?;
    }
    Ok(())
}

/// Forgets the email's failures after a successful login.
pub(crate) async fn record_success(
    conn: &mut PgConnection,
    subjects: &Subjects,
) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM login_throttle WHERE subject = $1")
        .bind(&subjects.email)
        .execute(conn)
        .await
        .context("clearing the login throttle")?;
    Ok(())
}
