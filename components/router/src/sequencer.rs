//! Group commit of revisions on a region leader.
//!
//! A region's log order must be its revision order, so taking a revision
//! from the oracle and submitting the raft command are done by one task at a
//! time per region. With a remote placement driver, one oracle round trip per write
//! would cap a region at one write per round trip. Instead, writes queue
//! up, and a single drain task takes one block of revisions for everything
//! queued and submits the commands in queue order (revision `first + i` to
//! the i-th queued write), again and again until the queue is empty. Each write is still registered as
//! in flight before its revision exists and stays so until it is applied.
//!
//! [`Sequencer::write`] runs to completion even if its caller goes away (the
//! work, and the drain, are spawned tasks): a write that took a revision must stay in the
//! in-flight set until its entry is applied or has failed, or a reader at a
//! higher revision could miss it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use pd::PdClient;
use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, Mutation, RaftCmdRequest, WriteRequest};
use raftstore::RegionHandle;
use tokio::sync::oneshot;

use crate::inflight::Inflight;
use crate::{header, Error, Result};

/// Writes sequenced with one oracle call at most.
const MAX_BATCH: usize = 4096;

type Applied = Pin<Box<dyn Future<Output = raftstore::Result<()>> + Send>>;

struct Job {
    token: u64,
    /// The region as the write was evaluated against it.
    region: metapb::Region,
    mutations: Vec<Mutation>,
    done: oneshot::Sender<Result<(i64, Applied)>>,
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
    /// order, and a writer that finds one running just waits: were every
    /// writer to take its turn at sequencing, each would take whatever few
    /// writes arrived since the previous turn, one oracle call each.
    draining: bool,
}

impl Sequencer {
    /// Takes a revision for `mutations`, replicates and applies them in
    /// `region` as one raft entry, and returns the revision.
    /// Errors: the oracle's ([`Error::Pd`]) or the replica's (not leader,
    /// epoch changed, stopped) — the write then did not happen (a revision
    /// it took stays unused).
    pub async fn write(
        self: &Arc<Self>,
        pd: Arc<dyn PdClient>,
        inflight: Arc<Inflight>,
        handle: RegionHandle,
        region: metapb::Region,
        mutations: Vec<Mutation>,
    ) -> Result<i64> {
        let this = self.clone();
        tokio::spawn(async move {
            let registered = inflight.register();
            let (done, rx) = oneshot::channel();
            let region_id = region.id;
            let start_drainer = {
                let mut state = this.state.lock();
                state.queue.push(Job {
                    token: registered.token(),
                    region,
                    mutations,
                    done,
                });
                !std::mem::replace(&mut state.draining, true)
            };
            if start_drainer {
                let drainer = this.clone();
                let inflight = inflight.clone();
                tokio::spawn(async move { drainer.drain(pd.as_ref(), &inflight, &handle).await });
            }
            let (rev, applied) = rx
                .await
                .map_err(|_| Error::Region(raftstore::Error::Stopped(region_id)))??;
            applied.await?;
            drop(registered);
            Ok(rev)
        })
        .await
        .map_err(|e| Error::Remote(format!("write task failed: {e}")))?
    }

    /// Sequences batches until nothing is queued.
    async fn drain(&self, pd: &dyn PdClient, inflight: &Inflight, handle: &RegionHandle) {
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
            self.sequence(pd, inflight, handle, jobs).await;
        }
    }

    async fn sequence(
        &self,
        pd: &dyn PdClient,
        inflight: &Inflight,
        handle: &RegionHandle,
        jobs: Vec<Job>,
    ) {
        // At most MAX_BATCH jobs: the count fits.
        let count = jobs.len() as u32;
        let first = match pd.alloc_revisions(count).await {
            Ok(first) => first,
            Err(e) => {
                for job in jobs {
                    let _ = job.done.send(Err(Error::Pd(e.clone())));
                }
                return;
            }
        };
        for (i, job) in jobs.into_iter().enumerate() {
            let rev = first + i as i64;
            inflight.set_revision_of(job.token, rev);
            let cmd = RaftCmdRequest {
                header: Some(header(&job.region)),
                cmd: Some(Cmd::Write(WriteRequest {
                    revision: rev,
                    mutations: job.mutations,
                })),
            };
            let submitted = handle
                .submit(cmd)
                .map(|applied| (rev, Box::pin(applied) as Applied))
                .map_err(Error::Region);
            let _ = job.done.send(submitted);
        }
    }
}
