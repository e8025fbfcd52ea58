//! HashKV over many regions: [`Router::hash_kv`] and the leader's side of
//! a forwarded region hash ([`Router::serve_forwarded_hash`]).

use mvcc::exec::ReadBounds;
use mvcc::{KeyRange, RangeHash};
use proto::forwardpb::RequestHeader;
use raftstore::RegionHandle;

use crate::forward::{span_bounds, RegionHash};
use crate::leader::check_spans;
use crate::locate::Location;
use crate::router::retrying;
use crate::{Error, Result, Router};

impl Router {
    /// HashKV of the whole keyspace at `revision` (0 = current): the
    /// CRC32 of the keyspace's hash stream (mvcc's range hash: every key's
    /// versions up to the revision, in key order), with the highest
    /// compaction revision of the regions and the revision hashed. Each
    /// region's part is hashed by a replica: this node's own if it has one
    /// (at the leader's linearizable revision, through a read index on a
    /// follower), otherwise the leader's node over forwarding. The parts
    /// combine in key order into the CRC32 of the one stream
    /// ([`mvcc::RangeHash::combine`]), so the answer does not depend on
    /// how the keyspace is cut into regions nor on which node is asked:
    /// healthy nodes answer the same hash for the same revision. The
    /// revision is fixed by the first region (0 resolves to its current
    /// revision); later ones hash at it, their current revision being at
    /// least as high.
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let everything = KeyRange::from_etcd(b"\0", b"\0");
        self.with_pieces(&everything, |pieces| async move {
            let mut combined = RangeHash::default();
            let mut compacted = 0;
            let mut at = revision;
            for piece in &pieces {
                let part = self.hash_region(piece, at).await?;
                at = part.revision;
                compacted = compacted.max(part.compact_revision);
                combined = combined.combine(part.hash);
            }
            Ok((combined.crc, compacted, at))
        })
        .await
    }

    /// The hash of the keys of `span`, which lie in one region, at
    /// `revision` (see [`Router::hash_kv`]).
    async fn hash_region(&self, span: &KeyRange, revision: i64) -> Result<RegionHash> {
        let spans = std::slice::from_ref(span);
        let local = retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, leader) => {
                    let (current, _) = leader.linearizable_revision(&handle).await?;
                    Ok(Ok((handle, current)))
                }
                Location::Follower(handle, target) => {
                    let current = self.follower_revision(&handle, &target).await?;
                    Ok(Ok((handle, current)))
                }
                Location::Remote(target) => self
                    .forwarded(&target, self.forwarder.hash(&target, span, revision))
                    .await
                    .map(Err),
            }
        })
        .await?;
        match local {
            Ok((handle, current)) => self.hash_local(handle, span, current, revision).await,
            Err(remote) => Ok(remote),
        }
    }

    /// This node's replica's hash of the keys of `span` at `revision`,
    /// with `current` the newest revision it may ask for, off the async
    /// threads.
    async fn hash_local(
        &self,
        handle: RegionHandle,
        span: &KeyRange,
        current: i64,
        revision: i64,
    ) -> Result<RegionHash> {
        let (lower, upper) = span_bounds(span);
        let span = span.clone();
        let mvcc = self.mvcc.clone();
        tokio::task::spawn_blocking(move || {
            let view = mvcc.snapshot();
            let state = handle.read_state(&view)?;
            // The region as of the view hashed: one split since the
            // replica was located is caught here, not hashed half.
            check_spans(&state.region, std::slice::from_ref(&span))?;
            let compacted = state.compact_revision;
            let rev = ReadBounds { current, compacted }.resolve(revision)?;
            let hash = view.range_hash(rev, compacted, &lower, &upper)?;
            Ok::<_, Error>(RegionHash {
                hash,
                compact_revision: compacted,
                revision: rev,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("hashing task failed: {e}")))?
    }

    /// Leader side of a forwarded HashKV of the keys of `span` (from a
    /// node without a replica of the region): hashed here at `revision`,
    /// 0 meaning this leader's linearizable revision.
    pub async fn serve_forwarded_hash(
        &self,
        header: Option<&RequestHeader>,
        span: &KeyRange,
        revision: i64,
    ) -> Result<RegionHash> {
        let handle = self.forwarded_leader(header)?;
        self.check_forwarded_spans(&handle, std::slice::from_ref(span))?;
        let leader = self.region_leader(handle.region_id());
        let (current, _) = leader.linearizable_revision(&handle).await?;
        self.hash_local(handle, span, current, revision).await
    }
}
