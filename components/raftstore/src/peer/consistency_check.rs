//! The replica loop's side of the consistency check (see the
//! `consistency` module): proposing `ComputeHash` on a ready leader,
//! starting the hash of an applied `ComputeHash`, sending a follower's
//! hash to the leader, and judging the hashes a replica has.

use proto::raft_cmdpb::{raft_cmd_request::Cmd, RaftCmdRequest, RaftRequestHeader};
use proto::raft_serverpb::{HashReport, RaftMessage};
use tracing::{debug, error};

use super::Peer;
use crate::consistency::{self, Inconsistency};
use crate::msg::PeerMsg;

impl Peer {
    /// A ready leader proposes a consistency check once the interval has
    /// passed (see `consistency`); its outcome needs no answer.
    pub(super) fn maybe_check_consistency(&mut self) {
        let leading = self.is_ready_leader() && self.merging.is_none() && self.is_initialized();
        if !self.consistency.due(leading) {
            return;
        }
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: self.region.id,
                region_epoch: self.region.region_epoch,
                term: 0,
            }),
            cmd: Some(Cmd::ComputeHash(Default::default())),
        };
        let region_id = self.region.id;
        self.propose(
            cmd,
            Box::new(move |res| {
                if let Err(e) = res {
                    debug!(region_id, "consistency check not started: {e}");
                }
            }),
        );
    }

    /// Hashes the region's state as of the `ComputeHash` just applied at
    /// `index`: returns once the hashing thread took its snapshot.
    pub(super) fn start_hash(&mut self, index: u64) {
        let version = self.region.region_epoch.unwrap_or_default().version;
        self.consistency.start(index, version);
        let mailbox = self.mailbox.clone();
        consistency::spawn(self.mvcc.clone(), self.region.clone(), index, move |hash| {
            let _ = mailbox.send(PeerMsg::HashComputed { index, hash });
        });
    }

    /// This replica's hash of `index` is done: a follower reports it to
    /// the leader it knows; reports that came first are judged now.
    pub(super) fn on_hash_computed(&mut self, index: u64, hash: u32) {
        if !self.consistency.computed(index, hash) {
            return;
        }
        debug!(
            region_id = self.region.id,
            index, hash, "consistency hash computed"
        );
        let leader_id = self.raw.raft.leader_id;
        if leader_id != self.peer_id {
            let leader = self.region.peers.iter().find(|p| p.id == leader_id);
            let me = self.region.peers.iter().find(|p| p.id == self.peer_id);
            if let (Some(leader), Some(me)) = (leader, me) {
                self.transport.send(RaftMessage {
                    region_id: self.region.id,
                    from_peer: Some(*me),
                    to_peer: Some(*leader),
                    region_epoch: self.region.region_epoch,
                    hash_report: Some(HashReport { index, hash }),
                    ..Default::default()
                });
            }
        }
        self.judge_consistency(index);
    }

    /// Peer `from` reported its hash of a `ComputeHash` index.
    pub(super) fn on_hash_report(&mut self, from: u64, report: HashReport) {
        self.consistency.report(from, report.index, report.hash);
        self.judge_consistency(report.index);
    }

    /// Judges the latest check (see `consistency`): logs a pass, and
    /// reports each replica found to differ to the store.
    fn judge_consistency(&mut self, index: u64) {
        let peers: Vec<u64> = self.region.peers.iter().map(|p| p.id).collect();
        let found = self.consistency.judge(self.peer_id, &peers);
        let region_id = self.region.id;
        let Some(host) = self.host.upgrade() else {
            return;
        };
        if found.passed {
            debug!(region_id, index, "consistency check passed");
            host.note_check_passed();
        }
        for (peer_id, hash, majority_hash) in found.differing {
            let node_id = self
                .region
                .peers
                .iter()
                .find(|p| p.id == peer_id)
                .map_or(0, |p| p.node_id);
            error!(
                region_id,
                index,
                node_id,
                peer_id,
                hash,
                ?majority_hash,
                "consistency check failed: a replica's state differs from its region's majority"
            );
            host.report_inconsistency(Inconsistency {
                region_id,
                node_id,
                peer_id,
                index,
                hash,
                majority_hash,
            });
        }
    }
}
