//! A clean shutdown (SIGTERM) of the node holding the region leader while
//! clients write through it: the writes in flight at that moment finish —
//! the node stops its client port first and keeps its peer port (raft
//! messages, forwarded requests) until they are done — and the node exits
//! promptly. Had both ports closed together, the followers' acks could no
//! longer reach the leader and every write in flight would end "request
//! timed out" (or the shutdown would wait for them forever).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::{client, Cluster, ProcessCluster};

/// When a write was sent, when it was answered, and how.
type Outcome = (Instant, Instant, Result<(), String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_flight_writes_finish_when_the_leader_node_shuts_down() {
    let mut cluster = ProcessCluster::start().await;
    let leader = cluster.leader_index().await;
    let endpoint = cluster.node(leader).endpoint();
    // Every write through the leader's node.
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = client(&endpoint).await;
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let sent = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    c.put(format!("w{w}/{i}"), "v", None),
                )
                .await;
                let outcome = match r {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer in 20 s".into()),
                };
                let failed = outcome.is_err();
                log.lock().unwrap().push((sent, Instant::now(), outcome));
                if failed {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sigterm = Instant::now();
    cluster.node(leader).terminate();
    let exited =
        tokio::task::block_in_place(|| cluster.node_mut(leader).wait_exit(Duration::from_secs(20)));
    let exit = exited.expect("the node did not exit within 20 s of SIGTERM");
    assert!(exit.success(), "exit status {exit}");
    for w in writers {
        let _ = w.await;
    }
    let log = log.lock().unwrap();
    let in_flight: Vec<_> = log
        .iter()
        .filter(|(sent, answered, _)| *sent < sigterm && *answered > sigterm)
        .collect();
    for (_, _, outcome) in &in_flight {
        assert!(
            outcome.is_ok(),
            "a write in flight at SIGTERM ended {outcome:?} ({} writes were in flight)",
            in_flight.len()
        );
    }
    let ok = log.iter().filter(|(_, _, o)| o.is_ok()).count();
    println!(
        "{ok} writes acknowledged, {} in flight at SIGTERM, exit after {:?}",
        in_flight.len(),
        sigterm.elapsed()
    );
    assert!(ok > 100, "too few writes: {ok}");
}
