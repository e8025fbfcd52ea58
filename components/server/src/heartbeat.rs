//! Region heartbeats: every region this node leads reports its meta and
//! leader to the placement driver, which is how PD learns where leaders are.
//! A heartbeat goes out at once when a region gains a new leader term here,
//! and otherwise every [`HEARTBEAT_INTERVAL`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pd::PdClient;
use raftstore::Store;
use tokio::sync::watch;
use tracing::debug;

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often leadership changes are looked for.
const POLL: Duration = Duration::from_millis(200);

pub async fn run(store: Arc<Store>, pd: Arc<dyn PdClient>, mut stopped: watch::Receiver<bool>) {
    // region id → (term reported, when)
    let mut reported: HashMap<u64, (u64, Instant)> = HashMap::new();
    loop {
        for handle in store.regions() {
            let status = handle.status();
            if !status.ready_leader {
                continue;
            }
            let due = match reported.get(&status.region.id) {
                Some((term, at)) => *term != status.term || at.elapsed() >= HEARTBEAT_INTERVAL,
                None => true,
            };
            let Some(leader) = status.region.peers.iter().find(|p| p.id == status.peer_id) else {
                continue;
            };
            if !due {
                continue;
            }
            let hb = pd::RegionHeartbeat {
                region: status.region.clone(),
                leader: *leader,
                ..Default::default()
            };
            match pd.region_heartbeat(hb).await {
                Ok(_) => {
                    reported.insert(status.region.id, (status.term, Instant::now()));
                }
                // PD may be restarting; the next round retries.
                Err(e) => debug!(region_id = status.region.id, "region heartbeat failed: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}
