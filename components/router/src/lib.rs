//! Maps etcd KV requests onto the regions that own their keys.
//!
//! The router is the storage layer of a node: it finds the region for a
//! request, and on that region's leader runs the write protocol
//!
//! 1. latch the keys the request touches ([`latches`]),
//! 2. evaluate it against the newest state (`mvcc::exec`); a request that
//!    changes nothing takes no revision and replies at the read revision,
//! 3. register as in flight ([`inflight`]), take one revision from the
//!    placement driver's oracle and submit the raft command, both under the
//!    region's sequencer so the region's log order is its revision order,
//! 4. wait until the entry is applied, then release everything;
//!
//! and the read protocol: a raft read-index barrier, the oracle's current
//! revision R, a wait for in-flight writes at or below R, then a read of the
//! local state machine at R. Serializable reads skip the barrier and read at
//! the region's applied revision.
//!
//! Contract (`Router` methods): every method validates the request with
//! etcd's rules first and returns [`Error::Mvcc`] for etcd-visible request
//! errors; region errors are retried internally until [`RETRY_DEADLINE`].

pub mod inflight;
pub mod latches;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use mvcc::exec::{self, ReadBounds, WriteRequest, WriteResponse};
use mvcc::{check, KeyRange, MvccStore};
use pd::PdClient;
use proto::etcdserverpb::{
    request_op::Request, RangeRequest, RangeResponse, ResponseHeader, TxnRequest,
};
use proto::raft_cmdpb::{raft_cmd_request::Cmd, CompactRequest, RaftCmdRequest, RaftRequestHeader};
use raftstore::{RegionHandle, Store};

use crate::inflight::Inflight;
use crate::latches::{LatchSet, Latches};

/// How long a request keeps retrying region errors (e.g. during an
/// election) before it fails.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mvcc(#[from] mvcc::Error),
    #[error(transparent)]
    Region(#[from] raftstore::Error),
    #[error("placement driver: {0}")]
    Pd(#[from] pd::PdError),
    #[error("no region serves key {0:?} on this node")]
    NoRegion(Vec<u8>),
    #[error("requests spanning several regions are not supported yet")]
    CrossRegion,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Leader-side write state of one region.
#[derive(Default)]
struct RegionWrites {
    latches: Latches,
    inflight: Inflight,
    sequencer: tokio::sync::Mutex<()>,
}

pub struct Router {
    store: Arc<Store>,
    pd: Arc<dyn PdClient>,
    mvcc: MvccStore,
    writes: DashMap<u64, Arc<RegionWrites>>,
}

impl Router {
    pub fn new(store: Arc<Store>, pd: Arc<dyn PdClient>) -> Router {
        Router {
            mvcc: store.mvcc(),
            store,
            pd,
            writes: DashMap::new(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The region whose key range covers every range in `spans`.
    fn region_for(&self, spans: &[KeyRange]) -> Result<(RegionHandle, Arc<RegionWrites>)> {
        let first = spans.first().map(|s| s.start.clone()).unwrap_or_default();
        for handle in self.store.regions() {
            let region = handle.status().region;
            let covers = |s: &KeyRange| {
                let start_ok = s.start.as_slice() >= region.start_key.as_slice();
                let end_ok = region.end_key.is_empty()
                    || match &s.end {
                        None => s.start < region.end_key,
                        Some(end) => !end.is_empty() && end.as_slice() <= region.end_key.as_slice(),
                    };
                start_ok && end_ok
            };
            if spans.iter().all(covers) {
                let writes = self.writes.entry(handle.region_id()).or_default().clone();
                return Ok((handle, writes));
            }
            if spans.iter().any(covers) {
                return Err(Error::CrossRegion);
            }
        }
        Err(Error::NoRegion(first))
    }

    /// Serves a Range. The header carries only the revision.
    pub async fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        check::check_range(req)?;
        let span = KeyRange::from_etcd(&req.key, &req.range_end);
        let (handle, writes) = self.region_for(std::slice::from_ref(&span))?;
        let current = if req.serializable {
            handle.status().applied_revision.max(1)
        } else {
            self.linearizable_revision(&handle, &writes).await?
        };
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
    /// that could commit at or below it has been applied here.
    async fn linearizable_revision(
        &self,
        handle: &RegionHandle,
        writes: &RegionWrites,
    ) -> Result<i64> {
        retry(|| handle.read_index()).await?;
        let current = self.pd.current_revision().await?;
        writes.inflight.wait_resolved(current).await;
        Ok(current)
    }

    /// Serves Put, DeleteRange and Txn.
    pub async fn write(&self, req: &WriteRequest) -> Result<WriteResponse> {
        match req {
            WriteRequest::Put(p) => check::check_put(p)?,
            WriteRequest::DeleteRange(d) => check::check_delete(d)?,
            WriteRequest::Txn(t) => check::check_txn(t)?,
        }
        let spans = write_spans(req);
        let (handle, writes) = self.region_for(&spans)?;
        let latch_set = if spans.iter().all(|s| s.end.is_none()) {
            LatchSet::Keys(spans.into_iter().map(|s| s.start).collect())
        } else {
            LatchSet::Everything
        };
        let _latches = writes.latches.acquire(latch_set).await;
        let deadline = Instant::now() + RETRY_DEADLINE;
        loop {
            match self.write_once(req, &handle, &writes).await {
                Err(Error::Region(e)) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
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
        let inflight = writes.inflight.register();
        let (rev, applied) = {
            let _seq = writes.sequencer.lock().await;
            let rev = self.pd.alloc_revisions(1).await?;
            inflight.set_revision(rev);
            let cmd = RaftCmdRequest {
                header: Some(header(&status.region)),
                cmd: Some(Cmd::Write(proto::raft_cmdpb::WriteRequest {
                    revision: rev,
                    mutations: eval.mutations,
                })),
            };
            (rev, handle.submit(cmd)?)
        };
        applied.await?;
        exec::fill_revisions(&mut response, rev, rev - 1);
        Ok(response)
    }

    /// etcd Compact: returns the current revision for the response header.
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<i64> {
        let span = KeyRange::from_etcd(b"\0", b"\0");
        let (handle, writes) = self.region_for(std::slice::from_ref(&span))?;
        let current = self.linearizable_revision(&handle, &writes).await?;
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
        retry(|| handle.propose(cmd.clone()))
            .await
            .map_err(|e| match e {
                raftstore::Error::Mvcc(m) => Error::Mvcc(m),
                e => Error::Region(e),
            })?;
        if physical {
            handle.wait_physically_compacted(revision).await?;
        }
        Ok(current)
    }

    /// Hash of the KV history up to `revision` (0 = current) with the
    /// compaction revision and the revision hashed.
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let span = KeyRange::from_etcd(b"\0", b"\0");
        let (handle, writes) = self.region_for(std::slice::from_ref(&span))?;
        let current = self.linearizable_revision(&handle, &writes).await?;
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

/// Retries region errors until [`RETRY_DEADLINE`].
async fn retry<F, Fut>(mut op: F) -> std::result::Result<(), raftstore::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), raftstore::Error>>,
{
    let deadline = Instant::now() + RETRY_DEADLINE;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
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
