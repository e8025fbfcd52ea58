//! A participant region's side of a transaction over several regions, on
//! its ready leader (the protocol is in `crate::txn`), and the waits every
//! reader and writer of a locked key makes.
//!
//! Contract of [`RegionLeader::txn_step`] (errors classified as in
//! `crate::error`):
//! * `Lock`: latches the spans (so no write of them is in flight), waits
//!   for other transactions' locks on them to go (see [`wait_unlocked`]),
//!   proposes the lock in the current term and, once it is applied here,
//!   answers the live keys of the spans and of the historical reads, and
//!   the leases whose owner keys it locked (their attached keys, and
//!   whether this leader's clock has them expired) — which cannot change
//!   while the lock is held (renewals aside). Not applied: not the ready
//!   leader, the spans not in the region, still locked by another
//!   transaction; outcome unknown: no answer within [`WRITE_TIMEOUT`].
//! * `Commit`, `Rollback`, `Forget`: proposes the command in the current
//!   term; `Ok` once applied here. A commit or rollback refused because the
//!   region holds no lock of the transaction any more is `StaleCommand`.
//! * `Status` (on the primary's region): after a read barrier, the
//!   recorded decision if there is one; else, if the primary still holds
//!   the lock, `PENDING` while it is younger than [`LOCK_TTL`], otherwise it
//!   is rolled back here and the answer is `ROLLED_BACK`; no lock and no
//!   decision means the transaction was rolled back (or never got past its
//!   primary's lock, which is taken before any other).
//! * `Held`: after a read barrier, whether the region holds a lock of the
//!   transaction. Not applied: not the ready leader, the span not in the
//!   region, or the region changed (split, merge) during the check.

use std::time::{Duration, Instant};

use mvcc::lease::{owner_id, LeaseView};
use mvcc::KeyRange;
use proto::forwardpb::{
    txn_status::Kind, txn_step_request::Step, txn_step_response, KeyValues, LeaseHeld, TxnHeld,
    TxnHeldRequest, TxnLock, TxnLocked, TxnStatus, TxnStatusRequest,
};
use proto::raft_cmdpb::raft_cmd_request::Cmd;
use raftstore::txn::span_range;
use raftstore::{Applied, RegionHandle};

use super::latches::LatchSet;
use super::{check_spans, not_leader, RegionLeader, READ_TIMEOUT, WRITE_TIMEOUT};
use crate::{Error, Result};

/// How long a reader or writer waits for a lock on its keys before
/// answering a retryable error (the router's retries go on waiting).
pub const LOCK_WAIT: Duration = Duration::from_secs(1);
/// A lock older than this on the replica that sees it belongs to an
/// abandoned transaction, and may be resolved (its coordinator, if alive,
/// then finds its commit refused and answers that nothing applied).
pub const LOCK_TTL: Duration = Duration::from_secs(3);

/// Waits until the locks that transactions other than `txn_id` (0: any)
/// hold on this replica over `spans` *now* are gone; a retryable
/// `StaleCommand` after [`LOCK_WAIT`].
///
/// Locks taken later are not waited for, so a stream of transactions
/// cannot starve a reader: a lock not yet applied here when a read's
/// revision R was fixed (leader: after its barrier; follower: once it has
/// applied the leader's index; serializable: its applied revision) was
/// committed after R was taken, and its transaction's revision comes from
/// the oracle after that — above R. A writer holds its latches, which a
/// lock needs, so no new lock on its keys can appear meanwhile.
pub(crate) async fn wait_unlocked(
    handle: &RegionHandle,
    spans: &[KeyRange],
    txn_id: u64,
) -> Result<()> {
    let waited: Vec<u64> = handle
        .locks()
        .conflicting(spans, txn_id)
        .iter()
        .map(|l| l.record.txn_id)
        .collect();
    if waited.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let mut changed = handle.locks().subscribe();
        let Some(held) = waited.iter().find(|id| handle.locks().get(**id).is_some()) else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Region(raftstore::Error::StaleCommand(format!(
                "keys locked by transaction {held}"
            ))));
        }
        let _ = tokio::time::timeout(left, changed.changed()).await;
    }
}

impl RegionLeader {
    /// Runs one transaction step (see the contract).
    pub async fn txn_step(
        &self,
        handle: &RegionHandle,
        step: Step,
    ) -> Result<Option<txn_step_response::Result>> {
        match step {
            Step::Lock(lock) => Ok(Some(txn_step_response::Result::Locked(
                self.txn_lock(handle, lock).await?,
            ))),
            Step::Commit(c) => self
                .propose_txn(handle, Cmd::TxnCommit(c))
                .await
                .map(|_| None),
            Step::Rollback(r) => self
                .propose_txn(handle, Cmd::TxnRollback(r))
                .await
                .map(|_| None),
            Step::Forget(f) => self
                .propose_txn(handle, Cmd::TxnForget(f))
                .await
                .map(|_| None),
            Step::Status(s) => Ok(Some(txn_step_response::Result::Status(
                self.txn_status(handle, &s).await?,
            ))),
            Step::Held(h) => Ok(Some(txn_step_response::Result::Held(TxnHeld {
                held: self.txn_held(handle, &h).await?,
            }))),
            Step::CommitMerge(c) => Ok(Some(txn_step_response::Result::Merge(
                self.merge_step(handle, Cmd::CommitMerge(c)).await?,
            ))),
            Step::RejectMerge(r) => Ok(Some(txn_step_response::Result::Merge(
                self.merge_step(handle, Cmd::RejectMerge(r)).await?,
            ))),
        }
    }

    async fn propose_txn(&self, handle: &RegionHandle, cmd: Cmd) -> Result<Applied> {
        self.propose_in_term(handle, cmd, "transaction step").await
    }

    async fn txn_lock(&self, handle: &RegionHandle, step: TxnLock) -> Result<TxnLocked> {
        let req = step
            .lock
            .ok_or_else(|| Error::Internal("lock step without a lock".into()))?;
        let spans: Vec<KeyRange> = req.spans.iter().map(span_range).collect();
        let _latches =
            tokio::time::timeout(WRITE_TIMEOUT, self.latches.acquire(LatchSet::of(&spans)))
                .await
                .map_err(|_| {
                    Error::Region(raftstore::Error::StaleCommand(
                        "lock: the keys' writes did not finish in time".into(),
                    ))
                })?;
        let status = handle.status();
        if !status.ready_leader {
            return Err(not_leader(handle));
        }
        check_spans(&status.region, &spans)?;
        wait_unlocked(handle, &spans, req.txn_id).await?;
        self.propose_txn(handle, Cmd::TxnLock(req)).await?;
        let view = self.mvcc.snapshot();
        let state = handle.read_state(&view)?;
        let mut latest = Vec::new();
        for span in &spans {
            latest.extend(view.range(span, i64::MAX, 0, true)?.kvs);
        }
        let mut historical = Vec::with_capacity(step.reads.len());
        for read in &step.reads {
            let span = read.span.as_ref().map(span_range);
            let kvs = match span {
                // Below the compaction revision: the coordinator's bounds
                // refuse the read.
                Some(span) if read.revision >= state.compact_revision => {
                    view.range(&span, read.revision, 0, true)?.kvs
                }
                _ => Vec::new(),
            };
            historical.push(KeyValues {
                revision: read.revision,
                kvs,
            });
        }
        let leases = held_leases(handle, &view, &spans)?;
        Ok(TxnLocked {
            latest,
            historical,
            compact_revision: state.compact_revision,
            region_id: status.region.id,
            leases,
        })
    }

    async fn txn_status(&self, handle: &RegionHandle, req: &TxnStatusRequest) -> Result<TxnStatus> {
        let status = handle.status();
        if !status.ready_leader {
            return Err(not_leader(handle));
        }
        check_spans(
            &status.region,
            &[KeyRange {
                start: req.primary_key.clone(),
                end: None,
            }],
        )?;
        tokio::time::timeout(READ_TIMEOUT, handle.read_index())
            .await
            .map_err(|_| Error::timed_out("read barrier"))??;
        if let Some(decided) = self.decision(handle, req)? {
            return Ok(decided);
        }
        let Some(lock) = handle.locks().get(req.txn_id) else {
            return Ok(rolled_back());
        };
        if lock.age() < LOCK_TTL {
            return Ok(TxnStatus {
                kind: Kind::Pending as i32,
                ..Default::default()
            });
        }
        let rollback = proto::raft_cmdpb::TxnRollbackRequest { txn_id: req.txn_id };
        match self.propose_txn(handle, Cmd::TxnRollback(rollback)).await {
            Ok(_) => Ok(rolled_back()),
            // The lock went meanwhile: committed, or rolled back by
            // another resolver.
            Err(Error::Region(raftstore::Error::StaleCommand(_))) => {
                Ok(self.decision(handle, req)?.unwrap_or_else(rolled_back))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this region holds a lock of `req`'s transaction, as of a
    /// read barrier taken after the call.
    async fn txn_held(&self, handle: &RegionHandle, req: &TxnHeldRequest) -> Result<bool> {
        let before = handle.status();
        if !before.ready_leader {
            return Err(not_leader(handle));
        }
        let span = req
            .span
            .as_ref()
            .map(span_range)
            .ok_or_else(|| Error::Internal("held step without a span".into()))?;
        check_spans(&before.region, &[span])?;
        tokio::time::timeout(READ_TIMEOUT, handle.read_index())
            .await
            .map_err(|_| Error::timed_out("read barrier"))??;
        let held = handle.locks().get(req.txn_id).is_some();
        // A merge moves the region's locks to its target, which the span's
        // next lookup finds.
        let after = handle.status();
        if !after.ready_leader || after.region.region_epoch != before.region.region_epoch {
            return Err(Error::Region(raftstore::Error::StaleCommand(
                "the region changed during the lock check".into(),
            )));
        }
        Ok(held)
    }

    /// The recorded decision of `req`'s transaction on this replica.
    fn decision(&self, handle: &RegionHandle, req: &TxnStatusRequest) -> Result<Option<TxnStatus>> {
        let view = self.mvcc.snapshot();
        Ok(handle
            .txn_record(&view, &req.primary_key, req.txn_id)?
            .map(|record| TxnStatus {
                kind: Kind::Committed as i32,
                revision: record.revision,
                mutations: record.mutations,
            }))
    }
}

/// The leases whose owner keys `spans` lock (as single keys) and that the
/// region holds as of `view`.
fn held_leases(
    handle: &RegionHandle,
    view: &mvcc::MvccSnapshot<'_>,
    spans: &[KeyRange],
) -> Result<Vec<LeaseHeld>> {
    let leases = handle.lease_view(view);
    let mut out = Vec::new();
    for span in spans.iter().filter(|s| s.end.is_none()) {
        let Some(id) = owner_id(&span.start) else {
            continue;
        };
        if leases.exists(id)? {
            out.push(LeaseHeld {
                id,
                keys: leases.attached(id)?,
                expired: leases.expired(id),
                revoking: leases.revoking(id),
            });
        }
    }
    Ok(out)
}

fn rolled_back() -> TxnStatus {
    TxnStatus {
        kind: Kind::RolledBack as i32,
        ..Default::default()
    }
}
