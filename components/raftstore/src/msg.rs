//! The mailbox protocol of a region replica: what [`crate::RegionHandle`]
//! (and the replica's own helpers) send its loop, and how each is answered.
//!
//! Every request carries a callback that is answered exactly once: with
//! the outcome, or, if the replica stops (or is removed from its region)
//! first, with `Stopped` — `OutcomeUnknown` for a proposal already in the
//! log; a caller whose callback is dropped unanswered sees the same through
//! its closed channel. Requests that need a leader
//! (`Propose`, `ReadIndex`, `ChangePeers`) fail at once with `NotLeader`
//! on a replica that is not a leader having applied an entry of its term;
//! `TransferLeader` needs only a leader. Messages are handled in arrival
//! order, so commands sent one after another reach the raft log in that
//! order when both are accepted.

use proto::metapb;
use proto::raft_cmdpb::RaftCmdRequest;
use proto::raft_serverpb::RaftMessage;
use raft::eraftpb::ConfChangeType;
use tokio::sync::oneshot;

use crate::Result;

/// How a request is answered.
pub type Callback = oneshot::Sender<Result<()>>;

/// What a proposal applied as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Its log index (a replica that applied this far has its effects).
    pub index: u64,
    /// The region's applied revision after it: a write's own revision.
    pub revision: i64,
}

/// How a proposal is answered: called exactly once, on the replica's
/// thread (or the sender's, when the replica is gone before taking it).
/// The error says whether the proposal did not apply or its outcome is
/// unknown (`crate::Error`).
pub type ProposeCallback = Box<dyn FnOnce(Result<Applied>) + Send>;

/// How a read barrier is answered: with the term in which a quorum
/// confirmed this replica's leadership.
pub type ReadCallback = oneshot::Sender<Result<u64>>;

/// A message to a replica's loop.
pub enum PeerMsg {
    /// Replicate and apply `cmd`; answered once applied (or rejected). A
    /// command whose header names a term is refused unless this replica
    /// leads in that term.
    Propose {
        cmd: RaftCmdRequest,
        cb: ProposeCallback,
    },
    /// Linearizable read barrier: answered once this replica is confirmed
    /// leader by a quorum and has applied everything committed before.
    ReadIndex { cb: ReadCallback },
    /// Replicate and apply a membership change; answered once applied.
    ChangePeers {
        changes: Vec<(ConfChangeType, metapb::Peer)>,
        cb: ProposeCallback,
    },
    /// Hand leadership to `peer_id`; answered once the transfer started
    /// (raft-rs aborts it silently if the target does not win in time).
    TransferLeader { peer_id: u64, cb: Callback },
    /// Answered once this replica has applied `index` (a follower read
    /// waiting for the leader's read index).
    WaitApplied { index: u64, cb: Callback },
    /// The physical clean-up of compaction `revision` finished (sent by
    /// the compaction thread; see the `compaction` module).
    CompactionDone { revision: i64 },
    /// This replica's hash of its state at the `ComputeHash` entry `index`
    /// is done (sent by the hashing thread; see the `consistency` module).
    HashComputed { index: u64, hash: u32 },
    /// A merge target on this node waits for this replica (the merge's
    /// source) to apply its log up to the prepare at `index` of `term`: the
    /// target's commit proves those entries committed, so if this
    /// replica's log holds an entry of `term` at `index` it may commit up
    /// to there on its own (its leader may be gone: the other replicas of
    /// the source stop as their nodes apply the merge).
    CatchUpMerge { index: u64, term: u64 },
    /// Stop for good, as the region is gone from this node: merged into
    /// another region here, or made stale by a newer region's snapshot.
    /// With `tombstone`, the replica writes its region state `Tombstone`
    /// first (otherwise the caller staged it). Nobody waits for it: the
    /// sender may be a replica on the same thread.
    Destroy { tombstone: bool },
    /// A raft message from a peer on another node.
    Raft(RaftMessage),
    /// The transport delivered (`ok`) or failed to deliver the region
    /// snapshot sent to peer `to`: raft-rs waits for this before it
    /// sends that peer anything else.
    SnapshotSent { to: u64, ok: bool },
    /// Ends the loop; everyone waiting is answered `Stopped`.
    Stop,
}
