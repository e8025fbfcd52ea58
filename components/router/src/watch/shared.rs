//! Watches of one range sharing one aggregator (etcd's synced watchers):
//! the aggregator's updates go out once, as one `Arc` every subscriber
//! reads, so a thousand watchers of a key cost one aggregator, one feed
//! subscription per region and one decoded copy of each event.
//!
//! Contract of [`Hub::join`]:
//! * Watches of the same range and `prev_kv` share the aggregator the
//!   first of them started (at its start revision), while it runs. A
//!   watch joins it only if its start revision is above the revision the
//!   aggregator has delivered: everything the watch must see is still to
//!   come. Otherwise (a start in the past) `join` answers `None` and the
//!   watch runs an aggregator of its own (etcd's unsynced watcher).
//! * A subscriber sees every update the aggregator sends after it joined,
//!   in order, events below its start revision left out; its delivered
//!   revision is the aggregator's, or its start revision − 1 until the
//!   aggregator passes it, and it is drained once it has taken every
//!   update sent.
//! * A subscriber that falls [`BACKLOG`] updates behind (a slow reader)
//!   loses its place; so does every subscriber of an aggregator that ends
//!   (compacted, failed). Either way it goes on with an aggregator of its
//!   own from the revision after the last update it took (the caller,
//!   `Watch`, does): it has taken every update up to that revision, and
//!   nothing was delivered in between, so nothing is lost or repeated.
//! * The aggregator stops when its last subscriber goes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use mvcc::KeyRange;
use parking_lot::Mutex;
use proto::mvccpb::Event;
use tokio::sync::{broadcast, watch};

use crate::Router;

/// How many updates a subscriber may leave unread before it loses its
/// place in the shared stream.
pub(super) const BACKLOG: usize = 256;

/// What a shared aggregator sends.
pub(super) enum SharedUpdate {
    /// As `WatchUpdate::Events`.
    Events { events: Vec<Event>, revision: i64 },
    /// The aggregator ended: every subscriber goes on alone.
    End,
}

/// The state of a shared aggregator its task and subscribers share.
pub(super) struct SharedCore {
    /// Taken to send (with `sent` and `delivered`) and to subscribe, so a
    /// subscriber's first update is the first sent after it read them.
    lock: Mutex<()>,
    tx: broadcast::Sender<Arc<SharedUpdate>>,
    delivered: watch::Sender<i64>,
    /// Updates sent so far (counted before each is sent).
    sent: AtomicU64,
    ended: AtomicBool,
}

impl SharedCore {
    pub(super) fn delivered(&self) -> i64 {
        *self.delivered.borrow()
    }

    /// Sends `events` (every change in `(delivered, revision]`) and moves
    /// the delivered revision.
    pub(super) fn deliver(&self, events: Vec<Event>, revision: i64) {
        let _sending = self.lock.lock();
        if !events.is_empty() {
            self.sent.fetch_add(1, Ordering::SeqCst);
            let _ = self
                .tx
                .send(Arc::new(SharedUpdate::Events { events, revision }));
        }
        self.delivered.send_replace(revision);
    }

    /// The aggregator ended: no new subscriber, and the present ones go on
    /// alone.
    pub(super) fn end(&self) {
        let _sending = self.lock.lock();
        self.ended.store(true, Ordering::SeqCst);
        self.sent.fetch_add(1, Ordering::SeqCst);
        let _ = self.tx.send(Arc::new(SharedUpdate::End));
    }

    /// Whether a subscriber that has taken `taken` updates has taken all.
    pub(super) fn is_drained(&self, taken: u64) -> bool {
        taken >= self.sent.load(Ordering::SeqCst)
    }
}

/// A running shared aggregator; dropping the last handle stops it.
pub(super) struct SharedWatch {
    core: Arc<SharedCore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SharedWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One watch's place in a shared aggregator's stream.
pub(super) struct Subscription {
    /// Keeps the aggregator running.
    _shared: Arc<SharedWatch>,
    pub(super) core: Arc<SharedCore>,
    pub(super) rx: broadcast::Receiver<Arc<SharedUpdate>>,
    /// Updates taken, counting from the aggregator's first.
    pub(super) taken: Arc<AtomicU64>,
    /// The watch's start revision − 1: events at or below it are left out.
    pub(super) from: i64,
    /// The revision of the last update taken (`from` before any).
    pub(super) last: i64,
}

/// The shared aggregators of a node, by range and `prev_kv`.
#[derive(Default)]
pub(crate) struct Hub {
    shared: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    by_range: HashMap<(KeyRange, bool), Weak<SharedWatch>>,
    /// Entries at the last sweep of the stopped ones.
    swept_at: usize,
}

impl Hub {
    /// A place for a watch of `range` from `start` (see the contract);
    /// `run` starts a new aggregator sending into the core it is given.
    pub(super) fn join(
        &self,
        router: &Arc<Router>,
        range: &KeyRange,
        start: i64,
        prev_kv: bool,
        run: impl FnOnce(Arc<Router>, Arc<SharedCore>) -> tokio::task::JoinHandle<()>,
    ) -> Option<Subscription> {
        let key = (range.clone(), prev_kv);
        let mut shared = self.shared.lock();
        if let Some(running) = shared.by_range.get(&key).and_then(Weak::upgrade) {
            if !running.core.ended.load(Ordering::SeqCst) {
                return subscribe(&running, start);
            }
        }
        let (tx, _) = broadcast::channel(BACKLOG);
        let (delivered, _) = watch::channel(start - 1);
        let core = Arc::new(SharedCore {
            lock: Mutex::new(()),
            tx,
            delivered,
            sent: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        });
        let task = run(router.clone(), core.clone());
        let running = Arc::new(SharedWatch { core, task });
        shared.by_range.insert(key, Arc::downgrade(&running));
        if shared.by_range.len() >= 2 * shared.swept_at.max(32) {
            shared.by_range.retain(|_, w| w.strong_count() > 0);
            shared.swept_at = shared.by_range.len();
        }
        subscribe(&running, start)
    }
}

/// A subscription from `start`, if nothing at or after it was delivered.
fn subscribe(running: &Arc<SharedWatch>, start: i64) -> Option<Subscription> {
    let core = &running.core;
    let _subscribing = core.lock.lock();
    if start <= core.delivered() {
        return None;
    }
    Some(Subscription {
        _shared: running.clone(),
        core: core.clone(),
        rx: core.tx.subscribe(),
        taken: Arc::new(AtomicU64::new(core.sent.load(Ordering::SeqCst))),
        from: start - 1,
        last: start - 1,
    })
}
