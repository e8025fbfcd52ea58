//! The lock resolver: ends the transactions over several regions that
//! their coordinators abandoned (killed or cut off), and forgets the
//! decisions no lock needs any more (the protocol is in `crate::txn`).
//!
//! * **Resolving.** A region leader finding a lock older than `LOCK_TTL`
//!   asks the primary for the decision. The primary answers with its
//!   record if committed; if it still holds the lock it rolls it back (from
//!   then on the coordinator's commit is refused) and answers rolled back;
//!   with neither lock nor record the transaction never committed (the
//!   primary's lock is taken before any other, and the record is forgotten
//!   only once no participant holds a lock). The secondary then commits
//!   (the decision's mutations its lock covers) or rolls back.
//! * **Forgetting.** A coordinator that committed every secondary forgets
//!   the decision itself (queued in [`Cleanup`]). Every
//!   [`RECORD_SWEEP_INTERVAL`] the leaders of primaries also go over their
//!   records and forget each one whose spans (every participant's, kept in
//!   the record) hold no lock of the transaction, so the decisions of
//!   transactions whose secondaries were resolved, or whose coordinator
//!   died after committing them, do not stay for good.
//!
//! Locks are resolved and decisions forgotten concurrently, each within
//! [`RESOLVE_STEP`], so one that cannot be done now holds up no other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use proto::forwardpb::{
    txn_status::Kind, txn_step_request::Step, txn_step_response, TxnHeldRequest, TxnStatus,
    TxnStatusRequest,
};
use proto::raft_cmdpb::{TxnCommitRequest, TxnForgetRequest, TxnRollbackRequest};
use proto::raft_serverpb::TxnCommitRecord;
use raftstore::txn::{range_span, span_range, Lock};
use raftstore::RegionHandle;
use tracing::{debug, info};

use super::{single, within};
use crate::leader::txn::LOCK_TTL;
use crate::{Error, Result, Router};

/// How often the lock resolver looks for abandoned locks.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(500);
/// The longest the lock resolver spends on one lock (or forgetting one
/// decision) in a round; it tries again next round.
const RESOLVE_STEP: Duration = Duration::from_secs(3);
/// Locks resolved (and decisions forgotten) at once by the lock resolver.
const RESOLVE_CONCURRENCY: usize = 16;
/// How often the leaders of primaries go over their decision records.
pub(crate) const RECORD_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Decision records to forget, queued by coordinators once their
/// transaction is fully committed (forgotten by the lock resolver's task,
/// off the client's path), and when the records were last swept.
#[derive(Default)]
pub(crate) struct Cleanup {
    forgets: Mutex<Vec<TxnForgetRequest>>,
    swept: Mutex<Option<Instant>>,
}

impl Cleanup {
    pub(crate) fn forget_later(&self, forget: TxnForgetRequest) {
        self.forgets.lock().push(forget);
    }

    /// Whether the records are due for a sweep (then counted as swept).
    fn sweep_due(&self) -> bool {
        let mut swept = self.swept.lock();
        let due = swept.is_none_or(|at| at.elapsed() >= RECORD_SWEEP_INTERVAL);
        if due {
            *swept = Some(Instant::now());
        }
        due
    }
}

impl Router {
    /// Starts the task resolving abandoned locks of the regions this node
    /// leads and forgetting decisions no lock needs any more (see the
    /// module docs); it ends when the router is dropped.
    pub fn start_lock_resolver(self: &Arc<Router>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESOLVE_INTERVAL).await;
                let Some(router) = weak.upgrade() else {
                    return;
                };
                router.resolve_round().await;
            }
        })
    }

    /// Forgets finished decisions and resolves the abandoned locks of the
    /// regions led here, [`RESOLVE_CONCURRENCY`] at a time, each bounded
    /// by [`RESOLVE_STEP`]: one that cannot be resolved now (its primary
    /// unreachable) holds up no other, and the round is bounded, so a node
    /// being shut down is not held up by its own resolver.
    async fn resolve_round(&self) {
        let mut work: Vec<BoxFuture<'_, Option<u64>>> = Vec::new();
        let forgets = self.txn_cleanup.forgets.lock().clone();
        for forget in forgets {
            work.push(self.forget(forget).boxed());
        }
        let sweep = self.txn_cleanup.sweep_due();
        for handle in self.store.regions() {
            if !handle.status().ready_leader {
                continue;
            }
            if sweep {
                match handle.txn_records(&self.mvcc.snapshot()) {
                    Ok(records) => work.extend(
                        records
                            .into_iter()
                            .filter(|(_, r)| !r.lock_spans.is_empty())
                            .map(|(primary_key, r)| self.collect(primary_key, r).boxed()),
                    ),
                    Err(e) => debug!(
                        region_id = handle.region_id(),
                        "listing transaction decisions failed: {e}"
                    ),
                }
            }
            for lock in handle.locks().all() {
                if lock.age() >= LOCK_TTL {
                    work.push(self.resolve_bounded(handle.clone(), lock).boxed());
                }
            }
        }
        // Decisions leave the list only once forgotten (a forget is
        // idempotent): one that failed is tried again next round.
        let forgotten: Vec<u64> = futures::stream::iter(work)
            .buffer_unordered(RESOLVE_CONCURRENCY)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        self.txn_cleanup
            .forgets
            .lock()
            .retain(|f| !forgotten.contains(&f.txn_id));
    }

    /// Forgets the decision `record`, kept under `primary_key`, if no
    /// region holds a lock of its transaction any more (each asked after a
    /// read barrier), within [`RESOLVE_STEP`]: its id if forgotten. No lock
    /// of a decided transaction is taken after its decision, so one found
    /// gone stays gone, and with the record gone too a secondary could
    /// only be resolved as rolled back.
    async fn collect(&self, primary_key: Vec<u8>, record: TxnCommitRecord) -> Option<u64> {
        let txn_id = record.txn_id;
        let unlocked = async {
            for span in &record.lock_spans {
                for (_, piece) in self.region_pieces(&span_range(span)).await? {
                    let step = Step::Held(TxnHeldRequest {
                        txn_id,
                        span: Some(range_span(&piece)),
                    });
                    match self.step(std::slice::from_ref(&piece), step).await? {
                        Some(txn_step_response::Result::Held(h)) if !h.held => {}
                        Some(txn_step_response::Result::Held(_)) => return Ok(false),
                        other => {
                            return Err(Error::Internal(format!("lock check answered {other:?}")))
                        }
                    }
                }
            }
            Ok::<_, Error>(true)
        };
        match tokio::time::timeout(RESOLVE_STEP, unlocked).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return None,
            Ok(Err(e)) => {
                debug!(txn_id, "checking a decision's locks failed: {e}");
                return None;
            }
            Err(_) => {
                debug!(txn_id, "checking a decision's locks timed out");
                return None;
            }
        }
        debug!(txn_id, "forgetting a decision no lock needs");
        self.forget(TxnForgetRequest {
            txn_id,
            primary_key,
        })
        .await
    }

    /// Forgets a finished decision within [`RESOLVE_STEP`]: its id if done.
    async fn forget(&self, forget: TxnForgetRequest) -> Option<u64> {
        let txn_id = forget.txn_id;
        let spans = [single(&forget.primary_key)];
        let step = self.step(&spans, Step::Forget(forget));
        match tokio::time::timeout(RESOLVE_STEP, step).await {
            Ok(Ok(_)) => return Some(txn_id),
            Ok(Err(e)) => debug!(txn_id, "forgetting a decision failed: {e}"),
            Err(_) => debug!(txn_id, "forgetting a decision timed out"),
        }
        None
    }

    /// [`Router::resolve`] within [`RESOLVE_STEP`] (`None`: no decision to
    /// forget).
    async fn resolve_bounded(&self, handle: RegionHandle, lock: Lock) -> Option<u64> {
        let (region_id, txn_id) = (handle.region_id(), lock.record.txn_id);
        match tokio::time::timeout(RESOLVE_STEP, self.resolve(&handle, &lock)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(region_id, txn_id, "resolving a lock failed: {e}"),
            Err(_) => debug!(region_id, txn_id, "resolving a lock timed out"),
        }
        None
    }

    /// Resolves an abandoned `lock` of `handle`'s region, led here.
    async fn resolve(&self, handle: &RegionHandle, lock: &Lock) -> Result<()> {
        let txn_id = lock.record.txn_id;
        let primary_key = lock.record.primary_key.clone();
        let status = self
            .step(
                &[single(&primary_key)],
                Step::Status(TxnStatusRequest {
                    txn_id,
                    primary_key: primary_key.clone(),
                }),
            )
            .await?;
        let Some(txn_step_response::Result::Status(status)) = status else {
            return Err(Error::Internal("status step without a status".into()));
        };
        let leader = self.region_leader(handle.region_id());
        let step = match decision(&status) {
            Kind::Pending => return Ok(()),
            Kind::Committed => Step::Commit(TxnCommitRequest {
                txn_id,
                revision: status.revision,
                // What the lock covers, not what the region holds now: a
                // merge may have brought another participant's keys in,
                // committed there already and not locked here.
                mutations: within(&status.mutations, |key| lock.covers_key(key)),
                primary: false,
                primary_key,
                lock_spans: Vec::new(),
            }),
            Kind::RolledBack => Step::Rollback(TxnRollbackRequest { txn_id }),
        };
        info!(
            region_id = handle.region_id(),
            txn_id,
            decision = ?decision(&status),
            "resolving an abandoned transaction lock"
        );
        match leader.txn_step(handle, step).await {
            // Resolved meanwhile (by the coordinator or the primary).
            Ok(_) | Err(Error::Region(raftstore::Error::StaleCommand(_))) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn decision(status: &TxnStatus) -> Kind {
    Kind::try_from(status.kind).unwrap_or(Kind::Pending)
}
