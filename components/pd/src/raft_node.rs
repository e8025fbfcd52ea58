//! PD's raft group: one raft-rs `RawNode` per member, driven by a dedicated
//! thread (the Ready loop), over [`Storage`].
//!
//! The thread owns the `RawNode`; everything else talks to it through a
//! channel ([`RaftMsg`]) and reads what it publishes in [`Shared`]: the
//! applied state machine and the raft status including the leader lease.
//!
//! ## Leader lease
//!
//! The leader serves reads and allocations only while `now < lease_until`.
//! Every tick the ready leader issues a raft read-index request whose
//! context names the moment `sent` it was issued; raft answers it (a
//! `ReadState`) once a quorum has acknowledged a heartbeat sent at or after
//! `sent`. Each of those followers reset its election timer on receipt, and
//! with `check_quorum` a follower refuses to vote (also pre-vote) until
//! `election_tick` of its own ticks have passed since it last heard from the
//! leader. The tick loop never catches up missed ticks, so `election_tick`
//! ticks take at least `(election_tick - 1) * tick` of real time (the first
//! tick may come right after the receipt). Any new leader needs a vote from
//! one of those followers (quorums intersect; the old leader itself never
//! votes while it is leader), so none can be elected before
//! `sent + (election_tick - 1) * tick`. The lease ends one more tick
//! earlier, as a margin for clocks running at different rates:
//! `lease_until = sent + (election_tick - 2) * tick`. The lease is dropped
//! the moment this member stops being leader or its term changes.
//!
//! A member forgets when it last heard from the leader when it restarts, so
//! one that acknowledged a lease, crashed and came back quickly could vote
//! inside that lease. A (re)started member therefore ignores vote and
//! pre-vote requests for `election_tick * tick` after it starts, longer
//! than any lease it can have acknowledged before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use proto::pd_raftpb::{self, command::Cmd};
use proto::pdpb;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::{GetEntriesContext, RaftState, RawNode, StateRole, StorageError};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::client::{PdError, Result};
use crate::state::ClusterState;
use crate::storage::{Batch, Storage};

/// What the raft thread is asked to do.
pub(crate) enum RaftMsg {
    /// Replicate `cmd`; `tx` gets the outcome of applying it on this member.
    Propose {
        cmd: Cmd,
        tx: oneshot::Sender<Result<bool>>,
    },
    /// Messages from other members.
    Step(Vec<Message>),
    /// The transport could not deliver to this member (raft then probes
    /// instead of streaming appends).
    Unreachable(u64),
    /// Test hook: start an election now.
    Campaign,
    /// Whether a snapshot reached this member; a lost one is sent again.
    SnapshotStatus {
        to: u64,
        delivered: bool,
    },
    Stop,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct RaftStatus {
    pub leader_id: u64,
    pub term: u64,
    pub is_leader: bool,
    /// This leader has applied an entry of its own term, hence every entry
    /// of earlier terms.
    pub ready: bool,
    pub lease_until: Option<Instant>,
    /// The raft thread has stopped.
    pub stopped: bool,
}

/// State shared between the raft thread and the rest of PD.
pub(crate) struct Shared {
    pub self_id: u64,
    pub cluster_id: u64,
    pub status: Mutex<RaftStatus>,
    pub state: RwLock<ClusterState>,
    /// Every member; client URLs of others are learned from their raft
    /// traffic.
    pub members: RwLock<Vec<pdpb::Member>>,
    /// Test hook: drop all raft traffic in and out (a network partition).
    pub isolated: AtomicBool,
    /// Test hook: drop raft traffic to and from these members.
    pub blocked: Mutex<HashSet<u64>>,
}

impl Shared {
    pub fn member_name(&self, id: u64) -> Option<String> {
        self.members
            .read()
            .iter()
            .find(|m| m.member_id == id)
            .map(|m| m.name.clone())
    }

    pub fn not_leader(&self, leader_id: u64) -> PdError {
        if leader_id == 0 || leader_id == self.self_id {
            return PdError::NotLeader("this PD member is not the leader; leader unknown".into());
        }
        let name = self
            .member_name(leader_id)
            .unwrap_or_else(|| leader_id.to_string());
        let url = self
            .members
            .read()
            .iter()
            .find(|m| m.member_id == leader_id)
            .and_then(|m| m.client_urls.first().cloned())
            .unwrap_or_default();
        PdError::NotLeader(format!(
            "this PD member is not the leader; the leader is {name} {url}"
        ))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RaftConfig {
    pub tick: Duration,
    pub election_ticks: usize,
    /// Applied entries kept in the log before it is compacted; members
    /// further behind catch up from a snapshot.
    pub log_gc_threshold: u64,
}

impl RaftConfig {
    pub fn lease(&self) -> Duration {
        self.tick * (self.election_ticks.saturating_sub(2) as u32)
    }
}

fn store_err(e: PdError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// raft-rs's view of the log in [`Storage`], with the small pieces it asks
/// for often cached.
pub(crate) struct RaftStore {
    storage: Arc<Storage>,
    hs: HardState,
    cs: ConfState,
    truncated: (u64, u64),
    last_index: u64,
}

impl RaftStore {
    pub fn new(storage: Arc<Storage>) -> Result<(RaftStore, (u64, u64))> {
        let p = storage.load_raft()?;
        Ok((
            RaftStore {
                storage,
                hs: p.hard_state,
                cs: p.conf_state,
                truncated: p.truncated,
                last_index: p.last_index,
            },
            p.applied,
        ))
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hs.clone(),
            conf_state: self.cs.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        self.storage
            .entries(low, high, max_size.into())
            .map_err(store_err)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let e = self
            .storage
            .entries(idx, idx + 1, None)
            .map_err(store_err)?;
        e.first()
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // PD's state is small: a snapshot is the whole state machine as of
        // the last applied entry, built on demand.
        let (state, applied, cs) = self.storage.snapshot_state().map_err(store_err)?;
        if applied.0 < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot {
            data: state.encode_to_vec().into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = applied.0;
        meta.term = applied.1;
        meta.set_conf_state(cs);
        Ok(snap)
    }
}

/// Sends raft messages to other members without blocking the raft thread.
pub(crate) trait Transport: Send {
    fn send(&self, msgs: Vec<Message>);
}

pub(crate) struct RaftNode {
    raw: RawNode<RaftStore>,
    shared: Arc<Shared>,
    rx: Receiver<RaftMsg>,
    transport: Option<Box<dyn Transport>>,
    cfg: RaftConfig,
    /// request id -> (term proposed in, waiter).
    pending: HashMap<u64, (u64, oneshot::Sender<Result<bool>>)>,
    next_request_id: u64,
    applied: (u64, u64),
    /// Outstanding lease renewals: (read-index context, when issued).
    lease_reads: VecDeque<(u64, Instant)>,
    next_read_seq: u64,
    last_renew: Option<Instant>,
    /// The term the current lease (and pending proposals) belong to; 0 when
    /// not leader.
    leader_term: u64,
    lease_until: Option<Instant>,
    /// Until then this member grants no votes (see the module doc).
    no_votes_until: Instant,
}

impl RaftNode {
    pub fn new(
        store: RaftStore,
        applied: (u64, u64),
        shared: Arc<Shared>,
        rx: Receiver<RaftMsg>,
        transport: Option<Box<dyn Transport>>,
        cfg: RaftConfig,
    ) -> Result<RaftNode> {
        let single = store.cs.voters == [shared.self_id] && store.cs.learners.is_empty();
        let rc = raft::Config {
            id: shared.self_id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: (cfg.election_ticks / 5).max(1),
            applied: applied.0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        rc.validate()
            .map_err(|e| PdError::InvalidArgument(format!("raft config: {e}")))?;
        let mut raw = RawNode::new(
            &rc,
            store,
            &engine::raft_logger("pd_member", shared.self_id),
        )
        .map_err(|e| PdError::Storage(format!("cannot start PD raft: {e}")))?;
        if single {
            // Nobody else can win; no reason to wait an election timeout.
            let _ = raw.campaign();
        }
        Ok(RaftNode {
            raw,
            shared,
            rx,
            transport,
            pending: HashMap::new(),
            // Random so that an entry proposed by an earlier incarnation of
            // this member never answers a waiter of this one.
            next_request_id: rand::random::<u64>() >> 1,
            applied,
            lease_reads: VecDeque::new(),
            next_read_seq: 0,
            last_renew: None,
            leader_term: 0,
            lease_until: None,
            no_votes_until: Instant::now() + cfg.tick * (cfg.election_ticks as u32),
            cfg,
        })
    }

    pub fn run(mut self) {
        let tick = self.cfg.tick;
        let mut next_tick = Instant::now() + tick;
        // A single member elected itself in `new`: make that visible (and
        // commit its first entry) before waiting for anything.
        self.publish_status();
        if let Err(e) = self.on_ready() {
            error!(error = %e, "PD raft storage failed; this member stops");
            self.finish();
            return;
        }
        self.publish_status();
        'outer: loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(msg) => {
                    if !self.handle(msg) {
                        break;
                    }
                    for _ in 0..1024 {
                        match self.rx.try_recv() {
                            Ok(msg) => {
                                if !self.handle(msg) {
                                    break 'outer;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                // Never catch up missed ticks: the lease argument needs
                // ticks to be at least `tick` apart.
                next_tick = now + tick;
            }
            // Role changes caused by the steps above become visible before
            // this Ready's messages (e.g. votes) leave.
            self.publish_status();
            self.maybe_renew_lease();
            if let Err(e) = self.on_ready() {
                error!(error = %e, "PD raft storage failed; this member stops");
                break;
            }
            self.publish_status();
        }
        self.finish();
    }

    fn finish(&mut self) {
        for (_, (_, tx)) in self.pending.drain() {
            let _ = tx.send(Err(PdError::Closed));
        }
        let mut s = self.shared.status.lock();
        s.is_leader = false;
        s.ready = false;
        s.lease_until = None;
        s.stopped = true;
        info!("PD raft stopped");
    }

    /// `false`: stop.
    fn handle(&mut self, msg: RaftMsg) -> bool {
        match msg {
            RaftMsg::Stop => return false,
            RaftMsg::Propose { cmd, tx } => self.propose(cmd, tx),
            RaftMsg::Unreachable(id) => self.raw.report_unreachable(id),
            RaftMsg::Campaign => {
                if let Err(e) = self.raw.campaign() {
                    debug!(error = %e, "campaign refused");
                }
            }
            RaftMsg::SnapshotStatus { to, delivered } => {
                let status = if delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            RaftMsg::Step(msgs) => {
                let no_votes = Instant::now() < self.no_votes_until;
                for m in msgs {
                    if m.to != self.shared.self_id {
                        continue;
                    }
                    if no_votes
                        && matches!(
                            m.get_msg_type(),
                            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                        )
                    {
                        continue;
                    }
                    if let Err(e) = self.raw.step(m) {
                        debug!(error = %e, "raft message dropped");
                    }
                }
            }
        }
        true
    }

    fn propose(&mut self, cmd: Cmd, tx: oneshot::Sender<Result<bool>>) {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader {
            let _ = tx.send(Err(self.shared.not_leader(r.leader_id)));
            return;
        }
        let term = r.term;
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let data = pd_raftpb::Command {
            request_id: id,
            cmd: Some(cmd),
        }
        .encode_to_vec();
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => {
                self.pending.insert(id, (term, tx));
            }
            Err(e) => {
                let _ = tx.send(Err(PdError::NotLeader(format!("proposal dropped: {e}"))));
            }
        }
    }

    fn publish_status(&mut self) {
        let r = &self.raw.raft;
        let is_leader = r.state == StateRole::Leader;
        let term = r.term;
        let leader_id = r.leader_id;
        let ready = is_leader && self.applied.1 == term;
        let leader_term = if is_leader { term } else { 0 };
        if leader_term != self.leader_term {
            self.leader_term = leader_term;
            self.lease_until = None;
            self.lease_reads.clear();
            self.last_renew = None;
            // Proposals of an earlier term may still commit under the next
            // leader; their callers get an error and retry, which every PD
            // operation tolerates.
            let err = self.shared.not_leader(leader_id);
            for (_, (_, tx)) in self.pending.drain() {
                let _ = tx.send(Err(err.clone()));
            }
            info!(term, is_leader, leader_id, "PD raft role changed");
        }
        let mut s = self.shared.status.lock();
        s.leader_id = leader_id;
        s.term = term;
        s.is_leader = is_leader;
        s.ready = ready;
        s.lease_until = self.lease_until;
    }

    fn maybe_renew_lease(&mut self) {
        if self.leader_term == 0 || self.applied.1 != self.leader_term {
            return;
        }
        let now = Instant::now();
        if self
            .last_renew
            .is_some_and(|t| now.duration_since(t) < self.cfg.tick)
        {
            return;
        }
        self.next_read_seq += 1;
        self.lease_reads.push_back((self.next_read_seq, now));
        while self.lease_reads.len() > 64 {
            self.lease_reads.pop_front();
        }
        self.raw
            .read_index(self.next_read_seq.to_be_bytes().to_vec());
        self.last_renew = Some(now);
    }

    fn on_read_states(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(seq) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            let seq = u64::from_be_bytes(seq);
            let Some(pos) = self.lease_reads.iter().position(|(s, _)| *s == seq) else {
                continue;
            };
            let sent = self.lease_reads[pos].1;
            // Older renewals are superseded (and may never be answered).
            self.lease_reads.drain(..=pos);
            let until = sent + self.cfg.lease();
            if self.lease_until.is_none_or(|u| u < until) {
                self.lease_until = Some(until);
            }
        }
    }

    fn send(&self, mut msgs: Vec<Message>) {
        if msgs.is_empty() || self.shared.isolated.load(Ordering::Relaxed) {
            return;
        }
        {
            let blocked = self.shared.blocked.lock();
            if !blocked.is_empty() {
                msgs.retain(|m| !blocked.contains(&m.to));
            }
        }
        if let Some(t) = &self.transport {
            t.send(msgs);
        }
    }

    fn storage(&self) -> Arc<Storage> {
        self.raw.store().storage.clone()
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let storage = self.storage();
        let mut rd = self.raw.ready();
        // A leader may send before persisting (raft thesis 10.2.1).
        self.send(rd.take_messages());

        let mut batch = Batch::default();
        let mut done = Vec::new();
        let mut snap_meta = None;
        if !rd.snapshot().is_empty() {
            snap_meta = Some(self.install_snapshot(rd.snapshot(), &mut batch)?);
        }
        self.apply_entries(rd.take_committed_entries(), &mut batch, &mut done)?;
        let entries = rd.take_entries();
        batch.append(&entries)?;
        if let Some(hs) = rd.hs() {
            batch.put_hard_state(hs)?;
        }
        self.on_read_states(rd.take_read_states());
        storage.write(batch, true)?;
        {
            let store = self.raw.mut_store();
            if let Some((index, term, cs)) = snap_meta {
                store.truncated = (index, term);
                store.last_index = index;
                store.cs = cs;
            }
            if let Some(last) = entries.last() {
                store.last_index = last.index;
            }
            if let Some(hs) = rd.hs() {
                store.hs = hs.clone();
            }
        }
        self.send(rd.take_persisted_messages());

        let mut light = self.raw.advance(rd);
        let mut batch = Batch::default();
        if let Some(commit) = light.commit_index() {
            let store = self.raw.mut_store();
            store.hs.commit = commit;
            batch.put_hard_state(&store.hs)?;
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries(), &mut batch, &mut done)?;
        storage.write(batch, true)?;
        self.raw.advance_apply();

        for (tx, res) in done {
            let _ = tx.send(res);
        }
        self.maybe_compact(&storage)
    }

    fn install_snapshot(
        &mut self,
        snap: &Snapshot,
        batch: &mut Batch,
    ) -> Result<(u64, u64, ConfState)> {
        let meta = snap.get_metadata();
        let state = pd_raftpb::StateSnapshot::decode(&snap.data[..])
            .map_err(|e| PdError::Storage(format!("undecodable PD snapshot: {e}")))?;
        let (index, term) = (meta.index, meta.term);
        let cs = meta.get_conf_state().clone();
        batch.clear_log();
        batch.replace_state(&state);
        batch.put_applied(index, term);
        batch.put_truncated(index, term);
        batch.put_conf_state(&cs)?;
        *self.shared.state.write() = ClusterState::from_snapshot(state)?;
        self.applied = (index, term);
        info!(index, term, "PD snapshot installed");
        Ok((index, term, cs))
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        batch: &mut Batch,
        done: &mut Vec<(oneshot::Sender<Result<bool>>, Result<bool>)>,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // Readers may see applied changes before this batch is on disk:
        // they are committed, i.e. durable on a quorum, and replayed from
        // the log after a crash.
        let mut state = self.shared.state.write();
        for e in entries {
            if e.index <= self.applied.0 {
                continue;
            }
            if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                match pd_raftpb::Command::decode(&e.data[..]) {
                    Ok(pd_raftpb::Command {
                        request_id,
                        cmd: Some(cmd),
                    }) => {
                        let res = state.apply(cmd, batch);
                        if let Some((term, tx)) = self.pending.remove(&request_id) {
                            if term == e.term {
                                done.push((tx, res));
                            } else {
                                self.pending.insert(request_id, (term, tx));
                            }
                        }
                    }
                    // Every member skips the same bytes the same way.
                    Ok(_) => warn!(index = e.index, "empty PD command skipped"),
                    Err(err) => {
                        warn!(index = e.index, error = %err, "undecodable PD command skipped")
                    }
                }
            }
            self.applied = (e.index, e.term);
        }
        batch.put_applied(self.applied.0, self.applied.1);
        Ok(())
    }

    fn maybe_compact(&mut self, storage: &Storage) -> Result<()> {
        let truncated = self.raw.store().truncated.0;
        if self.applied.0 < truncated + self.cfg.log_gc_threshold.max(1) {
            return Ok(());
        }
        let (index, term) = self.applied;
        let mut batch = Batch::default();
        batch.delete_log_before(index + 1);
        batch.put_truncated(index, term);
        storage.write(batch, true)?;
        self.raw.mut_store().truncated = (index, term);
        debug!(index, "PD raft log compacted");
        Ok(())
    }
}
