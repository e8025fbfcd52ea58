//! Group commit of revisions on a region leader.
//!
//! A region's log order must be its revision order, so taking a revision
//! from the oracle and submitting the raft command happen under one lock per
//! region. With a remote placement driver, one oracle round trip per write
//! under that lock would cap a region at one write per round trip. Instead,
//! writes queue up, and whoever holds the lock takes one block of revisions
//! for everything queued and submits the commands in queue order: revision
//! `first + i` to the i-th queued write. Each write is still registered as
//! in flight before its revision exists and stays so until it is applied.
//!
//! [`Sequencer::write`] runs to completion even if its caller goes away (the
//! work is a spawned task): a write that took a revision must stay in the
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
    queue: Mutex<Vec<Job>>,
    lock: tokio::sync::Mutex<()>,
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
            this.queue.lock().push(Job {
                token: registered.token(),
                region,
                mutations,
                done,
            });
            this.drain(pd.as_ref(), &inflight, &handle).await;
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

    /// Sequences everything queued, unless the lock holder before us already
    /// took our job along.
    async fn drain(&self, pd: &dyn PdClient, inflight: &Inflight, handle: &RegionHandle) {
        let _seq = self.lock.lock().await;
        loop {
            let jobs: Vec<Job> = {
                let mut queue = self.queue.lock();
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            if jobs.is_empty() {
                return;
            }
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
