//! [`Router`]: the entry point of a node's storage for etcd KV requests.
//!
//! Contract of the public methods (`range`, `write`, `compact`, `hash_kv`
//! (in `hash`), `current_revision`): every method validates the request with etcd's
//! rules first; etcd-visible request errors come back as [`Error::Mvcc`],
//! also when the leader's node found them. Retryable errors (the request
//! certainly had no effect: no leader yet, stale epoch, leader moved,
//! leader's node unreachable, a transient placement-driver failure) are
//! retried here, relocating the leader each time with a backoff from 20 ms,
//! until [`RETRY_DEADLINE`]; after that the last error is returned.
//! [`Error::OutcomeUnknown`] is never retried: the write may have applied.
//!
//! * `range`: serializable reads are served by the local replica at its
//!   applied revision when there is one (over several regions: at the
//!   lowest resolved revision of the local replicas, see `resolved`, when
//!   every region has one caught up here); linearizable reads on the leader
//!   (`RegionLeader::linearizable_revision`) or on a follower with the
//!   leader's read index (see [`Router::range`]); without a local replica
//!   the read is forwarded.
//! * `write`: on the ready leader through `RegionLeader::write`, otherwise
//!   forwarded; a txn whose every operation is a serializable Range is a
//!   serializable read and served locally like one, as etcd does. A write
//!   whose keys lie in several regions commits through `txn` (two-phase,
//!   at one revision).
//! * every read and write of keys a transaction over several regions has
//!   locked waits for the lock to go (`leader::txn::wait_unlocked`).
//! * every read uses one RocksDB snapshot and checks its revision against
//!   the compaction revision in that same snapshot, so a compaction cannot
//!   delete versions under a read it allowed.
//!
//! The `serve_forwarded_*` methods are the leader's side of forwarding:
//! they run the request only if this node's replica is the ready leader and
//! answer region errors otherwise, without retrying or forwarding again.

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use mvcc::exec::{self, ReadBounds, WriteRequest, WriteResponse};
use mvcc::{check, KeyRange, MvccStore};
use pd::PdClient;
use proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use proto::forwardpb::{txn_step_request::Step, txn_step_response, RequestHeader};
use raftstore::{RegionHandle, Store};
use tracing::debug;

use crate::cache::RegionCache;
use crate::forward::{Forward, ReadIndex, Target};
use crate::leader::txn::wait_unlocked;
use crate::leader::{check_spans, RegionLeader, READ_TIMEOUT};
use crate::locate::{is_serializable_txn, write_spans, LeaderHint, Location};
use crate::replicas::LocalReplicas;
use crate::{Error, Result, MAX_BACKOFF, MIN_BACKOFF, RETRY_DEADLINE};

pub struct Router {
    pub(crate) store: Arc<Store>,
    pub(crate) pd: Arc<dyn PdClient>,
    pub(crate) mvcc: MvccStore,
    leaders: DashMap<u64, Arc<RegionLeader>>,
    pub(crate) forwarder: Arc<dyn Forward>,
    /// Region id → newest leader hint, newer than what PD may know (PD
    /// hears of leaders through heartbeats only).
    pub(crate) hints: DashMap<u64, LeaderHint>,
    /// Regions without a replica here (see `cache`).
    pub(crate) cache: RegionCache,
    /// This node's replicas by key (see `replicas`).
    pub(crate) replicas: LocalReplicas,
    /// Decisions of transactions over several regions to forget (see
    /// `txn`).
    pub(crate) txn_cleanup: crate::txn::Cleanup,
    /// Resolved revisions of the regions with a replica here (see
    /// `resolved`).
    pub(crate) resolved: crate::resolved::ResolvedRevisions,
    /// What the merge driver here has seen (see `merge`).
    pub(crate) merges: crate::merge::MergeDriverState,
    /// Tasks running detached from client calls (see `detached`).
    pub(crate) detached: crate::detached::Detached,
    /// Watches sharing aggregators (see `watch`).
    pub(crate) watches: crate::watch::Hub,
}

impl Router {
    /// A router over this node's `store`, reaching other nodes through
    /// `forwarder`.
    pub fn new(store: Arc<Store>, pd: Arc<dyn PdClient>, forwarder: Arc<dyn Forward>) -> Router {
        Router {
            mvcc: store.mvcc(),
            store,
            pd,
            leaders: DashMap::new(),
            forwarder,
            hints: DashMap::new(),
            cache: RegionCache::default(),
            replicas: LocalReplicas::default(),
            txn_cleanup: Default::default(),
            resolved: Default::default(),
            watches: Default::default(),
            merges: Default::default(),
            detached: Default::default(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// This node's replica with the smallest start key (an index lookup,
    /// not a walk over the replicas), if it has any.
    pub fn first_local_replica(&self) -> Option<RegionHandle> {
        self.replicas.first(&self.store)
    }

    pub(crate) fn region_leader(&self, region_id: u64) -> Arc<RegionLeader> {
        self.leaders
            .entry(region_id)
            .or_insert_with(|| Arc::new(RegionLeader::new(self.pd.clone(), self.mvcc.clone())))
            .clone()
    }

    pub(crate) async fn forwarded<T>(
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
    /// (oracle, read barrier, in-flight writes at or below R resolved), so
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
        if req.serializable {
            if let Ok(handle) = self.region_for(std::slice::from_ref(&span)) {
                return self.read_serializable(&handle, req).await;
            }
        }
        if span.end.is_none() {
            // A single key lies in one region: no pieces to find.
            return self.range_in_region(req, &span).await;
        }
        let span = &span;
        self.with_pieces(span, |pieces| async move {
            if pieces.len() > 1 {
                if req.serializable {
                    if let Some(resp) = self.range_pieces_resolved(req, &pieces)? {
                        return Ok(resp);
                    }
                }
                self.range_pieces(req, pieces).await
            } else {
                self.range_in_region(req, span).await
            }
        })
        .await
    }

    /// Serves a Range whose keys `span` lie in one region.
    pub(crate) async fn range_in_region(
        &self,
        req: &RangeRequest,
        span: &KeyRange,
    ) -> Result<RangeResponse> {
        let spans = std::slice::from_ref(span);
        if req.serializable {
            if let Ok(handle) = self.region_for(spans) {
                return self.read_serializable(&handle, req).await;
            }
        }
        retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, leader) => {
                    self.range_on_leader(req, &handle, &leader).await
                }
                Location::Follower(handle, target) => {
                    let current = self.follower_revision(&handle, &target).await?;
                    wait_unlocked(&handle, spans, 0).await?;
                    self.read_local(&handle, req, Some(current))
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
        leader: &RegionLeader,
    ) -> Result<RangeResponse> {
        if req.serializable {
            return self.read_serializable(handle, req).await;
        }
        let (current, _) = leader.linearizable_revision(handle).await?;
        let span = KeyRange::from_etcd(&req.key, &req.range_end);
        wait_unlocked(handle, std::slice::from_ref(&span), 0).await?;
        self.read_local(handle, req, Some(current))
    }

    /// A serializable read on this replica at its applied revision, once
    /// no transaction holds a lock on its keys (a lock's commit may land
    /// below that revision), retrying while locked.
    async fn read_serializable(
        &self,
        handle: &RegionHandle,
        req: &RangeRequest,
    ) -> Result<RangeResponse> {
        let span = KeyRange::from_etcd(&req.key, &req.range_end);
        let spans = std::slice::from_ref(&span);
        retrying(|| async move {
            // Fixed before the wait: a lock taken later commits above it.
            let at = handle.status().applied_revision.max(1);
            wait_unlocked(handle, spans, 0).await?;
            self.read_local(handle, req, Some(at))
        })
        .await
    }

    /// Reads this replica's state machine for `req` with `current` as the
    /// newest revision a read may ask for (`None`: the replica's applied
    /// revision, a serializable read), from one snapshot.
    ///
    /// The region must still hold the range *now*: a linearizable read
    /// checked here, after its barrier, knows that a split moving the keys
    /// away (and so any write of them through the new region) came after
    /// its revision R.
    pub(crate) fn read_local(
        &self,
        handle: &RegionHandle,
        req: &RangeRequest,
        current: Option<i64>,
    ) -> Result<RangeResponse> {
        let span = KeyRange::from_etcd(&req.key, &req.range_end);
        let view = self.mvcc.snapshot();
        let state = handle.read_state(&view)?;
        check_spans(&state.region, std::slice::from_ref(&span))?;
        // Never below the compaction revision: versions below it may be
        // gone, and every write at or below it applied before the
        // compaction did (it waited for them, and for transaction locks).
        let current = current
            .unwrap_or(state.applied_revision.max(1))
            .max(state.compact_revision);
        let bounds = ReadBounds {
            current,
            compacted: state.compact_revision,
        };
        let rev = bounds.resolve(req.revision)?;
        let mut resp = exec::range(&view, req, rev)?;
        resp.header = Some(ResponseHeader {
            revision: current,
            ..Default::default()
        });
        Ok(resp)
    }

    /// A linearizable revision for a read of this follower replica: the
    /// leader's (R, A), then a wait until this replica has applied A.
    pub(crate) async fn follower_revision(
        &self,
        handle: &RegionHandle,
        target: &Target,
    ) -> Result<i64> {
        let ri = self
            .forwarded(target, self.forwarder.read_index(target))
            .await?;
        match tokio::time::timeout(READ_TIMEOUT, handle.wait_applied(ri.applied_index)).await {
            Ok(Ok(())) => Ok(ri.revision),
            // Removed or shutting down: look for the region elsewhere.
            Ok(Err(raftstore::Error::Stopped(id))) => {
                Err(Error::Region(raftstore::Error::RegionNotFound(id)))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::timed_out("wait for the leader's applied index")),
        }
    }

    /// Serves Put, DeleteRange and Txn.
    pub async fn write(self: &Arc<Router>, req: &WriteRequest) -> Result<WriteResponse> {
        check_write(req)?;
        let spans = &write_spans(req);
        if is_serializable_txn(req) {
            if let Ok(handle) = self.region_for(spans) {
                let handle = &handle;
                return retrying(|| async move {
                    let at = handle.status().applied_revision.max(1);
                    wait_unlocked(handle, spans, 0).await?;
                    self.read_only_txn_local(handle, req, at)
                })
                .await;
            }
        }
        let res = retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, leader) => leader.write(&handle, req, spans).await,
                Location::Follower(_, target) | Location::Remote(target) => {
                    self.forwarded(&target, self.forwarder.write(&target, req))
                        .await
                }
            }
        })
        .await;
        match res {
            Err(Error::CrossRegion) => self.write_across(req, spans).await,
            other => other,
        }
    }

    /// A serializable read-only txn on this replica at `current`, a
    /// revision it has applied (or its compaction revision, if above).
    fn read_only_txn_local(
        &self,
        handle: &RegionHandle,
        req: &WriteRequest,
        current: i64,
    ) -> Result<WriteResponse> {
        let view = self.mvcc.snapshot();
        let state = handle.read_state(&view)?;
        check_spans(&state.region, &write_spans(req))?;
        // As in `read_local`: never below the compaction revision.
        let current = current.max(state.compact_revision);
        let bounds = ReadBounds {
            current,
            compacted: state.compact_revision,
        };
        // Writes above `current` may be applied already (a transaction
        // over several regions commits below the applied revision, and
        // writes went on while this read waited for its locks).
        let at = mvcc::AtRevision {
            inner: &view,
            at: current,
        };
        let eval = exec::evaluate(&at, req, bounds, &mvcc::lease::NoLeases)?;
        if !eval.mutations.is_empty() {
            return Err(Error::Internal("read-only txn produced changes".into()));
        }
        let mut response = eval.response;
        exec::fill_revisions(&mut response, current, current);
        Ok(response)
    }

    /// This node's replica of the region a forwarded request is for, if it
    /// is the ready leader; the region error to answer otherwise.
    pub(crate) fn forwarded_leader(&self, header: Option<&RequestHeader>) -> Result<RegionHandle> {
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
    pub(crate) fn check_forwarded_spans(
        &self,
        handle: &RegionHandle,
        spans: &[KeyRange],
    ) -> Result<()> {
        check_spans(&handle.status().region, spans)
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
        let leader = self.region_leader(handle.region_id());
        leader.write(&handle, req, &spans).await
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
        let leader = self.region_leader(handle.region_id());
        self.range_on_leader(req, &handle, &leader).await
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
        let leader = self.region_leader(handle.region_id());
        // The epoch the sender located the region by (checked above).
        let epoch = header.and_then(|h| h.region_epoch);
        let (current, index) = leader.compact(&handle, revision, epoch).await?;
        if physical {
            handle.wait_physically_compacted(revision).await?;
        }
        Ok((current, index))
    }

    /// Leader side of a step of a transaction over several regions.
    pub async fn serve_txn_step(
        &self,
        header: Option<&RequestHeader>,
        step: Step,
    ) -> Result<Option<txn_step_response::Result>> {
        let handle = self.forwarded_leader(header)?;
        let leader = self.region_leader(handle.region_id());
        leader.txn_step(&handle, step).await
    }

    /// Leader side of a follower's read index: a linearizable revision R
    /// and this replica's applied index A once every write at or below R
    /// is applied here (so A covers them all).
    pub async fn serve_read_index(&self, header: Option<&RequestHeader>) -> Result<ReadIndex> {
        let handle = self.forwarded_leader(header)?;
        let leader = self.region_leader(handle.region_id());
        leader.read_index(&handle).await
    }

    /// The oracle's current revision (for response headers of requests that
    /// read nothing).
    pub async fn current_revision(&self) -> Result<i64> {
        Ok(self.pd.current_revision().await?)
    }
}

/// Runs `op` until it succeeds, fails with an error that is not
/// retryable, or [`RETRY_DEADLINE`] passes.
pub(crate) async fn retrying<T, F, Fut>(mut op: F) -> Result<T>
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
        WriteRequest::LeaseRevoke(_) => {}
    }
    Ok(())
}
