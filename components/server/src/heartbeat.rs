//! Region heartbeats: every region this node leads reports its meta, leader,
//! lagging or silent peers and last measured size (`split_check`) to the
//! placement driver, and carries out the step PD answers with (add a
//! learner, promote it, remove a peer, hand leadership over — how PD keeps
//! each region at `max-replicas` — or split at a key an operator asked
//! for).
//!
//! A heartbeat goes out at once when a region gains a new leader term here,
//! when its membership or lagging peers change, and otherwise every
//! [`HEARTBEAT_INTERVAL`] ([`BUSY_HEARTBEAT_INTERVAL`] while a membership
//! change is under way, so a caught-up learner is promoted promptly).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pd::{PdClient, RegionHeartbeat, RegionOperator};
use proto::metapb;

use raftstore::{ConfChangeType, PeerStatus, RegionHandle};
use router::Router;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::split_check::RegionSizes;

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
const BUSY_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often leadership and membership changes are looked for.
const POLL: Duration = Duration::from_millis(200);

/// What the last heartbeat of a region said, to tell when the next is due.
struct Reported {
    term: u64,
    region: metapb::Region,
    pending: Vec<u64>,
    at: Instant,
    busy: bool,
}

pub async fn run(
    router: Arc<Router>,
    pd: Arc<dyn PdClient>,
    sizes: Arc<RegionSizes>,
    mut stopped: watch::Receiver<bool>,
) {
    let store = router.store().clone();
    let mut reported: HashMap<u64, Reported> = HashMap::new();
    // Regions with an operator being carried out: one at a time per region.
    let running: Arc<Mutex<HashSet<u64>>> = Arc::default();
    loop {
        for handle in store.regions() {
            let status = handle.status();
            if !status.ready_leader {
                continue;
            }
            let Some(leader) = status.region.peers.iter().find(|p| p.id == status.peer_id) else {
                continue;
            };
            let due = match reported.get(&status.region.id) {
                Some(r) => {
                    let interval = if r.busy || !status.pending_peers.is_empty() {
                        BUSY_HEARTBEAT_INTERVAL
                    } else {
                        HEARTBEAT_INTERVAL
                    };
                    r.term != status.term
                        || r.region != status.region
                        || r.pending != status.pending_peers
                        || r.at.elapsed() >= interval
                }
                None => true,
            };
            if !due {
                continue;
            }
            let hb = RegionHeartbeat {
                region: status.region.clone(),
                leader: *leader,
                pending_peers: peers_by_id(&status, &status.pending_peers),
                down_peers: peers_by_id(&status, &status.down_peers),
                approximate_size: sizes.get(status.region.id).bytes,
                approximate_keys: sizes.get(status.region.id).keys,
            };
            match pd.region_heartbeat(hb).await {
                Ok(op) => {
                    let has_learner = status
                        .region
                        .peers
                        .iter()
                        .any(|p| p.role() != metapb::PeerRole::Voter);
                    reported.insert(
                        status.region.id,
                        Reported {
                            term: status.term,
                            region: status.region.clone(),
                            pending: status.pending_peers.clone(),
                            at: Instant::now(),
                            busy: op.is_some() || has_learner,
                        },
                    );
                    if let Some(op) = op {
                        spawn_operator(
                            router.clone(),
                            handle,
                            status.region.clone(),
                            op,
                            running.clone(),
                        );
                    }
                }
                // PD may be restarting or electing; the next round retries.
                Err(e) => debug!(region_id = status.region.id, "region heartbeat failed: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

fn peers_by_id(status: &PeerStatus, ids: &[u64]) -> Vec<metapb::Peer> {
    status
        .region
        .peers
        .iter()
        .filter(|p| ids.contains(&p.id))
        .copied()
        .collect()
}

/// Carries out `op` in the background unless one is already running for
/// the region. The operator was decided for `decided_on`; if the region has
/// changed since, it is dropped (PD decides again on the next heartbeat).
fn spawn_operator(
    router: Arc<Router>,
    handle: RegionHandle,
    decided_on: metapb::Region,
    op: RegionOperator,
    running: Arc<Mutex<HashSet<u64>>>,
) {
    let region_id = decided_on.id;
    if !lock(&running).insert(region_id) {
        return;
    }
    tokio::spawn(async move {
        let current = handle.status().region;
        if current.region_epoch == decided_on.region_epoch {
            if let Err(e) = execute(&router, &handle, &op).await {
                warn!(region_id, ?op, "scheduled step failed: {e}");
            } else {
                info!(region_id, ?op, "scheduled step done");
            }
        } else {
            debug!(
                region_id,
                ?op,
                "region changed since PD decided; step dropped"
            );
        }
        lock(&running).remove(&region_id);
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn execute(
    router: &Router,
    handle: &RegionHandle,
    op: &RegionOperator,
) -> Result<(), String> {
    let change = |ty: ConfChangeType, peer: &metapb::Peer, role: metapb::PeerRole| {
        let mut peer = *peer;
        peer.role = role as i32;
        vec![(ty, peer)]
    };
    let done = match op {
        RegionOperator::AddLearner(p) => {
            handle
                .change_peers(change(
                    ConfChangeType::AddLearnerNode,
                    p,
                    metapb::PeerRole::Learner,
                ))
                .await
        }
        RegionOperator::PromoteLearner(p) => {
            handle
                .change_peers(change(ConfChangeType::AddNode, p, metapb::PeerRole::Voter))
                .await
        }
        RegionOperator::RemovePeer(p) => {
            handle
                .change_peers(change(ConfChangeType::RemoveNode, p, p.role()))
                .await
        }
        RegionOperator::TransferLeader(p) => handle.transfer_leader(p.id).await,
        RegionOperator::Split { key } => {
            return router
                .split_region(handle.region_id(), key.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    done.map_err(|e| e.to_string())
}
