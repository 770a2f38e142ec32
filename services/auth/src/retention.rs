//! What the auth service purges, and after how long. Users are never
//! purged here.

use std::time::Duration;

use database::PurgeTarget;

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct AuthRetention {
    /// How long a refresh token is kept after it expired (it refreshes
    /// nothing by then).
    #[arg(long = "refresh-token-retention", env = "REFRESH_TOKEN_RETENTION", default_value = "7days",
          value_parser = database::parse_retention)]
    pub refresh_tokens: Duration,

    /// How long a refresh-token family is kept after its absolute lifetime
    /// (REFRESH_FAMILY_LIFETIME) ended, with any of its tokens still left.
    /// At least REFRESH_TOKEN_RETENTION, so that its tokens are gone first.
    #[arg(long = "refresh-family-retention", env = "REFRESH_FAMILY_RETENTION", default_value = "7days",
          value_parser = database::parse_retention)]
    pub refresh_families: Duration,

    /// How long a login-attempt record is kept after it stopped slowing
    /// anything down.
    #[arg(long = "login-attempt-retention", env = "LOGIN_ATTEMPT_RETENTION", default_value = "1day",
          value_parser = database::parse_retention)]
    pub login_attempts: Duration,

    /// How long a source's registration pace is kept after its whole burst
    /// was available again.
    #[arg(long = "registration-pace-retention", env = "REGISTRATION_PACE_RETENTION", default_value = "1day",
          value_parser = database::parse_retention)]
    pub registration_pace: Duration,

    /// How long a row of the former login throttle (no longer written) is
    /// kept after its window started.
    #[arg(long = "login-throttle-retention", env = "LOGIN_THROTTLE_RETENTION", default_value = "1day",
          value_parser = database::parse_retention)]
    pub login_throttle: Duration,

    /// How long a retired signing key's public half is kept after the last
    /// token it signed expired. (Its private half goes when it is retired.)
    #[arg(long = "signing-key-retention", env = "SIGNING_KEY_RETENTION", default_value = "30days",
          value_parser = database::parse_retention)]
    pub signing_keys: Duration,
}

impl AuthRetention {
    /// The targets, tokens before their families: a family's tokens all
    /// expire by the end of its lifetime, so when the family goes, the
    /// cascade finds few or none left.
    pub(crate) fn targets(&self, refresh_family_lifetime: Duration) -> Vec<PurgeTarget> {
        vec![
            crate::app::refresh_token_purge(self.refresh_tokens),
            crate::app::refresh_family_purge(
                refresh_family_lifetime.saturating_add(self.refresh_families),
            ),
            crate::throttle::login_attempt_purge(self.login_attempts),
            crate::throttle::registration_pace_purge(self.registration_pace),
            crate::throttle::login_throttle_purge(self.login_throttle),
            crate::keys::signing_key_purge(self.signing_keys),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test]
    async fn every_purge_finds_its_batch_through_an_index() {
        let retention = AuthRetention {
            refresh_tokens: DAY,
            refresh_families: DAY,
            login_attempts: DAY,
            registration_pace: DAY,
            login_throttle: DAY,
            signing_keys: DAY,
        };
        testkit::assert_purges_use_indexes(&crate::MANIFEST, retention.targets(DAY))
            .await
            .unwrap();
    }
}
