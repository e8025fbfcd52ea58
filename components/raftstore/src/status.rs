//! What a replica publishes to other threads, and how a leader tells which
//! of its peers are pending or down.
//!
//! Contract:
//! * [`PeerStatus`] is rewritten by the replica's thread at the end of every
//!   loop turn; the applied index and revisions are also published right
//!   after each apply batch is written (before any caller is answered) and
//!   after a snapshot is installed, so a caller's next read through the
//!   status sees at least its own write.
//! * Pending and down peers are reported by a leader only (empty
//!   otherwise), never include the leader itself, and cover learners too.
//!   A peer is pending while its matched index is more than
//!   [`PENDING_LAG`] below the commit index or it waits for a snapshot. It
//!   is down once silent for [`PEER_DOWN_AFTER`]; silence counts from when
//!   this replica became leader (as a follower it heard only from the
//!   leader) or from when the peer appeared in the configuration,
//!   whichever is later.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb;
use raft::{ProgressState, Raft, StateRole};
use tokio::sync::watch;

/// A replica's state as other threads see it.
#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    pub region: metapb::Region,
    pub peer_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Last index dropped from the raft log (the log starts after it).
    pub truncated_index: u64,
    pub leader_peer_id: u64,
    /// Leader that has applied an entry of its own term: only then is its
    /// state machine complete enough to evaluate requests against.
    pub ready_leader: bool,
    pub applied_revision: i64,
    pub compact_revision: i64,
    /// On the leader: peers whose log is well behind the commit index.
    pub pending_peers: Vec<u64>,
    /// On the leader: peers it has not heard from for [`PEER_DOWN_AFTER`].
    pub down_peers: Vec<u64>,
    /// On the leader: the lowest index every replica (learners too) has
    /// in its log; 0 elsewhere.
    pub min_matched: u64,
    /// Set while the region is frozen as a merge's source.
    pub merging: Option<proto::raft_serverpb::MergeState>,
}

/// A peer further behind the commit index than this is reported pending
/// (a learner is promoted only once it is not).
pub const PENDING_LAG: u64 = 64;
/// A peer silent for this long is reported down to PD.
pub const PEER_DOWN_AFTER: Duration = Duration::from_secs(10);

pub struct PeerShared {
    pub status: Mutex<PeerStatus>,
    /// Highest compaction revision whose physical clean-up has finished.
    pub physically_compacted: watch::Sender<i64>,
    /// The transaction locks the replica has applied.
    pub locks: crate::txn::LockTable,
    /// What the replica's apply runs write (see `feed`).
    pub(crate) feed: crate::feed::ChangeFeed,
    /// The leases' clock, run while the replica is the ready leader (see
    /// `lease`).
    pub(crate) leases: Mutex<crate::lease::LeaseClock>,
}

/// When each peer last sent this replica a message, for down peers.
#[derive(Default)]
pub(crate) struct LastHeard(HashMap<u64, Instant>);

impl LastHeard {
    /// Peer `id` sent a message that was taken.
    pub(crate) fn heard(&mut self, id: u64) {
        self.0.insert(id, Instant::now());
    }

    /// Called at the end of every loop turn in which this replica leads;
    /// `became_leader`: it did not lead at the previous turn.
    pub(crate) fn on_leader_turn<S: raft::Storage>(&mut self, became_leader: bool, raft: &Raft<S>) {
        if became_leader {
            // As a follower this replica heard only from the leader;
            // every peer's silence counts from now.
            self.0.clear();
        }
        // A peer just added counts as heard when it appears.
        let now = Instant::now();
        for id in raft.prs().conf().voters().ids().iter() {
            self.0.entry(id).or_insert(now);
        }
        for id in raft.prs().conf().learners().iter() {
            self.0.entry(*id).or_insert(now);
        }
    }

    /// Peers behind the commit index (pending) or silent (down), as leader
    /// `self_id` sees them; both empty unless `raft` leads.
    pub(crate) fn lagging_peers<S: raft::Storage>(
        &self,
        raft: &Raft<S>,
        self_id: u64,
    ) -> (Vec<u64>, Vec<u64>) {
        if raft.state != StateRole::Leader {
            return (Vec::new(), Vec::new());
        }
        let committed = raft.raft_log.committed;
        let mut pending = Vec::new();
        let mut down = Vec::new();
        for (id, pr) in raft.prs().iter() {
            if *id == self_id {
                continue;
            }
            if pr.matched + PENDING_LAG < committed || pr.state == ProgressState::Snapshot {
                pending.push(*id);
            }
            if self
                .0
                .get(id)
                .is_some_and(|t| t.elapsed() >= PEER_DOWN_AFTER)
            {
                down.push(*id);
            }
        }
        (pending, down)
    }
}
