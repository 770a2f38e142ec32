//! Wakes the requests that wait for a charge key's lease. The trigger of
//! `0004_lease_wakeups.sql` sends the key on `<schema>.charge_claims`
//! whenever a lease is freed or changes hands; one listener per replica
//! passes it on to every waiter, and each waiter reads its key again when
//! its key (or anything it may have missed) comes by. A waiter also wakes
//! when the lease it waits on runs out, since a holder that crashed frees
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Notifications kept for a waiter that has not looked yet; one that falls
/// further behind reads its key again (it may have missed its own).
const BACKLOG: usize = 1024;

/// How long to wait before listening again after the connection failed.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// The keys whose lease changed, as this replica hears of them.
#[derive(Debug)]
pub(crate) struct LeaseWatch {
    changed: broadcast::Sender<Option<Arc<str>>>,
}

impl Default for LeaseWatch {
    fn default() -> Self {
        Self {
            changed: broadcast::channel(BACKLOG).0,
        }
    }
}

impl LeaseWatch {
    /// A waiter that hears of every change from now on: take it before
    /// reading the key, so that no change between the read and the wait
    /// goes unheard.
    pub(crate) fn waiter(&self) -> Waiter {
        Waiter {
            changed: self.changed.subscribe(),
        }
    }

    /// Listens until `shutdown`. While the connection is down, changes go
    /// unheard: every waiter is woken to read its key again, then again
    /// once listening resumes.
    pub(crate) async fn run(self: Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.listen(&pool, &shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "lease watch lost its connection"
                    );
                    let _ = self.changed.send(None);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(RELISTEN_AFTER) => {}
                    }
                }
            }
        }
    }

    async fn listen(&self, pool: &PgPool, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(pool)
            .await?;
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(&format!("{schema}.charge_claims")).await?;
        // Whatever changed before we listened: everyone reads again.
        let _ = self.changed.send(None);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                notification = listener.recv() => {
                    let key: Arc<str> = notification?.payload().into();
                    // No receivers is fine: nobody waits.
                    let _ = self.changed.send(Some(key));
                }
            }
        }
    }
}

/// One request's ear on the [`LeaseWatch`].
#[derive(Debug)]
pub(crate) struct Waiter {
    changed: broadcast::Receiver<Option<Arc<str>>>,
}

impl Waiter {
    /// Returns once `key`'s lease may have changed, or when its `left`
    /// runs out (a holder that crashed never frees it), whichever is first.
    pub(crate) async fn changed(&mut self, key: &str, left: Duration) {
        let heard = async {
            loop {
                match self.changed.recv().await {
                    Ok(Some(changed)) if &*changed != key => {}
                    // Ours, a lost connection, missed changes, or no watch.
                    Ok(_) | Err(_) => return,
                }
            }
        };
        tokio::select! {
            () = heard => {}
            () = tokio::time::sleep(left) => {}
        }
    }
}
