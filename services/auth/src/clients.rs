//! Service clients configured by the operator, for the client-credentials
//! grant (`IssueServiceToken`).

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// Configured clients: `id=secret` pairs. Only the SHA-256 of each secret
/// is kept in memory; secrets are long random strings, so a fast hash
/// compared in constant time is enough.
#[derive(Clone, Default)]
pub struct ServiceClients {
    clients: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for ServiceClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.clients.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("ServiceClients").field("ids", &ids).finish()
    }
}

/// Shortest client secret accepted.
const MIN_SECRET_BYTES: usize = 16;

impl ServiceClients {
    /// Parses `id=secret,id=secret`; an empty string configures none.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut clients = Vec::new();
        for entry in value
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let (id, secret) = entry
                .split_once('=')
                .ok_or_else(|| format!("{:?} is not id=secret", redact(entry)))?;
            let (id, secret) = (id.trim(), secret.trim());
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "client id {id:?} must be letters, digits, '-', '_' or '.'"
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "the secret of {id:?} must be at least {MIN_SECRET_BYTES} bytes"
                ));
            }
            clients.push((id.to_owned(), digest(secret)));
        }
        Ok(Self { clients })
    }

    /// Whether `secret` is the secret of client `id`.
    pub fn verify(&self, id: &str, secret: &str) -> bool {
        let presented = digest(secret);
        self.clients
            .iter()
            .any(|(known_id, known)| known_id == id && bool::from(known.ct_eq(&presented)))
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn redact(entry: &str) -> String {
    entry.chars().take(4).chain("…".chars()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_verify_by_id_and_secret() {
        let clients =
            ServiceClients::parse("saga=0123456789abcdef0123, other = fedcba9876543210fedc")
                .unwrap();
        assert!(clients.verify("saga", "0123456789abcdef0123"));
        assert!(clients.verify("other", "fedcba9876543210fedc"));
        assert!(!clients.verify("saga", "fedcba9876543210fedc"));
        assert!(!clients.verify("nobody", "0123456789abcdef0123"));
    }

    #[test]
    fn bad_configuration_is_refused_without_echoing_secrets() {
        assert!(
            ServiceClients::parse("saga=short")
                .unwrap_err()
                .contains("at least 16 bytes")
        );
        let error = ServiceClients::parse("no-equals-sign-secret-value").unwrap_err();
        assert!(!error.contains("secret-value"), "{error}");
        assert!(ServiceClients::parse("").unwrap().clients.is_empty());
    }
}
