//! The replica loop's side of the consistency check (see the
//! `consistency` module): proposing `ComputeHash` on a ready leader,
//! starting the hash of an applied `ComputeHash`, proposing `VerifyHash`
//! once the leader's hash is done, and reporting what comparisons found.

use proto::metapb;
use proto::raft_cmdpb::{
    raft_cmd_request::Cmd, RaftCmdRequest, RaftRequestHeader, VerifyHashRequest,
};
use tracing::{debug, error};

use super::Peer;
use crate::consistency::{self, Inconsistency, Verdict};
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

    /// This replica's hash of `index` is done: a ready leader proposes
    /// `VerifyHash` with it (under the epoch version it hashed under),
    /// and a `VerifyHash` that came first is compared now.
    pub(super) fn on_hash_computed(&mut self, index: u64, hash: u32) {
        let (version, verdict) = self.consistency.computed(index, hash);
        debug!(
            region_id = self.region.id,
            index, hash, "consistency hash computed"
        );
        self.on_verdict(index, verdict);
        let Some(version) = version else { return };
        if !self.is_ready_leader() {
            return;
        }
        let epoch = metapb::RegionEpoch {
            version,
            ..self.region.region_epoch.unwrap_or_default()
        };
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: self.region.id,
                region_epoch: Some(epoch),
                term: 0,
            }),
            cmd: Some(Cmd::VerifyHash(VerifyHashRequest { index, hash })),
        };
        let region_id = self.region.id;
        self.propose(
            cmd,
            Box::new(move |res| {
                if let Err(e) = res {
                    debug!(region_id, index, "consistency check not verified: {e}");
                }
            }),
        );
    }

    /// Logs a comparison and reports a mismatch to the store.
    pub(super) fn on_verdict(&self, index: u64, verdict: Verdict) {
        let region_id = self.region.id;
        match verdict {
            Verdict::None => {}
            Verdict::Consistent => {
                debug!(region_id, index, "consistency check passed");
                if let Some(host) = self.host.upgrade() {
                    host.note_check_passed();
                }
            }
            Verdict::Mismatch(hash, leader_hash) => {
                let node_id = self
                    .region
                    .peers
                    .iter()
                    .find(|p| p.id == self.peer_id)
                    .map_or(0, |p| p.node_id);
                error!(
                    region_id,
                    index,
                    node_id,
                    peer_id = self.peer_id,
                    hash,
                    leader_hash,
                    "consistency check failed: this replica's state differs from the leader's"
                );
                if let Some(host) = self.host.upgrade() {
                    host.report_inconsistency(Inconsistency {
                        region_id,
                        node_id,
                        peer_id: self.peer_id,
                        index,
                        hash,
                        leader_hash,
                    });
                }
            }
        }
    }
}
