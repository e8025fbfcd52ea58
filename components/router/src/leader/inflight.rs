//! Writes of a region leader between taking a revision and being applied.
//!
//! A read at revision R must see every write with a revision <= R. A write
//! registers here *before* it asks the oracle for its revision; a reader
//! that got R from the oracle waits for every write registered at that time
//! until it either holds a revision above R or has finished. Writes that
//! register later ask the oracle after the reader did, so their revisions
//! are above R.
//!
//! Contract:
//! * [`Inflight::register`] returns an owned [`InflightWrite`]; the write is
//!   in flight until that guard is dropped, which its owner does once the
//!   write's outcome is known (applied, or certainly not applied) — the
//!   guard travels with the raft proposal, not with the client's request,
//!   so a cancelled request does not end it early.
//! * [`InflightWrite::set_revision`] records the revision once taken.
//! * [`Inflight::wait_resolved`] waits, without bound (callers bound it),
//!   until no write registered before the call is unresolved at or below
//!   the given revision. A guard whose write never resolves (a leader
//!   partitioned away with a pending proposal) blocks readers of that
//!   leader only — and such a leader serves no reads: it is not ready once
//!   another has been elected.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

#[derive(Default)]
struct State {
    next_token: u64,
    /// token → revision once allocated.
    writes: BTreeMap<u64, Option<i64>>,
}

pub struct Inflight {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        }
    }
}

/// Removes its write from the tracker when dropped, whatever the outcome.
pub struct InflightWrite {
    inflight: Arc<Inflight>,
    token: u64,
}

impl InflightWrite {
    pub fn set_revision(&self, rev: i64) {
        self.inflight
            .state
            .lock()
            .writes
            .insert(self.token, Some(rev));
        self.inflight.notify();
    }
}

impl Drop for InflightWrite {
    fn drop(&mut self) {
        self.inflight.state.lock().writes.remove(&self.token);
        self.inflight.notify();
    }
}

impl Inflight {
    pub fn register(self: &Arc<Self>) -> InflightWrite {
        let mut state = self.state.lock();
        state.next_token += 1;
        let token = state.next_token;
        state.writes.insert(token, None);
        InflightWrite {
            inflight: self.clone(),
            token,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until no write registered before this call can still commit
    /// at a revision <= `rev`.
    pub async fn wait_resolved(&self, rev: i64) {
        let mut rx = self.changed.subscribe();
        let horizon = self.state.lock().next_token;
        loop {
            let blocked = self
                .state
                .lock()
                .writes
                .range(..=horizon)
                .any(|(_, r)| r.is_none_or(|r| r <= rev));
            if !blocked {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn reader_waits_for_lower_revisions_only() {
        let inflight = Arc::new(Inflight::default());
        let w = inflight.register();
        w.set_revision(10);
        // A write above the read revision does not block.
        tokio::time::timeout(Duration::from_secs(1), inflight.wait_resolved(9))
            .await
            .expect("not blocked by a higher revision");
        let reader = {
            let inflight = inflight.clone();
            tokio::spawn(async move { inflight.wait_resolved(10).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "must wait for revision 10");
        drop(w);
        tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("released once the write finished")
            .unwrap();
    }

    #[tokio::test]
    async fn reader_waits_for_writes_without_revision_yet() {
        let inflight = Arc::new(Inflight::default());
        let w = inflight.register();
        let reader = {
            let inflight = inflight.clone();
            tokio::spawn(async move { inflight.wait_resolved(5).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        w.set_revision(6);
        tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("released once the revision is above the read")
            .unwrap();
        drop(w);
    }
}
