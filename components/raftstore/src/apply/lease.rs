//! Applying `Cmd::Lease` and the lease changes of writes (the `lease`
//! module's contract): records and attachments staged in the run's batch,
//! seen by the run's later entries, and listed in the outcome for the
//! leader's clock.

use engine::cf;
use prost::Message as _;
use proto::raft_cmdpb::{lease_request::Op, mutation, LeaseRequest, Mutation};
use proto::raft_serverpb::LeaseRecord;

use super::Run;
use crate::keys;
use crate::lease;
use crate::split;
use crate::txn;
use crate::{Error, Result};

fn is_lease_change(m: &Mutation) -> bool {
    matches!(m.op(), mutation::Op::Attach | mutation::Op::Revoke)
}

/// The changes of keys among `mutations` (what watchers see).
pub(super) fn key_changes(mut mutations: Vec<Mutation>) -> Vec<Mutation> {
    mutations.retain(|m| !is_lease_change(m));
    mutations
}

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
                let owner = lease::owner_key(r.id);
                if let Some((txn_id, _)) =
                    txn::locked_key(&self.locks, std::iter::once(owner.as_slice()))
                {
                    return Err(Error::StaleCommand(format!(
                        "lease {} is locked by transaction {txn_id}",
                        r.id
                    )));
                }
                if self.has_keys(r.id)? {
                    return Err(Error::Mvcc(mvcc::Error::LeaseKeysChanged));
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

    /// Checks a write's lease changes (those of the region, the caller
    /// filtered them): the region must hold each lease as of the entry.
    pub(super) fn check_lease_changes(&self, mutations: &[Mutation]) -> Result<()> {
        for m in mutations.iter().filter(|m| is_lease_change(m)) {
            if lease::owner_id(&m.key) != Some(m.lease) {
                return Err(Error::Corrupted(format!(
                    "a change of lease {} at another key",
                    m.lease
                )));
            }
            if self.lease_record(m.lease)?.is_none() {
                return Err(Error::Mvcc(mvcc::Error::LeaseNotFound));
            }
        }
        Ok(())
    }

    /// Stages a checked write's lease changes: attachments recorded, and a
    /// revoke's record and attachments deleted.
    pub(super) fn stage_lease_changes(&mut self, mutations: &[Mutation]) {
        for m in mutations {
            match m.op() {
                mutation::Op::Attach => {
                    let key = keys::lease_key_key(&m.key, &m.value);
                    self.kv.put_to(&mut self.wb, cf::META, &key, &[]);
                    self.lease_keys.push((m.lease, true));
                }
                mutation::Op::Revoke => {
                    self.stage_lease(m.lease, None);
                    let prefix = keys::lease_key_prefix(&m.key);
                    let end = keys::prefix_end(&prefix);
                    self.kv
                        .delete_range_to(&mut self.wb, cf::META, &prefix, &end);
                    self.lease_keys.push((m.lease, false));
                    self.outcome
                        .lease_changes
                        .push(LeaseChange::Revoked(m.lease));
                }
                mutation::Op::Put | mutation::Op::Delete => {}
            }
        }
    }

    /// Whether lease `id` has keys attached as of the entry being applied.
    fn has_keys(&self, id: i64) -> Result<bool> {
        if let Some((_, attached)) = self.lease_keys.iter().rev().find(|(i, _)| *i == id) {
            return Ok(*attached);
        }
        lease::has_attached(&self.kv.snapshot(), id)
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
