//! gRPC helpers for tests.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

/// A channel to `url` that fails fast instead of hanging a test.
pub async fn channel(url: &str) -> anyhow::Result<Channel> {
    channel_with(url, &tls::Tls::cleartext()).await
}

/// [`channel`], over TLS as `tls` says (`https://` URLs).
pub async fn channel_with(url: &str, tls: &tls::Tls) -> anyhow::Result<Channel> {
    Ok(tls
        .endpoint(url)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect()
        .await?)
}

/// `message` as a request carrying `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("a token is ASCII");
    request.metadata_mut().insert("authorization", value);
    request
}

/// The fields named by the `BadRequest` detail of an INVALID_ARGUMENT.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
