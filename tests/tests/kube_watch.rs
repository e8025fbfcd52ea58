//! Kubernetes' traffic shape on a node splitting into many regions: the
//! API server's watch cache — a paged list (`limit` + continue from the
//! last key + `\0`) at one revision, then a prefix watch from that
//! revision + 1 with prev_kv and progress notifications, and
//! `RequestProgress` before a consistent read from the cache — kept
//! against writers doing Kubernetes' optimistic Txns (create if absent,
//! update and delete if the mod revision is unchanged) and a compactor
//! doing Kubernetes' compare-on-version Txn then `Compact` every second,
//! and Kubernetes events created on leases as the API server makes them
//! (a 1 h lease shared by the events of a minute, here with a 2 s one
//! expiring mid-run, and the 1 h one revoked at the end: their events
//! vanish at one revision each). Whenever a progress answer at revision R
//! arrives, the cache must equal a list at R; at the end, the current
//! state. No event lost, repeated, out of order or cut from its revision
//! across the splits (events are applied with their prev_kv checked
//! against the cache, and a revision seen again fails).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::request_op::Request as Op;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::*;
use proto::mvccpb::event::EventType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::{metastore_ctl, Node};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const PREFIX: &[u8] = b"/registry/";
const PREFIX_END: &[u8] = b"/registry0";
const OBJECTS: usize = 60;

async fn channel(endpoint: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Channel::from_shared(endpoint.to_owned())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("connect {endpoint}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn compare_mod(key: &[u8], rev: i64) -> Compare {
    Compare {
        key: key.to_vec(),
        target: CompareTarget::Mod as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::ModRevision(rev)),
        ..Default::default()
    }
}

/// A Txn operation reading `key`.
fn get_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

/// Kubernetes' writes: create, update and delete of objects, each a Txn
/// guarded by the mod revision the writer last saw.
async fn writer(mut kv: KvClient<Channel>, seed: u64, stop: Arc<AtomicBool>) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!(
            "/registry/pods/ns{}/pod{:03}",
            rng.gen_range(0..3),
            rng.gen_range(0..OBJECTS)
        )
        .into_bytes();
        let rev = seen.get(&key).copied().unwrap_or(0);
        let op = if rev != 0 && rng.gen_bool(0.2) {
            Op::RequestDeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            })
        } else {
            Op::RequestPut(PutRequest {
                key: key.clone(),
                value: format!("spec-{}", rng.gen::<u32>()).into_bytes(),
                ..Default::default()
            })
        };
        let txn = TxnRequest {
            compare: vec![compare_mod(&key, rev)],
            success: vec![RequestOp { request: Some(op) }],
            failure: vec![get_op(&key)],
        };
        let Ok(resp) = kv.txn(txn).await else {
            continue;
        };
        let resp = resp.into_inner();
        let header_rev = resp.header.map_or(0, |h| h.revision);
        if resp.succeeded {
            done += 1;
            match resp.responses.first().and_then(|r| r.response.as_ref()) {
                Some(response_op::Response::ResponseDeleteRange(_)) => {
                    seen.remove(&key);
                }
                _ => {
                    seen.insert(key, header_rev);
                }
            }
        } else {
            let current = resp
                .responses
                .first()
                .and_then(|r| match &r.response {
                    Some(response_op::Response::ResponseRange(r)) => r.kvs.first().cloned(),
                    _ => None,
                })
                .map_or(0, |kv| kv.mod_revision);
            seen.insert(key, current);
        }
    }
    done
}

/// Kubernetes' events, created as the API server creates them (a Txn
/// putting the event if absent, with the lease of its TTL), a third of
/// them on a lease of 2 s that expires meanwhile (creations on it fail
/// from then on, "requested lease not found"), the rest on a lease of
/// 1 h. The creations, and the 1 h lease.
async fn event_writer(
    mut kv: KvClient<Channel>,
    mut leases: LeaseClient<Channel>,
    stop: Arc<AtomicBool>,
) -> (usize, i64) {
    let grant = |ttl| {
        let mut leases = leases.clone();
        async move {
            leases
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .expect("grant")
                .into_inner()
                .id
        }
    };
    let hour = grant(3600).await;
    let short = grant(2).await;
    let mut created = 0;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("/registry/events/ns{}/ev{n:05}", n % 3).into_bytes();
        let lease = if n % 3 == 0 { short } else { hour };
        let txn = TxnRequest {
            compare: vec![compare_mod(&key, 0)],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: key.clone(),
                    value: format!("event {n}").into_bytes(),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![get_op(&key)],
        };
        if kv.txn(txn).await.is_ok_and(|r| r.into_inner().succeeded) {
            created += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let alive = leases
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: short,
            keys: false,
        })
        .await
        .expect("time to live")
        .into_inner();
    assert_eq!(alive.ttl, -1, "the short lease expired");
    (created, hour)
}

/// Kubernetes' compactor: claims the compaction with a Txn on the
/// compact key's version, then compacts at the revision seen a period
/// earlier.
async fn compactor(mut kv: KvClient<Channel>, stop: Arc<AtomicBool>) -> usize {
    let key = b"compact_rev_key".to_vec();
    let mut version = 0;
    let mut last = 0;
    let mut compactions = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let txn = TxnRequest {
            compare: vec![Compare {
                key: key.clone(),
                target: CompareTarget::Version as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::Version(version)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: key.clone(),
                    value: last.to_string().into_bytes(),
                    ..Default::default()
                })),
            }],
            failure: vec![get_op(&key)],
        };
        let Ok(resp) = kv.txn(txn).await else {
            continue;
        };
        let resp = resp.into_inner();
        let rev = resp.header.map_or(0, |h| h.revision);
        if resp.succeeded {
            version += 1;
            if last > 0
                && kv
                    .compact(CompactionRequest {
                        revision: last,
                        physical: false,
                    })
                    .await
                    .is_ok()
            {
                compactions += 1;
            }
            last = rev;
        }
    }
    compactions
}

type Cache = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;

/// Applies a watch response to the cache (checking each event's prev_kv
/// against it); `at` is the revision the cache is complete up to. The
/// revision of a progress answer, if it is one.
fn apply(cache: &mut Cache, at: &mut i64, resp: &WatchResponse) -> Option<i64> {
    assert!(!resp.canceled, "watch canceled: {resp:?}");
    for e in &resp.events {
        let kv = e.kv.as_ref().unwrap();
        assert!(
            kv.mod_revision > *at,
            "event at {} after {at}",
            kv.mod_revision
        );
        let prev = e
            .prev_kv
            .as_ref()
            .map(|p| (p.value.clone(), p.mod_revision));
        assert_eq!(
            cache.get(&kv.key).cloned(),
            prev,
            "prev_kv of {:?} at {} disagrees with the cache",
            String::from_utf8_lossy(&kv.key),
            kv.mod_revision
        );
        if e.r#type == EventType::Delete as i32 {
            cache.remove(&kv.key);
        } else {
            cache.insert(kv.key.clone(), (kv.value.clone(), kv.mod_revision));
        }
    }
    if let Some(last) = resp.events.last() {
        *at = last.kv.as_ref().unwrap().mod_revision;
    }
    let rev = resp.header.as_ref().map_or(0, |h| h.revision);
    if resp.events.is_empty() && !resp.created {
        assert!(rev >= *at, "progress at {rev} below delivered {at}");
        *at = rev;
        return Some(rev);
    }
    None
}

/// The objects at `revision`, in one read; `None` once compacted.
async fn state_at(kv: &mut KvClient<Channel>, revision: i64) -> Option<Cache> {
    let resp = kv
        .range(RangeRequest {
            key: PREFIX.to_vec(),
            range_end: PREFIX_END.to_vec(),
            revision,
            ..Default::default()
        })
        .await
        .ok()?;
    Some(
        resp.into_inner()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
            .collect(),
    )
}

/// Fails with the first objects where `cache` and `state` differ.
fn assert_same(cache: &Cache, state: &Cache, what: &str) {
    let keys: std::collections::BTreeSet<&Vec<u8>> = cache.keys().chain(state.keys()).collect();
    let diff: Vec<String> = keys
        .into_iter()
        .filter(|k| cache.get(*k) != state.get(*k))
        .take(5)
        .map(|k| {
            let rev = |c: &Cache| c.get(k).map(|(_, r)| *r);
            format!(
                "{}: cache at {:?}, store at {:?}",
                String::from_utf8_lossy(k),
                rev(cache),
                rev(state)
            )
        })
        .collect();
    assert!(diff.is_empty(), "{what} differs from the store: {diff:?}");
}

async fn ask_progress(tx: &mpsc::Sender<WatchRequest>) {
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(Default::default())),
    })
    .await
    .unwrap();
}

/// A paged list of the prefix at `revision` (0: now), as the API server
/// lists: pages of 50, each continuing from the last key + `\0` at the
/// first page's revision. The objects and the revision listed at.
async fn list(kv: &mut KvClient<Channel>, revision: i64) -> (Cache, i64) {
    let mut cache = Cache::new();
    let mut key = PREFIX.to_vec();
    let mut at = revision;
    loop {
        let resp = kv
            .range(RangeRequest {
                key: key.clone(),
                range_end: PREFIX_END.to_vec(),
                limit: 50,
                revision: at,
                ..Default::default()
            })
            .await
            .expect("list page")
            .into_inner();
        if at == 0 {
            at = resp.header.as_ref().map_or(0, |h| h.revision);
        }
        for kv in &resp.kvs {
            cache.insert(kv.key.clone(), (kv.value.clone(), kv.mod_revision));
        }
        if !resp.more {
            return (cache, at);
        }
        key = resp.kvs.last().expect("a page").key.clone();
        key.push(0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_cache_stays_exact_over_splits_and_compactions() {
    let node =
        Node::start_dev_with(&["--region-max-keys", "20", "--split-check-interval", "200ms"]);
    let ch = channel(&node.endpoint()).await;
    let mut kv = KvClient::new(ch.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|i| tokio::spawn(writer(KvClient::new(ch.clone()), i, stop.clone())))
        .collect();
    let compactor = tokio::spawn(compactor(KvClient::new(ch.clone()), stop.clone()));
    let events_writer = tokio::spawn(event_writer(
        KvClient::new(ch.clone()),
        LeaseClient::new(ch.clone()),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The watch cache: list, then watch from the list's revision + 1.
    let (mut cache, listed) = list(&mut kv, 0).await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: PREFIX.to_vec(),
            range_end: PREFIX_END.to_vec(),
            start_revision: listed + 1,
            prev_kv: true,
            progress_notify: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = WatchClient::new(ch.clone())
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut at = listed;
    let mut events = 0;
    let mut checked = 0;
    let end = Instant::now() + Duration::from_secs(8);
    let mut next_progress = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_progress {
            ask_progress(&tx).await;
            next_progress = Instant::now() + Duration::from_millis(300);
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a watch response in time")
            .expect("stream")
            .expect("open");
        events += resp.events.len();
        if let Some(rev) = apply(&mut cache, &mut at, &resp) {
            // Everything up to `rev` is here (unless compacted since, the
            // cache must be the state at it).
            if let Some(state) = state_at(&mut kv, rev).await {
                assert_same(&cache, &state, &format!("the watch cache at {rev}"));
                checked += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    let compactions = compactor.await.unwrap();
    let (created, hour) = events_writer.await.unwrap();
    // The 1 h lease's events go at one revision.
    LeaseClient::new(ch.clone())
        .lease_revoke(LeaseRevokeRequest { id: hour })
        .await
        .expect("revoke");
    // Quiet now: one more progress answer at or above the last write's
    // revision, and the cache is the current state.
    let current = kv
        .range(RangeRequest {
            key: PREFIX.to_vec(),
            range_end: PREFIX_END.to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .header
        .map_or(0, |h| h.revision);
    ask_progress(&tx).await;
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the last progress answer in time")
            .expect("stream")
            .expect("open");
        if apply(&mut cache, &mut at, &resp).is_some_and(|rev| rev >= current) {
            break;
        }
    }
    let state = state_at(&mut kv, 0).await.expect("current state");
    assert_same(&cache, &state, "the watch cache at the end");
    let events_left = state
        .keys()
        .filter(|k| k.starts_with(b"/registry/events/"))
        .count();
    assert_eq!(events_left, 0, "events outlived their leases");
    let out = metastore_ctl(&node.endpoint(), &["region", "list", "-w", "json"]);
    let regions: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let regions = regions["regions"].as_array().map_or(0, Vec::len);
    println!(
        "{writes} writes, {created} Kubernetes events, {events} watch events, {checked} progress checks, {compactions} compactions, {regions} regions"
    );
    assert!(created >= 20, "{created} Kubernetes events created");
    assert!(regions >= 3, "{regions} regions");
    assert!(checked >= 3, "{checked} progress checks");
    assert!(compactions >= 2, "{compactions} compactions");
}
