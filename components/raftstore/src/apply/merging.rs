//! Applying the merge commands (see the `merge` module for what each
//! decides): freezing a source for its merge, and a target committing or
//! refusing to take it over, with the merge records that make the decision
//! durable and idempotent.

use engine::cf;
use prost::Message as _;
use proto::raft_cmdpb::{CommitMergeRequest, PrepareMergeRequest, RejectMergeRequest};
use proto::raft_serverpb::{MergeRecord, PeerState};
use raft::eraftpb::Entry;
use tracing::info;

use super::Run;
use crate::keys;
use crate::merge::{self, Decided};
use crate::split;
use crate::{Error, Result};

impl Run<'_> {
    /// Freezes the region for a merge (see the `merge` module).
    pub(super) fn apply_prepare_merge(
        &mut self,
        req: &PrepareMergeRequest,
        e: &Entry,
    ) -> Result<()> {
        let (region, state) = merge::prepare(
            self.region(),
            self.merging.as_ref(),
            !self.locks.is_empty(),
            (e.index, e.term),
            req,
        )?;
        info!(
            region_id = region.id,
            target = state.target.as_ref().map_or(0, |t| t.id),
            index = e.index,
            "merge prepared: region frozen"
        );
        self.merging = Some(state);
        self.merging_changed = true;
        self.stage_region_state(&region, PeerState::Merging);
        self.outcome.region = Some(region);
        Ok(())
    }

    /// The merge record of `source_id`, whose range ended at `end_key`, as
    /// of the entry being applied.
    fn merge_record(
        &self,
        end_key: &[u8],
        source_id: u64,
    ) -> Result<(Vec<u8>, Option<MergeRecord>)> {
        let key = keys::merge_record_key(end_key, source_id);
        if let Some((_, r)) = self.merge_records.iter().rev().find(|(k, _)| *k == key) {
            return Ok((key, Some(*r)));
        }
        let stored = self
            .kv
            .get(cf::META, &key)?
            .map(|raw| MergeRecord::decode(raw.as_slice()))
            .transpose()?;
        Ok((key, stored))
    }

    fn stage_merge_record(&mut self, key: Vec<u8>, record: MergeRecord) {
        self.kv
            .put_to(&mut self.wb, cf::META, &key, &record.encode_to_vec());
        self.merge_records.push((key, record));
    }

    /// `StaleCommand` unless the region owns `key` (a merge step went to
    /// the region that owns the source's end key, as the sender saw it).
    fn check_owns(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() || !split::contains(self.region(), key) {
            return Err(Error::StaleCommand(format!(
                "key {:?} is not in region {}",
                String::from_utf8_lossy(key),
                self.region().id
            )));
        }
        Ok(())
    }

    /// Decides a merge's commit (see the `merge` module).
    pub(super) fn apply_commit_merge(&mut self, req: &CommitMergeRequest) -> Result<()> {
        let source = req.source.clone().unwrap_or_default();
        self.check_owns(&source.end_key)?;
        let (key, record) = self.merge_record(&source.end_key, source.id)?;
        let refused = MergeRecord {
            source_id: source.id,
            prepare_index: req.prepare_index,
            committed: false,
            target_id: 0,
        };
        let merged =
            match merge::commit(self.region(), self.merging.is_some(), record.as_ref(), req) {
                Decided::AlreadyCommitted => return Ok(()),
                Decided::Refused => {
                    if record.is_none() {
                        info!(
                            source_id = source.id,
                            region_id = self.region().id,
                            "merge refused"
                        );
                        self.stage_merge_record(key, refused);
                    }
                    return Err(Error::MergeRefused(format!(
                        "region {} does not take region {} over",
                        self.region().id,
                        source.id
                    )));
                }
                Decided::Committed(merged) => merged,
            };
        let source_state = match (self.source_state)(&source, req.prepare_index, req.prepare_term) {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Nothing of this entry is staged yet: the run ends before
                // it, and the replica applies it again later.
                self.outcome.waiting_source = true;
                return Ok(());
            }
            Err(e) => {
                self.outcome.aborted = true;
                return Err(e);
            }
        };
        let state = &mut self.outcome.apply_state;
        state.applied_revision = state.applied_revision.max(source_state.applied_revision);
        if source_state.compact_revision != state.compact_revision {
            // One side's history is not compacted as far as the other's.
            let compact = state.compact_revision.max(source_state.compact_revision);
            state.compact_revision = compact;
            state.pending_compact_revision = compact;
            self.outcome.compaction = Some(compact);
        }
        self.stage_merge_record(
            key,
            MergeRecord {
                committed: true,
                target_id: merged.id,
                ..refused
            },
        );
        self.stage_region_state(&source, PeerState::Tombstone);
        self.stage_region_state(&merged, PeerState::Normal);
        info!(
            region_id = merged.id,
            source_id = source.id,
            start_key = ?String::from_utf8_lossy(&merged.start_key),
            version = merged.region_epoch.unwrap_or_default().version,
            "merge committed: region took its left neighbour over"
        );
        self.outcome.merged_sources.push(source.id);
        self.outcome.region = Some(merged);
        Ok(())
    }

    /// Settles a merge as refused unless it was committed (see the `merge`
    /// module).
    pub(super) fn apply_reject_merge(&mut self, req: &RejectMergeRequest) -> Result<()> {
        self.check_owns(&req.source_end_key)?;
        let (key, record) = self.merge_record(&req.source_end_key, req.source_id)?;
        if merge::reject(record.as_ref(), req.prepare_index) {
            return Ok(());
        }
        if record.is_none() {
            info!(
                source_id = req.source_id,
                region_id = self.region().id,
                "merge rejected"
            );
            self.stage_merge_record(
                key,
                MergeRecord {
                    source_id: req.source_id,
                    prepare_index: req.prepare_index,
                    committed: false,
                    target_id: 0,
                },
            );
        }
        Err(Error::MergeRefused(format!(
            "the merge of region {} is rejected",
            req.source_id
        )))
    }
}
