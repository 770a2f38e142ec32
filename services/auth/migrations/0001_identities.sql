-- People who can log in. Emails are stored normalised (trimmed, lower
-- case), so the unique constraint is what makes registration race-free.
CREATE TABLE users (
    user_id       UUID        PRIMARY KEY,
    email         TEXT        NOT NULL UNIQUE,
    display_name  TEXT        NOT NULL,
    -- argon2id in PHC string form (algorithm, parameters, salt, hash).
    password_hash TEXT        NOT NULL,
    role          TEXT        NOT NULL CHECK (role IN ('customer', 'admin')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The chain of refresh tokens that one login starts. Revoking the family
-- (logout, or reuse of a spent token) ends every token in it at once.
CREATE TABLE refresh_token_families (
    family_id      UUID        PRIMARY KEY,
    user_id        UUID        NOT NULL REFERENCES users ON DELETE CASCADE,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at     TIMESTAMPTZ,
    revoked_reason TEXT
);

-- Refresh tokens, by the SHA-256 of the token: the token itself is never
-- stored, so a copy of this table logs no one in.
CREATE TABLE refresh_tokens (
    token_hash BYTEA       PRIMARY KEY,
    family_id  UUID        NOT NULL REFERENCES refresh_token_families ON DELETE CASCADE,
    issued_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    -- Set when the token is exchanged; a second exchange is a reuse.
    used_at    TIMESTAMPTZ
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

-- Ed25519 signing keys. The newest unretired key signs; retired keys keep
-- verifying until every token they signed has expired (verify_until).
CREATE TABLE signing_keys (
    kid          TEXT        PRIMARY KEY,
    -- The 32-byte private seed. Never leaves this schema or reaches a log.
    private_key  BYTEA       NOT NULL,
    public_key   BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    retired_at   TIMESTAMPTZ,
    verify_until TIMESTAMPTZ
);
-- Exactly one key signs: replicas racing to create the first key, or to
-- rotate, cannot both win.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((true)) WHERE retired_at IS NULL;

-- Failed logins per email and per peer address, in a sliding window.
CREATE TABLE login_throttle (
    subject           TEXT        PRIMARY KEY,  -- 'email:<address>' or 'peer:<ip>'
    failures          INT         NOT NULL,
    window_started_at TIMESTAMPTZ NOT NULL,
    blocked_until     TIMESTAMPTZ
);
