//! One region's part of a watch: the changes of the watched keys the
//! region holds, caught up from MVCC and then followed through this node's
//! replica's change feed (`raftstore::feed`) — or, without a replica
//! here, asked of the region's leader's node (`super::remote`) — kept
//! until the aggregator (`super`) delivers them.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use mvcc::{KeyRange, MvccStore};
use proto::mvccpb::{event::EventType, Event, KeyValue};
use proto::raft_cmdpb::{mutation::Op, Mutation};
use raftstore::feed::{AppliedRun, FeedEvent, FeedReceiver};
use raftstore::RegionHandle;
use tokio::sync::broadcast::error::RecvError;

use super::remote::REMOTE_POLL;
use crate::forward::RegionChanges;
use crate::leader::check_spans;
use crate::{Error, Result, Router};

/// Why a piece cannot go on: the watch takes its regions again.
#[derive(Debug)]
pub(super) enum PieceEnd {
    /// The region changed (split, merge, snapshot, replica gone) or the
    /// feed lagged: catch up from MVCC again.
    LayoutChanged,
    /// The region is compacted above the revision the watch was at.
    Compacted(i64),
    Failed(Error),
}

pub(super) struct Piece {
    region_id: u64,
    span: KeyRange,
    prev_kv: bool,
    /// No change at or below this revision can still come from the
    /// region (the replica's own bound, or the one its leader answered).
    resolved: i64,
    /// Changes not delivered yet, by (revision, sub-revision).
    pending: BTreeMap<(i64, u32), Event>,
    source: Source,
}

/// Where a piece's changes come from.
enum Source {
    Local {
        handle: RegionHandle,
        feed: FeedReceiver,
        mvcc: MvccStore,
        /// The changes of the log up to this index are in `pending` (or
        /// delivered, or below the watch's start).
        applied_index: u64,
    },
    /// The answers of the region's leader's node, asked every
    /// [`REMOTE_POLL`] by a task of the piece's own (so that a busy local
    /// region's feed cannot keep cancelling the asking).
    Remote {
        answers: mpsc::Receiver<Result<RegionChanges>>,
        _task: AbortOnDrop,
    },
    /// A batch of a long history read from this node's replica: every
    /// change of the piece up to `cap` is in `pending`. Once the watch
    /// delivered up to `cap` it takes its regions again and reads on.
    Backlog { cap: i64 },
}

/// How many changes a piece reads from MVCC at once when it catches up:
/// more history than this is read batch by batch, one round each, so a
/// watch's memory stays bounded however far back it starts.
const CATCH_UP_BATCH: usize = 1024;

impl Piece {
    /// Starts following the keys of `span` (in `handle`'s region) from
    /// revision `from`: subscribes to the replica's feed, then reads the
    /// changes it already applied from one MVCC snapshot (the feed repeats
    /// the runs up to that snapshot; they are skipped). More than
    /// [`CATCH_UP_BATCH`] changes make it a backlog piece holding the
    /// first batch, without the feed. `Ok(Err(c))`: the region is
    /// compacted at `c`, above `from`.
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
        let mut changes = view.changes(&span, from, i64::MAX - 1, CATCH_UP_BATCH + 1, prev_kv)?;
        if changes.len() > CATCH_UP_BATCH {
            // The replica's own bound stays at its last single-region
            // write while only transactions over several regions commit
            // there; the one its leader published covers those.
            let published = router
                .published_resolved(handle.region_id())
                .filter(|(_, index)| *index <= state.applied_index)
                .map_or(0, |(revision, _)| revision);
            let bound = resolved.max(published);
            match first_batch(&view, &span, changes, prev_kv, bound)? {
                Some((cap, batch)) => {
                    return Ok(Ok(Piece {
                        region_id: handle.region_id(),
                        span,
                        prev_kv,
                        resolved: cap,
                        pending: batch.into_iter().map(keyed).collect(),
                        source: Source::Backlog { cap },
                    }))
                }
                // Not known to be complete yet: everything at once.
                None => changes = view.changes(&span, from, i64::MAX - 1, 0, prev_kv)?,
            }
        }
        drop(view);
        Ok(Ok(Piece {
            region_id: handle.region_id(),
            span,
            prev_kv,
            resolved,
            pending: changes.into_iter().map(keyed).collect(),
            source: Source::Local {
                handle,
                feed,
                mvcc,
                applied_index: state.applied_index,
            },
        }))
    }

    /// Whether this piece is a batch of history that the watch has
    /// delivered up to `delivered` (it then takes its regions again).
    pub fn backlog_done(&self, delivered: i64) -> bool {
        matches!(self.source, Source::Backlog { cap } if delivered >= cap)
    }

    /// Starts following the keys of `span` in region `region_id`, which
    /// has no replica here, from revision `from`: a task asks the region's
    /// leader's node at once, then every [`REMOTE_POLL`] after each
    /// answer, for the changes after the last resolved revision.
    pub fn start_remote(
        router: &Arc<Router>,
        region_id: u64,
        span: KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Piece {
        let (tx, answers) = mpsc::channel(1);
        let task = tokio::spawn({
            let router = Arc::downgrade(router);
            let span = span.clone();
            async move {
                let mut from = from;
                loop {
                    let Some(router) = router.upgrade() else {
                        return;
                    };
                    let answer = router.remote_changes(&span, from, prev_kv).await;
                    drop(router);
                    if let Ok(a) = &answer {
                        from = from.max(a.resolved + 1);
                    }
                    let failed = answer.is_err();
                    if tx.send(answer).await.is_err() || failed {
                        return;
                    }
                    tokio::time::sleep(REMOTE_POLL).await;
                }
            }
        });
        Piece {
            region_id,
            span,
            prev_kv,
            resolved: from - 1,
            pending: BTreeMap::new(),
            source: Source::Remote {
                answers,
                _task: AbortOnDrop(task),
            },
        }
    }

    pub fn region_id(&self) -> u64 {
        self.region_id
    }

    /// This node's replica, if the piece follows one.
    pub fn local_replica(&self) -> Option<&RegionHandle> {
        match &self.source {
            Source::Local { handle, .. } => Some(handle),
            Source::Remote { .. } | Source::Backlog { .. } => None,
        }
    }

    /// The highest revision of a change waiting for delivery.
    pub fn highest_pending(&self) -> Option<i64> {
        self.pending
            .keys()
            .next_back()
            .map(|(revision, _)| *revision)
    }

    /// The revision at or below which the region can add no change: the
    /// replica's own bound, or the one its leader published once the
    /// replica's changes up to the index that came with it are here; for
    /// a region without a replica here, the leader's last answer.
    pub fn resolved(&self, router: &Router) -> i64 {
        let Source::Local { applied_index, .. } = &self.source else {
            // Remote: the leader's last answer; backlog: its batch.
            return self.resolved;
        };
        let published = router
            .published_resolved(self.region_id)
            .filter(|(_, index)| index <= applied_index)
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

    /// Takes the replica's next apply run, or the leader's node's next
    /// answer; `Some` when the piece cannot go on. Cancel-safe.
    pub async fn recv(&mut self) -> Option<PieceEnd> {
        let feed = match &mut self.source {
            Source::Local { feed, .. } => feed,
            Source::Remote { answers, .. } => {
                let answer = answers.recv().await;
                return self.on_answer(answer);
            }
            // The round ends once its batch is delivered.
            Source::Backlog { .. } => return std::future::pending().await,
        };
        match feed.recv().await {
            Ok(FeedEvent::Applied(run)) => self.on_run(&run).err().map(PieceEnd::Failed),
            Ok(FeedEvent::Reset) | Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                Some(PieceEnd::LayoutChanged)
            }
        }
    }

    /// Takes the leader's node's answer (`None`: its task ended).
    fn on_answer(&mut self, answer: Option<Result<RegionChanges>>) -> Option<PieceEnd> {
        match answer {
            Some(Ok(answer)) if answer.compact_revision > 0 => {
                Some(PieceEnd::Compacted(answer.compact_revision))
            }
            Some(Ok(answer)) => {
                for (sub, event) in answer.changes {
                    let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    if revision > self.resolved {
                        self.pending.insert((revision, sub), event);
                    }
                }
                self.resolved = self.resolved.max(answer.resolved);
                None
            }
            // Leader moved, region split or merged, a replica arrived
            // here, node unreachable: take the regions again.
            Some(Err(e)) if e.is_retryable() || e.layout_changed() => Some(PieceEnd::LayoutChanged),
            Some(Err(e)) => Some(PieceEnd::Failed(e)),
            None => Some(PieceEnd::LayoutChanged),
        }
    }

    fn on_run(&mut self, run: &AppliedRun) -> Result<()> {
        let Source::Local {
            mvcc,
            applied_index,
            ..
        } = &mut self.source
        else {
            return Ok(());
        };
        if run.last_index <= *applied_index {
            // Read from MVCC at the start already.
            return Ok(());
        }
        let view = self.prev_kv.then(|| mvcc.snapshot());
        for write in &run.writes {
            for m in write
                .mutations
                .iter()
                // Lease changes are not published; a key change is an event.
                .filter(|m| self.span.contains(&m.key) && matches!(m.op(), Op::Put | Op::Delete))
            {
                let prev_kv = match &view {
                    Some(view) => view.get(&m.key, write.revision - 1)?,
                    None => None,
                };
                self.pending
                    .insert((write.revision, m.sub), event(m, write.revision, prev_kv));
            }
        }
        *applied_index = run.last_index;
        self.resolved = self.resolved.max(run.resolved);
        Ok(())
    }
}

/// etcd's event for the change of a key `m` written at `revision` (lease
/// changes are filtered out before).
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
        Op::Delete | Op::Attach | Op::Revoke => (
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

/// Stops its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Changes read from MVCC: (sub-revision, event), in (revision, sub)
/// order.
type Changes = Vec<(u32, Event)>;

/// A change keyed by (revision, sub-revision).
fn keyed((sub, event): (u32, Event)) -> ((i64, u32), Event) {
    let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
    ((revision, sub), event)
}

/// The first batch of a history read `changes` found longer than
/// [`CATCH_UP_BATCH`] (`CATCH_UP_BATCH + 1` of them, from `view`): its
/// last revision cut off (left to the next batch), unless it is the only
/// one (then read whole), with the batch's last revision. `None` when the
/// region cannot tell yet that no change up to it is still to come
/// (`bound`, its resolved revision, is below).
fn first_batch(
    view: &mvcc::MvccSnapshot<'_>,
    span: &KeyRange,
    mut changes: Changes,
    prev_kv: bool,
    bound: i64,
) -> Result<Option<(i64, Changes)>> {
    let revision = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
    let last = changes.last().map_or(0, |(_, e)| revision(e));
    changes.retain(|(_, e)| revision(e) < last);
    let cap = match changes.last() {
        Some((_, e)) => revision(e),
        None => {
            changes = view.changes(span, last, last, 0, prev_kv)?;
            last
        }
    };
    Ok((bound >= cap).then_some((cap, changes)))
}
