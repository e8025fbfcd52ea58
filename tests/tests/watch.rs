//! etcd's Watch on real processes:
//! * differential: the same seeded writes go to a real etcd and to a
//!   MetaStore dev node (and to one forced into many small regions); the
//!   same watches (single keys, ranges, prefixes, from-key, past start
//!   revisions, prev_kv, NOPUT/NODELETE filters) get the same events, and
//!   each revision's events in one response on both; so does a watch
//!   started before further writes; the refusals (empty range, duplicate
//!   id) and the compacted cancel answer the same;
//! * etcdctl `watch --prefix --rev --prev-kv` prints what etcd's prints;
//! * the etcd-client crate: watch, cancel, and `RequestProgress` answered
//!   at a revision at least the current one.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::request_op::Request as Op;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::watch_create_request::FilterType;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::*;
use proto::mvccpb::Event;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::{client, metastore_ctl, Etcd, Node, Pd};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const KEYS: usize = 8;
/// A watch stream this long without a response has sent its history.
const QUIET: Duration = Duration::from_millis(700);

async fn channel(endpoint: &str) -> Channel {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Channel::from_shared(endpoint.to_owned())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => panic!("connect {endpoint}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("k{i}").into_bytes()
}

/// Seeded writes: puts, deletes of a key or a range, and txns putting
/// and deleting several keys at one revision.
fn writes(seed: u64, n: usize) -> Vec<TxnRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut value = 0;
    (0..n)
        .map(|_| {
            let ops = (0..rng.gen_range(1..=3))
                .map(|_| {
                    let k = key(rng.gen_range(0..KEYS));
                    value += 1;
                    let request = match rng.gen_range(0..10) {
                        0..=6 => Op::RequestPut(PutRequest {
                            key: k,
                            value: format!("v{value}").into_bytes(),
                            ..Default::default()
                        }),
                        7 | 8 => Op::RequestDeleteRange(DeleteRangeRequest {
                            key: k,
                            ..Default::default()
                        }),
                        _ => Op::RequestDeleteRange(DeleteRangeRequest {
                            key: k,
                            range_end: key(rng.gen_range(0..KEYS)),
                            ..Default::default()
                        }),
                    };
                    RequestOp {
                        request: Some(request),
                    }
                })
                .collect::<Vec<_>>();
            // One change per key per revision, as etcd requires of a txn.
            let mut seen = std::collections::HashSet::new();
            let ops = ops
                .into_iter()
                .filter(|op| match &op.request {
                    Some(Op::RequestPut(p)) => seen.insert(p.key.clone()),
                    Some(Op::RequestDeleteRange(d)) => {
                        d.range_end.is_empty() && seen.insert(d.key.clone())
                    }
                    _ => false,
                })
                .collect::<Vec<_>>();
            TxnRequest {
                success: ops,
                ..Default::default()
            }
        })
        .collect()
}

/// Applies `writes`; the revision after them.
async fn apply(kv: &mut KvClient<Channel>, writes: &[TxnRequest]) -> i64 {
    let mut rev = 0;
    for w in writes {
        let resp = kv.txn(w.clone()).await.expect("txn").into_inner();
        rev = resp.header.map_or(0, |h| h.revision);
    }
    rev
}

/// Watches the test asks for: (create request, label).
fn watches(seed: u64, last: i64) -> Vec<WatchCreateRequest> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    (0..12)
        .map(|_| {
            let k = rng.gen_range(0..KEYS);
            let range_end = match rng.gen_range(0..4) {
                0 => Vec::new(),
                1 => vec![0],
                2 => b"l".to_vec(),
                _ => key((k + rng.gen_range(1..4)).min(KEYS)),
            };
            let mut filters = Vec::new();
            match rng.gen_range(0..5) {
                0 => filters.push(FilterType::Noput as i32),
                1 => filters.push(FilterType::Nodelete as i32),
                _ => {}
            }
            WatchCreateRequest {
                key: if rng.gen_bool(0.2) {
                    b"k".to_vec()
                } else {
                    key(k)
                },
                range_end,
                start_revision: rng.gen_range(1..=last),
                prev_kv: rng.gen_bool(0.5),
                filters,
                ..Default::default()
            }
        })
        .collect()
}

/// One watch stream: responses as they come.
struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    rx: tonic::Streaming<WatchResponse>,
}

impl Stream {
    /// Opens a stream with `first` as its first create request (a gRPC
    /// server may answer the call only once it has something to send);
    /// the stream and the created answer.
    async fn open(channel: &Channel, first: WatchCreateRequest) -> (Stream, WatchResponse) {
        let (tx, rx) = mpsc::channel(16);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(first)),
        })
        .await
        .expect("send");
        let resp = WatchClient::new(channel.clone())
            .watch(ReceiverStream::new(rx))
            .await
            .expect("watch stream");
        let mut stream = Stream {
            tx,
            rx: resp.into_inner(),
        };
        let created = stream.next().await;
        (stream, created)
    }

    async fn send(&self, req: RequestUnion) {
        self.tx
            .send(WatchRequest {
                request_union: Some(req),
            })
            .await
            .expect("send");
    }

    async fn next(&mut self) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("a watch response in time")
            .expect("stream")
            .expect("open stream")
    }

    /// Creates a watch; its created answer.
    async fn create(&mut self, req: WatchCreateRequest) -> WatchResponse {
        self.send(RequestUnion::CreateRequest(req)).await;
        self.next().await
    }

    /// Event responses of watch `id` until one reaches `revision`.
    async fn events_until(&mut self, id: i64, revision: i64) -> Vec<Vec<Event>> {
        let mut out = Vec::new();
        loop {
            let resp = self.next().await;
            assert_eq!(resp.watch_id, id, "{resp:?}");
            assert!(!resp.canceled, "{resp:?}");
            let reached = resp
                .events
                .last()
                .is_some_and(|e| e.kv.as_ref().unwrap().mod_revision >= revision);
            out.push(resp.events);
            if reached {
                return out;
            }
        }
    }
}

/// The comparable part of a watch's output: its events, each response's
/// revisions distinct from every other response's.
fn flatten(responses: &[Vec<Event>]) -> Vec<Event> {
    let mut owner: BTreeMap<i64, usize> = BTreeMap::new();
    for (i, r) in responses.iter().enumerate() {
        for e in r {
            let rev = e.kv.as_ref().unwrap().mod_revision;
            assert_eq!(*owner.entry(rev).or_insert(i), i, "revision {rev} split");
        }
    }
    responses.concat()
}

/// Every watch of `reqs` on `endpoint`: its events.
async fn run_watches(endpoint: &str, reqs: &[WatchCreateRequest]) -> Vec<Vec<Event>> {
    let channel = channel(endpoint).await;
    let mut stream: Option<Stream> = None;
    let mut out = Vec::new();
    for req in reqs {
        let created = match &mut stream {
            Some(stream) => stream.create(req.clone()).await,
            None => {
                let (opened, created) = Stream::open(&channel, req.clone()).await;
                stream = Some(opened);
                created
            }
        };
        let stream = stream.as_mut().unwrap();
        assert!(created.created && !created.canceled, "{created:?}");
        // Every write is applied before the watch starts: its history
        // comes at once, then the stream goes quiet.
        let mut responses = Vec::new();
        while let Ok(resp) = tokio::time::timeout(QUIET, stream.rx.message()).await {
            let resp = resp.expect("stream").expect("open stream");
            assert_eq!(resp.watch_id, created.watch_id, "{resp:?}");
            responses.push(resp.events);
        }
        stream
            .send(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: created.watch_id,
            }))
            .await;
        let canceled = stream.next().await;
        assert!(canceled.canceled, "{canceled:?}");
        out.push(flatten(&responses));
    }
    out
}

/// How many regions the dev node at `endpoint` has.
fn regions(endpoint: &str) -> usize {
    let out = metastore_ctl(endpoint, &["region", "list", "-w", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["regions"].as_array().map_or(0, Vec::len)
}

async fn differential(node_args: &[&str], seed: u64, min_regions: usize) {
    let etcd = Etcd::start();
    let node = Node::start_dev_with(node_args);
    let writes = writes(seed, 200);
    let mut revs = Vec::new();
    for endpoint in [etcd.endpoint(), node.endpoint()] {
        let mut kv = KvClient::new(channel(&endpoint).await);
        revs.push(apply(&mut kv, &writes).await);
    }
    assert_eq!(revs[0], revs[1], "the same writes, the same revisions");
    let last = revs[0];
    // The splits run behind the writes (every split check interval).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let regions = regions(&node.endpoint());
        if regions >= min_regions {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{regions} regions, not {min_regions}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reqs = watches(seed, last);
    let want = run_watches(&etcd.endpoint(), &reqs).await;
    let got = run_watches(&node.endpoint(), &reqs).await;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "watch {i} {:?}", reqs[i]);
    }
    assert!(want.iter().map(Vec::len).sum::<usize>() > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_events_as_etcd() {
    differential(&[], 7, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_events_as_etcd_over_many_regions() {
    differential(
        &["--region-max-keys", "2", "--split-check-interval", "100ms"],
        11,
        3,
    )
    .await;
}

/// A watch from now sees what is written after it, live, and the
/// answers to a refused create, a duplicate id, and a compacted start
/// revision are etcd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_and_refusals_as_etcd() {
    let etcd = Etcd::start();
    let node = Node::start_dev();
    let mut answers = Vec::new();
    for endpoint in [etcd.endpoint(), node.endpoint()] {
        let channel = channel(&endpoint).await;
        let mut kv = KvClient::new(channel.clone());
        let first = apply(&mut kv, &writes(3, 5)).await;
        let (mut stream, created) = Stream::open(
            &channel,
            WatchCreateRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                prev_kv: true,
                watch_id: 7,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(created.watch_id, 7);
        let later = writes(4, 20);
        let last = apply(&mut kv, &later).await;
        let events = flatten(&stream.events_until(7, last).await);
        assert!(events
            .iter()
            .all(|e| e.kv.as_ref().unwrap().mod_revision > first));
        let dup = stream
            .create(WatchCreateRequest {
                key: b"a".to_vec(),
                watch_id: 7,
                ..Default::default()
            })
            .await;
        let empty = stream
            .create(WatchCreateRequest {
                key: b"b".to_vec(),
                range_end: b"a".to_vec(),
                ..Default::default()
            })
            .await;
        kv.compact(CompactionRequest {
            revision: last - 5,
            physical: true,
        })
        .await
        .expect("compact");
        let compacted = stream
            .create(WatchCreateRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                start_revision: 2,
                ..Default::default()
            })
            .await;
        let cancel = stream.next().await;
        let strip = |r: WatchResponse| WatchResponse { header: None, ..r };
        answers.push((
            events,
            strip(dup),
            strip(empty),
            strip(compacted),
            strip(cancel),
        ));
    }
    assert_eq!(answers[1], answers[0]);
}

/// etcdctl's watch prints the same lines against MetaStore as against
/// etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_prints_what_etcd_prints() {
    let etcd = Etcd::start();
    let node = Node::start_dev();
    let mut outputs = Vec::new();
    for endpoint in [etcd.endpoint(), node.endpoint()] {
        let mut kv = KvClient::new(channel(&endpoint).await);
        let last = apply(&mut kv, &writes(5, 30)).await;
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(["watch", "--prefix", "k", "--rev=2", "--prev-kv"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run etcdctl");
        tokio::time::sleep(Duration::from_secs(2)).await;
        child.kill().expect("kill etcdctl");
        let out = child.wait_with_output().expect("etcdctl output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.lines().count() > 30, "{last}: {text}");
        outputs.push(text);
    }
    assert_eq!(outputs[1], outputs[0]);
}

/// The etcd-client crate: a watch's events, its cancel, and a progress
/// request answered at or above the current revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_watch_cancel_and_progress() {
    let node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_prev_key();
    let mut stream = c.watch("app/", Some(opts)).await.expect("watch");
    let created = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("created in time")
        .expect("stream")
        .expect("open");
    assert!(created.created());
    c.put("app/a", "1", None).await.expect("put");
    c.put("app/a", "2", None).await.expect("put");
    let current = c
        .delete("app/a", None)
        .await
        .expect("delete")
        .header()
        .unwrap()
        .revision();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events in time")
            .expect("stream")
            .expect("open");
        seen.extend(resp.events().iter().map(|e| {
            (
                e.event_type(),
                e.kv().map(|kv| kv.value().to_vec()),
                e.prev_kv().map(|kv| kv.value().to_vec()),
            )
        }));
    }
    use etcd_client::EventType::{Delete, Put};
    assert_eq!(
        seen,
        vec![
            (Put, Some(b"1".to_vec()), None),
            (Put, Some(b"2".to_vec()), Some(b"1".to_vec())),
            (Delete, Some(Vec::new()), Some(b"2".to_vec())),
        ]
    );
    stream.request_progress().await.expect("progress request");
    let progress = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("progress in time")
        .expect("stream")
        .expect("open");
    assert!(progress.events().is_empty());
    assert!(progress.header().unwrap().revision() >= current);
    stream.cancel(created.watch_id()).await.expect("cancel");
    let canceled = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("cancel in time")
        .expect("stream")
        .expect("open");
    assert!(canceled.canceled());
}

/// A watch asking for progress notifications gets one, at the current
/// revision, after every `--experimental-watch-progress-notify-interval`
/// without events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_get_progress_notifications() {
    let node = Node::start_dev_with(&["--experimental-watch-progress-notify-interval", "300ms"]);
    let mut c = client(&node.endpoint()).await;
    let current = c
        .put("idle/a", "1", None)
        .await
        .expect("put")
        .header()
        .unwrap()
        .revision();
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_progress_notify();
    let mut stream = c.watch("idle/", Some(opts)).await.expect("watch");
    let mut progress = Vec::new();
    while progress.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a notification in time")
            .expect("stream")
            .expect("open");
        if !resp.created() {
            assert!(resp.events().is_empty(), "{resp:?}");
            progress.push(resp.header().unwrap().revision());
        }
    }
    assert!(progress.iter().all(|r| *r >= current), "{progress:?}");
}

/// A progress answer never goes below an event already sent: under a
/// stream of writes, every `RequestProgress` answer's revision is at
/// least that of every event the stream delivered before it, whichever
/// of its watches sent it (Kubernetes takes the answer as its watch
/// cache's revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_never_goes_below_an_event_sent() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    let mut c = client(&ep).await;
    let mut stream = c
        .watch(
            "busy/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("watch");
    // A second, idle watch on the stream: the answer (watch id -1) is for
    // both, so it must be at or above the busy one's events too.
    stream
        .watch(
            "idle/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("second watch");
    // Several writers, so the watch has updates queued at many of the
    // session's progress ticks.
    let writer = tokio::spawn(async move {
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let ep = ep.clone();
                tokio::spawn(async move {
                    let mut c = client(&ep).await;
                    for i in 0..500 {
                        c.put(format!("busy/{w}/{}", i % 16), "v", None)
                            .await
                            .expect("put");
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.expect("writer");
        }
    });
    let (mut requests, mut responses) = stream.split();
    let asker = tokio::spawn(async move {
        while !writer.is_finished() {
            requests.request_progress().await.expect("progress request");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut last_event = 0;
    let mut answers = 0;
    while !asker.is_finished() {
        let Ok(resp) = tokio::time::timeout(Duration::from_millis(100), responses.message()).await
        else {
            continue;
        };
        // The stream ends once the asker is done (its half closed).
        let Some(resp) = resp.expect("stream") else {
            break;
        };
        let revision = resp.header().expect("header").revision();
        let events = resp.events().iter().filter_map(|e| e.kv());
        if let Some(max) = events.map(|kv| kv.mod_revision()).max() {
            last_event = last_event.max(max);
        } else if !resp.created() {
            answers += 1;
            assert!(
                revision >= last_event,
                "progress at {revision} after an event at {last_event}"
            );
        }
    }
    assert!(answers > 10, "{answers} progress answers");
}

/// With one replica per region (PD's `--max-replicas 1`) over two nodes,
/// the node without the replica serves a watch on its keys through the
/// leader's node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_replica_serves_the_watch() {
    let pd = Pd::start_cluster_with(1, |_, _| vec!["--max-replicas".into(), "1".into()]);
    let pd_endpoint = pd[0].endpoint();
    let nodes: Vec<Node> = ["n1", "n2"]
        .iter()
        .map(|name| Node::start_dev_with(&["--name", name, "--pd-endpoints", &pd_endpoint]))
        .collect();
    let mut writer = client(&nodes[0].endpoint()).await;
    let first = writer
        .put("r/a", "1", None)
        .await
        .expect("put")
        .header()
        .unwrap()
        .revision();
    let out = metastore_ctl(&pd_endpoint, &["region", "list", "-w", "json"]);
    let regions: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let holders: Vec<u64> = regions["regions"][0]["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["node_id"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(holders.len(), 1, "{regions}");
    for node in &nodes {
        let mut c = client(&node.endpoint()).await;
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(first);
        let mut stream = c.watch("r/", Some(opts)).await.expect("watch");
        let last = writer.put("r/b", node.endpoint(), None).await.expect("put");
        let last = last.header().unwrap().revision();
        let mut seen = Vec::new();
        while seen.last().is_none_or(|r| *r < last) {
            let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("events in time")
                .expect("stream")
                .expect("open");
            assert!(!resp.canceled(), "{resp:?}");
            seen.extend(resp.events().iter().map(|e| e.kv().unwrap().mod_revision()));
        }
        assert_eq!(seen.first(), Some(&first), "{seen:?}");
    }
}
