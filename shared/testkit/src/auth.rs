//! A stand-in for the auth service, for a service's integration tests: its
//! public key API (all a service asks of auth), and tokens signed with its
//! test key, so a service under test verifies them as it would real ones.

use std::time::{SystemTime, UNIX_EPOCH};

use access_control::{Claims, Role, Scopes};
use api_auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use api_auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, IssueServiceTokenRequest, LoginRequest,
    LogoutRequest, LogoutResponse, PublicKey, RefreshRequest, RegisterRequest, RegisterResponse,
    RotateSigningKeyRequest, ServiceToken, TokenPair,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The signing key of the stand-in auth service: RFC 8032's first Ed25519
/// test vector, its seed and public key.
const SEED: [u8; 32] = hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
const PUBLIC_KEY: [u8; 32] =
    hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
const KID: &str = "payment-tests";

const fn hex32(text: &str) -> [u8; 32] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a hex digit"),
        }
    }
    let bytes = text.as_bytes();
    let mut out = [0; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = digit(bytes[2 * i]) * 16 + digit(bytes[2 * i + 1]);
        i += 1;
    }
    out
}

/// The auth service as the payment service sees it: its public keys. The
/// rest of its API is not needed here.
struct KeysOnly;

#[tonic::async_trait]
impl AuthService for KeysOnly {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<TokenPair>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn refresh(&self, _: Request<RefreshRequest>) -> Result<Response<TokenPair>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn logout(&self, _: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn issue_service_token(
        &self,
        _: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<ServiceToken>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn get_public_keys(
        &self,
        _: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        Ok(Response::new(GetPublicKeysResponse {
            keys: vec![PublicKey {
                kid: KID.into(),
                algorithm: "EdDSA".into(),
                public_key: PUBLIC_KEY.to_vec(),
                created_at: None,
                verify_until: None,
            }],
        }))
    }

    async fn rotate_signing_key(
        &self,
        _: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<PublicKey>, Status> {
        Err(Status::unimplemented("keys only"))
    }
}

/// A token the payment service accepts, signed with the test key.
pub fn token(sub: &str, role: Role, scope: Scopes) -> String {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let claims = Claims {
        sub: sub.to_owned(),
        role,
        iat: now - 10,
        exp: now + 3600,
        iss: "ordersaga-auth".into(),
        aud: "ordersaga".into(),
        jti: uuid::Uuid::new_v4().to_string(),
        scope,
    };
    // PKCS#8 wrapping of an Ed25519 seed.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&SEED);
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(KID.into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

/// The stand-in, serving on a port of its own until dropped.
#[derive(Debug)]
pub struct AuthStandIn {
    /// Its URL, for the service's `AUTH_URL`.
    pub url: String,
    stop: CancellationToken,
}

impl AuthStandIn {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AuthServiceServer::new(KeysOnly))
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        Ok(Self { url, stop })
    }
}

impl Drop for AuthStandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
