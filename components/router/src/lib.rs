//! Maps etcd KV requests onto the regions that own their keys, and serves
//! them from any node.
//!
//! The router is the storage layer of a node. It finds the region for a
//! request and where that region's leader is:
//!
//! * **This node's replica is the ready leader**: it runs the write
//!   protocol
//!   1. latch the keys the request touches ([`latches`]),
//!   2. evaluate it against the newest state (`mvcc::exec`); a request that
//!      changes nothing takes no revision and replies at the read revision,
//!   3. register as in flight ([`inflight`]), take a revision from the
//!      placement driver's oracle and submit the raft command, both under
//!      the region's [`sequencer`] so the region's log order is its revision
//!      order (writes queued meanwhile share one oracle call),
//!   4. wait until the entry is applied, then release everything;
//!
//!   and the read protocol: a raft read-index barrier, the oracle's current
//!   revision R, a wait for in-flight writes at or below R, then a read of
//!   the local state machine at R.
//! * **The leader is on another node**: writes (Put, DeleteRange, Txn) and
//!   Compact are forwarded to that node ([`forward`], the
//!   `forwardpb.RegionForward` service on its peer port), which runs them
//!   with the protocol above. Linearizable reads are served here with a
//!   read index: the leader's node answers (R, A) — R computed as above, A
//!   its applied index afterwards — this replica waits until it has applied
//!   A and reads its own state machine at R (see [`Router::range`] for why
//!   that is linearizable). HashKV hashes this replica's data at such an R.
//! * **No replica here**: the region and leader come from the placement
//!   driver and every request, reads included, is forwarded.
//!
//! Serializable reads never leave the node when it has a replica: they read
//! at the replica's applied revision.
//!
//! Contract (`Router` methods): every method validates the request with
//! etcd's rules first and returns [`Error::Mvcc`] for etcd-visible request
//! errors, also when the leader's node found them; region errors (no leader,
//! stale epoch, leader moved, leader's node unreachable) are retried
//! internally, relocating the leader each time with a backoff from 20 ms,
//! until [`RETRY_DEADLINE`]. The `serve_forwarded_*` methods are the
//! leader's side of forwarding: they run the request only if this node's
//! replica is the ready leader and answer region errors otherwise, without
//! retrying or forwarding again, so a stale leader hint cannot make a
//! request loop between nodes.

pub mod forward;
pub mod inflight;
pub mod latches;
pub mod resolve;
pub mod sequencer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use mvcc::exec::{self, ReadBounds, WriteRequest, WriteResponse};
use mvcc::{check, KeyRange, MvccStore};
use pd::PdClient;
use proto::etcdserverpb::{
    request_op::Request, RangeRequest, RangeResponse, ResponseHeader, TxnRequest,
};
use proto::forwardpb::RequestHeader;
use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, CompactRequest, RaftCmdRequest, RaftRequestHeader};
use raftstore::{RegionHandle, Store};
use tracing::debug;

use crate::forward::{Forwarder, Target};
use crate::inflight::Inflight;
use crate::latches::{LatchSet, Latches};
use crate::resolve::{PdResolver, Resolver};
use crate::sequencer::Sequencer;

/// How long a request keeps retrying region errors (e.g. during an
/// election) before it fails.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(5);

/// First and largest pause between two attempts of a request.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mvcc(#[from] mvcc::Error),
    #[error(transparent)]
    Region(#[from] raftstore::Error),
    #[error("placement driver: {0}")]
    Pd(#[from] pd::PdError),
    /// The leader's node could not reach the placement driver.
    #[error("placement driver: {0}")]
    RemotePd(String),
    #[error("no region serves key {0:?}")]
    NoRegion(Vec<u8>),
    #[error("requests spanning several regions are not supported yet")]
    CrossRegion,
    /// The node believed to hold the leader did not answer.
    #[error("node {node_id} unreachable: {reason}")]
    Unreachable { node_id: u64, reason: String },
    #[error("request timed out")]
    Timeout,
    /// Any other failure of a request served by another node.
    #[error("{0}")]
    Remote(String),
}

impl Error {
    /// Whether trying again, after locating the region's leader afresh,
    /// may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Region(e) => e.is_retryable(),
            Error::NoRegion(_) | Error::Unreachable { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Leader-side write state of one region.
#[derive(Default)]
struct RegionWrites {
    latches: Latches,
    inflight: Arc<Inflight>,
    sequencer: Arc<Sequencer>,
}

/// Where a request for a region is served.
enum Location {
    /// This node's replica is the ready leader.
    Leader(RegionHandle, Arc<RegionWrites>),
    /// This node has a replica; the leader is on `Target`'s node.
    Follower(RegionHandle, Target),
    /// This node has no replica of the region.
    Remote(Target),
}

/// A leader hint from a node that refused a forwarded request.
#[derive(Clone, Copy, Debug)]
struct LeaderHint {
    refused_by: u64,
    leader_node: u64,
}

pub struct Router {
    store: Arc<Store>,
    pd: Arc<dyn PdClient>,
    mvcc: MvccStore,
    writes: DashMap<u64, Arc<RegionWrites>>,
    forwarder: Forwarder,
    /// Region id → newest leader hint, newer than what PD may know (PD
    /// hears of leaders through heartbeats only).
    hints: DashMap<u64, LeaderHint>,
}

impl Router {
    /// A router that finds other nodes' peer URLs through `pd`.
    pub fn new(store: Arc<Store>, pd: Arc<dyn PdClient>) -> Router {
        let resolver = Arc::new(PdResolver::new(pd.clone()));
        Router::with_resolver(store, pd, resolver)
    }

    pub fn with_resolver(
        store: Arc<Store>,
        pd: Arc<dyn PdClient>,
        resolver: Arc<dyn Resolver>,
    ) -> Router {
        Router {
            mvcc: store.mvcc(),
            store,
            pd,
            writes: DashMap::new(),
            forwarder: Forwarder::new(resolver),
            hints: DashMap::new(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn region_writes(&self, region_id: u64) -> Arc<RegionWrites> {
        self.writes.entry(region_id).or_default().clone()
    }

    /// The local replica whose key range covers every range in `spans`.
    fn region_for(&self, spans: &[KeyRange]) -> Result<RegionHandle> {
        let first = spans.first().map(|s| s.start.clone()).unwrap_or_default();
        for handle in self.store.regions() {
            let region = handle.status().region;
            if spans.iter().all(|s| covers(&region, s)) {
                return Ok(handle);
            }
            if spans.iter().any(|s| covers(&region, s)) {
                return Err(Error::CrossRegion);
            }
        }
        Err(Error::NoRegion(first))
    }

    /// Finds where the region of `spans` is served. Fails with a retryable
    /// error while the leader is unknown.
    async fn locate(&self, spans: &[KeyRange]) -> Result<Location> {
        let handle = match self.region_for(spans) {
            Ok(handle) => handle,
            Err(Error::NoRegion(key)) => return self.locate_remote(spans, key).await,
            Err(e) => return Err(e),
        };
        let status = handle.status();
        let region_id = handle.region_id();
        if status.ready_leader {
            return Ok(Location::Leader(handle, self.region_writes(region_id)));
        }
        let own_node = node_of(&status.region, status.peer_id);
        let mut leader_node = (status.leader_peer_id != 0)
            .then(|| node_of(&status.region, status.leader_peer_id))
            .flatten();
        if let Some(hint) = self.hints.get(&region_id).map(|h| *h) {
            // Raft's view here is usually freshest, except when that very
            // node just told us it no longer leads.
            if leader_node.is_none() || leader_node == Some(hint.refused_by) {
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
        let Some((region, leader)) = self.pd.get_region(&key).await? else {
            return Err(Error::NoRegion(key));
        };
        if !spans.iter().all(|s| covers(&region, s)) {
            return Err(Error::CrossRegion);
        }
        let node_id = self
            .hints
            .get(&region.id)
            .map(|h| h.leader_node)
            .or(leader.map(|p| p.node_id))
            .ok_or(Error::Region(raftstore::Error::NotLeader {
                region_id: region.id,
                leader: None,
            }))?;
        Ok(Location::Remote(Target {
            node_id,
            region_id: region.id,
            epoch: region.region_epoch,
        }))
    }

    /// Keeps what a failed forward taught about the leader.
    fn note_forward_error(&self, target: &Target, err: &Error) {
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

    async fn forwarded<T>(
        &self,
        target: &Target,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let res = fut.await;
        if let Err(e) = &res {
            debug!(
                region_id = target.region_id,
                node_id = target.node_id,
                "forwarded request failed: {e}"
            );
            self.note_forward_error(target, e);
        }
        res
    }

    /// Serves a Range. The header carries only the revision.
    ///
    /// A linearizable read on a follower is correct for the same reason as
    /// on the leader: the leader's node computes R like a leader read does
    /// (read barrier, oracle, in-flight writes at or below R resolved), so
    /// every write acknowledged before this read started has a revision at
    /// or below R and none at or below R is still pending; its applied index
    /// A taken afterwards is at or above the log index of each of those
    /// writes, since a write is acknowledged only once applied and the
    /// region's log order is its revision order. Once this replica has
    /// applied A it holds every write at or below R (and perhaps later ones,
    /// which a read at R does not see), so its state at R is the leader's.
    pub async fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        check::check_range(req)?;
        let span = KeyRange::from_etcd(&req.key, &req.range_end);
        let spans = std::slice::from_ref(&span);
        if req.serializable {
            if let Ok(handle) = self.region_for(spans) {
                let current = handle.status().applied_revision.max(1);
                return self.read_local(&handle, req, current);
            }
        }
        retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, writes) => {
                    self.range_on_leader(req, &handle, &writes).await
                }
                Location::Follower(handle, target) => {
                    let current = self.follower_revision(&handle, &target).await?;
                    self.read_local(&handle, req, current)
                }
                Location::Remote(target) => {
                    self.forwarded(&target, self.forwarder.range(&target, req))
                        .await
                }
            }
        })
        .await
    }

    async fn range_on_leader(
        &self,
        req: &RangeRequest,
        handle: &RegionHandle,
        writes: &RegionWrites,
    ) -> Result<RangeResponse> {
        let current = if req.serializable {
            handle.status().applied_revision.max(1)
        } else {
            self.linearizable_revision(handle, writes).await?
        };
        self.read_local(handle, req, current)
    }

    /// Reads this replica's state machine for `req` with `current` as the
    /// newest revision a read may ask for.
    fn read_local(
        &self,
        handle: &RegionHandle,
        req: &RangeRequest,
        current: i64,
    ) -> Result<RangeResponse> {
        let bounds = ReadBounds {
            current,
            compacted: handle.status().compact_revision,
        };
        let rev = bounds.resolve(req.revision)?;
        let mut resp = exec::range(&self.mvcc, req, rev)?;
        resp.header = Some(ResponseHeader {
            revision: current,
            ..Default::default()
        });
        Ok(resp)
    }

    /// Read barrier, then the oracle's current revision once every write
    /// that could commit at or below it has been applied here. For the
    /// ready leader only; one attempt (callers retry).
    async fn linearizable_revision(
        &self,
        handle: &RegionHandle,
        writes: &RegionWrites,
    ) -> Result<i64> {
        handle.read_index().await?;
        let current = self.pd.current_revision().await?;
        writes.inflight.wait_resolved(current).await;
        Ok(current)
    }

    /// A linearizable revision for a read of this follower replica: the
    /// leader's (R, A), then a wait until this replica has applied A.
    async fn follower_revision(&self, handle: &RegionHandle, target: &Target) -> Result<i64> {
        let (revision, index) = self
            .forwarded(target, self.forwarder.read_index(target))
            .await?;
        match tokio::time::timeout(RETRY_DEADLINE, handle.wait_applied(index)).await {
            Ok(Ok(())) => Ok(revision),
            // Removed or shutting down: look for the region elsewhere.
            Ok(Err(raftstore::Error::Stopped(id))) => {
                Err(Error::Region(raftstore::Error::RegionNotFound(id)))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Serves Put, DeleteRange and Txn.
    pub async fn write(&self, req: &WriteRequest) -> Result<WriteResponse> {
        check_write(req)?;
        let spans = &write_spans(req);
        retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, writes) => {
                    self.write_on_leader(req, spans, &handle, &writes).await
                }
                Location::Follower(_, target) | Location::Remote(target) => {
                    self.forwarded(&target, self.forwarder.write(&target, req))
                        .await
                }
            }
        })
        .await
    }

    async fn write_on_leader(
        &self,
        req: &WriteRequest,
        spans: &[KeyRange],
        handle: &RegionHandle,
        writes: &RegionWrites,
    ) -> Result<WriteResponse> {
        let latch_set = if spans.iter().all(|s| s.end.is_none()) {
            LatchSet::Keys(spans.iter().map(|s| s.start.clone()).collect())
        } else {
            LatchSet::Everything
        };
        let _latches = writes.latches.acquire(latch_set).await;
        self.write_once(req, handle, writes).await
    }

    async fn write_once(
        &self,
        req: &WriteRequest,
        handle: &RegionHandle,
        writes: &RegionWrites,
    ) -> Result<WriteResponse> {
        let status = handle.status();
        if !status.ready_leader {
            return Err(Error::Region(raftstore::Error::NotLeader {
                region_id: handle.region_id(),
                leader: None,
            }));
        }
        let current = match req {
            // Only txns read at historical revisions during evaluation.
            WriteRequest::Txn(_) => self.pd.current_revision().await?,
            _ => i64::MAX,
        };
        let bounds = ReadBounds {
            current,
            compacted: status.compact_revision,
        };
        let eval = exec::evaluate(&self.mvcc, req, bounds, &|_| false)?;
        let mut response = eval.response;
        if eval.mutations.is_empty() {
            let read_rev = self.pd.current_revision().await?;
            exec::fill_revisions(&mut response, read_rev, read_rev);
            return Ok(response);
        }
        let rev = writes
            .sequencer
            .write(
                self.pd.clone(),
                writes.inflight.clone(),
                handle.clone(),
                status.region,
                eval.mutations,
            )
            .await?;
        exec::fill_revisions(&mut response, rev, rev - 1);
        Ok(response)
    }

    /// etcd Compact: returns the current revision for the response header.
    /// With `physical`, waits until this node's replica (or the leader's,
    /// if this node has none) has cleaned up.
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<i64> {
        let span = KeyRange::from_etcd(b"\0", b"\0");
        let spans = std::slice::from_ref(&span);
        let (current, local, index) = retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, writes) => {
                    let (current, index) =
                        self.compact_on_leader(revision, &handle, &writes).await?;
                    Ok((current, Some(handle), index))
                }
                Location::Follower(handle, target) => {
                    let (current, index) = self
                        .forwarded(&target, self.forwarder.compact(&target, revision, false))
                        .await?;
                    Ok((current, Some(handle), index))
                }
                Location::Remote(target) => {
                    let (current, index) = self
                        .forwarded(&target, self.forwarder.compact(&target, revision, physical))
                        .await?;
                    Ok((current, None, index))
                }
            }
        })
        .await?;
        if physical {
            if let Some(handle) = local {
                // The compaction is committed; this replica starts its own
                // clean-up once it has applied it.
                tokio::time::timeout(RETRY_DEADLINE, handle.wait_applied(index))
                    .await
                    .map_err(|_| Error::Timeout)??;
                handle.wait_physically_compacted(revision).await?;
            }
        }
        Ok(current)
    }

    /// Proposes the compaction on the ready leader; returns the linearizable
    /// revision it was checked against and the applied index afterwards.
    async fn compact_on_leader(
        &self,
        revision: i64,
        handle: &RegionHandle,
        writes: &RegionWrites,
    ) -> Result<(i64, u64)> {
        let current = self.linearizable_revision(handle, writes).await?;
        if revision <= handle.status().compact_revision {
            return Err(mvcc::Error::Compacted.into());
        }
        if revision > current {
            return Err(mvcc::Error::FutureRev.into());
        }
        let cmd = RaftCmdRequest {
            header: Some(header(&handle.status().region)),
            cmd: Some(Cmd::Compact(CompactRequest { revision })),
        };
        handle.propose(cmd).await.map_err(|e| match e {
            raftstore::Error::Mvcc(m) => Error::Mvcc(m),
            e => Error::Region(e),
        })?;
        Ok((current, handle.status().applied_index))
    }

    /// Hash of this replica's KV history up to `revision` (0 = current)
    /// with the compaction revision and the revision hashed. On a follower
    /// the current revision is the leader's linearizable one, so hashes of
    /// different nodes at one revision are comparable.
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let span = KeyRange::from_etcd(b"\0", b"\0");
        let spans = std::slice::from_ref(&span);
        // Hashing is of a node's own data: without a replica there is
        // nothing to hash, whoever leads.
        self.region_for(spans)?;
        let (handle, current) = retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, writes) => {
                    let current = self.linearizable_revision(&handle, &writes).await?;
                    Ok((handle, current))
                }
                Location::Follower(handle, target) => {
                    let current = self.follower_revision(&handle, &target).await?;
                    Ok((handle, current))
                }
                // The replica went away since.
                Location::Remote(_) => Err(Error::Region(raftstore::Error::RegionNotFound(0))),
            }
        })
        .await?;
        let status = handle.status();
        let rev = ReadBounds {
            current,
            compacted: status.compact_revision,
        }
        .resolve(revision)?;
        let region = status.region;
        let mvcc = self.mvcc.clone();
        let compacted = status.compact_revision;
        let hash = tokio::task::spawn_blocking(move || {
            mvcc.hash(rev, compacted, &region.start_key, &region.end_key)
        })
        .await
        .map_err(|e| mvcc::Error::Storage(e.to_string()))??;
        Ok((hash, compacted, rev))
    }

    /// This node's replica of the region a forwarded request is for, if it
    /// is the ready leader; the region error to answer otherwise.
    fn forwarded_leader(&self, header: Option<&RequestHeader>) -> Result<RegionHandle> {
        let header = header.copied().unwrap_or_default();
        let region_id = header.region_id;
        let handle = self
            .store
            .region(region_id)
            .ok_or(raftstore::Error::RegionNotFound(region_id))?;
        let status = handle.status();
        if status.applied_index == 0 {
            // Created on demand, waiting for its first snapshot.
            return Err(raftstore::Error::RegionNotFound(region_id).into());
        }
        let current = status.region.region_epoch.unwrap_or_default();
        let given = header.region_epoch.unwrap_or_default();
        if given.version != current.version {
            return Err(raftstore::Error::EpochNotMatch {
                region_id,
                current: status.region,
            }
            .into());
        }
        if !status.ready_leader {
            let leader = status
                .region
                .peers
                .iter()
                .find(|p| p.id == status.leader_peer_id && p.id != status.peer_id)
                .copied();
            return Err(raftstore::Error::NotLeader { region_id, leader }.into());
        }
        Ok(handle)
    }

    /// Checks that `spans` lie in the forwarded request's region here.
    fn check_forwarded_spans(&self, handle: &RegionHandle, spans: &[KeyRange]) -> Result<()> {
        let region = handle.status().region;
        if spans.iter().all(|s| covers(&region, s)) {
            return Ok(());
        }
        Err(raftstore::Error::EpochNotMatch {
            region_id: region.id,
            current: region,
        }
        .into())
    }

    /// Leader side of a forwarded Put, DeleteRange or Txn.
    pub async fn serve_forwarded_write(
        &self,
        header: Option<&RequestHeader>,
        req: &WriteRequest,
    ) -> Result<WriteResponse> {
        check_write(req)?;
        let handle = self.forwarded_leader(header)?;
        let spans = write_spans(req);
        self.check_forwarded_spans(&handle, &spans)?;
        let writes = self.region_writes(handle.region_id());
        self.write_on_leader(req, &spans, &handle, &writes).await
    }

    /// Leader side of a forwarded Range (from a node without a replica).
    pub async fn serve_forwarded_range(
        &self,
        header: Option<&RequestHeader>,
        req: &RangeRequest,
    ) -> Result<RangeResponse> {
        check::check_range(req)?;
        let handle = self.forwarded_leader(header)?;
        let span = KeyRange::from_etcd(&req.key, &req.range_end);
        self.check_forwarded_spans(&handle, std::slice::from_ref(&span))?;
        let writes = self.region_writes(handle.region_id());
        self.range_on_leader(req, &handle, &writes).await
    }

    /// Leader side of a forwarded Compact: the linearizable revision and
    /// the applied index once the compaction is applied here.
    pub async fn serve_forwarded_compact(
        &self,
        header: Option<&RequestHeader>,
        revision: i64,
        physical: bool,
    ) -> Result<(i64, u64)> {
        let handle = self.forwarded_leader(header)?;
        let writes = self.region_writes(handle.region_id());
        let (current, index) = self.compact_on_leader(revision, &handle, &writes).await?;
        if physical {
            handle.wait_physically_compacted(revision).await?;
        }
        Ok((current, index))
    }

    /// Leader side of a follower's read index: a linearizable revision R
    /// and this replica's applied index A once every write at or below R
    /// is applied here (so A covers them all).
    pub async fn serve_read_index(&self, header: Option<&RequestHeader>) -> Result<(i64, u64)> {
        let handle = self.forwarded_leader(header)?;
        let writes = self.region_writes(handle.region_id());
        let revision = self.linearizable_revision(&handle, &writes).await?;
        Ok((revision, handle.status().applied_index))
    }

    /// The oracle's current revision (for response headers of requests that
    /// read nothing).
    pub async fn current_revision(&self) -> Result<i64> {
        Ok(self.pd.current_revision().await?)
    }
}

fn header(region: &proto::metapb::Region) -> RaftRequestHeader {
    RaftRequestHeader {
        region_id: region.id,
        region_epoch: region.region_epoch,
        proposal_id: 0,
    }
}

/// Runs `op` until it succeeds, fails with an error that is not
/// retryable, or [`RETRY_DEADLINE`] passes.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + RETRY_DEADLINE;
    let mut backoff = MIN_BACKOFF;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && Instant::now() + backoff < deadline => {
                debug!("retrying: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
}

fn check_write(req: &WriteRequest) -> Result<()> {
    match req {
        WriteRequest::Put(p) => check::check_put(p)?,
        WriteRequest::DeleteRange(d) => check::check_delete(d)?,
        WriteRequest::Txn(t) => check::check_txn(t)?,
    }
    Ok(())
}

/// Whether `region`'s key range holds all of `s`.
fn covers(region: &metapb::Region, s: &KeyRange) -> bool {
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

/// Every key range a write may read or change, over both txn branches.
fn write_spans(req: &WriteRequest) -> Vec<KeyRange> {
    let mut spans = Vec::new();
    match req {
        WriteRequest::Put(p) => spans.push(KeyRange::from_etcd(&p.key, &[])),
        WriteRequest::DeleteRange(d) => spans.push(KeyRange::from_etcd(&d.key, &d.range_end)),
        WriteRequest::Txn(t) => txn_spans(t, &mut spans),
    }
    spans
}

fn txn_spans(t: &TxnRequest, spans: &mut Vec<KeyRange>) {
    for c in &t.compare {
        spans.push(KeyRange::from_etcd(&c.key, &c.range_end));
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => spans.push(KeyRange::from_etcd(&r.key, &r.range_end)),
            Some(Request::RequestPut(p)) => spans.push(KeyRange::from_etcd(&p.key, &[])),
            Some(Request::RequestDeleteRange(d)) => {
                spans.push(KeyRange::from_etcd(&d.key, &d.range_end))
            }
            Some(Request::RequestTxn(inner)) => txn_spans(inner, spans),
            None => {}
        }
    }
}
