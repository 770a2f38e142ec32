-- Login attempts counted per (email, source) and per source, for the
-- increasing waits of throttle.rs. They replace login_throttle, whose
-- per-email block let anyone lock any account out; login_throttle is no
-- longer written, and is left in place for replicas of the previous version
-- that may still run during a rolling update (a later migration drops it).
CREATE TABLE login_attempts (
    -- 'account:<email>|source:<source>' or 'source:<source>', where a source
    -- is an IPv4 address or an IPv6 /64.
    subject         TEXT             PRIMARY KEY,
    -- Attempts counted and not taken back (a right password takes its own
    -- back), less those faded away by last_attempt_at; fractional because
    -- fading is continuous.
    failures        DOUBLE PRECISION NOT NULL,
    last_attempt_at TIMESTAMPTZ      NOT NULL,
    -- When the row stops slowing anything down; later attempts delete such
    -- rows a few at a time, oldest first.
    forget_at       TIMESTAMPTZ      NOT NULL
);
CREATE INDEX login_attempts_forget_at ON login_attempts (forget_at);

-- Registrations per source, paced by the generic cell rate algorithm: the
-- one timestamp is when the source's whole burst is available again.
CREATE TABLE registration_pace (
    source      TEXT        PRIMARY KEY,
    restored_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX registration_pace_restored_at ON registration_pace (restored_at);

-- ChangePassword and SetPassword revoke every live family of one user.
CREATE INDEX refresh_token_families_live_of_user ON refresh_token_families (user_id)
    WHERE revoked_at IS NULL;
