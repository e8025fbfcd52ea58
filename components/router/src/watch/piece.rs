//! One region's part of a watch: the changes of the watched keys the
//! region holds, caught up from MVCC and then followed through this node's
//! replica's change feed (`raftstore::feed`), kept until the aggregator
//! (`super`) delivers them.

use std::collections::BTreeMap;

use mvcc::{KeyRange, MvccStore};
use proto::mvccpb::{event::EventType, Event, KeyValue};
use proto::raft_cmdpb::{mutation::Op, Mutation};
use raftstore::feed::{AppliedRun, FeedEvent, FeedReceiver};
use raftstore::RegionHandle;
use tokio::sync::broadcast::error::RecvError;

use crate::leader::check_spans;
use crate::{Error, Result, Router};

/// Why a piece cannot go on: the watch takes its regions again.
#[derive(Debug)]
pub(super) enum PieceEnd {
    /// The region changed (split, merge, snapshot, replica gone) or the
    /// feed lagged: catch up from MVCC again.
    LayoutChanged,
    Failed(Error),
}

pub(super) struct Piece {
    handle: RegionHandle,
    span: KeyRange,
    feed: FeedReceiver,
    mvcc: MvccStore,
    prev_kv: bool,
    /// The changes of the log up to this index are in `pending` (or
    /// delivered, or below the watch's start).
    applied_index: u64,
    /// No change at or below this revision can still come from the
    /// region (its replica's own bound).
    resolved: i64,
    /// Changes not delivered yet, by (revision, sub-revision).
    pending: BTreeMap<(i64, u32), Event>,
}

impl Piece {
    /// Starts following the keys of `span` (in `handle`'s region) from
    /// revision `from`: subscribes to the replica's feed, then reads the
    /// changes it already applied from one MVCC snapshot (the feed repeats
    /// the runs up to that snapshot; they are skipped). `Ok(Err(c))`: the
    /// region is compacted at `c`, above `from`.
    pub fn start(
        router: &Router,
        handle: RegionHandle,
        span: KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Result<std::result::Result<Piece, i64>> {
        let feed = handle.subscribe_changes();
        let mvcc = router.mvcc.clone();
        let view = mvcc.snapshot();
        let state = handle.read_state(&view)?;
        check_spans(&state.region, std::slice::from_ref(&span))?;
        if from < state.compact_revision {
            return Ok(Err(state.compact_revision));
        }
        let resolved = handle.resolved_revision(&view, &state)?;
        // Up to every revision: a transaction's commit may be applied at
        // a revision above the region's applied revision.
        let mut pending = BTreeMap::new();
        for (sub, event) in view.changes(&span, from, i64::MAX - 1, 0, prev_kv)? {
            let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            pending.insert((revision, sub), event);
        }
        drop(view);
        Ok(Ok(Piece {
            handle,
            span,
            feed,
            mvcc,
            prev_kv,
            applied_index: state.applied_index,
            resolved,
            pending,
        }))
    }

    pub fn region_id(&self) -> u64 {
        self.handle.region_id()
    }

    /// The revision at or below which the region can add no change: the
    /// replica's own bound, or the one its leader published once the
    /// replica's changes up to the index that came with it are here.
    pub fn resolved(&self, router: &Router) -> i64 {
        let published = router
            .published_resolved(self.handle.region_id())
            .filter(|(_, index)| *index <= self.applied_index)
            .map_or(0, |(revision, _)| revision);
        self.resolved.max(published)
    }

    /// The changes at or below `revision`, taken out: (revision, sub,
    /// event) in that order.
    pub fn take(&mut self, revision: i64) -> Vec<(i64, u32, Event)> {
        let later = self.pending.split_off(&(revision.saturating_add(1), 0));
        std::mem::replace(&mut self.pending, later)
            .into_iter()
            .map(|((rev, sub), event)| (rev, sub, event))
            .collect()
    }

    /// Takes the replica's next apply run; `Some` when the piece cannot
    /// go on. Cancel-safe.
    pub async fn recv(&mut self) -> Option<PieceEnd> {
        match self.feed.recv().await {
            Ok(FeedEvent::Applied(run)) => self.on_run(&run).err().map(PieceEnd::Failed),
            Ok(FeedEvent::Reset) | Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                Some(PieceEnd::LayoutChanged)
            }
        }
    }

    fn on_run(&mut self, run: &AppliedRun) -> Result<()> {
        if run.last_index <= self.applied_index {
            // Read from MVCC at the start already.
            return Ok(());
        }
        let view = self.prev_kv.then(|| self.mvcc.snapshot());
        for write in &run.writes {
            for m in write
                .mutations
                .iter()
                .filter(|m| self.span.contains(&m.key))
            {
                let prev_kv = match &view {
                    Some(view) => view.get(&m.key, write.revision - 1)?,
                    None => None,
                };
                self.pending
                    .insert((write.revision, m.sub), event(m, write.revision, prev_kv));
            }
        }
        self.applied_index = run.last_index;
        self.resolved = self.resolved.max(run.resolved);
        Ok(())
    }
}

/// etcd's event for mutation `m` written at `revision`.
fn event(m: &Mutation, revision: i64, prev_kv: Option<KeyValue>) -> Event {
    let (kind, kv) = match m.op() {
        Op::Put => (
            EventType::Put,
            KeyValue {
                key: m.key.clone(),
                create_revision: if m.create_revision == 0 {
                    revision
                } else {
                    m.create_revision
                },
                mod_revision: revision,
                version: m.version,
                value: m.value.clone(),
                lease: m.lease,
            },
        ),
        Op::Delete => (
            EventType::Delete,
            KeyValue {
                key: m.key.clone(),
                mod_revision: revision,
                ..Default::default()
            },
        ),
    };
    Event {
        r#type: kind as i32,
        kv: Some(kv),
        prev_kv,
    }
}
