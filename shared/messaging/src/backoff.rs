use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff for retry loops, capped, cancellable.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(self.next) => {}
        }
        self.next = (self.next * 2).min(Duration::from_secs(5));
    }

    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}
