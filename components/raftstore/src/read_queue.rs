//! Readers waiting on a replica: linearizable read barriers (`ReadIndex`)
//! and follower reads waiting for an applied index (`WaitApplied`).
//!
//! Contract:
//! * A read barrier goes through two stages. [`ReadQueue::push_read`] gives
//!   it a fresh id, which the replica hands raft-rs as the read request's
//!   context, and remembers the leader's term at that moment; when raft-rs
//!   reports the read state carrying that context (a quorum confirmed the
//!   leadership), [`ReadQueue::on_read_state`] moves it to wait for the
//!   read state's index. A read state with an unknown or malformed context
//!   is ignored.
//! * [`ReadQueue::release`] answers every confirmed barrier whose index is
//!   applied with the term it was issued in (raft-rs drops read requests
//!   across a leader change, so a confirmed barrier's leadership was of
//!   that term), and every applied-index wait whose index is applied with
//!   success; the others keep waiting. A wait whose index is already
//!   applied is answered at once.
//! * raft-rs forgets read requests across a leader change, so when this
//!   replica stops leading, [`ReadQueue::fail_unconfirmed`] fails every
//!   barrier raft has not confirmed yet (confirmed ones stay valid).
//! * [`ReadQueue::fail_all`] fails everything waiting (the replica stops).
//!   Waits never time out here.

use std::collections::HashMap;

use crate::msg::{Callback, ReadCallback};
use crate::Error;

/// A read barrier and the term it was issued in.
type Read = (u64, ReadCallback);

#[derive(Default)]
pub(crate) struct ReadQueue {
    next_read_id: u64,
    /// Read barriers waiting for raft to confirm leadership, by request id.
    pending_reads: HashMap<u64, Read>,
    /// Confirmed read barriers waiting for the apply index to reach theirs.
    ready_reads: Vec<(u64, Read)>,
    /// `WaitApplied` callers, by the index they wait for.
    applied_waiters: Vec<(u64, Callback)>,
}

impl ReadQueue {
    /// Queues a read barrier of a leader in `term`; returns the context of
    /// raft's read request.
    pub(crate) fn push_read(&mut self, cb: ReadCallback, term: u64) -> Vec<u8> {
        self.next_read_id += 1;
        let id = self.next_read_id;
        self.pending_reads.insert(id, (term, cb));
        id.to_be_bytes().to_vec()
    }

    /// raft confirmed the read request with context `ctx` at `index`.
    pub(crate) fn on_read_state(&mut self, ctx: &[u8], index: u64) {
        let id = <[u8; 8]>::try_from(ctx).map(u64::from_be_bytes);
        if let Some(read) = id.ok().and_then(|id| self.pending_reads.remove(&id)) {
            self.ready_reads.push((index, read));
        }
    }

    /// Answers `cb` once `index` is applied (`applied`: the applied index).
    pub(crate) fn wait_applied(&mut self, index: u64, cb: Callback, applied: u64) {
        if index <= applied {
            let _ = cb.send(Ok(()));
        } else {
            self.applied_waiters.push((index, cb));
        }
    }

    /// Answers the readers whose index is at or below `applied`.
    pub(crate) fn release(&mut self, applied: u64) {
        let mut i = 0;
        while i < self.ready_reads.len() {
            if self.ready_reads[i].0 <= applied {
                let (_, (term, cb)) = self.ready_reads.swap_remove(i);
                let _ = cb.send(Ok(term));
            } else {
                i += 1;
            }
        }
        release_reached(&mut self.applied_waiters, applied);
    }

    /// Fails the read barriers raft has not confirmed (leadership lost).
    pub(crate) fn fail_unconfirmed(&mut self, err: impl Fn() -> Error) {
        let reads: Vec<Read> = self.pending_reads.drain().map(|(_, r)| r).collect();
        for (_, cb) in reads {
            let _ = cb.send(Err(err()));
        }
    }

    /// Fails every reader.
    pub(crate) fn fail_all(&mut self, err: impl Fn() -> Error) {
        for (_, (_, cb)) in self.pending_reads.drain() {
            let _ = cb.send(Err(err()));
        }
        for (_, (_, cb)) in self.ready_reads.drain(..) {
            let _ = cb.send(Err(err()));
        }
        for (_, cb) in self.applied_waiters.drain(..) {
            let _ = cb.send(Err(err()));
        }
    }
}

/// Answers (with success) and drops the callers in `waiters` waiting for an
/// index at or below `applied`.
fn release_reached(waiters: &mut Vec<(u64, Callback)>, applied: u64) {
    let mut i = 0;
    while i < waiters.len() {
        if waiters[i].0 <= applied {
            let (_, cb) = waiters.swap_remove(i);
            let _ = cb.send(Ok(()));
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    fn cb() -> (Callback, oneshot::Receiver<crate::Result<()>>) {
        oneshot::channel()
    }

    fn read_cb() -> (ReadCallback, oneshot::Receiver<crate::Result<u64>>) {
        oneshot::channel()
    }

    #[test]
    fn read_barrier_waits_for_confirmation_then_apply() {
        let mut q = ReadQueue::default();
        let (tx, mut rx) = read_cb();
        let ctx = q.push_read(tx, 4);
        q.release(100);
        assert!(rx.try_recv().is_err(), "not confirmed yet");
        q.on_read_state(b"bad", 7);
        q.on_read_state(&ctx, 7);
        q.release(6);
        assert!(rx.try_recv().is_err(), "index 7 not applied");
        q.release(7);
        assert!(matches!(rx.try_recv(), Ok(Ok(4))), "answered with its term");
    }

    #[test]
    fn leadership_loss_fails_only_unconfirmed_reads() {
        let mut q = ReadQueue::default();
        let (tx1, mut rx1) = read_cb();
        let (tx2, mut rx2) = read_cb();
        let ctx1 = q.push_read(tx1, 2);
        q.push_read(tx2, 2);
        q.on_read_state(&ctx1, 3);
        q.fail_unconfirmed(|| Error::Stopped(1));
        assert!(matches!(rx2.try_recv(), Ok(Err(Error::Stopped(1)))));
        q.release(3);
        assert!(matches!(rx1.try_recv(), Ok(Ok(2))));
    }

    #[test]
    fn applied_waits() {
        let mut q = ReadQueue::default();
        let (tx1, mut rx1) = cb();
        let (tx2, mut rx2) = cb();
        q.wait_applied(5, tx1, 5);
        assert!(matches!(rx1.try_recv(), Ok(Ok(()))));
        q.wait_applied(9, tx2, 5);
        q.release(8);
        assert!(rx2.try_recv().is_err());
        q.fail_all(|| Error::Stopped(1));
        assert!(matches!(rx2.try_recv(), Ok(Err(Error::Stopped(1)))));
    }
}
