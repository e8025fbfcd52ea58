//! Physical compaction of a region's MVCC history, in the background.
//!
//! A compaction command is logical when applied: it sets the region's
//! compaction revision (reads below it fail from then on) and records the
//! same revision as pending in the apply state, in the apply batch. The
//! physical clean-up ([`spawn`]: `MvccStore::compact` over the region's key
//! range, dropping the versions no read can see any more) runs on a thread
//! of its own so apply is not held up, and reports back through `done`.
//!
//! Contract and edge cases:
//! * [`finish`] clears the pending revision (and persists the apply state,
//!   without sync) only if it is still the one that finished: a later
//!   compaction may have replaced it, and stays pending until its own
//!   clean-up is done. It then publishes the revision in
//!   `physically_compacted`, which only ever increases.
//! * A clean-up that fails, a thread that cannot start, or a process that
//!   stops first leaves the revision pending: the replica starts it again
//!   when it starts. A replica that installs a snapshot redoes the
//!   snapshot's compaction, as the leader's clean-up may not be done.
//! * Failures here are logged, never fatal: the data stays correct, only
//!   larger.

use engine::{cf, KvEngine, WriteBatch};
use mvcc::MvccStore;
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::RaftApplyState;
use tokio::sync::watch;
use tracing::{error, info};

use crate::keys;

/// Starts the physical clean-up of compaction `revision` over `region`'s
/// key range on its own thread; `done` runs there once it succeeded.
pub(crate) fn spawn(
    mvcc: MvccStore,
    region: &metapb::Region,
    revision: i64,
    done: impl FnOnce() + Send + 'static,
) {
    let (start, end) = (region.start_key.clone(), region.end_key.clone());
    let region_id = region.id;
    std::thread::Builder::new()
        .name(format!("compact-{region_id}"))
        .spawn(move || match mvcc.compact(revision, &start, &end) {
            Ok(stats) => {
                info!(region_id, revision, ?stats, "compaction finished");
                done();
            }
            // Retried at the next restart: the pending revision stays.
            Err(e) => error!(region_id, revision, "compaction failed: {e}"),
        })
        .map(|_| ())
        .unwrap_or_else(|e| error!(region_id, "cannot start compaction thread: {e}"));
}

/// Records that the clean-up of compaction `revision` of region
/// `region_id` finished (see the module docs).
pub(crate) fn finish(
    kv: &KvEngine,
    region_id: u64,
    apply_state: &mut RaftApplyState,
    physically_compacted: &watch::Sender<i64>,
    revision: i64,
) {
    if apply_state.pending_compact_revision == revision {
        apply_state.pending_compact_revision = 0;
        let mut wb = WriteBatch::default();
        kv.put_to(
            &mut wb,
            cf::META,
            &keys::apply_state_key(region_id),
            &apply_state.encode_to_vec(),
        );
        if let Err(e) = kv.write(wb) {
            error!(region_id, "persisting compaction state: {e}");
        }
    }
    physically_compacted.send_if_modified(|done| {
        let advanced = revision > *done;
        if advanced {
            *done = revision;
        }
        advanced
    });
}
