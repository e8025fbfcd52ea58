//! Many regions on 3 PD members and 3 nodes: the nodes split their regions
//! as keys arrive (small limits) until there are at least 64, while
//! clients write through every node; then a full prefix Range and its
//! count, a Kubernetes-style paginated list at one revision (limit, and
//! the next page from the last key + `\0` at the first page's revision),
//! and reads at that revision from every node all agree with what was
//! written; PD's leader balance spreads the regions' leaders evenly (within
//! one) over the nodes.
//!
//! `SCALE_KEYS` (default 12,000) sets the number of keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use pd::{PdClient, RpcPdClient, RpcPdClientConfig};
use test_support::{ProcessCluster, ProcessClusterOptions};

const MIN_REGIONS: usize = 64;

fn key(i: usize) -> String {
    format!("scale/{i:07}")
}

async fn write_all(endpoints: &[String], n: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..24 {
        let endpoint = endpoints[w % endpoints.len()].clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([endpoint], None).await.expect("connect");
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                // Splits make the odd request retry inside the node; a
                // client-side error is retried here (puts are idempotent
                // for this test: the same value again).
                let mut tries = 0;
                while let Err(e) = c.put(key(i), format!("v{i}"), None).await {
                    tries += 1;
                    assert!(tries < 20, "put {}: {e}", key(i));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_regions_answer_as_one_store() {
    let n: usize = std::env::var("SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12_000);
    let max_keys = (n / (MIN_REGIONS * 2)).max(2).to_string();
    let cluster = ProcessCluster::start_with(ProcessClusterOptions {
        node_args: vec![
            "--region-max-keys".into(),
            max_keys,
            "--split-check-interval".into(),
            "300ms".into(),
        ],
        ..Default::default()
    })
    .await;
    let endpoints: Vec<String> = cluster.nodes().iter().map(|n| n.endpoint()).collect();
    let started = Instant::now();
    write_all(&endpoints, n).await;
    let wrote = started.elapsed();

    let pd = RpcPdClient::connect(&cluster.pd_endpoints(), RpcPdClientConfig::default())
        .await
        .expect("connect to PD");
    let deadline = Instant::now() + Duration::from_secs(120);
    let regions = loop {
        let regions = pd.scan_regions(b"", b"", 0).await.expect("scan regions");
        let led = regions.iter().filter(|r| r.leader.is_some()).count();
        // PD learns of a split's two sides from two heartbeats: wait until
        // it has heard from every region (adjacent, covering the keyspace).
        let adjacent = regions
            .windows(2)
            .all(|p| p[0].region.end_key == p[1].region.start_key)
            && regions
                .first()
                .is_some_and(|r| r.region.start_key.is_empty())
            && regions.last().is_some_and(|r| r.region.end_key.is_empty());
        if regions.len() >= MIN_REGIONS && led == regions.len() && adjacent {
            break regions;
        }
        assert!(
            Instant::now() < deadline,
            "{} regions ({led} with a leader) after {:?}",
            regions.len(),
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "{n} keys written in {wrote:?}; {} regions after {:?}",
        regions.len(),
        started.elapsed()
    );
    // PD's leader balance spreads the leaders: within one of even.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let regions = pd.scan_regions(b"", b"", 0).await.expect("scan regions");
        let mut per_node = std::collections::BTreeMap::new();
        for r in &regions {
            if let Some(l) = r.leader {
                *per_node.entry(l.node_id).or_insert(0usize) += 1;
            }
        }
        let (min, max) = (
            per_node.values().min().copied().unwrap_or(0),
            per_node.values().max().copied().unwrap_or(0),
        );
        if per_node.len() == 3 && max - min <= 1 {
            println!(
                "leaders per node {per_node:?} after {:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaders not balanced: {per_node:?} over {} regions",
            regions.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut c = Client::connect([endpoints[0].clone()], None)
        .await
        .expect("connect");
    // One read of the whole prefix, and its count.
    let all = c
        .get("scale/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("full range");
    assert_eq!(all.count() as usize, n);
    assert_eq!(all.kvs().len(), n);
    for (i, kv) in all.kvs().iter().enumerate() {
        assert_eq!(kv.key_str().ok(), Some(key(i).as_str()));
        assert_eq!(kv.value_str().ok(), Some(format!("v{i}").as_str()));
    }
    let counted = c
        .get(
            "scale/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count");
    assert_eq!(counted.count() as usize, n);
    let revision = all.header().map_or(0, |h| h.revision());

    // Kubernetes' paginated list: pages of 500 at the first page's revision,
    // each next page from the last key + "\0"; every page counts what is
    // left. A write after the first page changes nothing in the list.
    c.put(key(0), "changed", None).await.expect("put");
    let mut seen = 0;
    let mut from = b"scale/".to_vec();
    let end = b"scale0".to_vec();
    loop {
        let page = c
            .get(
                from.clone(),
                Some(
                    GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(500)
                        .with_revision(revision),
                ),
            )
            .await
            .expect("page");
        assert_eq!(
            page.count() as usize,
            n - seen,
            "count of the page from key {seen}"
        );
        for kv in page.kvs() {
            assert_eq!(kv.key_str().ok(), Some(key(seen).as_str()));
            assert_eq!(kv.value_str().ok(), Some(format!("v{seen}").as_str()));
            seen += 1;
        }
        if !page.more() {
            break;
        }
        from = page
            .kvs()
            .last()
            .map(|kv| kv.key().to_vec())
            .unwrap_or_default();
        from.push(0);
    }
    assert_eq!(seen, n);

    // Every node answers the same at that revision.
    for endpoint in &endpoints {
        let mut c = Client::connect([endpoint.clone()], None)
            .await
            .expect("connect");
        let r = c
            .get(
                "scale/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_revision(revision)
                        .with_keys_only(),
                ),
            )
            .await
            .expect("read at revision");
        assert_eq!(r.kvs().len(), n, "{endpoint}");
        assert_eq!(r.count() as usize, n, "{endpoint}");
    }
}
