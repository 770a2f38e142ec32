use serde::{Deserialize, Serialize};

use crate::Scopes;

/// What a caller may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A registered customer.
    Customer,
    /// An operator.
    Admin,
    /// Another service of this system (client-credentials grant).
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Admin => "admin",
            Self::Service => "service",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id (UUID), or the service client's id.
    pub sub: String,
    pub role: Role,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    pub iss: String,
    pub aud: String,
    /// Unique token id.
    pub jti: String,
    /// What a service token may do, space separated (`payments:charge
    /// orders:settle`). User tokens carry none: their role decides. A
    /// service token without the claim opens no internal RPC.
    #[serde(default, skip_serializing_if = "Scopes::is_empty")]
    pub scope: Scopes,
}

impl Claims {
    /// Whether the caller is a person (customer or admin) rather than a service.
    pub fn is_user(&self) -> bool {
        matches!(self.role, Role::Customer | Role::Admin)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}
