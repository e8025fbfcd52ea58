//! watch: opens `--streams` Watch streams with `--watch-per-stream` watchers
//! each over `--watched-key-total` keys, then puts `--put-total` times to
//! those keys and times each event from just before its put was sent to its
//! arrival. The send time travels in the first 8 bytes of the value, so no
//! bookkeeping is shared between the putting and the watching tasks.
//!
//! Every event a put should cause is accounted for: received (timed), or an
//! error of the watcher's creation failure, of a failed put (`PutFailed`),
//! or `EventNotReceived` after `--event-timeout`.

use crate::cli::{Global, WatchArgs};
use crate::conn;
use crate::keys;
use crate::progress::Progress;
use crate::rate::RateLimiter;
use crate::runner::{self, Worker};
use crate::stats::{BenchError, Stats};
use futures::channel::mpsc;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use tonic::Streaming;

pub struct WatchOutcome {
    pub create: Stats,
    pub create_elapsed: Duration,
    pub puts: Stats,
    pub puts_elapsed: Duration,
    pub events: Stats,
    pub events_elapsed: Duration,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What a stream reports once its watchers are set up.
struct Created {
    stats: Stats,
    /// Per watcher of the stream: created, or why not.
    watchers: Vec<Result<(), BenchError>>,
}

/// What a stream reports at the end.
struct Received {
    events: Stats,
    last_event: Option<Instant>,
    canceled: u64,
    broken: Option<BenchError>,
}

fn create_req(key: &[u8]) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

fn closed(e: impl std::fmt::Display) -> BenchError {
    BenchError::new("StreamClosed", e.to_string())
}

/// Waits for the answer to a create request, skipping anything else.
async fn await_created(
    rx: &mut Streaming<WatchResponse>,
    timeout: Duration,
) -> Result<WatchResponse, BenchError> {
    loop {
        let msg = tokio::time::timeout(timeout, rx.message())
            .await
            .map_err(|_| BenchError::new("Timeout", "no answer to watch create request"))??;
        match msg {
            Some(r) if r.created || r.canceled => return Ok(r),
            Some(_) => continue,
            None => return Err(closed("server closed the watch stream")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_task(
    ch: Channel,
    keys_of_watchers: Vec<Vec<u8>>,
    timeout: Duration,
    t0: Instant,
    created_tx: oneshot::Sender<Created>,
    received: Arc<AtomicU64>,
    progress: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut created = Created {
        stats: Stats::default(),
        watchers: Vec::with_capacity(keys_of_watchers.len()),
    };
    let mut out = Received {
        events: Stats::default(),
        last_event: None,
        canceled: 0,
        broken: None,
    };
    let (tx, req_rx) = mpsc::unbounded();
    let mut req_rx = Some(req_rx);
    let mut client = WatchClient::new(ch);

    // The first create is queued before the call: servers send the response
    // headers only along with the first response.
    let mut rx = None;
    for (j, key) in keys_of_watchers.iter().enumerate() {
        let st = Instant::now();
        if tx.unbounded_send(create_req(key)).is_err() {
            let e = closed("request channel closed");
            created.stats.record_err(&e);
            created.watchers.push(Err(e));
            continue;
        }
        if let Some(req_rx) = req_rx.take() {
            match client.watch(req_rx).await {
                Ok(r) => rx = Some(r.into_inner()),
                Err(e) => {
                    let e = BenchError::from(e);
                    for _ in 0..keys_of_watchers.len() {
                        created.stats.record_err(&e);
                        created.watchers.push(Err(e.clone()));
                    }
                    break;
                }
            }
        }
        let Some(stream) = rx.as_mut() else { break };
        match await_created(stream, timeout).await {
            Ok(r) if r.created && !r.canceled => {
                created.stats.record_ok(st.elapsed());
                created.watchers.push(Ok(()));
            }
            Ok(r) => {
                let e = BenchError::new("WatchCanceled", r.cancel_reason);
                created.stats.record_err(&e);
                created.watchers.push(Err(e));
            }
            Err(e) => {
                // The stream is unusable: the rest of its watchers fail alike.
                for _ in j..keys_of_watchers.len() {
                    created.stats.record_err(&e);
                    created.watchers.push(Err(e.clone()));
                }
                rx = None;
                break;
            }
        }
    }
    let _ = created_tx.send(created);

    let Some(mut rx) = rx else { return out };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = rx.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.canceled {
                        out.canceled += 1;
                    }
                    let now = Instant::now();
                    let now_ns = now.duration_since(t0).as_nanos() as u64;
                    for ev in resp.events {
                        let sent = ev
                            .kv
                            .as_ref()
                            .and_then(|kv| kv.value.get(..8))
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                            .map(u64::from_le_bytes)
                            .unwrap_or(now_ns);
                        out.events
                            .record_ok(Duration::from_nanos(now_ns.saturating_sub(sent)));
                        received.fetch_add(1, Ordering::Relaxed);
                        progress.fetch_add(1, Ordering::Relaxed);
                        out.last_event = Some(now);
                    }
                }
                Ok(None) => {
                    out.broken = Some(closed("server closed the watch stream"));
                    break;
                }
                Err(e) => {
                    out.broken = Some(e.into());
                    break;
                }
            }
        }
    }
    // Dropping the sender ends the request stream, i.e. closes the watch.
    drop(tx);
    out
}

struct WatchPutWorker {
    kv: KvClient<Channel>,
    watched: Arc<Vec<Vec<u8>>>,
    value: Arc<Vec<u8>>,
    t0: Instant,
    succeeded: Arc<Vec<AtomicU64>>,
}

impl Worker for WatchPutWorker {
    type Req = (usize, PutRequest);

    fn prepare(&mut self, i: u64) -> (usize, Self::Req) {
        let k = (i % self.watched.len() as u64) as usize;
        let req = PutRequest {
            key: self.watched[k].clone(),
            value: self.value.as_ref().clone(),
            ..Default::default()
        };
        (0, (k, req))
    }

    async fn send(&mut self, (k, mut req): Self::Req) -> Result<(), BenchError> {
        let sent = self.t0.elapsed().as_nanos() as u64;
        req.value[..8].copy_from_slice(&sent.to_le_bytes());
        self.kv.put(req).await?;
        self.succeeded[k].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// How many of `put_total` puts land on watched key `k` of `keys` (put `i`
/// goes to key `i % keys`).
fn puts_on_key(k: u64, keys: u64, put_total: u64) -> u64 {
    put_total / keys + u64::from(k < put_total % keys)
}

pub fn check(args: &WatchArgs) -> Result<(), String> {
    if args.val_size < 8 {
        return Err("--val-size must be at least 8 for watch".into());
    }
    keys::check_key_size(args.key_size, args.watched_key_total)
}

pub async fn run(g: &Global, conns: &[Channel], args: &WatchArgs) -> WatchOutcome {
    let t0 = Instant::now();
    let nkeys = args.watched_key_total;
    let watched: Arc<Vec<Vec<u8>>> =
        Arc::new((0..nkeys).map(|k| keys::key(k, args.key_size)).collect());
    let per_stream = args.watch_per_stream as usize;
    let streams = args.streams as usize;
    let key_of = |s: usize, j: usize| ((s * per_stream + j) as u64 % nkeys) as usize;

    // Phase 1: watchers.
    let create_progress = Progress::start("watch-create", (streams * per_stream) as u64);
    let event_total: u64 = (0..streams)
        .flat_map(|s| (0..per_stream).map(move |j| (s, j)))
        .map(|(s, j)| puts_on_key(key_of(s, j) as u64, nkeys, args.put_total))
        .sum();
    let event_counter = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut created_rxs = Vec::with_capacity(streams);
    let mut tasks = Vec::with_capacity(streams);
    let mut received = Vec::with_capacity(streams);
    let create_start = Instant::now();
    for s in 0..streams {
        // Stream s belongs to client s % clients, which uses that client's
        // connection, as etcd's tool assigns watch streams.
        let ch = conn::for_client(conns, s % g.clients as usize);
        let ks = (0..per_stream)
            .map(|j| watched[key_of(s, j)].clone())
            .collect();
        let (ctx, crx) = oneshot::channel();
        let got = Arc::new(AtomicU64::new(0));
        received.push(got.clone());
        created_rxs.push(crx);
        tasks.push(tokio::spawn(stream_task(
            ch,
            ks,
            args.event_timeout,
            t0,
            ctx,
            got,
            event_counter.clone(),
            stop_rx.clone(),
        )));
    }
    let create_counter = create_progress.counter();
    let mut create = Stats::default();
    let mut watcher_ok: Vec<Vec<Result<(), BenchError>>> = Vec::with_capacity(streams);
    for crx in created_rxs {
        let c = crx.await.unwrap_or_else(|_| Created {
            stats: Stats::default(),
            watchers: vec![Err(BenchError::new("ClientPanicked", "watch task died")); per_stream],
        });
        create.merge(&c.stats);
        create_counter.fetch_add(per_stream as u64, Ordering::Relaxed);
        watcher_ok.push(c.watchers);
    }
    let create_elapsed = create_start.elapsed();
    create_progress.finish().await;

    // Phase 2: puts, while the streams time the events.
    let succeeded: Arc<Vec<AtomicU64>> = Arc::new((0..nkeys).map(|_| AtomicU64::new(0)).collect());
    let value = Arc::new(keys::random_bytes(args.val_size));
    let workers: Vec<_> = (0..g.clients as usize)
        .map(|c| WatchPutWorker {
            kv: KvClient::new(conn::for_client(conns, c)),
            watched: watched.clone(),
            value: value.clone(),
            t0,
            succeeded: succeeded.clone(),
        })
        .collect();
    let event_progress = Progress::start_with_counter("watch-events", event_total, event_counter);
    let put_start = Instant::now();
    let put_out = runner::run(
        workers,
        args.put_total,
        1,
        RateLimiter::new(args.put_rate),
        None,
    )
    .await;
    let puts_done = Instant::now();

    // Events each stream can still expect: successful puts on the keys of
    // its created watchers.
    let expected: Vec<u64> = watcher_ok
        .iter()
        .enumerate()
        .map(|(s, ws)| {
            ws.iter()
                .enumerate()
                .filter(|(_, r)| r.is_ok())
                .map(|(j, _)| succeeded[key_of(s, j)].load(Ordering::Relaxed))
                .sum()
        })
        .collect();
    let deadline = puts_done + args.event_timeout;
    loop {
        let all_in = received
            .iter()
            .zip(&expected)
            .all(|(r, e)| r.load(Ordering::Relaxed) >= *e);
        if all_in || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stop_tx.send(true);

    let mut events = Stats::default();
    let mut last_event = puts_done;
    let mut canceled = 0;
    let mut broken = Stats::default();
    for (s, t) in tasks.into_iter().enumerate() {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => {
                broken.record_err(&BenchError::new("ClientPanicked", e.to_string()));
                continue;
            }
        };
        events.merge(&r.events);
        if let Some(t) = r.last_event {
            last_event = last_event.max(t);
        }
        canceled += r.canceled;
        if let Some(e) = r.broken {
            broken.record_err(&e);
        }
        let got = r.events.ok_count();
        if got < expected[s] {
            events.record_errs(
                &BenchError::new(
                    "EventNotReceived",
                    format!(
                        "events still missing {:?} after the last put",
                        args.event_timeout
                    ),
                ),
                expected[s] - got,
            );
        }
        for (j, w) in watcher_ok[s].iter().enumerate() {
            let k = key_of(s, j);
            let due = puts_on_key(k as u64, nkeys, args.put_total);
            match w {
                Err(e) => events.record_errs(e, due),
                Ok(()) => {
                    let failed = due.saturating_sub(succeeded[k].load(Ordering::Relaxed));
                    events.record_errs(
                        &BenchError::new("PutFailed", "the put that causes this event failed"),
                        failed,
                    );
                }
            }
        }
    }
    event_progress.finish().await;

    let mut extra = serde_json::Map::new();
    extra.insert("events_expected".into(), json!(event_total));
    extra.insert("watchers".into(), json!(streams * per_stream));
    extra.insert("canceled_responses".into(), json!(canceled));
    if broken.error_count() > 0 {
        let kinds: serde_json::Map<_, _> = broken
            .errors
            .iter()
            .map(|(k, v)| (k.clone(), json!({"count": v.count, "example": v.example})))
            .collect();
        extra.insert("broken_streams".into(), json!(kinds));
    }

    WatchOutcome {
        create,
        create_elapsed,
        puts: put_out.all(),
        puts_elapsed: put_out.elapsed,
        events,
        events_elapsed: last_event.duration_since(put_start),
        extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_are_split_over_keys() {
        for (keys, total) in [(1, 1000), (3, 10), (7, 3), (5, 0)] {
            let sum: u64 = (0..keys).map(|k| puts_on_key(k, keys, total)).sum();
            assert_eq!(sum, total);
            for k in 0..keys {
                let direct = (0..total).filter(|i| i % keys == k).count() as u64;
                assert_eq!(puts_on_key(k, keys, total), direct);
            }
        }
    }
}
