//! The replica loop's side of leases (the `lease` module's contract):
//! running the leases' clock while the ready leader, revoking the expired
//! ones without keys (those with keys are handed over to the router,
//! whose revoke deletes them at a revision) and checkpointing remaining
//! TTLs through raft, and following the lease changes apply made.

use std::time::Instant;

use proto::raft_cmdpb::{
    lease_request::Op, raft_cmd_request::Cmd, LeaseCheckpoint, LeaseRequest, LeaseRevoke,
    RaftCmdRequest, RaftRequestHeader,
};
use tracing::{debug, info, warn};

use super::Peer;
use crate::apply::LeaseChange;
use crate::lease;

impl Peer {
    /// Every tick: the ready leader runs the clock (loading it when it
    /// takes the lead or its range changed), proposes the revoke of each
    /// expired lease and, when due, a checkpoint (not while frozen for a
    /// merge); any other replica stops it.
    pub(super) fn tend_leases(&mut self) {
        let leading = self.is_ready_leader() && self.is_initialized();
        if !leading {
            let mut clock = self.shared.leases.lock();
            if clock.is_running() {
                clock.stop();
            }
            return;
        }
        let now = Instant::now();
        let version = self.region.region_epoch.unwrap_or_default().version;
        if !self.shared.leases.lock().loaded_at(version) {
            let records = lease::records(&self.kv.snapshot(), &self.region);
            match records {
                Ok(records) => {
                    if !records.is_empty() {
                        info!(
                            region_id = self.region.id,
                            leases = records.len(),
                            "running the leases' clock"
                        );
                    }
                    self.shared.leases.lock().load(&records, version, now);
                }
                Err(e) => {
                    warn!(region_id = self.region.id, "cannot load leases: {e}");
                    return;
                }
            }
        }
        let interval = self
            .host
            .upgrade()
            .map(|h| h.options().lease_checkpoint_interval)
            .unwrap_or_default();
        if self.merging.is_some() {
            // Frozen for a merge: apply refuses lease commands until the
            // merge is decided; the clock keeps running meanwhile.
            return;
        }
        let (expired, checkpoint) = {
            let mut clock = self.shared.leases.lock();
            let expired = clock.expired(now);
            let checkpoint = clock
                .checkpoint_due(interval, now)
                .then(|| clock.remaining(now))
                .filter(|r| !r.is_empty());
            (expired, checkpoint)
        };
        if !expired.is_empty() {
            let keyed: Vec<_> = {
                let snap = self.kv.snapshot();
                expired
                    .iter()
                    .map(|id| lease::has_attached(&snap, *id))
                    .collect()
            };
            for (id, keyed) in expired.into_iter().zip(keyed) {
                match keyed {
                    Ok(false) => {
                        debug!(region_id = self.region.id, id, "lease expired: revoking");
                        self.propose_lease(Op::Revoke(LeaseRevoke { id }));
                    }
                    Ok(true) => {
                        debug!(region_id = self.region.id, id, "lease with keys expired");
                        self.shared.leases.lock().hand_over(id);
                    }
                    Err(e) => warn!(region_id = self.region.id, id, "cannot read a lease: {e}"),
                }
            }
        }
        if let Some(leases) = checkpoint {
            self.propose_lease(Op::Checkpoint(LeaseCheckpoint { leases }));
        }
    }

    /// Proposes a lease command bound to this leader's term (apply refuses
    /// it in an entry of another term); its outcome needs no answer (the
    /// clock tries again).
    fn propose_lease(&mut self, op: Op) {
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: self.region.id,
                region_epoch: self.region.region_epoch,
                term: self.raw.raft.term,
            }),
            cmd: Some(Cmd::Lease(LeaseRequest { op: Some(op) })),
        };
        let region_id = self.region.id;
        self.propose(
            cmd,
            Box::new(move |res| {
                if let Err(e) = res {
                    debug!(region_id, "lease command not applied: {e}");
                }
            }),
        );
    }

    /// Follows what an apply run did to the region's leases.
    pub(super) fn on_lease_changes(&mut self, changes: Vec<LeaseChange>) {
        if changes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut clock = self.shared.leases.lock();
        for change in changes {
            match change {
                LeaseChange::Granted { id, ttl } => clock.granted(id, ttl, now),
                LeaseChange::Revoked(id) => clock.revoked(id),
                LeaseChange::Checkpointed(remaining) => clock.checkpointed(&remaining),
            }
        }
    }
}
