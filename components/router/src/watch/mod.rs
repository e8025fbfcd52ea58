//! Watches over many regions: [`Router::watch`] turns the change feeds of
//! the regions holding a key range into etcd's one revision-ordered
//! stream of events (the watch aggregator of docs/architecture.md,
//! "Watch").
//!
//! Contract:
//! * A [`Watch`] delivers every change to a key in its range at a revision
//!   from its start revision on, exactly once, in revision order; the
//!   changes of one revision (several keys of a Txn, in every region it
//!   touched) come in one [`WatchUpdate::Events`], ordered as the request
//!   made them (their sub-revisions).
//! * An update at revision R (its `revision`) means every change in the
//!   range at or below R has been delivered; [`Watch::delivered`] is the
//!   highest such R so far, and it moves on without changes too (that is
//!   what a progress notification reports).
//! * A change is delivered only once every region of the range has
//!   resolved its revision: no write at or below it can still appear
//!   there (`raftstore::feed` for a replica's own bound; the resolved
//!   revisions its leader publishes, `crate::resolved`, for regions
//!   without writes). Within one region changes go out as the replica
//!   applies them; a range over several regions waits for the slowest
//!   region's resolved revision.
//! * A start revision below a region's compaction revision ends the watch
//!   with [`WatchUpdate::Compacted`] (etcd's compacted watch cancel).
//! * Splits, merges, snapshots, removed replicas and lagging feeds are
//!   invisible: the watch takes the range's regions again and catches up
//!   from MVCC after the last revision it delivered. A long history is
//!   caught up batch by batch (about a thousand changes per region each,
//!   a revision never cut), so a watch's memory stays bounded however far
//!   back it starts and however slowly it is read. Errors that cannot
//!   be retried end the watch with `Err`.
//! * Each region of the range is followed through this node's replica
//!   (leader or follower); a region without a replica here through its
//!   leader's node, asked for the changes up to the region's resolved
//!   revision every 100 ms (`remote`).
//! * Watches of one range (and `prev_kv`) from the revision after the
//!   newest one delivered share one aggregator (`shared`): it reads the
//!   regions once and each update is one copy every watcher reads; a
//!   watch from further back, or one that falls behind the shared stream,
//!   runs its own.
//! * Dropping the [`Watch`] stops it.

mod piece;
mod remote;
mod shared;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mvcc::KeyRange;
use proto::mvccpb::Event;
use raftstore::RegionHandle;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::{Result, Router, RETRY_DEADLINE};
use piece::{Piece, PieceEnd};
pub(crate) use shared::Hub;
use shared::{SharedCore, SharedUpdate, Subscription};

/// How often a watch looks at the regions' published resolved revisions
/// while no region applies anything.
const RESOLVED_POLL: Duration = Duration::from_millis(100);
/// The least time between two batches of resolved-revision asks of one
/// watch.
const ASK_SPACING: Duration = Duration::from_millis(10);
/// How many updates may wait for the consumer before the watch stops
/// reading its regions (their feeds then lag, and it catches up from
/// MVCC once read again).
const UPDATE_QUEUE: usize = 64;

/// What a watch delivers (see the contract).
#[derive(Debug, Clone, PartialEq)]
pub enum WatchUpdate {
    /// Every change in the range at revisions above the previous update's
    /// and at or below `revision`, in revision order.
    Events { events: Vec<Event>, revision: i64 },
    /// The range's history is compacted above the revision the watch was
    /// to deliver next; nothing more comes.
    Compacted { compact_revision: i64 },
}

/// A running watch; dropping it stops it.
pub struct Watch {
    mode: Mode,
    progress: WatchProgress,
    router: Arc<Router>,
    range: KeyRange,
    prev_kv: bool,
}

enum Mode {
    /// Its own aggregator.
    Own(Own),
    /// A place in a shared aggregator's stream.
    Shared(Subscription),
}

struct Own {
    updates: mpsc::Receiver<Result<WatchUpdate>>,
    queued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Own {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a watch's delivery stands, readable apart from the [`Watch`]
/// (a consumer may hold the watch in a pending [`Watch::next`]); it
/// follows the watch from a shared aggregator to its own.
#[derive(Clone)]
pub struct WatchProgress {
    of: Arc<parking_lot::Mutex<ProgressOf>>,
}

enum ProgressOf {
    Own {
        delivered: watch::Receiver<i64>,
        /// Updates handed over and not yet taken by [`Watch::next`].
        queued: Arc<AtomicUsize>,
    },
    Shared {
        core: Arc<SharedCore>,
        taken: Arc<AtomicU64>,
        from: i64,
    },
}

impl WatchProgress {
    /// Every change at or below this revision has been handed to
    /// [`Watch::next`]'s queue.
    pub fn delivered(&self) -> i64 {
        match &*self.of.lock() {
            ProgressOf::Own { delivered, .. } => *delivered.borrow(),
            ProgressOf::Shared { core, from, .. } => core.delivered().max(*from),
        }
    }

    /// Whether every update delivered so far has been taken by
    /// [`Watch::next`]: then everything up to the [`Watch::delivered`]
    /// read before this call has been taken.
    pub fn is_drained(&self) -> bool {
        match &*self.of.lock() {
            ProgressOf::Own { queued, .. } => queued.load(Ordering::SeqCst) == 0,
            ProgressOf::Shared { core, taken, .. } => core.is_drained(taken.load(Ordering::SeqCst)),
        }
    }

    /// Whether the watch reads a shared aggregator's stream.
    pub fn is_shared(&self) -> bool {
        matches!(&*self.of.lock(), ProgressOf::Shared { .. })
    }
}

impl Watch {
    /// The next update; `None` once the watch ended (after its last
    /// update or error).
    pub async fn next(&mut self) -> Option<Result<WatchUpdate>> {
        loop {
            let sub = match &mut self.mode {
                Mode::Own(own) => {
                    let update = own.updates.recv().await;
                    if update.is_some() {
                        own.queued.fetch_sub(1, Ordering::SeqCst);
                    }
                    return update;
                }
                Mode::Shared(sub) => sub,
            };
            let update = match sub.rx.recv().await {
                Ok(update) => {
                    sub.taken.fetch_add(1, Ordering::SeqCst);
                    update
                }
                // Too far behind, or the aggregator is gone: alone from
                // the last update taken on.
                Err(_) => {
                    self.go_alone();
                    continue;
                }
            };
            match &*update {
                SharedUpdate::Events { events, revision } => {
                    sub.last = *revision;
                    let from = sub.from;
                    let events: Vec<Event> = events
                        .iter()
                        .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision > from))
                        .cloned()
                        .collect();
                    if !events.is_empty() {
                        let revision = *revision;
                        return Some(Ok(WatchUpdate::Events { events, revision }));
                    }
                }
                SharedUpdate::End => self.go_alone(),
            }
        }
    }

    /// Leaves the shared stream for an aggregator of its own, from the
    /// revision after the last update taken (see `shared`).
    fn go_alone(&mut self) {
        let Mode::Shared(sub) = &self.mode else {
            return;
        };
        debug!("a watch leaves its shared aggregator at {}", sub.last);
        let (own, progress) =
            start_own(&self.router, self.range.clone(), sub.last + 1, self.prev_kv);
        *self.progress.of.lock() = progress;
        self.mode = Mode::Own(own);
    }

    /// See [`WatchProgress::delivered`].
    pub fn delivered(&self) -> i64 {
        self.progress.delivered()
    }

    /// See [`WatchProgress::is_drained`].
    pub fn is_drained(&self) -> bool {
        self.progress.is_drained()
    }

    /// A handle on where the watch's delivery stands.
    pub fn progress(&self) -> WatchProgress {
        self.progress.clone()
    }
}

/// Where an aggregator's delivery goes: a watch's own queue, or a shared
/// stream.
enum Delivery {
    Own(OwnDelivery),
    Shared(Arc<SharedCore>),
}

/// The sending side of a watch's own queue, shared with its [`Watch`].
struct OwnDelivery {
    updates: mpsc::Sender<Result<WatchUpdate>>,
    delivered: watch::Sender<i64>,
    /// Counted before each update is sent (see [`WatchProgress`]).
    queued: Arc<AtomicUsize>,
}

impl Delivery {
    fn delivered(&self) -> i64 {
        match self {
            Delivery::Own(own) => *own.delivered.borrow(),
            Delivery::Shared(core) => core.delivered(),
        }
    }

    /// Hands `events` (all changes in `(delivered, revision]`) over.
    /// `false`: the watch was dropped.
    async fn deliver(&self, events: Vec<Event>, revision: i64) -> bool {
        let own = match self {
            Delivery::Own(own) => own,
            Delivery::Shared(core) => {
                core.deliver(events, revision);
                return true;
            }
        };
        if !events.is_empty() {
            let update = WatchUpdate::Events { events, revision };
            if !own.send(Ok(update)).await {
                return false;
            }
        }
        own.delivered.send_replace(revision);
        true
    }

    /// The watch ends with `last`; a shared aggregator's subscribers go on
    /// alone, and find it themselves.
    async fn end(&self, last: Result<WatchUpdate>) {
        match self {
            Delivery::Own(own) => {
                own.send(last).await;
            }
            Delivery::Shared(core) => core.end(),
        }
    }

    /// Whether nobody reads the deliveries any more (a shared aggregator
    /// is stopped by its last subscriber instead).
    fn is_closed(&self) -> bool {
        match self {
            Delivery::Own(own) => own.updates.is_closed(),
            Delivery::Shared(_) => false,
        }
    }

    /// Resolves once [`Delivery::is_closed`].
    async fn closed(&self) {
        match self {
            Delivery::Own(own) => own.updates.closed().await,
            Delivery::Shared(_) => std::future::pending().await,
        }
    }
}

impl OwnDelivery {
    /// Queues `update`, counted first (so a consumer that reads the
    /// delivered revision and then finds nothing queued has taken every
    /// update up to it). `false`: the watch was dropped.
    async fn send(&self, update: Result<WatchUpdate>) -> bool {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.updates.send(update).await.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// Starts an aggregator of a watch's own, from `start`.
fn start_own(
    router: &Arc<Router>,
    range: KeyRange,
    start: i64,
    prev_kv: bool,
) -> (Own, ProgressOf) {
    let (updates_tx, updates) = mpsc::channel(UPDATE_QUEUE);
    let (delivered_tx, delivered) = watch::channel(start - 1);
    let queued = Arc::new(AtomicUsize::new(0));
    let delivery = Delivery::Own(OwnDelivery {
        updates: updates_tx,
        delivered: delivered_tx,
        queued: queued.clone(),
    });
    let task = tokio::spawn(run(router.clone(), range, prev_kv, delivery));
    let own = Own {
        updates,
        queued: queued.clone(),
        task,
    };
    (own, ProgressOf::Own { delivered, queued })
}

impl Router {
    /// Watches the keys of `range` from revision `start_revision` on (0:
    /// from the revision after the current one), with each event's
    /// previous version if `prev_kv` (see the contract).
    pub async fn watch(
        self: &Arc<Router>,
        range: KeyRange,
        start_revision: i64,
        prev_kv: bool,
    ) -> Result<Watch> {
        let start = if start_revision > 0 {
            start_revision
        } else {
            self.current_revision().await? + 1
        };
        let joined = self
            .watches
            .join(self, &range, start, prev_kv, |router, core| {
                let range = range.clone();
                tokio::spawn(run(router, range, prev_kv, Delivery::Shared(core)))
            });
        let (mode, progress) = match joined {
            Some(sub) => {
                let progress = ProgressOf::Shared {
                    core: sub.core.clone(),
                    taken: sub.taken.clone(),
                    from: sub.from,
                };
                (Mode::Shared(sub), progress)
            }
            None => {
                let (own, progress) = start_own(self, range.clone(), start, prev_kv);
                (Mode::Own(own), progress)
            }
        };
        Ok(Watch {
            mode,
            progress: WatchProgress {
                of: Arc::new(parking_lot::Mutex::new(progress)),
            },
            router: self.clone(),
            range,
            prev_kv,
        })
    }

    /// The resolved revision the leader of `region_id` published, with
    /// the log index a replica must have applied to rely on it.
    pub(crate) fn published_resolved(&self, region_id: u64) -> Option<(i64, u64)> {
        self.resolved.get(region_id)
    }
}

/// The watch's task: rounds over the range's regions as they are, until
/// the watch is dropped or fails.
async fn run(router: Arc<Router>, range: KeyRange, prev_kv: bool, delivery: Delivery) {
    let mut failing_since = None;
    loop {
        let result = round(&router, &range, prev_kv, &delivery).await;
        match result {
            Ok(RoundEnd::Dropped) => return,
            Ok(RoundEnd::Compacted(compact_revision)) => {
                delivery
                    .end(Ok(WatchUpdate::Compacted { compact_revision }))
                    .await;
                return;
            }
            Ok(RoundEnd::LayoutChanged) => failing_since = None,
            Err(e) if e.is_retryable() || e.layout_changed() => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= RETRY_DEADLINE {
                    delivery.end(Err(e)).await;
                    return;
                }
                debug!("watch retries: {e}");
            }
            Err(e) => {
                delivery.end(Err(e)).await;
                return;
            }
        }
        if delivery.is_closed() {
            return;
        }
        tokio::time::sleep(crate::MIN_BACKOFF).await;
    }
}

enum RoundEnd {
    /// The regions changed: take them again.
    LayoutChanged,
    Compacted(i64),
    Dropped,
}

/// One round: follows the regions holding `range` now, from the revision
/// after the last delivered one, until they change.
async fn round(
    router: &Arc<Router>,
    range: &KeyRange,
    prev_kv: bool,
    delivery: &Delivery,
) -> Result<RoundEnd> {
    let from = delivery.delivered() + 1;
    let mut pieces = Vec::new();
    for (region, span) in router.region_pieces(range).await? {
        let Some(handle) = router.store.region(region.id) else {
            pieces.push(Piece::start_remote(router, region.id, span, from, prev_kv));
            continue;
        };
        match Piece::start(router, handle, span, from, prev_kv)? {
            Ok(piece) => pieces.push(piece),
            Err(compact_revision) => return Ok(RoundEnd::Compacted(compact_revision)),
        }
    }
    let mut asker = Asker::new();
    loop {
        let resolved = pieces.iter().map(|p| p.resolved(router)).min().unwrap_or(0);
        if resolved > delivery.delivered() {
            let mut changes: Vec<(i64, u32, Event)> =
                pieces.iter_mut().flat_map(|p| p.take(resolved)).collect();
            changes.sort_by_key(|(rev, sub, _)| (*rev, *sub));
            let events = changes.into_iter().map(|(_, _, e)| e).collect();
            if !delivery.deliver(events, resolved).await {
                return Ok(RoundEnd::Dropped);
            }
        }
        if pieces.iter().any(|p| p.backlog_done(delivery.delivered())) {
            // A batch of history is out: read the next one.
            return Ok(RoundEnd::LayoutChanged);
        }
        if let Some(wanted) = pieces.iter().filter_map(Piece::highest_pending).max() {
            // Changes wait for other regions: ask those regions' leaders
            // now rather than at the tracker's next refresh.
            let lagging = pieces
                .iter()
                .filter(|p| p.resolved(router) < wanted)
                .filter_map(|p| p.local_replica().cloned())
                .collect();
            asker.ask(router, lagging);
        }
        let next = futures::future::select_all(pieces.iter_mut().map(|p| Box::pin(p.recv())));
        let woke = tokio::select! {
            (end, i, rest) = next => {
                drop(rest);
                end.map(|end| (end, i))
            }
            _ = asker.answered() => None,
            _ = tokio::time::sleep(RESOLVED_POLL) => None,
            _ = delivery.closed() => return Ok(RoundEnd::Dropped),
        };
        if let Some((end, i)) = woke {
            debug!(
                region_id = pieces[i].region_id(),
                "watch takes its regions again: {end:?}"
            );
            return match end {
                PieceEnd::LayoutChanged => Ok(RoundEnd::LayoutChanged),
                PieceEnd::Compacted(c) => Ok(RoundEnd::Compacted(c)),
                PieceEnd::Failed(e) => Err(e),
            };
        }
    }
}

/// Asks regions' leaders for their resolved revisions on a watch's behalf
/// (`Router::refresh_resolved_of`), one batch at a time and at most one
/// batch per [`ASK_SPACING`] (a follower still applying, or a transaction
/// holding its locks, keeps a region behind however often it is asked);
/// dropping it stops the batch asked.
struct Asker {
    task: Option<tokio::task::JoinHandle<()>>,
    last: Option<tokio::time::Instant>,
    done_tx: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
}

impl Asker {
    fn new() -> Asker {
        let (done_tx, done) = mpsc::channel(1);
        Asker {
            task: None,
            last: None,
            done_tx,
            done,
        }
    }

    /// Asks for `regions` unless a batch is still being asked.
    fn ask(&mut self, router: &Arc<Router>, regions: Vec<RegionHandle>) {
        let busy = self.task.as_ref().is_some_and(|t| !t.is_finished());
        let recent = self.last.is_some_and(|t| t.elapsed() < ASK_SPACING);
        if regions.is_empty() || busy || recent {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        let router = router.clone();
        let done = self.done_tx.clone();
        self.task = Some(tokio::spawn(async move {
            router.refresh_resolved_of(regions).await;
            let _ = done.try_send(());
        }));
    }

    /// Resolves when a batch was answered. Cancel-safe.
    async fn answered(&mut self) {
        let _ = self.done.recv().await;
    }
}

impl Drop for Asker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
