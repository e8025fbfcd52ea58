//! A region replica's change feed: the writes each apply run made, for
//! the watch aggregator (`router::watch`) to turn into etcd watch events
//! without reading them back from RocksDB.
//!
//! Contract ([`RegionHandle::subscribe_changes`](crate::RegionHandle::subscribe_changes)
//! returns a [`FeedReceiver`]):
//! * A receiver gets every [`FeedEvent`] published after it subscribed, in
//!   apply order, until the replica stops (the stream is then closed).
//! * [`FeedEvent::Applied`] is one apply run (written or not: a receiver
//!   counts the log indexes it has seen): its log index range, its writes in apply order
//!   (each at its revision, its mutations as the leader computed them: a
//!   put carries its value, create revision, version and lease; sorted by
//!   `sub`) and the replica's resolved revision after it. It is published
//!   once the run's batch is written (a new MVCC snapshot sees it) and
//!   before any caller of the run is answered.
//! * Apply order is revision order except for a transaction's commit,
//!   which may apply after writes with higher revisions (they took the
//!   region's revisions while the transaction held its locks). `resolved`
//!   accounts for it: no write at or below it can still be applied by this
//!   region — it is the region's applied revision, lowered to the base of
//!   the oldest transaction lock held (a locked transaction commits above
//!   its lock's base). It never decreases while the region keeps its range.
//! * [`FeedEvent::Reset`] means what was published can no longer be
//!   continued: the region's range changed (split, merge), a snapshot
//!   replaced its data, the replica was removed — or the receiver
//!   subscribed while a run was being applied whose writes were not
//!   collected (nobody listened when it began), so the run cannot be
//!   published. A receiver starts over
//!   from MVCC (and subscribes again, to this or another replica).
//! * A receiver more than [`FEED_CAPACITY`] events behind misses events:
//!   its next receive says it lagged (and it must start over from MVCC,
//!   as on a reset). Publishing never waits for receivers, and builds
//!   nothing while there are none.

use std::sync::Arc;

use proto::raft_cmdpb::Mutation;
use tokio::sync::broadcast;

/// How many events a receiver may fall behind before it misses some.
pub const FEED_CAPACITY: usize = 1024;

/// A write applied by a region replica.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedWrite {
    pub revision: i64,
    /// The region's changes at `revision`, sorted by `sub`.
    pub mutations: Vec<Mutation>,
}

/// One apply run's writes (see the contract).
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedRun {
    /// The log indexes the run applied, inclusive.
    pub first_index: u64,
    pub last_index: u64,
    pub writes: Vec<AppliedWrite>,
    /// No write at or below this revision can still be applied by the
    /// region after this run.
    pub resolved: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FeedEvent {
    Applied(Arc<AppliedRun>),
    /// Start over from MVCC (see the contract).
    Reset,
}

pub type FeedReceiver = broadcast::Receiver<FeedEvent>;

/// The publishing side, owned by the replica's shared state.
pub(crate) struct ChangeFeed(broadcast::Sender<FeedEvent>);

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed(broadcast::channel(FEED_CAPACITY).0)
    }
}

impl ChangeFeed {
    pub fn subscribe(&self) -> FeedReceiver {
        self.0.subscribe()
    }

    /// Whether anyone listens: the apply path collects writes only then.
    pub fn observed(&self) -> bool {
        self.0.receiver_count() > 0
    }

    pub fn publish(&self, run: AppliedRun) {
        if self.observed() {
            let _ = self.0.send(FeedEvent::Applied(Arc::new(run)));
        }
    }

    pub fn reset(&self) {
        if self.observed() {
            let _ = self.0.send(FeedEvent::Reset);
        }
    }
}

/// The resolved revision of a region at `applied_revision` holding locks
/// whose base revisions are `lock_bases` (see the contract).
pub fn resolved_revision(applied_revision: i64, lock_bases: impl Iterator<Item = i64>) -> i64 {
    lock_bases.fold(applied_revision, i64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u64, resolved: i64) -> AppliedRun {
        AppliedRun {
            first_index: first,
            last_index: first,
            writes: Vec::new(),
            resolved,
        }
    }

    #[tokio::test]
    async fn receivers_get_what_was_published_after_they_subscribed() {
        let feed = ChangeFeed::default();
        assert!(!feed.observed());
        feed.publish(run(1, 1));
        let mut rx = feed.subscribe();
        assert!(feed.observed());
        feed.publish(run(2, 2));
        feed.reset();
        assert_eq!(
            rx.recv().await.unwrap(),
            FeedEvent::Applied(Arc::new(run(2, 2)))
        );
        assert_eq!(rx.recv().await.unwrap(), FeedEvent::Reset);
        drop(feed);
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_receiver_too_far_behind_is_told_it_lagged() {
        let feed = ChangeFeed::default();
        let mut rx = feed.subscribe();
        for i in 0..=FEED_CAPACITY as u64 {
            feed.publish(run(i + 1, i as i64));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(1))
        ));
    }

    #[test]
    fn locks_hold_the_resolved_revision_back() {
        assert_eq!(resolved_revision(10, std::iter::empty()), 10);
        assert_eq!(resolved_revision(10, [7, 9].into_iter()), 7);
    }
}
