//! What request evaluation knows of etcd's leases: where a lease lives in
//! the keyspace (its *owner key*) and [`LeaseView`], the leases as of the
//! state an evaluation reads.
//!
//! A lease belongs to the region owning its owner key ([`owner_key`]:
//! [`OWNER_PREFIX`] + the id, big-endian), a position in the keyspace used
//! for ownership only: the lease's record and the keys attached to it live
//! beside the region's data (`raftstore::lease`), never as MVCC keys. A
//! write that attaches a key to a lease, or revokes one, takes the owner
//! key in its spans, so it is ordered against every other write of the
//! lease by the same latches, locks and raft log as writes of one key.

use std::collections::HashMap;

use crate::Result;

/// Where leases' owner keys sort: near the top of the keyspace, away from
/// the keys applications use (any key can still be written there; lease
/// records are not MVCC keys).
pub const OWNER_PREFIX: &[u8] = b"\xff\xfemetastore/lease/";

/// The owner key of lease `id` (see the module docs).
pub fn owner_key(id: i64) -> Vec<u8> {
    let mut k = OWNER_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The lease whose owner key `key` is, if it is one.
pub fn owner_id(key: &[u8]) -> Option<i64> {
    let rest = key.strip_prefix(OWNER_PREFIX)?;
    let id: [u8; 8] = rest.try_into().ok()?;
    Some(i64::from_be_bytes(id))
}

/// The leases an evaluation sees, as of the same state as its keys. It is
/// asked only about leases whose owner keys lie in the write's spans (so
/// they are latched or locked with the keys).
pub trait LeaseView {
    /// Whether lease `id` is granted (being revoked or not).
    fn exists(&self, id: i64) -> Result<bool>;

    /// Whether a key may be attached to lease `id`: [`LeaseView::exists`],
    /// except that a lease being revoked fails with `LeaseRevoking` (the
    /// put waits for the revoke, and then finds the lease gone).
    fn attachable(&self, id: i64) -> Result<bool> {
        self.exists(id)
    }

    /// The keys attached to lease `id`, in key order: every key put with
    /// it since it was granted (a key put again without it, or deleted,
    /// is still listed; a revoke deletes only those still carrying it).
    fn attached(&self, id: i64) -> Result<Vec<Vec<u8>>>;

    /// Whether the clock of the lease's region leader has it expired
    /// (asked only by the revoke of an expired lease).
    fn expired(&self, id: i64) -> bool;
}

/// No lease exists: for evaluations that only read.
pub struct NoLeases;

impl LeaseView for NoLeases {
    fn exists(&self, _id: i64) -> Result<bool> {
        Ok(false)
    }

    fn attached(&self, _id: i64) -> Result<Vec<Vec<u8>>> {
        Ok(Vec::new())
    }

    fn expired(&self, _id: i64) -> bool {
        false
    }
}

/// One lease as a region holding it reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldLease {
    pub keys: Vec<Vec<u8>>,
    pub expired: bool,
    pub revoking: bool,
}

/// The leases the participants of a transaction over several regions
/// reported with their locks; a lease not reported does not exist.
#[derive(Clone, Debug, Default)]
pub struct FetchedLeases {
    pub held: HashMap<i64, HeldLease>,
}

impl LeaseView for FetchedLeases {
    fn exists(&self, id: i64) -> Result<bool> {
        Ok(self.held.contains_key(&id))
    }

    fn attachable(&self, id: i64) -> Result<bool> {
        match self.held.get(&id) {
            Some(l) if l.revoking => Err(crate::Error::LeaseRevoking),
            held => Ok(held.is_some()),
        }
    }

    fn attached(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .held
            .get(&id)
            .map(|l| l.keys.clone())
            .unwrap_or_default())
    }

    fn expired(&self, id: i64) -> bool {
        self.held.get(&id).is_some_and(|l| l.expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keys_name_their_lease() {
        assert_eq!(owner_id(&owner_key(7)), Some(7));
        assert_eq!(owner_id(&owner_key(-1)), Some(-1));
        assert_eq!(owner_id(b"foo"), None);
        let mut longer = owner_key(7);
        longer.push(0);
        assert_eq!(owner_id(&longer), None);
        assert!(owner_key(1) < owner_key(2));
    }
}
