//! Applying `Cmd::Lease` (the `lease` module's contract): records staged
//! in the run's batch, seen by the run's later entries, and listed in the
//! outcome for the leader's clock.

use engine::cf;
use prost::Message as _;
use proto::raft_cmdpb::{lease_request::Op, LeaseRequest};
use proto::raft_serverpb::LeaseRecord;

use super::Run;
use crate::keys;
use crate::lease;
use crate::split;
use crate::{Error, Result};

/// A lease change an apply run made, for the leader's clock.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LeaseChange {
    Granted { id: i64, ttl: i64 },
    Revoked(i64),
    Checkpointed(Vec<proto::raft_cmdpb::LeaseRemaining>),
}

impl Run<'_> {
    pub(super) fn apply_lease(&mut self, req: LeaseRequest) -> Result<()> {
        match req.op {
            Some(Op::Grant(g)) => {
                self.check_owned(g.id)?;
                if self.lease_record(g.id)?.is_some() {
                    return Err(Error::Mvcc(mvcc::Error::LeaseExists));
                }
                self.stage_lease(
                    g.id,
                    Some(LeaseRecord {
                        id: g.id,
                        ttl: g.ttl,
                        remaining_ttl: 0,
                    }),
                );
                self.outcome.lease_changes.push(LeaseChange::Granted {
                    id: g.id,
                    ttl: g.ttl,
                });
            }
            Some(Op::Revoke(r)) => {
                self.check_owned(r.id)?;
                if self.lease_record(r.id)?.is_none() {
                    return Err(Error::Mvcc(mvcc::Error::LeaseNotFound));
                }
                self.stage_lease(r.id, None);
                self.outcome.lease_changes.push(LeaseChange::Revoked(r.id));
            }
            Some(Op::Checkpoint(c)) => {
                let mut applied = Vec::with_capacity(c.leases.len());
                for r in c.leases {
                    let Some(mut record) = self.lease_record(r.id)? else {
                        continue;
                    };
                    if !split::contains(self.region(), &lease::owner_key(r.id)) {
                        continue;
                    }
                    record.remaining_ttl = r.remaining_ttl.max(0);
                    self.stage_lease(r.id, Some(record));
                    applied.push(r);
                }
                self.outcome
                    .lease_changes
                    .push(LeaseChange::Checkpointed(applied));
            }
            None => return Err(Error::Corrupted("lease command without an op".into())),
        }
        Ok(())
    }

    fn check_owned(&self, id: i64) -> Result<()> {
        if split::contains(self.region(), &lease::owner_key(id)) {
            return Ok(());
        }
        Err(Error::StaleCommand(format!(
            "lease {id} is not in region {}",
            self.region().id
        )))
    }

    /// Lease `id`'s record as of the entry being applied.
    fn lease_record(&self, id: i64) -> Result<Option<LeaseRecord>> {
        if let Some((_, staged)) = self.leases.iter().rev().find(|(i, _)| *i == id) {
            return Ok(*staged);
        }
        let key = keys::lease_record_key(&lease::owner_key(id));
        self.kv
            .get(cf::META, &key)?
            .map(|v| LeaseRecord::decode(v.as_slice()).map_err(Error::from))
            .transpose()
    }

    fn stage_lease(&mut self, id: i64, record: Option<LeaseRecord>) {
        let key = keys::lease_record_key(&lease::owner_key(id));
        match &record {
            Some(r) => self
                .kv
                .put_to(&mut self.wb, cf::META, &key, &r.encode_to_vec()),
            None => self.kv.delete_from(&mut self.wb, cf::META, &key),
        }
        self.leases.push((id, record));
    }
}
