//! Admission of requests that hash or check a password (Login, Register,
//! ChangePassword, SetPassword), per replica and per source.
//!
//! Each such request waits for one of the few hasher threads; admitting
//! them without limit would only lengthen that queue until every request
//! in it timed out, and one client could fill it alone. So a replica admits
//! at most `per_replica` at a time and at most `per_source` from one
//! source, and refuses the rest at once with a time to retry after, instead
//! of letting them wait. These counts are per replica and in memory on
//! purpose: they protect this process's CPU, which is the thing that runs
//! out. (The failure counts that slow down password guessing live in the
//! database, shared by every replica: see `throttle`.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::source::Source;

/// Why a request was not admitted, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Overloaded {
    /// Every slot of this replica is taken: another replica, or this one a
    /// little later, can serve it (UNAVAILABLE).
    #[error("this replica is checking as many passwords as it can; retry in {0:?}")]
    Replica(Duration),
    /// The source has as many requests in flight as it may (RESOURCE_EXHAUSTED).
    #[error("too many password checks in flight from one source; retry in {0:?}")]
    Source(Duration),
}

/// The limits, and the requests admitted now.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    replica: Arc<Semaphore>,
    per_source: usize,
    sources: Arc<Mutex<HashMap<Source, usize>>>,
}

/// A request's place, given back when it is dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    _replica: OwnedSemaphorePermit,
    source: Source,
    sources: Arc<Mutex<HashMap<Source, usize>>>,
}

/// The shortest retry delay suggested: a hash takes tens of milliseconds,
/// and a client retrying sooner would only be refused again.
const MIN_RETRY: Duration = Duration::from_millis(100);

impl Admission {
    pub(crate) fn new(per_replica: usize, per_source: usize) -> Self {
        Self {
            replica: Arc::new(Semaphore::new(per_replica.max(1))),
            per_source: per_source.max(1),
            sources: Arc::default(),
        }
    }

    /// Admits a request from `source`, or says why not. `expected_wait` is
    /// how long the hasher's queue takes to drain now: the retry delay.
    pub(crate) fn admit(
        &self,
        source: Source,
        expected_wait: Duration,
    ) -> Result<Admitted, Overloaded> {
        let retry = expected_wait.max(MIN_RETRY);
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if sources.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Err(Overloaded::Source(retry));
        }
        let permit = Arc::clone(&self.replica)
            .try_acquire_owned()
            .map_err(|_| Overloaded::Replica(retry))?;
        *sources.entry(source).or_default() += 1;
        Ok(Admitted {
            _replica: permit,
            source,
            sources: Arc::clone(&self.sources),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(in_flight) = sources.get_mut(&self.source) {
            *in_flight -= 1;
            // Forgetting idle sources keeps the map as small as the number
            // of sources with a request in flight.
            if *in_flight == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(address: &str) -> Source {
        Source::of(address.parse().unwrap())
    }

    #[test]
    fn a_source_gets_its_share_and_no_more() {
        let admission = Admission::new(10, 2);
        let wait = Duration::from_millis(300);
        let first = admission.admit(source("192.0.2.1"), wait).unwrap();
        let _second = admission.admit(source("192.0.2.1"), wait).unwrap();
        assert_eq!(
            admission.admit(source("192.0.2.1"), wait).unwrap_err(),
            Overloaded::Source(wait)
        );
        let _other = admission.admit(source("192.0.2.2"), wait).unwrap();
        drop(first);
        admission
            .admit(source("192.0.2.1"), wait)
            .expect("a finished request frees its source's place");
    }

    #[test]
    fn the_replica_admits_its_limit_across_sources() {
        let admission = Admission::new(2, 2);
        let _a = admission
            .admit(source("192.0.2.1"), Duration::ZERO)
            .unwrap();
        let b = admission
            .admit(source("192.0.2.2"), Duration::ZERO)
            .unwrap();
        assert_eq!(
            admission
                .admit(source("192.0.2.3"), Duration::ZERO)
                .unwrap_err(),
            Overloaded::Replica(MIN_RETRY),
            "the retry delay is never below the minimum"
        );
        drop(b);
        let _c = admission
            .admit(source("192.0.2.3"), Duration::ZERO)
            .unwrap();
        assert_eq!(
            admission.sources.lock().unwrap().len(),
            2,
            "idle sources are forgotten"
        );
    }
}
