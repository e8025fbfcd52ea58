//! Group commit of revisions on a region leader.
//!
//! A region's log order must be its revision order, so taking a revision
//! from the oracle and proposing the raft command are done by one task at a
//! time per region. With a remote placement driver one oracle round trip
//! per write would cap a region at one write per round trip; instead writes
//! queue up here, and a single drain task takes one block of revisions for
//! everything queued and proposes the commands in queue order (revision
//! `first + i` to the i-th queued write), again and again until the queue
//! is empty.
//!
//! Contract of [`Sequencer::submit`]: the [`Job`] is answered exactly once
//! on its `done` channel — with the applied revision, or with an error that
//! says whether the write may have applied (see `crate::error`): an oracle
//! failure means it was never proposed; a raft outcome is passed through.
//! The job's guards (latches, in-flight registration) are dropped just
//! before that answer, wherever it comes from (this task, or the replica's
//! thread once the entry is applied or known not to apply), so they live
//! exactly as long as the write can still change the region — whether or
//! not anyone still waits for the answer.

use std::sync::Arc;

use parking_lot::Mutex;
use pd::PdClient;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, Mutation, RaftCmdRequest, RaftRequestHeader};
use raftstore::{Applied, RegionHandle};
use tokio::sync::oneshot;

use super::inflight::InflightWrite;
use super::latches::LatchGuard;
use crate::{Error, Result};

/// Writes sequenced with one oracle call at most.
const MAX_BATCH: usize = 4096;

/// A write evaluated on the leader, waiting for its revision.
pub struct Job {
    pub handle: RegionHandle,
    /// Region, epoch and term the write was evaluated against.
    pub header: RaftRequestHeader,
    pub mutations: Vec<Mutation>,
    pub latches: LatchGuard,
    pub inflight: InflightWrite,
    pub done: oneshot::Sender<Result<Applied>>,
}

impl Job {
    fn finish(self, res: Result<Applied>) {
        let Job {
            latches,
            inflight,
            done,
            ..
        } = self;
        drop(inflight);
        drop(latches);
        let _ = done.send(res);
    }
}

#[derive(Default)]
pub struct Sequencer {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: Vec<Job>,
    /// A drain task is running; it takes everything queued until the queue
    /// is empty. One drainer at a time is what keeps log order = revision
    /// order, and a writer that finds one running just queues: were every
    /// writer to take its turn, each would take whatever few writes arrived
    /// since the previous turn, one oracle call each.
    draining: bool,
}

impl Sequencer {
    /// Queues `job` and makes sure a drain task runs (see the contract).
    pub fn submit(self: &Arc<Self>, pd: &Arc<dyn PdClient>, job: Job) {
        let start_drainer = {
            let mut state = self.state.lock();
            state.queue.push(job);
            !std::mem::replace(&mut state.draining, true)
        };
        if start_drainer {
            let this = self.clone();
            let pd = pd.clone();
            tokio::spawn(async move { this.drain(pd.as_ref()).await });
        }
    }

    /// Sequences batches until nothing is queued.
    async fn drain(&self, pd: &dyn PdClient) {
        // Were this task to die by a panic with `draining` still set, no
        // write of the region would ever be sequenced again.
        struct OnPanic<'a>(&'a Sequencer);
        impl Drop for OnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.state.lock().draining = false;
                }
            }
        }
        let _on_panic = OnPanic(self);
        loop {
            let jobs: Vec<Job> = {
                let mut state = self.state.lock();
                if state.queue.is_empty() {
                    state.draining = false;
                    return;
                }
                let n = state.queue.len().min(MAX_BATCH);
                state.queue.drain(..n).collect()
            };
            sequence(pd, jobs).await;
        }
    }
}

/// Takes one block of revisions for `jobs` and proposes them in order.
async fn sequence(pd: &dyn PdClient, jobs: Vec<Job>) {
    // At most MAX_BATCH jobs: the count fits.
    let first = match pd.alloc_revisions(jobs.len() as u32).await {
        Ok(first) => first,
        Err(e) => {
            // Nothing was proposed: certainly not applied.
            for job in jobs {
                job.finish(Err(Error::Pd(e.clone())));
            }
            return;
        }
    };
    for (i, mut job) in jobs.into_iter().enumerate() {
        let revision = first + i as i64;
        job.inflight.set_revision(revision);
        let cmd = RaftCmdRequest {
            header: Some(job.header),
            cmd: Some(Cmd::Write(proto::raft_cmdpb::WriteRequest {
                revision,
                mutations: std::mem::take(&mut job.mutations),
            })),
        };
        let handle = job.handle.clone();
        handle.propose_with(
            cmd,
            Box::new(move |res| job.finish(res.map_err(Error::from))),
        );
    }
}
