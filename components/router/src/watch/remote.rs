//! A watched region without a replica on this node: its leader's node
//! answers the changes up to the region's resolved revision
//! ([`Router::serve_forwarded_watch_events`]), and the watch asks again
//! every [`REMOTE_POLL`] for the ones after.

use std::time::Duration;

use mvcc::KeyRange;
use proto::forwardpb::RequestHeader;

use crate::forward::RegionChanges;
use crate::leader::check_spans;
use crate::locate::Location;
use crate::{Error, Result, Router};

/// How often a watch asks a region's leader's node for new changes.
pub(super) const REMOTE_POLL: Duration = Duration::from_millis(100);

impl Router {
    /// Leader side of a watch on a node without a replica of the region:
    /// the changes of the keys of `span` from revision `from` up to the
    /// region's resolved revision (a read barrier and the oracle's current
    /// revision, lowered for transaction locks held, as
    /// `RegionLeader::read_index`), read from one MVCC snapshot once every
    /// write at or below it has applied here. `compact_revision` is set
    /// instead when `from` is below the region's compaction revision.
    pub async fn serve_forwarded_watch_events(
        &self,
        header: Option<&RequestHeader>,
        span: &KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Result<RegionChanges> {
        let handle = self.forwarded_leader(header)?;
        self.check_forwarded_spans(&handle, std::slice::from_ref(span))?;
        let ri = self
            .region_leader(handle.region_id())
            .read_index(&handle)
            .await?;
        handle.wait_applied(ri.applied_index).await?;
        let mvcc = self.mvcc.clone();
        let span = span.clone();
        tokio::task::spawn_blocking(move || {
            let view = mvcc.snapshot();
            let state = handle.read_state(&view)?;
            check_spans(&state.region, std::slice::from_ref(&span))?;
            if from < state.compact_revision {
                return Ok(RegionChanges {
                    compact_revision: state.compact_revision,
                    ..Default::default()
                });
            }
            let changes = view.changes(&span, from, ri.resolved, 0, prev_kv)?;
            Ok(RegionChanges {
                changes,
                resolved: ri.resolved,
                compact_revision: 0,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("watch read failed: {e}")))?
    }

    /// The changes of `span` (in one region without a replica here) from
    /// `from` on, from the region's leader's node.
    pub(super) async fn remote_changes(
        &self,
        span: &KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Result<RegionChanges> {
        let spans = std::slice::from_ref(span);
        match self.locate(spans).await? {
            Location::Remote(target) => {
                self.forwarded(
                    &target,
                    self.forwarder.watch_events(&target, span, from, prev_kv),
                )
                .await
            }
            // A replica arrived here: follow it instead.
            Location::Leader(..) | Location::Follower(..) => Err(Error::CrossRegion),
        }
    }
}
