//! Requests over many regions, and region split.
//!
//! Contract:
//! * [`Router::pieces`]: the regions covering a key range, in key order,
//!   each with the part of the range it owns. Regions are found among this
//!   node's initialized replicas first, then in the region cache (filled
//!   from PD); a key no region
//!   covers (PD has heard from only one side of a fresh split) is a
//!   retryable `NoRegion`. The pieces are a snapshot of the layout: a split
//!   after they were taken makes a piece span two regions, which the
//!   single-region path answers with `CrossRegion`, and callers take the
//!   pieces again.
//! * A Range over several regions is one read at one revision R: R is the
//!   oracle's current revision, taken before anything else (so it is at or
//!   above every write acknowledged before the read started); every piece
//!   is then read at R as a linearizable read of its region (each region
//!   waits until its writes at or below R are resolved, exactly as a
//!   single-region read does), and the answers are merged as one read of
//!   the whole range would answer (`mvcc::exec::merge_ranges`). A
//!   serializable Range over several regions is answered by this node's
//!   replicas alone at the lowest of their resolved revisions (`resolved`)
//!   when every region has one caught up here, and like a linearizable one
//!   otherwise.
//! * A Txn over several regions that changes nothing is a read at one
//!   revision R, like a Range: R from the oracle first, then every span it
//!   reads fetched at R (and its historical reads at their revisions) as
//!   linearizable reads of the pieces' regions, then the request evaluated
//!   against what came back (`read_across`); a historical read below the
//!   compaction revision fails the request only if its branch is taken, as
//!   in etcd. It takes no locks: values
//!   taken under transaction locks are the state at R only while the locks
//!   hold, and a slow coordinator's locks may be rolled back by the lock
//!   resolver without it noticing. If the evaluation changes something
//!   after all (a compare that failed under locks holds now), `CrossRegion`
//!   sends the caller back to the two-phase path.
//! * Writes over several regions commit through `txn` (two-phase, at one
//!   revision).
//! * `compact(R)` applies the compaction in every region (in key order);
//!   regions that had already compacted at R or later (a previous call
//!   that stopped half way) count as done, and `Compacted` comes back only
//!   if every region had.
//! * `split_region(id, key)`, on the region's ready leader only: takes the
//!   region's whole latch (so no write of the region is being evaluated or
//!   is in flight), new ids from PD, and proposes the split; returns the
//!   two regions once it is applied here.

use std::time::Instant;

use futures::future::try_join_all;
use mvcc::exec::{self, ReadBounds, WriteRequest, WriteResponse};
use mvcc::{FetchedView, KeyRange};
use proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use proto::metapb;
use proto::mvccpb::KeyValue;
use proto::raft_cmdpb::SplitRequest;

use crate::leader::READ_TIMEOUT;
use crate::txn::historical_reads;
use crate::{Error, Result, Router, MIN_BACKOFF, RETRY_DEADLINE};

/// A key range as etcd's `key` and `range_end`.
fn etcd_bounds(range: &KeyRange) -> (Vec<u8>, Vec<u8>) {
    let end = match &range.end {
        None => Vec::new(),
        Some(end) if end.is_empty() => vec![0],
        Some(end) => end.clone(),
    };
    (range.start.clone(), end)
}

impl Router {
    /// The parts of `span` each region owns (see the contract).
    pub(crate) async fn pieces(&self, span: &KeyRange) -> Result<Vec<KeyRange>> {
        Ok(self
            .region_pieces(span)
            .await?
            .into_iter()
            .map(|(_, piece)| piece)
            .collect())
    }

    /// The regions covering `span`, with their parts (see the contract).
    pub(crate) async fn region_pieces(
        &self,
        span: &KeyRange,
    ) -> Result<Vec<(metapb::Region, KeyRange)>> {
        let mut pieces = Vec::new();
        let mut cursor = span.start.clone();
        loop {
            let region = match self.replicas.find(&self.store, &cursor) {
                Some(h) => h.status().region,
                None => self.remote_region(&cursor, false).await?.region,
            };
            let region_end = region.end_key.clone();
            let last = match &span.end {
                None => true,
                Some(end) if end.is_empty() => region_end.is_empty(),
                Some(end) => region_end.is_empty() || end.as_slice() <= &region_end[..],
            };
            if last {
                let piece = KeyRange {
                    start: cursor,
                    end: span.end.clone(),
                };
                pieces.push((region, piece));
                return Ok(pieces);
            }
            let piece = KeyRange {
                start: cursor,
                end: Some(region_end.clone()),
            };
            pieces.push((region, piece));
            cursor = region_end;
        }
    }

    /// A Range over several regions (see the contract).
    pub(crate) async fn range_pieces(
        &self,
        req: &RangeRequest,
        pieces: Vec<KeyRange>,
    ) -> Result<RangeResponse> {
        let current = tokio::time::timeout(READ_TIMEOUT, self.pd.current_revision())
            .await
            .map_err(|_| Error::timed_out("the oracle's current revision"))??;
        if req.revision > current {
            return Err(mvcc::Error::FutureRev.into());
        }
        let mut template = exec::piece_request(req);
        template.revision = if req.revision > 0 {
            req.revision
        } else {
            current
        };
        template.serializable = false;
        let reads = pieces.iter().map(|piece| {
            let mut r = template.clone();
            (r.key, r.range_end) = etcd_bounds(piece);
            async move { self.range_in_region(&r, piece).await }
        });
        let parts = try_join_all(reads).await?;
        let mut resp = exec::merge_ranges(req, parts);
        resp.header = Some(ResponseHeader {
            revision: current,
            ..Default::default()
        });
        Ok(resp)
    }

    /// A Txn over several regions that changes nothing, read without locks
    /// at one revision (see the contract): `CrossRegion` if it would
    /// change something.
    pub(crate) async fn read_across(
        &self,
        req: &WriteRequest,
        spans: &[KeyRange],
    ) -> Result<WriteResponse> {
        let current = tokio::time::timeout(READ_TIMEOUT, self.pd.current_revision())
            .await
            .map_err(|_| Error::timed_out("the oracle's current revision"))??;
        let mut view = FetchedView::default();
        let latest = spans.iter().map(|span| async move {
            match self.read_span_at(span, current).await {
                // A compaction above R came in since R was taken: the
                // pieces cannot all be read at R, take a new one.
                Err(Error::Mvcc(mvcc::Error::Compacted)) => Err(Error::Region(
                    raftstore::Error::StaleCommand("compacted past the read's revision".into()),
                )),
                other => other,
            }
        });
        for kvs in try_join_all(latest).await? {
            view.insert(i64::MAX, kvs);
        }
        // A read above R fails the evaluation (a future revision).
        let historical = historical_reads(req)
            .into_iter()
            .filter(|(_, revision)| *revision <= current);
        let historical = historical.map(|(span, revision)| async move {
            match self.read_span_at(&span, revision).await {
                Ok(kvs) => Ok((revision, Some(kvs))),
                // An error only if the evaluation takes the branch that
                // reads there, as etcd answers.
                Err(Error::Mvcc(mvcc::Error::Compacted)) => Ok((revision, None)),
                Err(e) => Err(e),
            }
        });
        let mut compacted = 0;
        for (revision, kvs) in try_join_all(historical).await? {
            match kvs {
                Some(kvs) => view.insert(revision, kvs),
                None => compacted = compacted.max(revision + 1),
            }
        }
        let bounds = ReadBounds { current, compacted };
        let eval = exec::evaluate(&view, req, bounds, &mvcc::lease::NoLeases)?;
        if !eval.mutations.is_empty() {
            return Err(Error::CrossRegion);
        }
        let mut response = eval.response;
        exec::fill_revisions(&mut response, current, current);
        Ok(response)
    }

    /// The live keys of `span` at `revision`, each piece read as a
    /// linearizable read of its region.
    async fn read_span_at(&self, span: &KeyRange, revision: i64) -> Result<Vec<KeyValue>> {
        let pieces = self.pieces(span).await?;
        let reads = pieces.iter().map(|piece| async move {
            let mut r = RangeRequest {
                revision,
                ..Default::default()
            };
            (r.key, r.range_end) = etcd_bounds(piece);
            Ok::<_, Error>(self.range_in_region(&r, piece).await?.kvs)
        });
        Ok(try_join_all(reads).await?.into_iter().flatten().collect())
    }

    /// A serializable Range over several regions from this node's replicas
    /// alone, at the lowest of their resolved revisions (see `resolved`);
    /// `None` if some region has no replica here caught up to its resolved
    /// revision, or the request asks for a newer revision, or a compaction
    /// passed it — the caller then reads as a linearizable Range does.
    pub(crate) fn range_pieces_resolved(
        &self,
        req: &RangeRequest,
        pieces: &[KeyRange],
    ) -> Result<Option<RangeResponse>> {
        let mut local = Vec::with_capacity(pieces.len());
        let mut at = i64::MAX;
        for piece in pieces {
            let Some(handle) = self.replicas.find(&self.store, &piece.start) else {
                return Ok(None);
            };
            let Some(resolved) = self.resolved_revision(&handle) else {
                return Ok(None);
            };
            at = at.min(resolved);
            local.push(handle);
        }
        if req.revision > at || local.iter().any(|h| h.status().compact_revision > at) {
            return Ok(None);
        }
        let template = exec::piece_request(req);
        let mut parts = Vec::with_capacity(pieces.len());
        for (piece, handle) in pieces.iter().zip(&local) {
            let mut r = template.clone();
            (r.key, r.range_end) = etcd_bounds(piece);
            match self.read_local(handle, &r, Some(at)) {
                // A compaction above `at` moved the read up (see
                // `read_local`): the pieces would not share a revision.
                Ok(part) if part.header.as_ref().map(|h| h.revision) != Some(at) => {
                    return Ok(None)
                }
                Ok(part) => parts.push(part),
                // Split since the pieces were taken: the linearizable path
                // takes them again.
                Err(Error::Region(raftstore::Error::EpochNotMatch { .. })) => return Ok(None),
                Err(e) => return Err(e),
            }
        }

        let mut resp = exec::merge_ranges(req, parts);
        resp.header = Some(ResponseHeader {
            revision: at,
            ..Default::default()
        });
        Ok(Some(resp))
    }

    /// Runs `op` on the pieces of `span` (in key order) until it does not
    /// meet a changed region layout (a piece spanning regions or whose
    /// region split or merged since the pieces were taken), or
    /// [`RETRY_DEADLINE`] passes. `op` must be safe to run again after
    /// such a failure: a read, or a write whose repeat changes nothing.
    pub(crate) async fn with_pieces<T, F, Fut>(&self, span: &KeyRange, mut op: F) -> Result<T>
    where
        F: FnMut(Vec<KeyRange>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + RETRY_DEADLINE;
        loop {
            let pieces = crate::router::retrying(|| self.pieces(span)).await?;
            match op(pieces).await {
                Err(e) if e.layout_changed() && Instant::now() < deadline => {
                    tokio::time::sleep(MIN_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// Splits region `region_id` at `split_key` on this node's ready
    /// leader (see the contract): the region and the new one.
    pub async fn split_region(
        &self,
        region_id: u64,
        split_key: Vec<u8>,
    ) -> Result<(metapb::Region, metapb::Region)> {
        let handle = self
            .store
            .region(region_id)
            .ok_or(Error::Region(raftstore::Error::RegionNotFound(region_id)))?;
        let peers = handle.status().region.peers.len();
        let new_region_id = self.pd.alloc_id().await?;
        let mut new_peer_ids = Vec::with_capacity(peers);
        for _ in 0..peers {
            new_peer_ids.push(self.pd.alloc_id().await?);
        }
        let req = SplitRequest {
            split_key,
            new_region_id,
            new_peer_ids,
        };
        let leader = self.region_leader(region_id);
        let region = leader.split(&handle, req).await?;
        let new_region = self
            .store
            .region(new_region_id)
            .map(|h| h.status().region)
            .ok_or(Error::Region(raftstore::Error::RegionNotFound(
                new_region_id,
            )))?;
        Ok((region, new_region))
    }
}
