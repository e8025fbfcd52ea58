//! Region heartbeats: every region this node leads reports its meta, leader,
//! lagging or silent peers and last measured size (`split_check`) to the
//! placement driver, and carries out the step PD answers with (add a
//! learner, promote it, remove a peer, hand leadership over — how PD keeps
//! each region at `max-replicas` — split at a key an operator asked for,
//! or merge the region into its right neighbour: `router::merge`).
//!
//! A heartbeat is due at once when a region gains a new leader term here,
//! when its membership or lagging peers change, and otherwise every
//! [`HEARTBEAT_INTERVAL`] ([`BUSY_HEARTBEAT_INTERVAL`] while a membership
//! change is under way, so a caught-up learner is promoted promptly). Every
//! [`POLL`] the node collects the heartbeats of all its regions that are
//! due and sends them in one call ([`PdClient::region_heartbeats`], split
//! into calls of at most [`MAX_BATCH`] heartbeats and about
//! [`MAX_BATCH_BYTES`]); PD answers each region in order.
//! Regions that would be due within a fifth of their interval ride along
//! with a batch that goes out anyway, so the regions of a node settle into
//! few phases and a quiet node sends about one call per interval, however
//! many regions it leads.

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
/// How often leadership and membership changes are looked for, and due
/// heartbeats sent.
const POLL: Duration = Duration::from_millis(200);
/// Heartbeats in one call at most; more go in further calls of the round.
const MAX_BATCH: usize = 256;
/// Roughly the most bytes of heartbeats in one call (region boundary keys
/// can be large), well below gRPC's 4 MiB message limit; a single larger
/// heartbeat goes alone.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// A region whose heartbeat falls due within `interval / RIDE_ALONG`
/// goes with a batch that is sent anyway.
const RIDE_ALONG: u32 = 5;

/// What the last heartbeat of a region said, to tell when the next is due.
struct Reported {
    term: u64,
    region: metapb::Region,
    pending: Vec<u64>,
    at: Instant,
    busy: bool,
}

/// Whether a region's heartbeat goes out in this round.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Something changed, or the interval passed.
    Now,
    /// Not yet, but soon enough to ride along with a batch.
    Soon,
    Later,
}

fn due(last: Option<&Reported>, status: &PeerStatus, now: Instant) -> Due {
    let Some(r) = last else {
        return Due::Now;
    };
    if r.term != status.term || r.region != status.region || r.pending != status.pending_peers {
        return Due::Now;
    }
    let interval = if r.busy || !status.pending_peers.is_empty() {
        BUSY_HEARTBEAT_INTERVAL
    } else {
        HEARTBEAT_INTERVAL
    };
    let age = now.saturating_duration_since(r.at);
    if age >= interval {
        Due::Now
    } else if age + interval / RIDE_ALONG >= interval {
        Due::Soon
    } else {
        Due::Later
    }
}

/// A region whose heartbeat goes out in this round.
struct Outgoing {
    handle: RegionHandle,
    status: PeerStatus,
    hb: RegionHeartbeat,
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
        let now = Instant::now();
        let mut outgoing = Vec::new();
        let mut any_due = false;
        let regions = store.regions();
        for handle in &regions {
            let status = handle.status();
            if !status.ready_leader {
                continue;
            }
            let Some(leader) = status.region.peers.iter().find(|p| p.id == status.peer_id) else {
                continue;
            };
            match due(reported.get(&status.region.id), &status, now) {
                Due::Now => any_due = true,
                Due::Soon => {}
                Due::Later => continue,
            }
            let size = sizes.get(status.region.id);
            let hb = RegionHeartbeat {
                region: status.region.clone(),
                leader: *leader,
                pending_peers: peers_by_id(&status, &status.pending_peers),
                down_peers: peers_by_id(&status, &status.down_peers),
                approximate_size: size.bytes,
                approximate_keys: size.keys,
            };
            outgoing.push(Outgoing {
                handle: handle.clone(),
                status,
                hb,
            });
        }
        if any_due {
            send(&router, pd.as_ref(), outgoing, &mut reported, &running).await;
        }
        // Regions no longer here (moved away, merged, removed) are
        // forgotten; led again later, they report at once.
        let here: HashSet<u64> = regions.iter().map(|h| h.region_id()).collect();
        reported.retain(|id, _| here.contains(id));
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// Roughly a heartbeat's size on the wire.
fn wire_size(hb: &RegionHeartbeat) -> usize {
    let peers = hb.region.peers.len() + hb.pending_peers.len() + hb.down_peers.len();
    hb.region.start_key.len() + hb.region.end_key.len() + 16 * peers + 64
}

/// `items` in order, cut into calls of at most [`MAX_BATCH`] and, unless
/// one item alone is larger, [`MAX_BATCH_BYTES`] by `size`.
fn into_calls<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut calls: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        match calls.last_mut() {
            Some(call) if call.len() < MAX_BATCH && bytes + n <= MAX_BATCH_BYTES => {
                bytes += n;
                call.push(item);
            }
            _ => {
                bytes = n;
                calls.push(vec![item]);
            }
        }
    }
    calls
}

/// Sends the round's heartbeats in calls of at most [`MAX_BATCH`] (and
/// about [`MAX_BATCH_BYTES`]), notes what each region reported and starts
/// the steps PD answered with.
async fn send(
    router: &Arc<Router>,
    pd: &dyn PdClient,
    outgoing: Vec<Outgoing>,
    reported: &mut HashMap<u64, Reported>,
    running: &Arc<Mutex<HashSet<u64>>>,
) {
    for chunk in into_calls(outgoing, |o| wire_size(&o.hb)) {
        let hbs = chunk.iter().map(|o| o.hb.clone()).collect();
        let outcomes = match pd.region_heartbeats(hbs).await {
            Ok(outcomes) => outcomes,
            // PD may be restarting or electing; the next round retries.
            Err(e) => {
                debug!(regions = chunk.len(), "region heartbeats failed: {e}");
                continue;
            }
        };
        if outcomes.len() != chunk.len() {
            // A broken PD client; the regions without an answer retry.
            warn!(
                sent = chunk.len(),
                answered = outcomes.len(),
                "PD answered a different number of heartbeats"
            );
        }
        let at = Instant::now();
        for (o, outcome) in chunk.into_iter().zip(outcomes) {
            let region_id = o.status.region.id;
            let op = match outcome {
                Ok(op) => op,
                Err(e) => {
                    debug!(region_id, "region heartbeat failed: {e}");
                    continue;
                }
            };
            let has_learner = o
                .status
                .region
                .peers
                .iter()
                .any(|p| p.role() != metapb::PeerRole::Voter);
            reported.insert(
                region_id,
                Reported {
                    term: o.status.term,
                    region: o.status.region.clone(),
                    pending: o.status.pending_peers.clone(),
                    at,
                    busy: op.is_some() || has_learner,
                },
            );
            if let Some(op) = op {
                spawn_operator(
                    router.clone(),
                    o.handle,
                    o.status.region,
                    op,
                    running.clone(),
                );
            }
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
        RegionOperator::Merge { target } => {
            if handle.status().merging.is_some() {
                // Prepared already; the router's merge driver carries it
                // out (PD repeats the step until the region is gone).
                return Ok(());
            }
            info!(
                source_id = handle.region_id(),
                target_id = target.id,
                "merging the region into its right neighbour"
            );
            return router
                .merge_region(handle.region_id(), target.clone())
                .await
                .map_err(|e| e.to_string());
        }
    };
    done.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use pd::{
        HeartbeatOutcome, LocalPdClient, PdConfig, PdCore, RegionWithLeader, Result as PdResult,
    };
    use raftstore::PeerStatus;
    use router::forward::LocalNetwork;
    use test_support::raft_cluster;

    use super::*;

    fn status(term: u64, region: &metapb::Region, pending: Vec<u64>) -> PeerStatus {
        PeerStatus {
            term,
            region: region.clone(),
            pending_peers: pending,
            ..Default::default()
        }
    }

    #[test]
    fn calls_hold_at_most_max_batch_and_about_max_bytes() {
        let lens = |calls: Vec<Vec<usize>>| calls.iter().map(Vec::len).collect::<Vec<_>>();
        assert!(into_calls(Vec::<usize>::new(), |n| *n).is_empty());
        assert_eq!(lens(into_calls(vec![1; 600], |n| *n)), [256, 256, 88]);
        // By bytes: 1 MiB fits four of 256 KiB; a larger one goes alone.
        let calls = into_calls(
            vec![1 << 18, 1 << 18, 1 << 18, 1 << 18, 1, 3 << 20, 1],
            |n| *n,
        );
        assert_eq!(lens(calls.clone()), [4, 1, 1, 1]);
        assert_eq!(calls.concat()[4..], [1, 3 << 20, 1]);
    }

    #[test]
    fn due_on_change_at_the_interval_and_soon_before() {
        let region = raft_cluster::region(3);
        let t0 = Instant::now();
        let last = Reported {
            term: 2,
            region: region.clone(),
            pending: Vec::new(),
            at: t0,
            busy: false,
        };
        let quiet = status(2, &region, Vec::new());
        assert_eq!(due(None, &quiet, t0), Due::Now, "never reported");
        assert_eq!(due(Some(&last), &quiet, t0), Due::Later);
        let at = |d: Duration| t0 + d;
        assert_eq!(
            due(Some(&last), &quiet, at(Duration::from_secs(3))),
            Due::Later
        );
        assert_eq!(
            due(Some(&last), &quiet, at(Duration::from_secs(4))),
            Due::Soon
        );
        assert_eq!(due(Some(&last), &quiet, at(HEARTBEAT_INTERVAL)), Due::Now);
        // A new term, membership or pending peers: at once.
        assert_eq!(
            due(Some(&last), &status(3, &region, Vec::new()), t0),
            Due::Now
        );
        let mut changed = region.clone();
        changed.peers.pop();
        assert_eq!(
            due(Some(&last), &status(2, &changed, Vec::new()), t0),
            Due::Now
        );
        assert_eq!(due(Some(&last), &status(2, &region, vec![3]), t0), Due::Now);
        // Busy: every second, riding along from 800 ms.
        let busy = Reported { busy: true, ..last };
        assert_eq!(
            due(Some(&busy), &quiet, at(Duration::from_millis(700))),
            Due::Later
        );
        assert_eq!(
            due(Some(&busy), &quiet, at(Duration::from_millis(800))),
            Due::Soon
        );
        assert_eq!(
            due(Some(&busy), &quiet, at(BUSY_HEARTBEAT_INTERVAL)),
            Due::Now
        );
    }

    /// Passes everything to PD, counting the heartbeat calls.
    struct Counting {
        inner: Arc<dyn PdClient>,
        single: AtomicUsize,
        batches: Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl PdClient for Counting {
        async fn cluster_id(&self) -> PdResult<u64> {
            self.inner.cluster_id().await
        }
        async fn is_bootstrapped(&self) -> PdResult<bool> {
            self.inner.is_bootstrapped().await
        }
        async fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> PdResult<()> {
            self.inner.bootstrap(node, region).await
        }
        async fn alloc_id(&self) -> PdResult<u64> {
            self.inner.alloc_id().await
        }
        async fn put_node(&self, node: metapb::Node) -> PdResult<()> {
            self.inner.put_node(node).await
        }
        async fn get_node(&self, id: u64) -> PdResult<Option<metapb::Node>> {
            self.inner.get_node(id).await
        }
        async fn get_all_nodes(&self) -> PdResult<Vec<metapb::Node>> {
            self.inner.get_all_nodes().await
        }
        async fn get_region(&self, key: &[u8]) -> PdResult<Option<RegionWithLeader>> {
            self.inner.get_region(key).await
        }
        async fn get_region_by_id(&self, id: u64) -> PdResult<Option<RegionWithLeader>> {
            self.inner.get_region_by_id(id).await
        }
        async fn scan_regions(
            &self,
            start: &[u8],
            end: &[u8],
            limit: usize,
        ) -> PdResult<Vec<RegionWithLeader>> {
            self.inner.scan_regions(start, end, limit).await
        }
        async fn region_heartbeat(&self, hb: RegionHeartbeat) -> PdResult<Option<RegionOperator>> {
            self.single.fetch_add(1, Ordering::Relaxed);
            self.inner.region_heartbeat(hb).await
        }
        async fn region_heartbeats(
            &self,
            hbs: Vec<RegionHeartbeat>,
        ) -> PdResult<Vec<HeartbeatOutcome>> {
            lock(&self.batches).push(hbs.len());
            self.inner.region_heartbeats(hbs).await
        }
        async fn alloc_revisions(&self, count: u32) -> PdResult<i64> {
            self.inner.alloc_revisions(count).await
        }
        async fn current_revision(&self) -> PdResult<i64> {
            self.inner.current_revision().await
        }
        async fn split_region(&self, key: &[u8]) -> PdResult<RegionWithLeader> {
            self.inner.split_region(key).await
        }
        async fn merge_regions(
            &self,
            source_id: u64,
            target_id: u64,
        ) -> PdResult<(RegionWithLeader, RegionWithLeader)> {
            self.inner.merge_regions(source_id, target_id).await
        }
        async fn compact(&self, revision: i64) -> PdResult<pd::CompactOutcome> {
            self.inner.compact(revision).await
        }
        async fn compaction_revision(&self) -> PdResult<i64> {
            self.inner.compaction_revision().await
        }
        async fn alarm(
            &self,
            action: proto::pdpb::alarm_request::AlarmAction,
            member_id: u64,
            alarm: proto::pdpb::AlarmType,
        ) -> PdResult<Vec<proto::pdpb::AlarmMember>> {
            self.inner.alarm(action, member_id, alarm).await
        }
    }

    fn node(id: u64) -> metapb::Node {
        metapb::Node {
            id,
            name: format!("n{id}"),
            client_urls: vec![format!("http://127.0.0.1:{}", 4000 + id)],
            state: metapb::NodeState::Up as i32,
            ..Default::default()
        }
    }

    fn led(store: &raftstore::Store) -> Vec<PeerStatus> {
        store
            .regions()
            .iter()
            .map(|h| h.status())
            .filter(|s| s.ready_leader)
            .collect()
    }

    /// Three nodes, six regions all led from one node: each node's
    /// heartbeats go to PD in batches (the first round of the leading node
    /// carries all six), and the leader-balance transfers PD answers
    /// through them are carried out until every node leads two.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn regions_report_in_batches_and_balance_steps_are_carried_out() {
        let raft = raft_cluster::Cluster::new(3);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = PdConfig::new(dir.path());
        cfg.schedule.region_balance_limit = 0;
        let core = PdCore::open(cfg).unwrap();
        let local: Arc<dyn PdClient> = Arc::new(LocalPdClient::new(core.clone()));
        local
            .bootstrap(node(1), raft_cluster::region(3))
            .await
            .unwrap();
        for id in 2..=3 {
            local.put_node(node(id)).await.unwrap();
        }
        let net = LocalNetwork::new();
        let mut pds = HashMap::new();
        let mut routers = HashMap::new();
        for id in 1..=3u64 {
            let pd = Arc::new(Counting {
                inner: local.clone(),
                single: AtomicUsize::new(0),
                batches: Default::default(),
            });
            let router = Arc::new(Router::new(raft.store(id), pd.clone(), net.forwarder(id)));
            net.register(id, &router);
            pds.insert(id, pd);
            routers.insert(id, router);
        }

        // Six regions, all led from the first region's leader.
        let (leader, _) = raft.leader().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        for key in [&b"b"[..], b"c", b"d", b"e", b"f"] {
            loop {
                let containing = led(&raft.store(leader))
                    .into_iter()
                    .find(|s| key > s.region.start_key.as_slice() && s.region.end_key.is_empty());
                if let Some(s) = containing {
                    let split = routers[&leader]
                        .split_region(s.region.id, key.to_vec())
                        .await;
                    if split.is_ok() {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "split at {key:?} not done");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        while led(&raft.store(leader)).len() < 6 {
            assert!(Instant::now() < deadline, "new regions elect no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let (stop, stopped) = watch::channel(false);
        let tasks: Vec<_> = (1..=3u64)
            .map(|id| {
                tokio::spawn(run(
                    routers[&id].clone(),
                    pds[&id].clone(),
                    Arc::new(RegionSizes::default()),
                    stopped.clone(),
                ))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let per_node: Vec<usize> = (1..=3).map(|id| led(&raft.store(id)).len()).collect();
            // As PD heard it from the new leaders.
            let mut reported = [0usize; 3];
            for r in local.scan_regions(b"", b"", 0).await.unwrap() {
                if let Some(l) = r.leader {
                    reported[l.node_id as usize - 1] += 1;
                }
            }
            if per_node == [2, 2, 2] && reported == [2, 2, 2] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "leaders per node {per_node:?}, as PD knows them {reported:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop.send(true);
        for t in tasks {
            t.await.unwrap();
        }

        for (id, pd) in &pds {
            assert_eq!(pd.single.load(Ordering::Relaxed), 0, "node {id}");
        }
        let first = lock(&pds[&leader].batches).first().copied();
        assert_eq!(first, Some(6), "the first round reports every region");
        let stats = core.heartbeat_stats();
        assert!(stats.heartbeats >= 6 + 4, "{stats:?}");

        drop(routers);
        drop(pds);
        core.close().await.unwrap();
        tokio::task::spawn_blocking(move || drop(raft))
            .await
            .unwrap();
    }
}
