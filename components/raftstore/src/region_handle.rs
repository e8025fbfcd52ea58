//! The handle callers use to reach one region replica of this node.
//!
//! Contract of [`RegionHandle`]:
//! * `propose` / `propose_with` answer once the command is applied on this
//!   replica (its effects are readable here) with its [`Applied`] index and
//!   revision, or with an error that says whether it did not apply
//!   (retryable: not the ready leader, epoch or term moved, replica stopped
//!   before taking it, its slot committed with another entry, apply refused
//!   it) or its outcome is unknown (`OutcomeUnknown`: the replica lost track
//!   of an entry already in its log) — see `crate::Error` and the `peer`
//!   module. `propose_with`'s callback runs exactly once, on the replica's
//!   thread (or the caller's, if the replica is gone); it must not block.
//! * `read_index` resolves once a quorum confirmed this replica's leadership
//!   and everything committed before the call is applied here, with the
//!   term of that leadership.
//! * `read_state(view)` is the region meta and the applied and compaction
//!   revisions of this replica as of `view`, a snapshot of this node's
//!   RocksDB: the same moment as the data a read through `view` sees; a
//!   read checks its keys against that region. It fails with `Installing`
//!   (retryable) if `view` caught a region snapshot install half-way, and
//!   with `RegionNotFound` if the replica was gone by then: a tombstone
//!   (removed, its data deleted in batches from then on; or merged away),
//!   or replaced by a newer replica of the region on this node (whose
//!   state, under the same region id, does not list this replica's peer).
//! * `subscribe_changes` follows the writes the replica applies from then
//!   on (the `feed` module's contract); `resolved_revision(view, state)`
//!   is where a subscriber's catch-up from `view` leaves off: no write at
//!   or below it is applied after `view`, and the feed repeats the runs up
//!   to `state.applied_index`.
//! * `wait_applied(index)` resolves once this replica (leader or not) has
//!   applied `index`, and fails with `Stopped` if the replica stops or is
//!   removed from the region first. It does not time out.
//! * `lease_records(view)` lists the leases the region owns as of `view`,
//!   `lease_keys(view, id)` the keys attached to one, `lease_view(view)`
//!   is what evaluating a write on the leader knows of leases;
//!   `renew_lease`, `lease_time_to_live` and `take_expired_leases` ask the
//!   leases' clock, which only the ready leader runs (the `lease` module's
//!   contract).
//! * `status` is a snapshot taken after the replica's last loop turn.
//! * `change_peers` proposes one raft membership change (`ConfChangeV2`) on
//!   the leader and resolves once it is applied here, like `propose`. The
//!   changes are checked against the region as the leader sees it: a
//!   `RemoveNode` of a peer not in the region, an `AddLearnerNode` or
//!   `AddNode` of a new peer on a node already holding one, or a peer named
//!   twice fail with `InvalidConfChange`; an empty list too. `AddNode` of a
//!   learner promotes it; `AddLearnerNode` of a voter demotes it. Several
//!   changes go through joint consensus, left automatically by raft-rs, and
//!   may not remove a voter (demote it first). While a change is not yet
//!   applied (or the region is joint) another fails with `StaleCommand`; so
//!   does one raft refuses. The change carries the epoch it was proposed
//!   against and apply rejects it (`EpochNotMatch`) if `conf_ver` moved.
//!   Once applied, `conf_ver` is one higher on every replica. Removing the
//!   leader's own peer is allowed: it answers, then stops like any removed
//!   replica (which marks its region state `Tombstone` and is unregistered
//!   here, so it is neither found by `region` nor restarted by `open`).
//!   Data commands check only the epoch's `version`, so membership changes
//!   do not fail writes in flight.

use std::sync::Arc;
use std::time::Instant;

use engine::cf;
use mvcc::MvccSnapshot;
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::RaftCmdRequest;
use proto::raft_serverpb::{
    LeaseRecord, PeerState, RaftApplyState, RegionLocalState, TxnCommitRecord,
};
use raft::eraftpb::ConfChangeType;
use tokio::sync::oneshot;

use crate::poller::Mailbox;

use crate::feed::FeedReceiver;
use crate::keys;
use crate::lease::{self, ClockError, Renewal};
use crate::msg::{Applied, PeerMsg, ProposeCallback};
use crate::status::{PeerShared, PeerStatus};
use crate::txn::{self, LockTable};
use crate::{Error, Result};

#[derive(Clone)]
pub struct RegionHandle {
    pub(crate) region_id: u64,
    pub(crate) mailbox: Mailbox,
    pub(crate) shared: Arc<PeerShared>,
}

impl RegionHandle {
    pub fn region_id(&self) -> u64 {
        self.region_id
    }

    /// Proposes `cmd` and waits for its outcome (see the contract).
    pub async fn propose(&self, cmd: RaftCmdRequest) -> Result<Applied> {
        let (tx, rx) = oneshot::channel();
        self.propose_with(
            cmd,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// Queues `cmd` for proposal now; `cb` gets its outcome (see the
    /// contract). Commands queued one after another reach the raft log in
    /// that order (when both are accepted), which callers use to keep
    /// revision order equal to log order.
    pub fn propose_with(&self, cmd: RaftCmdRequest, cb: ProposeCallback) {
        if let Err(std::sync::mpsc::SendError(PeerMsg::Propose { cb, .. })) =
            self.mailbox.send(PeerMsg::Propose { cmd, cb })
        {
            cb(Err(Error::Stopped(self.region_id)));
        }
    }

    /// A linearizable read barrier; returns the term of the confirmed
    /// leadership (see the contract).
    pub async fn read_index(&self) -> Result<u64> {
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::ReadIndex { cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// The region as this replica holds it, with its applied and
    /// compaction revisions, as of `view` (see the contract).
    pub fn read_state(&self, view: &MvccSnapshot<'_>) -> Result<ReadState> {
        let gone = || Error::RegionNotFound(self.region_id);
        let raw = view
            .kv()
            .get(cf::META, &keys::region_state_key(self.region_id))?
            .ok_or_else(gone)?;
        let local = RegionLocalState::decode(raw.as_slice())?;
        let peer_id = self.shared.status.lock().peer_id;
        let tombstone = local.state() == PeerState::Tombstone;
        let region = local.region.unwrap_or_default();
        if tombstone || !region.peers.iter().any(|p| p.id == peer_id) {
            return Err(gone());
        }
        let raw = view
            .kv()
            .get(cf::META, &keys::apply_state_key(self.region_id))?
            .ok_or_else(|| {
                Error::Corrupted(format!("region {} without apply state", self.region_id))
            })?;
        let state = RaftApplyState::decode(raw.as_slice())?;
        if state.installing_snapshot {
            return Err(Error::Installing(self.region_id));
        }
        Ok(ReadState {
            region,
            applied_index: state.applied_index,
            applied_revision: state.applied_revision,
            compact_revision: state.compact_revision,
        })
    }

    /// Waits until this replica has applied the log up to `index`: a
    /// follower serving a read at a revision the leader vouched for waits
    /// for the leader's applied index here (see the router).
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        if self.shared.status.lock().applied_index >= index {
            return Ok(());
        }
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::WaitApplied { index, cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// Proposes a membership change of the region (see the contract above)
    /// and waits until it is applied on this replica.
    pub async fn change_peers(&self, changes: Vec<(ConfChangeType, metapb::Peer)>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let cb: ProposeCallback = Box::new(move |res| {
            let _ = tx.send(res.map(|_| ()));
        });
        self.send(PeerMsg::ChangePeers { changes, cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// Starts handing leadership to voter `peer_id` (no-op if it is this
    /// replica). `Err(NotLeader)` unless this replica leads; the transfer
    /// itself may still fail (raft-rs gives up after an election timeout),
    /// so callers watch the region's leader to know.
    pub async fn transfer_leader(&self, peer_id: u64) -> Result<()> {
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::TransferLeader { peer_id, cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    pub fn status(&self) -> PeerStatus {
        self.shared.status.lock().clone()
    }

    /// The replica's current raft term (its status's, without the copy).
    pub fn term(&self) -> u64 {
        self.shared.status.lock().term
    }

    /// The writes this replica applies from now on (see `feed`).
    pub fn subscribe_changes(&self) -> FeedReceiver {
        self.shared.feed.subscribe()
    }

    /// The transaction locks this replica has applied (see `txn`).
    pub fn locks(&self) -> &LockTable {
        &self.shared.locks
    }

    /// The decision of transaction `txn_id` with `primary_key`, if this
    /// replica's state as of `view` records one (see `txn`).
    pub fn txn_record(
        &self,
        view: &MvccSnapshot<'_>,
        primary_key: &[u8],
        txn_id: u64,
    ) -> Result<Option<TxnCommitRecord>> {
        txn::read_record(view.kv(), primary_key, txn_id)
    }

    /// The decisions recorded under this replica's primary keys as of
    /// `view`: (primary key, record). `RegionNotFound` as
    /// [`RegionHandle::read_state`].
    pub fn txn_records(&self, view: &MvccSnapshot<'_>) -> Result<Vec<(Vec<u8>, TxnCommitRecord)>> {
        let state = self.read_state(view)?;
        txn::snapshot_records(view.kv(), &state.region)
    }

    /// The replica's resolved revision as of `view` (see `feed`), `state`
    /// being its [`RegionHandle::read_state`] of the same view.
    pub fn resolved_revision(&self, view: &MvccSnapshot<'_>, state: &ReadState) -> Result<i64> {
        let locks = txn::snapshot_locks(view.kv(), self.region_id)?;
        Ok(crate::feed::resolved_revision(
            state.applied_revision,
            locks.iter().map(|l| l.base_revision),
        ))
    }

    /// The leases this replica's region owns as of `view` (see `lease`).
    /// `RegionNotFound` as [`RegionHandle::read_state`].
    pub fn lease_records(&self, view: &MvccSnapshot<'_>) -> Result<Vec<LeaseRecord>> {
        let state = self.read_state(view)?;
        lease::records(view.kv(), &state.region)
    }

    /// Restarts lease `id`'s TTL on this replica's clock (the `lease`
    /// contract): only the ready leader runs one (`ClockError::NotRunning`
    /// elsewhere); the caller confirms the leadership first (a read
    /// barrier), so a deposed leader does not acknowledge a renewal.
    pub fn renew_lease(&self, id: i64) -> std::result::Result<Renewal, ClockError> {
        self.shared.leases.lock().renew(id, Instant::now())
    }

    /// Lease `id`'s (granted TTL, remaining TTL) on this replica's clock,
    /// as [`RegionHandle::renew_lease`].
    pub fn lease_time_to_live(&self, id: i64) -> std::result::Result<(i64, i64), ClockError> {
        self.shared.leases.lock().time_to_live(id, Instant::now())
    }

    /// The leases this replica holds as of `view`, for evaluating a write
    /// on the region's leader (see `lease::ReplicaLeases`).
    pub fn lease_view<'a>(&'a self, view: &'a MvccSnapshot<'a>) -> lease::ReplicaLeases<'a> {
        lease::ReplicaLeases {
            kv: view.kv(),
            clock: &self.shared.leases,
        }
    }

    /// The keys attached to lease `id` as of `view`, in key order.
    pub fn lease_keys(&self, view: &MvccSnapshot<'_>, id: i64) -> Result<Vec<Vec<u8>>> {
        lease::attached_keys(view.kv(), id)
    }

    /// Starts a revoke of lease `id` on this replica's clock (see
    /// `LeaseClock::begin_revoke`), as [`RegionHandle::renew_lease`].
    pub fn begin_lease_revoke(
        &self,
        id: i64,
        expired: bool,
    ) -> std::result::Result<(), ClockError> {
        self.shared
            .leases
            .lock()
            .begin_revoke(id, expired, Instant::now())
    }

    /// The expired leases with keys attached that the leader's clock handed
    /// over since the last call: the router revokes them (a revoke with
    /// keys takes a revision, and maybe other regions), through the clock's
    /// check that they are still expired.
    pub fn take_expired_leases(&self) -> Vec<i64> {
        self.shared.leases.lock().take_handed_over()
    }

    /// Waits until the physical clean-up of compaction `revision` is done.
    pub async fn wait_physically_compacted(&self, revision: i64) -> Result<()> {
        let mut rx = self.shared.physically_compacted.subscribe();
        rx.wait_for(|done| *done >= revision)
            .await
            .map(|_| ())
            .map_err(|_| Error::Stopped(self.region_id))
    }

    pub(crate) fn send(&self, msg: PeerMsg) -> Result<()> {
        self.mailbox
            .send(msg)
            .map_err(|_| Error::Stopped(self.region_id))
    }
}

/// A replica's region and revisions as of one RocksDB snapshot (see
/// [`RegionHandle::read_state`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadState {
    /// The region meta this replica had applied.
    pub region: metapb::Region,
    /// The last log index applied: a change feed subscribed before `view`
    /// was taken repeats the runs up to it.
    pub applied_index: u64,
    pub applied_revision: i64,
    pub compact_revision: i64,
}
