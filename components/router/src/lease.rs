//! etcd's leases over the regions: each lease is served by the leader of
//! the region owning its owner key (`raftstore::lease`), here or on the
//! leader's node through forwarding.
//!
//! Contract of [`Router::lease`]:
//! * `Grant` goes through the owning region's raft and answers once
//!   applied on its leader; "lease already exists" is apply's answer. It
//!   takes no revision. A forwarded one whose answer was lost is
//!   `OutcomeUnknown` (etcd's "request timed out"), never retried.
//! * `Revoke` lists the keys attached to the lease (`Keys`), then: none,
//!   the region's raft drops the record, taking no revision (apply refuses
//!   it if keys were attached meanwhile, and the revoke starts again);
//!   some, a write over the owner key and those keys deletes, at one
//!   revision, each still carrying the lease, and drops the record
//!   (`exec::LeaseRevoke`, run as a transaction over its regions even when
//!   they are one: its evaluation fails with `LeaseKeysChanged` if more
//!   keys were attached meanwhile, and the revoke starts again). "requested
//!   lease not found" if it does not exist. An expired lease with keys is
//!   revoked the same way by the node leading its region
//!   ([`Router::start_lease_expiry`]), with the evaluation's check that the
//!   leader's clock still has it expired.
//! * `Keys`: after a read barrier on the leader, the keys attached to the
//!   lease (a superset: a key put again without it, or deleted, stays
//!   listed until the revoke).
//! * `Renew` and `TimeToLive` ask the leader's clock after a read barrier
//!   (a quorum confirmed the leadership, so a deposed leader acknowledges
//!   no renewal); a renewal of a lease whose checkpoint holds a remainder
//!   resets that checkpoint through raft before it answers. No raft write
//!   otherwise. An unknown or expired lease is `LeaseNotFound`.
//! * `List` reads every region of the owner key range at its leader
//!   (after a read barrier), and answers the ids in id order; a region
//!   that split or merged meanwhile is read again.
//! * Errors that certainly changed nothing are retried until
//!   `RETRY_DEADLINE`, as every request of the router.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mvcc::exec::{LeaseRevoke as RevokeRequest, WriteRequest};
use mvcc::lease::LeaseView;
use mvcc::{KeyRange, MvccStore};
use proto::etcdserverpb::RangeRequest;
use proto::forwardpb::{self, lease_request::Kind};
use proto::raft_cmdpb::{
    lease_request::Op, raft_cmd_request::Cmd, LeaseCheckpoint, LeaseGrant, LeaseRemaining,
    LeaseRequest, LeaseRevoke, RaftCmdRequest, RaftRequestHeader,
};
use raftstore::lease::{owner_key, ClockError, OWNER_PREFIX};
use raftstore::RegionHandle;
use tracing::debug;

use crate::leader::check_spans;
use crate::locate::{write_spans, Location};
use crate::router::retrying;
use crate::{Error, Result, Router, RETRY_DEADLINE};

/// How often a node hands the expired leases with keys of the regions it
/// leads to revokes.
const EXPIRY_INTERVAL: Duration = Duration::from_millis(200);
/// How many expired leases a node revokes at once.
const EXPIRY_CONCURRENCY: usize = 16;
/// How many of a lease's keys [`Router::lease_keys`] reads at once.
const KEY_READS: usize = 64;

/// A lease operation (see the contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    Grant {
        id: i64,
        ttl: i64,
    },
    Revoke(i64),
    Renew(i64),
    TimeToLive(i64),
    List,
    Keys(i64),
    /// `Keys`, after marking the lease as being revoked on its leader's
    /// clock (puts with it wait meanwhile); with `expired`, only if that
    /// clock has it expired (`LeaseNotExpired` otherwise).
    BeginRevoke {
        id: i64,
        expired: bool,
    },
}

/// What a lease operation answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Grant, Revoke.
    Done,
    /// Renew: the lease's TTL, now its remaining TTL.
    Renewed { ttl: i64 },
    /// TimeToLive: the granted and remaining TTL (-1: expired).
    TimeToLive { ttl: i64, remaining: i64 },
    /// List: lease ids.
    Listed(Vec<i64>),
    /// Keys: the attached keys, in key order.
    Keys(Vec<Vec<u8>>),
}

impl LeaseOp {
    /// Whether running it twice is harmless (a lost answer may be asked
    /// again).
    pub fn is_idempotent(&self) -> bool {
        !matches!(self, LeaseOp::Grant { .. } | LeaseOp::Revoke(_))
    }

    pub fn to_wire(&self, header: forwardpb::RequestHeader) -> forwardpb::LeaseRequest {
        let expired = matches!(self, LeaseOp::BeginRevoke { expired: true, .. });
        let (kind, id, ttl) = match *self {
            LeaseOp::Grant { id, ttl } => (Kind::Grant, id, ttl),
            LeaseOp::Revoke(id) => (Kind::Revoke, id, 0),
            LeaseOp::Renew(id) => (Kind::Renew, id, 0),
            LeaseOp::TimeToLive(id) => (Kind::TimeToLive, id, 0),
            LeaseOp::List => (Kind::List, 0, 0),
            LeaseOp::Keys(id) => (Kind::Keys, id, 0),
            LeaseOp::BeginRevoke { id, .. } => (Kind::BeginRevoke, id, 0),
        };
        forwardpb::LeaseRequest {
            header: Some(header),
            kind: kind as i32,
            id,
            ttl,
            expired,
        }
    }

    pub fn from_wire(req: &forwardpb::LeaseRequest) -> Result<LeaseOp> {
        let kind = Kind::try_from(req.kind)
            .map_err(|_| Error::Internal(format!("unknown lease request kind {}", req.kind)))?;
        Ok(match kind {
            Kind::Grant => LeaseOp::Grant {
                id: req.id,
                ttl: req.ttl,
            },
            Kind::Revoke => LeaseOp::Revoke(req.id),
            Kind::Renew => LeaseOp::Renew(req.id),
            Kind::TimeToLive => LeaseOp::TimeToLive(req.id),
            Kind::List => LeaseOp::List,
            Kind::Keys => LeaseOp::Keys(req.id),
            Kind::BeginRevoke => LeaseOp::BeginRevoke {
                id: req.id,
                expired: req.expired,
            },
        })
    }

    /// `resp` (without error) as this operation's answer.
    pub fn answer_from_wire(&self, resp: forwardpb::LeaseResponse) -> LeaseAnswer {
        match self {
            LeaseOp::Grant { .. } | LeaseOp::Revoke(_) => LeaseAnswer::Done,
            LeaseOp::Renew(_) => LeaseAnswer::Renewed { ttl: resp.ttl },
            LeaseOp::TimeToLive(_) => LeaseAnswer::TimeToLive {
                ttl: resp.ttl,
                remaining: resp.remaining_ttl,
            },
            LeaseOp::List => LeaseAnswer::Listed(resp.ids),
            LeaseOp::Keys(_) | LeaseOp::BeginRevoke { .. } => LeaseAnswer::Keys(resp.keys),
        }
    }
}

impl LeaseAnswer {
    pub fn to_wire(&self) -> forwardpb::LeaseResponse {
        let mut resp = forwardpb::LeaseResponse::default();
        match self {
            LeaseAnswer::Done => {}
            LeaseAnswer::Renewed { ttl } => resp.ttl = *ttl,
            LeaseAnswer::TimeToLive { ttl, remaining } => {
                resp.ttl = *ttl;
                resp.remaining_ttl = *remaining;
            }
            LeaseAnswer::Listed(ids) => resp.ids = ids.clone(),
            LeaseAnswer::Keys(keys) => resp.keys = keys.clone(),
        }
        resp
    }
}

/// The key range of every owner key.
fn owner_range() -> KeyRange {
    let mut end = OWNER_PREFIX.to_vec();
    // The prefix ends in '/': its successor bounds every key under it.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    KeyRange {
        start: OWNER_PREFIX.to_vec(),
        end: Some(end),
    }
}

fn owner_of(id: i64) -> KeyRange {
    KeyRange {
        start: owner_key(id),
        end: None,
    }
}

impl Router {
    /// Runs a lease operation (see the contract).
    pub async fn lease(self: &Arc<Router>, op: LeaseOp) -> Result<LeaseAnswer> {
        let id = match op {
            LeaseOp::List => return self.list_leases().await,
            LeaseOp::Revoke(id) => return self.revoke_lease(id, false).await,
            LeaseOp::Grant { id, .. }
            | LeaseOp::Renew(id)
            | LeaseOp::TimeToLive(id)
            | LeaseOp::Keys(id)
            | LeaseOp::BeginRevoke { id, .. } => id,
        };
        let span = owner_of(id);
        self.lease_in_region(op, &span).await
    }

    /// The keys whose newest version carries lease `id` (etcd's TimeToLive
    /// with keys), in key order: its attached keys, each read
    /// linearizably. `LeaseNotFound` for an unknown lease.
    pub async fn lease_keys(self: &Arc<Router>, id: i64) -> Result<Vec<Vec<u8>>> {
        let LeaseAnswer::Keys(attached) = self.lease(LeaseOp::Keys(id)).await? else {
            return Err(Error::Internal("a lease's keys answered otherwise".into()));
        };
        let mut out = Vec::new();
        for chunk in attached.chunks(KEY_READS) {
            let reads = chunk.iter().map(|key| {
                let req = RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                };
                async move { self.range(&req).await }
            });
            for (key, read) in chunk.iter().zip(futures::future::join_all(reads).await) {
                if read?.kvs.first().is_some_and(|kv| kv.lease == id) {
                    out.push(key.clone());
                }
            }
        }
        Ok(out)
    }

    /// Revokes lease `id` (see the contract); with `expired`, only if its
    /// leader's clock has it expired (`LeaseNotExpired` otherwise).
    async fn revoke_lease(self: &Arc<Router>, id: i64, expired: bool) -> Result<LeaseAnswer> {
        let span = owner_of(id);
        let deadline = Instant::now() + RETRY_DEADLINE;
        loop {
            let begin = LeaseOp::BeginRevoke { id, expired };
            let keys = match self.lease_in_region(begin, &span).await? {
                LeaseAnswer::Keys(keys) => keys,
                _ => return Err(Error::Internal("a lease's keys answered otherwise".into())),
            };
            let revoked = if keys.is_empty() {
                if expired {
                    // The leader's clock revokes it, keys gone or not.
                    return Ok(LeaseAnswer::Done);
                }
                self.lease_in_region(LeaseOp::Revoke(id), &span).await
            } else {
                let req = WriteRequest::LeaseRevoke(RevokeRequest { id, keys, expired });
                self.write_across(&req, &write_spans(&req))
                    .await
                    .map(|_| LeaseAnswer::Done)
            };
            match revoked {
                Err(Error::Mvcc(mvcc::Error::LeaseKeysChanged)) if Instant::now() < deadline => {}
                other => return other,
            }
        }
    }

    /// Every [`EXPIRY_INTERVAL`], revokes the expired leases with keys the
    /// clocks of the regions led here handed over (see the contract),
    /// [`EXPIRY_CONCURRENCY`] at a time, within the task (stopping it
    /// stops them); a revoke that fails is handed over again by the clock
    /// (`raftstore::lease::REVOKE_RETRY`). Ends with the router.
    pub fn start_lease_expiry(self: &Arc<Router>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXPIRY_INTERVAL).await;
                let Some(router) = weak.upgrade() else {
                    return;
                };
                let mut expired = BTreeSet::new();
                for handle in router.store.regions() {
                    expired.extend(handle.take_expired_leases());
                }
                let router = &router;
                futures::stream::iter(expired)
                    .for_each_concurrent(EXPIRY_CONCURRENCY, |id| async move {
                        match router.revoke_lease(id, true).await {
                            Ok(_) => debug!(id, "expired lease revoked with its keys"),
                            Err(e) => debug!(id, "revoking an expired lease: {e}"),
                        }
                    })
                    .await;
            }
        })
    }

    /// Runs `op` on the leader of the region owning `span`.
    async fn lease_in_region(&self, op: LeaseOp, span: &KeyRange) -> Result<LeaseAnswer> {
        let spans = std::slice::from_ref(span);
        retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, _) => {
                    lease_on_leader(&self.mvcc, &handle, op, Some(span)).await
                }
                Location::Follower(_, target) | Location::Remote(target) => {
                    self.forwarded(&target, self.forwarder.lease(&target, op))
                        .await
                }
            }
        })
        .await
    }

    async fn list_leases(&self) -> Result<LeaseAnswer> {
        let range = owner_range();
        let ids = self
            .with_pieces(&range, |pieces| async move {
                let mut ids = BTreeSet::new();
                for piece in &pieces {
                    let LeaseAnswer::Listed(found) =
                        self.lease_in_region(LeaseOp::List, piece).await?
                    else {
                        return Err(Error::Internal("a lease list answered otherwise".into()));
                    };
                    // A region's list is all it owns; keep this piece's.
                    ids.extend(
                        found
                            .into_iter()
                            .filter(|id| piece.contains(&owner_key(*id))),
                    );
                }
                Ok(ids)
            })
            .await?;
        Ok(LeaseAnswer::Listed(ids.into_iter().collect()))
    }

    /// Leader side of a forwarded lease operation.
    pub async fn serve_forwarded_lease(
        &self,
        header: Option<&forwardpb::RequestHeader>,
        op: LeaseOp,
    ) -> Result<LeaseAnswer> {
        let handle = self.forwarded_leader(header)?;
        lease_on_leader(&self.mvcc, &handle, op, None).await
    }
}

/// Runs `op` on this node's replica `handle`, the region's ready leader.
/// `List` answers what the region owns, checked to still cover `piece`
/// (forwarded: the sender's epoch was checked instead).
async fn lease_on_leader(
    mvcc: &MvccStore,
    handle: &RegionHandle,
    op: LeaseOp,
    piece: Option<&KeyRange>,
) -> Result<LeaseAnswer> {
    match op {
        LeaseOp::Grant { id, ttl } => {
            propose(handle, Op::Grant(LeaseGrant { id, ttl })).await?;
            Ok(LeaseAnswer::Done)
        }
        LeaseOp::Revoke(id) => {
            // Without keys (apply refuses it if some are attached).
            propose(handle, Op::Revoke(LeaseRevoke { id })).await?;
            Ok(LeaseAnswer::Done)
        }
        LeaseOp::Keys(id) => attached_keys(mvcc, handle, id, piece, None).await,
        LeaseOp::BeginRevoke { id, expired } => {
            attached_keys(mvcc, handle, id, piece, Some(expired)).await
        }
        LeaseOp::Renew(id) => {
            handle.read_index().await?;
            let renewal = handle.renew_lease(id).map_err(|e| clock_error(handle, e))?;
            if renewal.reset_checkpoint {
                let reset = LeaseRemaining {
                    id,
                    remaining_ttl: 0,
                };
                let leases = vec![reset];
                propose(handle, Op::Checkpoint(LeaseCheckpoint { leases })).await?;
            }
            Ok(LeaseAnswer::Renewed { ttl: renewal.ttl })
        }
        LeaseOp::TimeToLive(id) => {
            handle.read_index().await?;
            let (ttl, remaining) = handle
                .lease_time_to_live(id)
                .map_err(|e| clock_error(handle, e))?;
            Ok(LeaseAnswer::TimeToLive { ttl, remaining })
        }
        LeaseOp::List => {
            handle.read_index().await?;
            let view = mvcc.snapshot();
            if let Some(piece) = piece {
                let state = handle.read_state(&view)?;
                check_spans(&state.region, std::slice::from_ref(piece))?;
            }
            let ids = handle
                .lease_records(&view)?
                .into_iter()
                .map(|r| r.id)
                .collect();
            Ok(LeaseAnswer::Listed(ids))
        }
    }
}

/// The keys attached to lease `id` on the leader `handle`, after a read
/// barrier; with `revoke` (`Some(expired)`), once its revoke is marked
/// begun on the clock, so no key is attached to it meanwhile (a put
/// evaluated before the mark and applied after it is found by the
/// revoke's lock, and the revoke lists the keys again).
async fn attached_keys(
    mvcc: &MvccStore,
    handle: &RegionHandle,
    id: i64,
    piece: Option<&KeyRange>,
    revoke: Option<bool>,
) -> Result<LeaseAnswer> {
    handle.read_index().await?;
    let exists = |view: &mvcc::MvccSnapshot<'_>| -> Result<()> {
        if let Some(piece) = piece {
            let state = handle.read_state(view)?;
            check_spans(&state.region, std::slice::from_ref(piece))?;
        }
        match handle.lease_view(view).exists(id)? {
            true => Ok(()),
            false => Err(Error::Mvcc(mvcc::Error::LeaseNotFound)),
        }
    };
    if let Some(expired) = revoke {
        // Marked only once it is known to exist; listed after the mark.
        exists(&mvcc.snapshot())?;
        handle
            .begin_lease_revoke(id, expired)
            .map_err(|e| match e {
                ClockError::NotFound => Error::Mvcc(mvcc::Error::LeaseNotExpired),
                e => clock_error(handle, e),
            })?;
    }
    let view = mvcc.snapshot();
    exists(&view)?;
    Ok(LeaseAnswer::Keys(handle.lease_keys(&view, id)?))
}

fn clock_error(handle: &RegionHandle, e: ClockError) -> Error {
    match e {
        ClockError::NotRunning => raftstore::Error::NotLeader {
            region_id: handle.region_id(),
            leader: None,
        }
        .into(),
        ClockError::NotFound => Error::Mvcc(mvcc::Error::LeaseNotFound),
    }
}

/// Proposes a lease command on `handle` under its current epoch.
async fn propose(handle: &RegionHandle, op: Op) -> Result<()> {
    let region = handle.status().region;
    let cmd = RaftCmdRequest {
        header: Some(RaftRequestHeader {
            region_id: region.id,
            region_epoch: region.region_epoch,
            term: 0,
        }),
        cmd: Some(Cmd::Lease(LeaseRequest { op: Some(op) })),
    };
    handle.propose(cmd).await?;
    Ok(())
}
