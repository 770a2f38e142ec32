-- Retention (`src/retention.rs`) and signing keys at rest (`src/keys.rs`).

-- Each purge finds its batch, oldest first, through one of these.
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);
CREATE INDEX refresh_token_families_created_at ON refresh_token_families (created_at);
CREATE INDEX login_throttle_window_started_at ON login_throttle (window_started_at);
CREATE INDEX signing_keys_verify_until ON signing_keys (verify_until) WHERE verify_until IS NOT NULL;

-- A private key is kept sealed with the key-encryption key from the
-- settings (a format byte, the nonce, the ciphertext and its tag); the
-- plaintext column is emptied when the service first starts with a key
-- (it seals what it finds), and for good once a key is retired: a retired
-- key never signs again, and keeps only its public half.
ALTER TABLE signing_keys ALTER COLUMN private_key DROP NOT NULL;
ALTER TABLE signing_keys ADD COLUMN sealed_private_key BYTEA;
