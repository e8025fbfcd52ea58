//! Work that outlives the client call that started it. A transaction over
//! several regions runs its coordinator on a task of its own (`txn`), so a
//! client cancelling its call does not cut the protocol between taking
//! locks and committing or releasing them: the locks would stay until the
//! lock resolver's TTL, refusing writes, splits and merges of their keys.
//!
//! Contract:
//! * [`Router::run_detached`] spawns `work` and waits for its answer; the
//!   caller going away does not stop it. A task that panics or is aborted
//!   answers "outcome unknown" (it may have been anywhere in its protocol).
//! * [`Router::stop_detached`] waits up to `wait` for the tasks running to
//!   finish, then aborts the rest; [`Router::abort_detached`] aborts them at
//!   once. A node stopping calls one of them, since each task holds the
//!   router (and its store) until it ends. Locks of an aborted coordinator
//!   are left to the lock resolvers, as after a crash.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::task::AbortHandle;

use crate::{Error, Result, Router};

/// The tasks running detached from client calls.
#[derive(Default)]
pub(crate) struct Detached {
    next: AtomicU64,
    running: Mutex<HashMap<u64, AbortHandle>>,
}

impl Router {
    /// Runs `work(router)` on a task of its own (see the contract).
    pub(crate) async fn run_detached<T, F, Fut>(self: &Arc<Router>, work: F) -> Result<T>
    where
        F: FnOnce(Arc<Router>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let id = self.detached.next.fetch_add(1, Ordering::Relaxed);
        let work = work(self.clone());
        let router = self.clone();
        let task = {
            // Held while spawning, so the task cannot remove its entry
            // before it is in.
            let mut running = self.detached.running.lock();
            let task = tokio::spawn(async move {
                let out = work.await;
                router.detached.running.lock().remove(&id);
                out
            });
            running.insert(id, task.abort_handle());
            task
        };
        task.await.unwrap_or_else(|e| {
            self.detached.running.lock().remove(&id);
            Err(Error::OutcomeUnknown(format!("detached task: {e}")))
        })
    }

    /// Waits up to `wait` for the detached tasks to finish, then aborts
    /// the rest (see the contract).
    pub async fn stop_detached(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.detached.running.lock().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.abort_detached();
    }

    /// Aborts every detached task (see the contract).
    pub fn abort_detached(&self) {
        for (_, task) in self.detached.running.lock().drain() {
            task.abort();
        }
    }
}
