//! The store's batch system: a few threads (pollers) drive every replica
//! of the node, instead of a thread per replica.
//!
//! Each replica belongs to one poller for its whole life (assigned in turn
//! as replicas start). A replica's [`Mailbox`] queues the message and, if
//! the replica is not scheduled yet, tells its poller. A poller's round:
//! 1. waits for mail until its next tick is due (every `TICK_INTERVAL`,
//!    when every replica ticks);
//! 2. drains the mailbox of every replica with mail (at most
//!    [`MESSAGES_PER_ROUND`]; the rest wait for the next round);
//! 3. handles each such replica's `Ready` up to the log write, staging its
//!    entries and hard state into one raft-engine batch shared by the
//!    round (`Peer::ready_begin`);
//! 4. writes that batch once, synced if any replica needed it;
//! 5. finishes each `Ready` (`Peer::ready_end`: the messages that needed
//!    the write go out, the newly committed entries are applied);
//! 6. ends the replicas that stopped (`Peer::finish`).
//!
//! So a round costs one raft-engine write and one fsync whatever the
//! number of regions with work in it, and a message costs a thread wake-up
//! only when its replica's poller sleeps. Nothing a replica does may wait
//! for another replica: they may share a thread (a merge's target does not
//! block on its source, nor a snapshot on the replicas it replaces).
//!
//! Edge cases:
//! * A storage write failure aborts the process, as in the replica's own
//!   handling: going on could acknowledge writes that are not durable.
//! * [`Pollers::shutdown`] ends every replica still running (each answers
//!   what waits with `Stopped`) and joins the threads.
//! * Mail for a replica its poller does not hold (not started yet) is
//!   handled when it starts; for one that has ended, it is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use engine::{RaftLogBatch, RaftLogEngine};
use parking_lot::Mutex;
use tracing::error;

use crate::msg::PeerMsg;
use crate::peer::{Peer, TICK_INTERVAL};
use crate::{Error, Result};

/// Messages one replica handles in a round at most, so that one flooded
/// replica does not hold up the others of its poller.
pub const MESSAGES_PER_ROUND: usize = 4096;

/// Where a replica's messages go (see the module docs); cloned by every
/// sender.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<PeerMsg>,
    token: u64,
    scheduled: Arc<AtomicBool>,
    poller: Sender<PollerMsg>,
}

impl Mailbox {
    /// Queues `msg` for the replica; `Err` (with the message, as std's
    /// `Sender::send`, so a caller can answer its callback) once the
    /// replica has ended.
    #[allow(clippy::result_large_err)]
    pub fn send(&self, msg: PeerMsg) -> std::result::Result<(), mpsc::SendError<PeerMsg>> {
        self.tx.send(msg)?;
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            let _ = self.poller.send(PollerMsg::Mail(self.token));
        }
        Ok(())
    }
}

/// A replica and its mailbox's receiving end, as its poller holds them.
pub(crate) struct Slot {
    peer: Peer,
    rx: Receiver<PeerMsg>,
    scheduled: Arc<AtomicBool>,
}

enum PollerMsg {
    /// The replica of this token got mail.
    Mail(u64),
    /// A replica to drive from now on.
    Start(u64, Box<Slot>),
    /// End every replica left and return.
    Exit,
}

/// The pollers of a store.
pub(crate) struct Pollers {
    senders: Vec<Sender<PollerMsg>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_poller: AtomicUsize,
    next_token: AtomicU64,
}

impl Pollers {
    /// Starts `count` pollers (at least one) writing to `log`.
    pub(crate) fn start(count: usize, log: &RaftLogEngine) -> Result<Pollers> {
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let (tx, rx) = mpsc::channel();
            let log = log.clone();
            let thread = std::thread::Builder::new()
                .name(format!("raft-poller-{i}"))
                .spawn(move || Poller::new(rx, log).run())
                .map_err(|e| Error::Engine(engine::Error::Io(e)))?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Pollers {
            senders,
            threads: Mutex::new(threads),
            next_poller: AtomicUsize::new(0),
            next_token: AtomicU64::new(1),
        })
    }

    /// A mailbox on the next poller in turn, for a replica about to start,
    /// and its receiving end (for [`Pollers::run`]).
    pub(crate) fn mailbox(&self) -> (Mailbox, Receiver<PeerMsg>) {
        let i = self.next_poller.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        let (tx, rx) = mpsc::channel();
        let mailbox = Mailbox {
            tx,
            token: self.next_token.fetch_add(1, Ordering::Relaxed),
            scheduled: Arc::new(AtomicBool::new(false)),
            poller: self.senders[i].clone(),
        };
        (mailbox, rx)
    }

    /// Hands `peer`, whose mailbox is `mailbox`, to its poller, which
    /// starts it (`Peer::start`) and drives it from then on.
    pub(crate) fn run(&self, mailbox: &Mailbox, peer: Peer, rx: Receiver<PeerMsg>) -> Result<()> {
        let region_id = peer.region_id();
        let slot = Slot {
            peer,
            rx,
            scheduled: mailbox.scheduled.clone(),
        };
        mailbox
            .poller
            .send(PollerMsg::Start(mailbox.token, Box::new(slot)))
            .map_err(|_| Error::Stopped(region_id))
    }

    /// Ends every replica still running and joins the pollers. Replicas
    /// handed over before this call are ended too (their start is queued
    /// before the exit).
    pub(crate) fn shutdown(&self) {
        for tx in &self.senders {
            let _ = tx.send(PollerMsg::Exit);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Pollers {
    /// A store dropped without `shutdown` (one that failed to open) ends
    /// its pollers too; not joined, as the last reference may go on a
    /// poller's own thread.
    fn drop(&mut self) {
        for tx in &self.senders {
            let _ = tx.send(PollerMsg::Exit);
        }
    }
}

struct Poller {
    rx: Receiver<PollerMsg>,
    log: RaftLogEngine,
    slots: HashMap<u64, Slot>,
    /// Replicas with mail for this round, in arrival order.
    due: Vec<u64>,
    /// Replicas with mail left over from the last round.
    again: Vec<u64>,
    exiting: bool,
}

impl Poller {
    fn new(rx: Receiver<PollerMsg>, log: RaftLogEngine) -> Poller {
        Poller {
            rx,
            log,
            slots: HashMap::new(),
            due: Vec::new(),
            again: Vec::new(),
            exiting: false,
        }
    }

    fn run(mut self) {
        let mut next_tick = Instant::now() + TICK_INTERVAL;
        loop {
            self.due = std::mem::take(&mut self.again);
            let wait = if self.due.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                std::time::Duration::ZERO
            };
            match self.rx.recv_timeout(wait) {
                Ok(msg) => self.take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.exiting = true,
            }
            while let Ok(msg) = self.rx.try_recv() {
                self.take(msg);
            }
            let tick = Instant::now() >= next_tick;
            if tick {
                next_tick = Instant::now() + TICK_INTERVAL;
                self.due = self.slots.keys().copied().collect();
            }
            self.round(tick);
            if self.exiting {
                for (_, slot) in self.slots.drain() {
                    slot.peer.finish();
                }
                return;
            }
        }
    }

    fn take(&mut self, msg: PollerMsg) {
        match msg {
            PollerMsg::Mail(token) => self.due.push(token),
            PollerMsg::Start(token, mut slot) => {
                slot.peer.start();
                self.slots.insert(token, *slot);
                self.due.push(token);
            }
            PollerMsg::Exit => self.exiting = true,
        }
    }

    /// One round over the replicas due (see the module docs).
    fn round(&mut self, tick: bool) {
        let mut due = std::mem::take(&mut self.due);
        due.sort_unstable();
        due.dedup();
        let mut batch = RaftLogBatch::default();
        let mut sync = false;
        let mut readies = Vec::new();
        let mut ended = Vec::new();
        for token in due {
            let Some(slot) = self.slots.get_mut(&token) else {
                continue;
            };
            // Before draining: mail arriving from now on schedules the
            // replica again.
            slot.scheduled.store(false, Ordering::Release);
            let mut handled = 0;
            let mut running = true;
            while handled < MESSAGES_PER_ROUND {
                let Ok(msg) = slot.rx.try_recv() else { break };
                handled += 1;
                if !slot.peer.handle(msg) {
                    running = false;
                    break;
                }
            }
            if handled == MESSAGES_PER_ROUND {
                self.again.push(token);
            }
            if !running {
                ended.push(token);
                continue;
            }
            if tick {
                slot.peer.tick();
            }
            match slot.peer.ready_begin(&mut batch, &mut sync) {
                Ok(Some(ready)) => readies.push((token, ready)),
                Ok(None) => {}
                Err(e) => storage_failure(slot.peer.region_id(), e),
            }
            if slot.peer.ended() {
                ended.push(token);
            }
        }
        if !batch.is_empty() {
            if let Err(e) = self.log.write(&mut batch, sync) {
                storage_failure(0, e.into());
            }
        }
        for (token, ready) in readies {
            let Some(slot) = self.slots.get_mut(&token) else {
                continue;
            };
            if let Err(e) = slot.peer.ready_end(ready) {
                storage_failure(slot.peer.region_id(), e);
            }
            if slot.peer.ended() && !ended.contains(&token) {
                ended.push(token);
            }
        }
        for token in ended {
            if let Some(slot) = self.slots.remove(&token) {
                slot.peer.finish();
            }
        }
    }
}

/// The log or the state machine could not be written: going on could
/// acknowledge writes that are not durable.
fn storage_failure(region_id: u64, e: Error) -> ! {
    error!(region_id, "storage failure, stopping the process: {e}");
    std::process::abort();
}
