//! Where a request is served: which region owns its keys and where that
//! region's leader is.
//!
//! Contract of [`Router::locate`]:
//! * a local replica covering every span → [`Location::Leader`] if it is
//!   the ready leader, else [`Location::Follower`] with the leader's node
//!   (from the replica's raft state, or a fresher hint from a node that
//!   refused a forwarded request);
//! * no local replica → [`Location::Remote`], region and leader from the
//!   region cache, filled from PD on a miss (PD knows leaders from
//!   heartbeats only, so a hint beats it);
//! * spans over several regions → [`Error::CrossRegion`];
//! * no leader known yet, or this replica leads but is not ready (it has
//!   not applied an entry of its term) → a retryable `NotLeader`.
//!
//! Hints are kept per region from forwarded requests' region errors
//! ([`Router::note_forward_error`]): a `NotLeader` naming another node
//! becomes the hint; any region error or unreachable node drops a hint
//! pointing at the node that failed.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::exec::WriteRequest;
use mvcc::lease::{owner_id, owner_key};
use mvcc::KeyRange;
use proto::etcdserverpb::{request_op::Request, PutRequest, TxnRequest};
use proto::metapb;
use raftstore::RegionHandle;

use crate::cache::Cached;
use crate::forward::Target;
use crate::leader::RegionLeader;
use crate::{Error, Result, Router};

/// Where a request for a region is served.
pub(crate) enum Location {
    /// This node's replica is the ready leader.
    Leader(RegionHandle, Arc<RegionLeader>),
    /// This node has a replica; the leader is on `Target`'s node.
    Follower(RegionHandle, Target),
    /// This node has no replica of the region.
    Remote(Target),
}

/// A leader hint from a node that refused a forwarded request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaderHint {
    refused_by: u64,
    leader_node: u64,
    at: Instant,
}

/// How long a leader hint is followed. A hint can be wrong for good: a node
/// that refused during an election may name the old leader, which, if it
/// is down or paused, never answers the errors that would drop the hint —
/// while this node's own raft state already knows the new leader.
const HINT_TTL: Duration = Duration::from_secs(2);

impl LeaderHint {
    fn is_fresh(&self) -> bool {
        self.at.elapsed() < HINT_TTL
    }
}

impl Router {
    /// The local replica whose key range covers every range in `spans`:
    /// `NoRegion` if none holds the first key, `CrossRegion` if the one
    /// that does ends before the spans do, a retryable `EpochNotMatch` if
    /// the index of replicas is a moment behind a split.
    pub(crate) fn region_for(&self, spans: &[KeyRange]) -> Result<RegionHandle> {
        let first = spans.first().map(|s| s.start.clone()).unwrap_or_default();
        let Some(handle) = self.replicas.find(&self.store, &first) else {
            return Err(Error::NoRegion(first));
        };
        let region = handle.status().region;
        if !holds_key(&region, &first) {
            // A split published the replica's new range but not yet the
            // new layout: a moment later the index names the right one.
            return Err(Error::Region(raftstore::Error::EpochNotMatch {
                region_id: region.id,
                current: region,
            }));
        }
        if spans.iter().all(|s| covers(&region, s)) {
            Ok(handle)
        } else {
            Err(Error::CrossRegion)
        }
    }

    /// Finds where the region of `spans` is served (see the contract).
    pub(crate) async fn locate(&self, spans: &[KeyRange]) -> Result<Location> {
        let handle = match self.region_for(spans) {
            Ok(handle) => handle,
            Err(Error::NoRegion(key)) => return self.locate_remote(spans, key).await,
            Err(e) => return Err(e),
        };
        let status = handle.status();
        let region_id = handle.region_id();
        if status.ready_leader {
            return Ok(Location::Leader(handle, self.region_leader(region_id)));
        }
        let own_node = node_of(&status.region, status.peer_id);
        let mut leader_node = (status.leader_peer_id != 0)
            .then(|| node_of(&status.region, status.leader_peer_id))
            .flatten();
        if let Some(hint) = self.hints.get(&region_id).map(|h| *h) {
            if !hint.is_fresh() {
                self.hints.remove(&region_id);
            } else if Some(hint.leader_node) == own_node {
                // A hint naming this node: its own raft state knows better
                // (followed, it would leave no node to forward to, and no
                // forward would ever correct it).
                self.hints.remove(&region_id);
            } else if leader_node.is_none() || leader_node == Some(hint.refused_by) {
                // Raft's view here is usually freshest, except when that
                // very node just told us it no longer leads.
                leader_node = Some(hint.leader_node);
            }
        }
        match leader_node.filter(|&n| Some(n) != own_node) {
            Some(node_id) => Ok(Location::Follower(
                handle,
                Target {
                    node_id,
                    region_id,
                    epoch: status.region.region_epoch,
                },
            )),
            // No leader known, or this replica leads but has not applied an
            // entry of its term yet: wait.
            None => Err(Error::Region(raftstore::Error::NotLeader {
                region_id,
                leader: None,
            })),
        }
    }

    async fn locate_remote(&self, spans: &[KeyRange], key: Vec<u8>) -> Result<Location> {
        let mut found = self.remote_region(&key, false).await?;
        if !spans.iter().all(|s| covers(&found.region, s)) {
            // The cached region may predate a split or a merge: ask PD.
            found = self.remote_region(&key, true).await?;
        }
        let Cached {
            region,
            leader_node,
        } = found;
        if !spans.iter().all(|s| covers(&region, s)) {
            return Err(Error::CrossRegion);
        }
        let Some(node_id) = self
            .hints
            .get(&region.id)
            .filter(|h| h.is_fresh())
            .map(|h| h.leader_node)
            .or(leader_node)
        else {
            // PD knew of no leader when asked (an election, a restart):
            // ask it again next time rather than keep that answer.
            self.cache.remove(region.id);
            return Err(Error::Region(raftstore::Error::NotLeader {
                region_id: region.id,
                leader: None,
            }));
        };
        Ok(Location::Remote(Target {
            node_id,
            region_id: region.id,
            epoch: region.region_epoch,
        }))
    }

    /// The region owning `key`, from the cache, or from PD (then cached);
    /// `fresh`: from PD in any case.
    pub(crate) async fn remote_region(&self, key: &[u8], fresh: bool) -> Result<Cached> {
        if let Some(cached) = self.cache.lookup(key).filter(|_| !fresh) {
            return Ok(cached);
        }
        let Some(found) = self.pd.get_region(key).await? else {
            return Err(Error::NoRegion(key.to_vec()));
        };
        let leader_node = found.leader.map(|p| p.node_id);
        self.cache.insert(found.region.clone(), leader_node);
        Ok(Cached {
            region: found.region,
            leader_node,
        })
    }

    /// Keeps what a failed forward taught about the region and its leader:
    /// the region's new meta from an epoch mismatch replaces the cached
    /// one; any other region error or an unreachable node drops the cached
    /// region (PD is asked again).
    pub(crate) fn note_forward_error(&self, target: &Target, err: &Error) {
        match err {
            Error::Region(raftstore::Error::EpochNotMatch { current, .. }) => {
                self.cache.remove(target.region_id);
                self.cache.insert(current.clone(), None);
            }
            Error::Region(_) | Error::Unreachable { .. } => self.cache.remove(target.region_id),
            _ => {}
        }
        match err {
            Error::Region(raftstore::Error::NotLeader {
                leader: Some(leader),
                ..
            }) if leader.node_id != target.node_id => {
                self.hints.insert(
                    target.region_id,
                    LeaderHint {
                        refused_by: target.node_id,
                        leader_node: leader.node_id,
                        at: Instant::now(),
                    },
                );
            }
            Error::Region(_) | Error::Unreachable { .. } => {
                self.hints
                    .remove_if(&target.region_id, |_, h| h.leader_node == target.node_id);
            }
            _ => {}
        }
    }
}

/// Whether `region`'s key range holds `key`.
pub(crate) fn holds_key(region: &metapb::Region, key: &[u8]) -> bool {
    key >= region.start_key.as_slice()
        && (region.end_key.is_empty() || key < region.end_key.as_slice())
}

/// Whether `region`'s key range holds all of `s`.
pub(crate) fn covers(region: &metapb::Region, s: &KeyRange) -> bool {
    let start_ok = s.start.as_slice() >= region.start_key.as_slice();
    let end_ok = region.end_key.is_empty()
        || match &s.end {
            None => s.start < region.end_key,
            Some(end) => !end.is_empty() && end.as_slice() <= region.end_key.as_slice(),
        };
    start_ok && end_ok
}

/// The node of `region`'s peer `peer_id`.
fn node_of(region: &metapb::Region, peer_id: u64) -> Option<u64> {
    region
        .peers
        .iter()
        .find(|p| p.id == peer_id)
        .map(|p| p.node_id)
}

/// Every key range a write may read or change, over both txn branches;
/// the owner key of every lease it attaches keys to or revokes.
pub(crate) fn write_spans(req: &WriteRequest) -> Vec<KeyRange> {
    spans_of(req, true)
}

/// What a region leader latches of a write's `spans` (its
/// [`write_spans`]): all but the owner keys of the leases a put attaches
/// keys to (see `leader`); `spans` themselves when there are none.
pub(crate) fn latch_spans<'a>(req: &WriteRequest, spans: &'a [KeyRange]) -> Cow<'a, [KeyRange]> {
    let leased = spans
        .iter()
        .any(|s| s.end.is_none() && owner_id(&s.start).is_some());
    if leased {
        Cow::Owned(spans_of(req, false))
    } else {
        Cow::Borrowed(spans)
    }
}

fn spans_of(req: &WriteRequest, owners: bool) -> Vec<KeyRange> {
    let mut spans = Vec::new();
    match req {
        WriteRequest::Put(p) => put_spans(p, owners, &mut spans),
        WriteRequest::DeleteRange(d) => spans.push(KeyRange::from_etcd(&d.key, &d.range_end)),
        WriteRequest::Txn(t) => txn_spans(t, owners, &mut spans),
        WriteRequest::LeaseRevoke(r) => {
            spans.push(KeyRange::from_etcd(&owner_key(r.id), &[]));
            spans.extend(r.keys.iter().map(|k| KeyRange::from_etcd(k, &[])));
        }
    }
    spans
}

fn put_spans(p: &PutRequest, owners: bool, spans: &mut Vec<KeyRange>) {
    spans.push(KeyRange::from_etcd(&p.key, &[]));
    if owners && p.lease != 0 {
        spans.push(KeyRange::from_etcd(&owner_key(p.lease), &[]));
    }
}

fn txn_spans(t: &TxnRequest, owners: bool, spans: &mut Vec<KeyRange>) {
    for c in &t.compare {
        spans.push(KeyRange::from_etcd(&c.key, &c.range_end));
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => spans.push(KeyRange::from_etcd(&r.key, &r.range_end)),
            Some(Request::RequestPut(p)) => put_spans(p, owners, spans),
            Some(Request::RequestDeleteRange(d)) => {
                spans.push(KeyRange::from_etcd(&d.key, &d.range_end))
            }
            Some(Request::RequestTxn(inner)) => txn_spans(inner, owners, spans),
            None => {}
        }
    }
}

/// Whether `req` is a txn etcd serves as a serializable read: every
/// operation of both branches is a serializable Range (etcd's
/// `isTxnSerializable`, top level only, as etcd checks it).
pub(crate) fn is_serializable_txn(req: &WriteRequest) -> bool {
    let WriteRequest::Txn(t) = req else {
        return false;
    };
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| matches!(&op.request, Some(Request::RequestRange(r)) if r.serializable))
}
