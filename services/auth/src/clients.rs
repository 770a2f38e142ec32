//! Service clients configured by the operator, for the client-credentials
//! grant (`IssueServiceToken`).

use access_control::{Scope, Scopes};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// A configured client: its id, the SHA-256 of its secret, and the scopes
/// its tokens may carry.
#[derive(Clone)]
struct Client {
    id: String,
    secret_digest: [u8; 32],
    scopes: Scopes,
}

/// Configured clients, `id=secret scope scope, id=secret scope`. Only the
/// SHA-256 of each secret is kept in memory; secrets are long random
/// strings, so a fast hash compared in constant time is enough.
#[derive(Clone, Default)]
pub struct ServiceClients {
    clients: Vec<Client>,
}

impl std::fmt::Debug for ServiceClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut clients = f.debug_map();
        for client in &self.clients {
            clients.entry(&client.id, &client.scopes.to_string());
        }
        clients.finish()
    }
}

/// Shortest client secret accepted.
const MIN_SECRET_BYTES: usize = 16;

impl ServiceClients {
    /// Parses `id=secret scope scope, id=secret scope`: entries separated by
    /// commas; in each, the id up to the first `=`, then the secret up to
    /// the first whitespace, then the client's scopes separated by
    /// whitespace (as in a token's `scope` claim). Every client needs at
    /// least one known scope: a client granted nothing could only ever be
    /// refused, which is an old or mistyped configuration, better stopped
    /// at start than found out in the first saga. An empty string
    /// configures no clients.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut clients: Vec<Client> = Vec::new();
        for entry in value
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let (id, rest) = entry
                .split_once('=')
                .ok_or_else(|| format!("{:?} is not `id=secret scope ...`", redact(entry)))?;
            let id = id.trim();
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "client id {id:?} must be letters, digits, '-', '_' or '.'"
                ));
            }
            if clients.iter().any(|client| client.id == id) {
                return Err(format!("client {id:?} is configured twice"));
            }
            let rest = rest.trim_start();
            let (secret, scopes) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "the secret of {id:?} must be at least {MIN_SECRET_BYTES} bytes"
                ));
            }
            let scopes = Scopes::parse(scopes).map_err(|error| {
                // Every scope is `resource:action`; a word without a colon
                // is more likely the rest of a secret with a space in it.
                if error.name.contains(':') {
                    format!("client {id:?}: {error}")
                } else {
                    format!(
                        "client {id:?}: a word after its secret is not a scope \
                         (a secret cannot hold whitespace)"
                    )
                }
            })?;
            if scopes.is_empty() {
                return Err(format!(
                    "client {id:?} is granted no scopes: write them after its secret, \
                     e.g. `{id}=<secret> payments:charge orders:settle`"
                ));
            }
            clients.push(Client {
                id: id.to_owned(),
                secret_digest: digest(secret),
                scopes,
            });
        }
        Ok(Self { clients })
    }

    /// One client's entry in the format [`parse`](Self::parse) reads, for
    /// whoever writes the setting (the local stack, the tests); join
    /// several with `,`.
    pub fn entry(id: &str, secret: &str, scopes: impl IntoIterator<Item = Scope>) -> String {
        let scopes: Scopes = scopes.into_iter().collect();
        format!("{id}={secret} {scopes}")
    }

    /// The scopes of client `id`, if `secret` is its secret.
    pub fn authenticate(&self, id: &str, secret: &str) -> Option<&Scopes> {
        let presented = digest(secret);
        self.clients
            .iter()
            .find(|client| client.id == id && bool::from(client.secret_digest.ct_eq(&presented)))
            .map(|client| &client.scopes)
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

    fn scopes(names: &str) -> Scopes {
        Scopes::parse(names).unwrap()
    }

    #[test]
    fn clients_authenticate_by_id_and_secret_and_get_their_own_scopes() {
        let clients = ServiceClients::parse(
            "saga=0123456789abcdef0123 payments:charge payments:refund orders:settle, \
             reader = fedcba9876543210fedc   payments:read",
        )
        .unwrap();
        assert_eq!(
            clients.authenticate("saga", "0123456789abcdef0123"),
            Some(&scopes("payments:charge payments:refund orders:settle"))
        );
        assert_eq!(
            clients.authenticate("reader", "fedcba9876543210fedc"),
            Some(&scopes("payments:read"))
        );
        assert_eq!(clients.authenticate("saga", "fedcba9876543210fedc"), None);
        assert_eq!(clients.authenticate("nobody", "0123456789abcdef0123"), None);
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        let value = [
            ServiceClients::entry("saga", "0123456789abcdef0123", [Scope::PaymentsCharge]),
            ServiceClients::entry("all", "fedcba9876543210fedc", Scope::ALL),
        ]
        .join(",");
        let clients = ServiceClients::parse(&value).unwrap();
        assert_eq!(
            clients.authenticate("saga", "0123456789abcdef0123"),
            Some(&scopes("payments:charge"))
        );
        assert_eq!(
            clients.authenticate("all", "fedcba9876543210fedc"),
            Some(&Scope::ALL.into_iter().collect())
        );
    }

    #[test]
    fn secrets_may_hold_equals_signs_and_scopes_any_whitespace() {
        let clients = ServiceClients::parse(
            "saga=c2VjcmV0LXNlY3JldC1zZWNyZXQ=\tpayments:read\n orders:settle",
        )
        .unwrap();
        assert_eq!(
            clients.authenticate("saga", "c2VjcmV0LXNlY3JldC1zZWNyZXQ="),
            Some(
                &[Scope::PaymentsRead, Scope::OrdersSettle]
                    .into_iter()
                    .collect()
            )
        );
    }

    #[test]
    fn unknown_or_missing_scopes_stop_the_configuration() {
        let error =
            ServiceClients::parse("saga=0123456789abcdef0123 payments:charge payments:charg")
                .unwrap_err();
        assert!(error.contains("\"saga\""), "{error}");
        assert!(
            error.contains("unknown scope \"payments:charg\""),
            "{error}"
        );
        assert!(
            error.contains("payments:refund"),
            "lists the known ones: {error}"
        );

        // The format before scopes existed: refused, saying what to write.
        let error = ServiceClients::parse("saga=0123456789abcdef0123").unwrap_err();
        assert!(error.contains("granted no scopes"), "{error}");
        assert!(!error.contains("0123456789abcdef0123"), "{error}");
    }

    #[test]
    fn bad_configuration_is_refused_without_echoing_secrets() {
        assert!(
            ServiceClients::parse("saga=short payments:read")
                .unwrap_err()
                .contains("at least 16 bytes")
        );
        let error = ServiceClients::parse("no-equals-sign-secret-value").unwrap_err();
        assert!(!error.contains("secret-value"), "{error}");
        let error = ServiceClients::parse(
            "saga=0123456789abcdef0123 payments:read,saga=fedcba9876543210fedc payments:read",
        )
        .unwrap_err();
        assert!(error.contains("twice"), "{error}");
        assert!(!error.contains("fedcba"), "{error}");
        let error =
            ServiceClients::parse("saga=0123456789abcdef0123 rest-of-the-secret payments:read")
                .unwrap_err();
        assert!(!error.contains("rest-of-the-secret"), "{error}");
        assert!(ServiceClients::parse("").unwrap().clients.is_empty());
        let debug = format!(
            "{:?}",
            ServiceClients::parse("saga=0123456789abcdef0123 payments:read").unwrap()
        );
        assert!(!debug.contains("0123456789"), "{debug}");
        assert!(debug.contains("payments:read"), "{debug}");
    }
}
