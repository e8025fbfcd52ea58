//! One revision-oracle RPC in flight per client: the node-level batcher
//! behind [`crate::RpcPdClient`]'s `alloc_revisions` and `current_revision`.
//!
//! Every region leader's sequencer asks for one block of revisions per
//! batch, and every linearizable read asks for the current revision. With
//! many regions on a node, one RPC per call would make the oracle's load
//! proportional to regions × batches; here it is one RPC per round trip per
//! client (TiKV batches TSO requests per store the same way).
//!
//! # Contract
//!
//! A dedicated task ([`OracleBatcher::spawn`]) owns the RPCs; callers only
//! queue a request on a channel and wait for their answer, so a caller's
//! future can be dropped at any time without stalling anyone else. The task
//! sends at most one RPC at a time. When it returns, everything that queued
//! meanwhile goes into the next RPC, sent at once:
//!
//! - **allocations**: one `AllocRevisions` for the sum of the queued counts
//!   (at most [`MAX_COUNT_PER_RPC`]; a request that does not fit waits for
//!   the next RPC, and one larger than the limit goes alone). The callers
//!   get consecutive, disjoint sub-blocks of the answer in queue order:
//!   `first`, `first + count_0`, ... Every value is a revision PD handed
//!   out by an RPC sent after the caller called, so the oracle's guarantee
//!   (greater than everything handed out before) holds per caller.
//! - **current revision**: a caller is served only by an RPC *sent after it
//!   called*: its request is taken off the channel before that RPC starts,
//!   never by an RPC already in flight when it arrived. So the value is at
//!   least every revision handed out before the call started (linearizable,
//!   as [`crate::PdClient::current_revision`] promises). A batch that also
//!   allocates answers its readers with the last revision of its block,
//!   which is PD's current revision right after that allocation; otherwise
//!   one `CurrentRevision` serves them all.
//!
//! # Edge cases
//!
//! - **Errors** go, unchanged (same [`PdError`] variant, so the router's
//!   "not applied" classification is kept), to every caller of the failed
//!   RPC; for an allocation, an error means nothing was handed to that
//!   caller. The RPC itself (the client's `call`) keeps following the PD
//!   leader and retrying until its deadline, as for any other request.
//! - **Cancelled callers**: a caller that went away before its request was
//!   taken into an RPC is skipped (nothing is allocated for it; a batch of
//!   only such callers sends no RPC). One that goes away while its RPC is in
//!   flight leaves its sub-block unused: a gap in the revision sequence,
//!   which is allowed (a failed proposal or a PD crash leaves gaps too) and
//!   happens only on cancellation — sequencers run in spawned tasks and are
//!   not cancelled.
//! - **Implausible answers** from PD (a first revision not above the initial
//!   one, a block running past `i64::MAX`, a current revision below the
//!   initial one) become [`PdError::Other`] for the callers of that RPC,
//!   never a panic or a wrapped value.
//! - **Shutdown**: the task ends when the last [`OracleBatcher`] handle is
//!   dropped (or its runtime shuts down); callers then get
//!   [`PdError::Unavailable`], never a hang.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::client::{PdError, Result, INITIAL_REVISION};

/// The wire count of one `AllocRevisions` is a `u32`, and PD has no smaller
/// limit (its window grows to fit any count).
pub(crate) const MAX_COUNT_PER_RPC: u32 = u32::MAX;

/// How often the task logs (at debug level) how well it batched.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The two oracle RPCs, as the batcher sends them (one at a time). The
/// gRPC client implements it with its leader-following retries; tests use
/// fakes.
#[async_trait::async_trait]
pub(crate) trait OracleRpc: Send + Sync + 'static {
    /// `count` consecutive revisions; returns the first.
    async fn alloc_revisions(&self, count: u32) -> Result<i64>;
    /// The highest revision handed out so far.
    async fn current_revision(&self) -> Result<i64>;
}

/// How the batcher has done since it started: RPCs sent against calls
/// answered. `calls / rpcs` is the batching factor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OracleBatchStats {
    /// `AllocRevisions` RPCs sent (each may also have answered readers).
    pub alloc_rpcs: u64,
    /// `CurrentRevision` RPCs sent.
    pub current_rpcs: u64,
    /// `alloc_revisions` calls answered (with a block or an error).
    pub alloc_calls: u64,
    /// `current_revision` calls answered.
    pub current_calls: u64,
    /// Revisions asked for by the `AllocRevisions` RPCs sent.
    pub revisions: u64,
    /// Calls dropped by their caller before an RPC took them (skipped).
    pub cancelled: u64,
    /// Time spent in RPCs, in microseconds: `rpc_micros / rpcs` is the mean
    /// round trip (retries included), and over a period, `rpc_micros` over
    /// its length is how busy the one RPC slot was.
    pub rpc_micros: u64,
}

impl OracleBatchStats {
    pub fn rpcs(&self) -> u64 {
        self.alloc_rpcs + self.current_rpcs
    }

    pub fn calls(&self) -> u64 {
        self.alloc_calls + self.current_calls
    }
}

#[derive(Debug, Default)]
struct Counters {
    alloc_rpcs: AtomicU64,
    current_rpcs: AtomicU64,
    alloc_calls: AtomicU64,
    current_calls: AtomicU64,
    revisions: AtomicU64,
    cancelled: AtomicU64,
    rpc_micros: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> OracleBatchStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OracleBatchStats {
            alloc_rpcs: l(&self.alloc_rpcs),
            current_rpcs: l(&self.current_rpcs),
            alloc_calls: l(&self.alloc_calls),
            current_calls: l(&self.current_calls),
            revisions: l(&self.revisions),
            cancelled: l(&self.cancelled),
            rpc_micros: l(&self.rpc_micros),
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn add_rpc_time(&self, started: Instant) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Counters::add(&self.rpc_micros, micros);
    }
}

#[derive(Debug)]
enum Request {
    Alloc {
        count: u32,
        tx: oneshot::Sender<Result<i64>>,
    },
    Current {
        tx: oneshot::Sender<Result<i64>>,
    },
}

impl Request {
    fn is_cancelled(&self) -> bool {
        match self {
            Request::Alloc { tx, .. } | Request::Current { tx } => tx.is_closed(),
        }
    }
}

/// The callers' side: cheap to clone, all clones feed one task.
#[derive(Debug, Clone)]
pub(crate) struct OracleBatcher {
    tx: mpsc::UnboundedSender<Request>,
    counters: Arc<Counters>,
}

fn stopped() -> PdError {
    PdError::Unavailable("revision batcher stopped".into())
}

impl OracleBatcher {
    /// Starts the task on the current tokio runtime (panics outside one,
    /// like `tokio::spawn`).
    pub(crate) fn spawn<R: OracleRpc>(rpc: Arc<R>) -> Self {
        Self::spawn_with_limit(rpc, MAX_COUNT_PER_RPC)
    }

    /// [`Self::spawn`] with another per-RPC count limit (tests).
    pub(crate) fn spawn_with_limit<R: OracleRpc>(rpc: Arc<R>, max_count: u32) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        tokio::spawn(run(rpc, rx, max_count.max(1), counters.clone()));
        OracleBatcher { tx, counters }
    }

    /// See the module's contract. `count` 0 is `Err(InvalidArgument)`.
    pub(crate) async fn alloc_revisions(&self, count: u32) -> Result<i64> {
        if count == 0 {
            return Err(PdError::InvalidArgument("revision count 0".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Alloc { count, tx })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// See the module's contract.
    pub(crate) async fn current_revision(&self) -> Result<i64> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Current { tx })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub(crate) fn stats(&self) -> OracleBatchStats {
        self.counters.snapshot()
    }
}

/// The callers of one RPC.
#[derive(Default)]
struct Batch {
    allocs: Vec<(u32, oneshot::Sender<Result<i64>>)>,
    reads: Vec<oneshot::Sender<Result<i64>>>,
    total: u32,
    cancelled: u64,
}

impl Batch {
    /// Takes `req` in, or hands it back if its count does not fit.
    fn add(&mut self, req: Request, max_count: u32) -> std::result::Result<(), Request> {
        if req.is_cancelled() {
            self.cancelled += 1;
            return Ok(());
        }
        match req {
            Request::Alloc { count, tx } => {
                match self.total.checked_add(count) {
                    Some(t) if t <= max_count => self.total = t,
                    // Alone, a request goes whatever its size.
                    _ if self.allocs.is_empty() => self.total = count,
                    _ => return Err(Request::Alloc { count, tx }),
                }
                self.allocs.push((count, tx));
            }
            Request::Current { tx } => self.reads.push(tx),
        }
        Ok(())
    }

    fn fail(self, e: PdError) {
        for (_, tx) in self.allocs {
            let _ = tx.send(Err(e.clone()));
        }
        for tx in self.reads {
            let _ = tx.send(Err(e.clone()));
        }
    }

    /// Sends the batch's one RPC and answers every caller.
    async fn serve<R: OracleRpc>(self, rpc: &R, counters: &Counters) {
        Counters::add(&counters.cancelled, self.cancelled);
        Counters::add(&counters.alloc_calls, self.allocs.len() as u64);
        Counters::add(&counters.current_calls, self.reads.len() as u64);
        if self.allocs.is_empty() {
            if self.reads.is_empty() {
                return;
            }
            Counters::add(&counters.current_rpcs, 1);
            let started = Instant::now();
            let r = rpc.current_revision().await;
            counters.add_rpc_time(started);
            let r = r.and_then(|v| {
                if v < INITIAL_REVISION {
                    Err(PdError::Other(format!("PD answered current revision {v}")))
                } else {
                    Ok(v)
                }
            });
            for tx in self.reads {
                let _ = tx.send(r.clone());
            }
            return;
        }
        Counters::add(&counters.alloc_rpcs, 1);
        Counters::add(&counters.revisions, u64::from(self.total));
        let started = Instant::now();
        let r = rpc.alloc_revisions(self.total).await;
        counters.add_rpc_time(started);
        let first = match r {
            Ok(first) => first,
            Err(e) => return self.fail(e),
        };
        // The block first..=last must lie above the initial revision and
        // within i64; anything else is a broken PD, not a value to pass on.
        let last = first.checked_add(i64::from(self.total) - 1);
        let last = match last {
            Some(last) if first > INITIAL_REVISION => last,
            _ => {
                let total = self.total;
                return self.fail(PdError::Other(format!(
                    "PD answered AllocRevisions({total}) with first revision {first}"
                )));
            }
        };
        let mut next = first;
        for (count, tx) in self.allocs {
            let _ = tx.send(Ok(next));
            // Saturating: only the step past the final sub-block can go
            // beyond `last`, and that value is not used.
            next = next.saturating_add(i64::from(count));
        }
        // The current revision right after this allocation, which PD made
        // after every caller of this batch had called.
        for tx in self.reads {
            let _ = tx.send(Ok(last));
        }
    }
}

async fn run<R: OracleRpc>(
    rpc: Arc<R>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    max_count: u32,
    counters: Arc<Counters>,
) {
    let mut carried: Option<Request> = None;
    let mut logged = (Instant::now(), OracleBatchStats::default());
    loop {
        let first = match carried.take() {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        // Only requests already queued now join: each was sent before the
        // RPC below starts.
        let mut batch = Batch::default();
        let mut next = Some(first);
        while let Some(req) = next.take() {
            if let Err(req) = batch.add(req, max_count) {
                carried = Some(req);
                break;
            }
            next = rx.try_recv().ok();
        }
        batch.serve(rpc.as_ref(), &counters).await;

        let period = logged.0.elapsed();
        if period >= LOG_EVERY {
            let (now, was) = (counters.snapshot(), logged.1);
            let rpcs = now.rpcs() - was.rpcs();
            let micros = now.rpc_micros - was.rpc_micros;
            debug!(
                rpcs,
                calls = now.calls() - was.calls(),
                revisions = now.revisions - was.revisions,
                cancelled = now.cancelled - was.cancelled,
                mean_rpc_ms = micros as f64 / 1000.0 / rpcs.max(1) as f64,
                busy = micros as f64 / 1e6 / period.as_secs_f64(),
                secs = period.as_secs_f64(),
                "revision oracle batching"
            );
            logged = (Instant::now(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use parking_lot::Mutex;

    use super::*;

    /// What the fake saw for one RPC.
    #[derive(Debug, Clone, PartialEq)]
    enum Sent {
        Alloc(u32),
        Current,
    }

    /// A fake PD oracle: hands out revisions from a counter when an RPC
    /// arrives (as PD would), then optionally waits for the test to release
    /// the answer, and can fail chosen RPCs. Checks that at most one RPC is
    /// in flight.
    #[derive(Default)]
    struct FakeOracle {
        state: Mutex<FakeState>,
        released: tokio::sync::Notify,
    }

    #[derive(Default)]
    struct FakeState {
        /// Highest revision handed out.
        last: i64,
        sent: Vec<Sent>,
        in_flight: usize,
        /// RPCs (by index in `sent`) that wait for `release`.
        gated: Vec<usize>,
        releases: usize,
        /// Answers to force for coming RPCs, in order (`None`: normal).
        scripted: VecDeque<Option<Result<i64>>>,
    }

    impl FakeOracle {
        fn new() -> Arc<Self> {
            let f = FakeOracle::default();
            f.state.lock().last = INITIAL_REVISION;
            Arc::new(f)
        }

        fn gate(&self, rpc_index: usize) {
            self.state.lock().gated.push(rpc_index);
        }

        fn release(&self) {
            self.state.lock().releases += 1;
            self.released.notify_waiters();
        }

        fn script(&self, answer: Option<Result<i64>>) {
            self.state.lock().scripted.push_back(answer);
        }

        fn sent(&self) -> Vec<Sent> {
            self.state.lock().sent.clone()
        }

        /// Another node allocating directly from PD.
        fn alloc_elsewhere(&self, n: i64) -> i64 {
            let mut s = self.state.lock();
            s.last += n;
            s.last
        }

        async fn rpc(&self, what: Sent) -> Result<i64> {
            let (index, scripted, value) = {
                let mut s = self.state.lock();
                s.in_flight += 1;
                assert_eq!(s.in_flight, 1, "two oracle RPCs in flight");
                let index = s.sent.len();
                s.sent.push(what.clone());
                let scripted = s.scripted.pop_front().flatten();
                let value = match (&what, &scripted) {
                    (_, Some(_)) => 0,
                    (Sent::Alloc(n), None) => {
                        let first = s.last + 1;
                        s.last += i64::from(*n);
                        first
                    }
                    (Sent::Current, None) => s.last,
                };
                (index, scripted, value)
            };
            loop {
                let notified = self.released.notified();
                {
                    let s = self.state.lock();
                    let waiting = s.gated.iter().filter(|&&g| g <= index).count();
                    if !s.gated.contains(&index) || s.releases >= waiting {
                        break;
                    }
                }
                notified.await;
            }
            self.state.lock().in_flight -= 1;
            scripted.unwrap_or(Ok(value))
        }
    }

    #[async_trait::async_trait]
    impl OracleRpc for FakeOracle {
        async fn alloc_revisions(&self, count: u32) -> Result<i64> {
            self.rpc(Sent::Alloc(count)).await
        }
        async fn current_revision(&self) -> Result<i64> {
            self.rpc(Sent::Current).await
        }
    }

    type Call = Pin<Box<dyn Future<Output = Result<i64>> + Send>>;

    fn alloc(b: &OracleBatcher, n: u32) -> Call {
        let b = b.clone();
        Box::pin(async move { b.alloc_revisions(n).await })
    }

    fn current(b: &OracleBatcher) -> Call {
        let b = b.clone();
        Box::pin(async move { b.current_revision().await })
    }

    /// Polls `call` once, which queues its request; it must then wait.
    async fn queue(call: &mut Call) {
        let p = futures::poll!(call.as_mut());
        assert!(matches!(p, Poll::Pending), "answered before any RPC");
    }

    /// Lets the batcher task run until it has sent `n` RPCs.
    async fn until_sent(fake: &FakeOracle, n: usize) {
        for _ in 0..10_000 {
            if fake.sent().len() >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("batcher sent {:?}, expected {n} RPCs", fake.sent());
    }

    #[tokio::test]
    async fn queued_allocations_share_one_rpc_with_disjoint_contiguous_blocks() {
        let fake = FakeOracle::new();
        fake.gate(0);
        let b = OracleBatcher::spawn(fake.clone());
        let mut head = alloc(&b, 1);
        queue(&mut head).await;
        until_sent(&fake, 1).await;

        // 100 callers while the first RPC is in flight.
        let counts: Vec<u32> = (0..100).map(|i| i % 7 + 1).collect();
        let mut calls: Vec<Call> = counts.iter().map(|&n| alloc(&b, n)).collect();
        for c in &mut calls {
            queue(c).await;
        }
        fake.release();
        assert_eq!(head.await, Ok(2));
        let mut blocks = Vec::new();
        for (c, n) in calls.into_iter().zip(&counts) {
            let first = c.await.expect("allocation");
            blocks.push((first, first + i64::from(*n) - 1));
        }
        let total: u32 = counts.iter().sum();
        assert_eq!(fake.sent(), vec![Sent::Alloc(1), Sent::Alloc(total)]);
        // In queue order, each starting right after the previous one.
        let mut expect = 3;
        for (first, last) in blocks {
            assert_eq!(first, expect);
            assert!(last >= first);
            expect = last + 1;
        }
        assert_eq!(expect, 3 + i64::from(total));
        let s = b.stats();
        assert_eq!((s.alloc_rpcs, s.alloc_calls), (2, 101));
        assert_eq!(s.revisions, u64::from(total) + 1);
    }

    /// The case a wrong batcher gets wrong: a reader that arrives while an
    /// RPC is in flight, after a revision was handed out elsewhere, must not
    /// be answered from that RPC.
    #[tokio::test]
    async fn current_revision_never_comes_from_an_rpc_sent_before_the_call() {
        let fake = FakeOracle::new();
        fake.gate(0);
        fake.gate(2);
        let b = OracleBatcher::spawn(fake.clone());

        // An allocation in flight: PD already handed out 2 and answers late.
        let mut a = alloc(&b, 1);
        queue(&mut a).await;
        until_sent(&fake, 1).await;
        // Another node then gets 3 and its write completes.
        assert_eq!(fake.alloc_elsewhere(1), 3);
        // Only now does the read start.
        let mut r = current(&b);
        queue(&mut r).await;
        fake.release();
        assert_eq!(a.await, Ok(2));
        assert_eq!(r.await, Ok(3), "served from the RPC sent before the call");
        assert_eq!(fake.sent(), vec![Sent::Alloc(1), Sent::Current]);

        // Same with a CurrentRevision in flight.
        let mut r1 = current(&b);
        queue(&mut r1).await;
        until_sent(&fake, 3).await;
        assert_eq!(fake.alloc_elsewhere(5), 8);
        let mut r2 = current(&b);
        queue(&mut r2).await;
        fake.release();
        assert_eq!(r1.await, Ok(3));
        assert_eq!(r2.await, Ok(8));
        assert_eq!(fake.sent()[2..], [Sent::Current, Sent::Current]);
    }

    #[tokio::test]
    async fn readers_queued_with_allocations_get_the_end_of_the_block() {
        let fake = FakeOracle::new();
        fake.gate(0);
        let b = OracleBatcher::spawn(fake.clone());
        let mut head = current(&b);
        queue(&mut head).await;
        until_sent(&fake, 1).await;
        let mut r = current(&b);
        let mut a1 = alloc(&b, 3);
        let mut a2 = alloc(&b, 2);
        for c in [&mut r, &mut a1, &mut a2] {
            queue(c).await;
        }
        fake.release();
        assert_eq!(head.await, Ok(1));
        assert_eq!(a1.await, Ok(2));
        assert_eq!(a2.await, Ok(5));
        // 2..=6 handed out by an RPC sent after the reader called.
        assert_eq!(r.await, Ok(6));
        assert_eq!(fake.sent(), vec![Sent::Current, Sent::Alloc(5)]);
    }

    #[tokio::test]
    async fn an_error_reaches_every_caller_of_its_rpc_unchanged() {
        let fake = FakeOracle::new();
        fake.gate(0);
        let b = OracleBatcher::spawn(fake.clone());
        let mut head = alloc(&b, 1);
        queue(&mut head).await;
        until_sent(&fake, 1).await;
        // RPC 0 is in flight (answering normally); the next one, for two
        // allocations and a reader, fails.
        fake.script(Some(Err(PdError::NotLeader("pd2".into()))));
        let mut calls = vec![alloc(&b, 2), current(&b), alloc(&b, 5)];
        for c in &mut calls {
            queue(c).await;
        }
        fake.release();
        assert_eq!(head.await, Ok(2));
        for c in calls {
            assert_eq!(c.await, Err(PdError::NotLeader("pd2".into())));
        }
        assert_eq!(fake.sent(), vec![Sent::Alloc(1), Sent::Alloc(7)]);
        // Each kind of error, alone, comes back as it was.
        for e in [
            PdError::Unavailable("gone".into()),
            PdError::Storage("disk".into()),
            PdError::Exhausted("revision"),
            PdError::Closed,
        ] {
            fake.script(Some(Err(e.clone())));
            assert_eq!(b.alloc_revisions(1).await, Err(e.clone()));
            fake.script(Some(Err(e.clone())));
            assert_eq!(b.current_revision().await, Err(e));
        }
        // Failures allocated nothing; the next allocation continues.
        assert_eq!(b.alloc_revisions(1).await, Ok(3));
        assert_eq!(b.current_revision().await, Ok(3));
    }

    #[tokio::test]
    async fn cancelled_callers_neither_stall_others_nor_take_revisions() {
        let fake = FakeOracle::new();
        fake.gate(0);
        fake.gate(1);
        let b = OracleBatcher::spawn(fake.clone());
        let mut head = alloc(&b, 1);
        queue(&mut head).await;
        until_sent(&fake, 1).await;

        // Queued behind RPC 0; two of them go away before it returns.
        let mut keep1 = alloc(&b, 2);
        let mut gone1 = alloc(&b, 10);
        let mut gone2 = current(&b);
        let mut keep2 = current(&b);
        let mut keep3 = alloc(&b, 3);
        for c in [&mut keep1, &mut gone1, &mut gone2, &mut keep2, &mut keep3] {
            queue(c).await;
        }
        drop(gone1);
        drop(gone2);
        // The head caller goes away too, with its RPC in flight.
        drop(head);
        fake.release();
        until_sent(&fake, 2).await;
        // The survivors' RPC asks only for their revisions.
        assert_eq!(fake.sent(), vec![Sent::Alloc(1), Sent::Alloc(5)]);
        // And one of them goes away while it is in flight.
        drop(keep2);
        fake.release();
        assert_eq!(keep1.await, Ok(3));
        assert_eq!(keep3.await, Ok(5));
        let s = b.stats();
        assert_eq!(s.cancelled, 2);
        // Revision 2 (the dropped head's) is a gap; nothing else is lost.
        assert_eq!(b.alloc_revisions(1).await, Ok(8));

        // A batch whose callers all left sends nothing.
        fake.gate(3);
        let mut head = current(&b);
        queue(&mut head).await;
        until_sent(&fake, 4).await;
        let mut gone = alloc(&b, 4);
        queue(&mut gone).await;
        drop(gone);
        fake.release();
        assert_eq!(head.await, Ok(8));
        assert_eq!(b.current_revision().await, Ok(8));
        assert_eq!(
            fake.sent()[3..],
            [Sent::Current, Sent::Current],
            "an RPC for a cancelled caller"
        );
    }

    #[tokio::test]
    async fn batches_stay_within_the_per_rpc_count() {
        let fake = FakeOracle::new();
        fake.gate(0);
        let b = OracleBatcher::spawn_with_limit(fake.clone(), 10);
        let mut head = alloc(&b, 1);
        queue(&mut head).await;
        until_sent(&fake, 1).await;
        let mut calls = vec![alloc(&b, 4), alloc(&b, 4), alloc(&b, 4), alloc(&b, 25)];
        let mut r = current(&b);
        for c in calls.iter_mut().chain([&mut r]) {
            queue(c).await;
        }
        fake.release();
        assert_eq!(head.await, Ok(2));
        let mut firsts = Vec::new();
        for c in calls {
            firsts.push(c.await.expect("allocation"));
        }
        assert_eq!(firsts, vec![3, 7, 11, 15]);
        // The reader queued last: it joined the RPC of the large block,
        // which went alone otherwise.
        assert_eq!(r.await, Ok(39));
        assert_eq!(
            fake.sent(),
            vec![
                Sent::Alloc(1),
                Sent::Alloc(8),
                Sent::Alloc(4),
                Sent::Alloc(25)
            ]
        );
    }

    #[tokio::test]
    async fn implausible_answers_are_errors_not_panics() {
        let fake = FakeOracle::new();
        let b = OracleBatcher::spawn(fake.clone());
        for bad in [i64::MAX - 1, 0, -5, INITIAL_REVISION] {
            fake.script(Some(Ok(bad)));
            let r = b.alloc_revisions(3).await;
            assert!(matches!(r, Err(PdError::Other(_))), "{bad}: {r:?}");
        }
        fake.script(Some(Ok(i64::MAX - 2)));
        assert_eq!(b.alloc_revisions(3).await, Ok(i64::MAX - 2));
        fake.script(Some(Ok(0)));
        assert!(matches!(b.current_revision().await, Err(PdError::Other(_))));
        assert_eq!(
            b.alloc_revisions(0).await,
            Err(PdError::InvalidArgument("revision count 0".into()))
        );
    }

    #[test]
    fn callers_get_unavailable_once_the_task_is_gone() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        let rt = runtime();
        let b = rt.block_on(async { OracleBatcher::spawn(FakeOracle::new()) });
        // The batcher's runtime shuts down, taking the task with it.
        drop(rt);
        runtime().block_on(async {
            assert!(matches!(
                b.alloc_revisions(1).await,
                Err(PdError::Unavailable(_))
            ));
            assert!(matches!(
                b.current_revision().await,
                Err(PdError::Unavailable(_))
            ));
        });
    }

    /// Many tasks on several threads, some giving up early: blocks are
    /// disjoint, readers never go below an allocation completed before they
    /// started, RPCs are far fewer than calls, and nobody hangs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_with_cancellations() {
        #[derive(Default)]
        struct SlowOracle(FakeOracle);
        #[async_trait::async_trait]
        impl OracleRpc for SlowOracle {
            async fn alloc_revisions(&self, count: u32) -> Result<i64> {
                tokio::time::sleep(Duration::from_micros(300)).await;
                self.0.alloc_revisions(count).await
            }
            async fn current_revision(&self) -> Result<i64> {
                tokio::time::sleep(Duration::from_micros(300)).await;
                self.0.current_revision().await
            }
        }
        let fake = Arc::new(SlowOracle::default());
        fake.0.state.lock().last = INITIAL_REVISION;
        let b = OracleBatcher::spawn(fake.clone());
        let done = Arc::new(AtomicU64::new(INITIAL_REVISION as u64));
        let mut tasks = Vec::new();
        for t in 0..64u32 {
            let b = b.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..50u32 {
                    if (t + i) % 3 == 0 {
                        let floor = done.load(Ordering::SeqCst) as i64;
                        let cur = b.current_revision().await.expect("current");
                        assert!(cur >= floor, "current {cur} < completed {floor}");
                    } else if (t * 7 + i) % 11 == 0 {
                        // Gives up almost at once: queued, maybe in flight.
                        let _ =
                            tokio::time::timeout(Duration::from_micros(50), b.alloc_revisions(2))
                                .await;
                    } else {
                        let n = (t + i) % 4 + 1;
                        let first = b.alloc_revisions(n).await.expect("alloc");
                        let last = first + i64::from(n) - 1;
                        mine.push((first, last));
                        done.fetch_max(last as u64, Ordering::SeqCst);
                    }
                }
                mine
            }));
        }
        let mut blocks = Vec::new();
        for t in tasks {
            let r = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("a caller hung");
            blocks.extend(r.expect("task"));
        }
        blocks.sort();
        for w in blocks.windows(2) {
            assert!(w[0].1 < w[1].0, "overlapping blocks {w:?}");
        }
        let s = b.stats();
        assert!(
            s.rpcs() * 4 < s.calls(),
            "little batching: {} RPCs for {} calls",
            s.rpcs(),
            s.calls()
        );
    }
}
