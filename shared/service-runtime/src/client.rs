//! Calling another service: one channel per downstream, with the stack
//! every call goes through, outermost first:
//!
//! 1. telemetry, so the call is a client span and carries `traceparent`
//!    and the correlation id;
//! 2. the service's own bearer token, when it has one;
//! 3. a circuit breaker per downstream, so a service that keeps failing is
//!    given time to recover instead of a pile-up of calls that would fail
//!    anyway (they fail fast with UNAVAILABLE, which callers retry later).
//!
//! Deadlines are per call (`Request::set_timeout`, sent as `grpc-timeout`
//! and enforced by both sides). Retries are the caller's decision, made only
//! for idempotent calls: the saga engine retries its steps, all of which
//! are idempotent by key.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use access_control::{BearerLayer, ServiceTokenSource};
use anyhow::Context as _;
use futures::future::BoxFuture;
use tonic::Code;
use tonic::body::Body;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

/// A channel to one downstream service, with the whole client stack.
pub type Downstream =
    BoxCloneSyncService<http::Request<Body>, http::Response<Body>, tonic::transport::Error>;

/// When a downstream's circuit opens, and for how long.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BreakerSettings {
    /// Consecutive failures (unavailable, timed out) that open a
    /// downstream's circuit.
    #[arg(long = "circuit-breaker-threshold", env = "CIRCUIT_BREAKER_THRESHOLD", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub threshold: u32,

    /// How long an open circuit refuses calls before letting one through
    /// to test the downstream.
    #[arg(long = "circuit-breaker-cooldown", env = "CIRCUIT_BREAKER_COOLDOWN", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub cooldown: Duration,
}

/// A lazily connected channel to `url` named `name` (for logs), calling
/// with `token` when given, over TLS as `tls` says (see the `tls` crate).
pub fn downstream(
    name: &'static str,
    url: &str,
    breaker: BreakerSettings,
    token: Option<Arc<ServiceTokenSource>>,
    tls: &tls::Tls,
) -> anyhow::Result<Downstream> {
    let channel = tls
        .endpoint(url)
        .with_context(|| format!("the URL of {name}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy();
    let service = ServiceBuilder::new()
        .layer(telemetry::grpc::ClientLayer)
        .option_layer(token.map(BearerLayer::new))
        .layer(CircuitBreakerLayer::new(name, breaker))
        .service(channel);
    Ok(BoxCloneSyncService::new(service))
}

/// A circuit breaker shared by every clone of one downstream's channel.
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    breaker: Arc<Breaker>,
}

impl CircuitBreakerLayer {
    pub fn new(name: &'static str, settings: BreakerSettings) -> Self {
        Self {
            breaker: Arc::new(Breaker {
                name,
                settings,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Debug)]
struct Breaker {
    name: &'static str,
    settings: BreakerSettings,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    /// While set and in the future, calls are refused.
    open_until: Option<Instant>,
    /// After the cool-down, one trial call is let through.
    trial_in_flight: bool,
}

/// Whether a call may proceed, and if it is the trial of a half-open circuit.
enum Admission {
    Closed,
    Trial,
    /// Refused without calling; worth asking again after this long.
    Refused(Duration),
}

/// Metadata on the UNAVAILABLE status of a call that an open circuit
/// refused without making it: milliseconds until the circuit lets a call
/// through again.
const CIRCUIT_RETRY_AFTER: &str = "ordersaga-circuit-retry-after-ms";

/// If `status` is an open circuit's refusal (the call was not made), how
/// long until the circuit may let a call through again.
pub fn refused_by_circuit(status: &tonic::Status) -> Option<Duration> {
    let millis = status
        .metadata()
        .get(CIRCUIT_RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(millis))
}

impl Breaker {
    fn admit(&self) -> Admission {
        let mut state = self.state.lock().expect("breaker lock");
        let now = Instant::now();
        match state.open_until {
            None => Admission::Closed,
            Some(until) if now < until => Admission::Refused(until - now),
            // The trial's answer will settle it soon.
            Some(_) if state.trial_in_flight => Admission::Refused(self.settings.cooldown / 4),
            Some(_) => {
                state.trial_in_flight = true;
                Admission::Trial
            }
        }
    }

    fn record(&self, failed: bool) {
        let mut state = self.state.lock().expect("breaker lock");
        state.trial_in_flight = false;
        if !failed {
            if state.open_until.is_some() {
                tracing::info!(downstream = self.name, "circuit closed");
            }
            *state = State::default();
            return;
        }
        state.consecutive_failures += 1;
        let reopen = state.open_until.is_some();
        if reopen || state.consecutive_failures >= self.settings.threshold {
            if !reopen {
                tracing::warn!(
                    downstream = self.name,
                    failures = state.consecutive_failures,
                    "circuit opened"
                );
            }
            state.open_until = Some(Instant::now() + self.settings.cooldown);
        }
    }
}

/// One admitted call's outcome, to record. A call dropped before it
/// answered (its caller gave up: a timeout, a cancelled task) counts as a
/// failure: otherwise a trial that never finished would hold the circuit
/// open for good.
struct Pending {
    breaker: Arc<Breaker>,
    recorded: bool,
}

impl Pending {
    fn new(breaker: Arc<Breaker>) -> Self {
        Self {
            breaker,
            recorded: false,
        }
    }

    fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.record(failed);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(true);
        }
    }
}

/// The service [`CircuitBreakerLayer`] wraps around a channel.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for CircuitBreaker<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let breaker = self.breaker.clone();
        Box::pin(async move {
            if let Admission::Refused(retry_after) = breaker.admit() {
                let mut status =
                    tonic::Status::unavailable(format!("circuit to {} is open", breaker.name));
                if let Ok(value) = retry_after.as_millis().to_string().parse() {
                    status.metadata_mut().insert(CIRCUIT_RETRY_AFTER, value);
                }
                return Ok(status.into_http());
            }
            let pending = Pending::new(breaker);
            let response = inner.call(request).await;
            let failed = match &response {
                Err(_) => true,
                Ok(response) => counts_as_failure(response.headers()),
            };
            pending.record(failed);
            response
        })
    }
}

/// Failures that say the downstream is in trouble, as opposed to answers
/// (NOT_FOUND, FAILED_PRECONDITION...) that say it is working.
fn counts_as_failure(headers: &http::HeaderMap) -> bool {
    let code = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map(Code::from);
    matches!(
        code,
        Some(Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            name: "test",
            settings: BreakerSettings {
                threshold,
                cooldown,
            },
            state: Mutex::new(State::default()),
        }
    }

    #[test]
    fn the_circuit_opens_after_consecutive_failures_and_a_trial_closes_it() {
        let breaker = breaker(3, Duration::from_millis(50));
        for _ in 0..2 {
            assert!(matches!(breaker.admit(), Admission::Closed));
            breaker.record(true);
        }
        breaker.record(false); // a success in between resets the count
        for _ in 0..3 {
            assert!(matches!(breaker.admit(), Admission::Closed));
            breaker.record(true);
        }
        assert!(
            matches!(breaker.admit(), Admission::Refused(_)),
            "open after three in a row"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            matches!(breaker.admit(), Admission::Trial),
            "one trial after the cool-down"
        );
        assert!(matches!(breaker.admit(), Admission::Refused(_)), "only one");
        breaker.record(true);
        assert!(
            matches!(breaker.admit(), Admission::Refused(_)),
            "a failed trial reopens it"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(breaker.admit(), Admission::Trial));
        breaker.record(false);
        assert!(
            matches!(breaker.admit(), Admission::Closed),
            "a good trial closes it"
        );
    }

    #[test]
    fn a_trial_whose_caller_gave_up_counts_as_failed_and_frees_the_next_trial() {
        let breaker = Arc::new(breaker(1, Duration::from_millis(20)));
        breaker.record(true);
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(breaker.admit(), Admission::Trial));
        drop(Pending::new(breaker.clone())); // the caller timed out mid-call
        assert!(
            matches!(breaker.admit(), Admission::Refused(_)),
            "reopened, not stuck"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            matches!(breaker.admit(), Admission::Trial),
            "the next trial is let through"
        );
    }

    #[test]
    fn a_refusal_says_when_to_ask_again() {
        let breaker = breaker(1, Duration::from_secs(5));
        breaker.record(true);
        let Admission::Refused(after) = breaker.admit() else {
            panic!("the circuit is open");
        };
        assert!(after > Duration::from_secs(4) && after <= Duration::from_secs(5));
    }
}
