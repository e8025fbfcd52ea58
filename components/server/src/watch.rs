//! etcd's Watch service over the router's watches (`router::watch`).
//!
//! One gRPC stream carries many watches; a session task per stream owns
//! them and writes every response, so the order on the wire is the order
//! the session decided on. Contract, as etcd 3.5 behaves:
//! * Create: `watch_id` 0 lets the server choose (the lowest id from 0 not
//!   in use on the stream); a chosen id in use is refused. `key` empty
//!   means `"\0"`; `range_end` `"\0"` means every key from `key`, empty
//!   one key. `start_revision` 0 watches from the next revision. The
//!   answer is `created` with the watch id and a header at the current
//!   revision, before any event of the watch; a refused create answers
//!   `created` and `canceled` with watch id -1 and etcd's reason ("mvcc:
//!   watcher range is empty", "mvcc: duplicate watch ID provided on the
//!   WatchStream").
//! * Events come in revision order, one response per revision batch the
//!   router delivered (a revision's events never split, unless the watch
//!   asked for `fragment` and the response is larger than etcd's request
//!   limit: then fragments, all but the last flagged). `prev_kv` adds each
//!   event's previous version; the NOPUT / NODELETE filters drop events
//!   (a response left without events is not sent).
//! * A start revision below the compaction revision cancels the watch with
//!   `compact_revision` set, as etcd does; a watch that fails otherwise is
//!   canceled with the error as reason.
//! * Cancel answers `canceled` for a watch of the stream; an unknown id is
//!   ignored, as in etcd.
//! * Progress: a watch created with `progress_notify` gets an empty
//!   response at its delivered revision after every interval
//!   (`--experimental-watch-progress-notify-interval`) in which it sent
//!   nothing. A `RequestProgress` is answered with one empty response,
//!   watch id -1, at a revision R no lower than the current revision when
//!   it was asked, once every watch of the stream has sent everything up
//!   to R (Kubernetes reads its watch cache at R on the strength of it),
//!   and R is no lower than anything a watch of the stream reported (an
//!   event's revision, a progress notification): the answer is for every
//!   watch of the stream. While it waits, a watch that has sent up to the
//!   revision wanted takes no more updates, so the others can catch up
//!   ([`PROGRESS_PAUSE_MAX`] at most: no watch stalls long for another).
//! * `require_leader` metadata (`hasleader=true`): refused with etcd's "no
//!   leader" when this node's main region knows no leader.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{AbortHandle, Abortable, Aborted};
use futures::stream::FuturesUnordered;
use futures::{Future, Stream, StreamExt};
use mvcc::KeyRange;
use prost::Message as _;
use proto::etcdserverpb::watch_create_request::FilterType;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::watch_server::Watch;
use proto::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse};
use proto::mvccpb::{event::EventType, Event};
use router::watch::{Watch as RouterWatch, WatchProgress, WatchUpdate};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::{errors, NodeContext};

/// etcd's default `--max-request-bytes`: fragments are cut below it.
const MAX_RESPONSE_BYTES: usize = 1536 * 1024;
/// How often a session looks at progress to report.
const PROGRESS_TICK: Duration = Duration::from_millis(50);
/// How long watches ahead of a pending `RequestProgress` answer wait for
/// the others at most.
const PROGRESS_PAUSE_MAX: Duration = Duration::from_secs(1);
const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

pub struct WatchService {
    ctx: Arc<NodeContext>,
}

impl WatchService {
    pub fn new(ctx: Arc<NodeContext>) -> WatchService {
        WatchService { ctx }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let require_leader = req
            .metadata()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        if require_leader && self.ctx.main_region_status().leader_peer_id == 0 {
            return Err(Status::unavailable("etcdserver: no leader"));
        }
        let (tx, rx) = mpsc::channel(64);
        let session = Session {
            ctx: self.ctx.clone(),
            out: tx,
            watches: BTreeMap::new(),
            progress_interval: self.ctx.config.watch_progress_notify_interval.0,
            progress_asked: Vec::new(),
            pause: None,
            pending: Mutex::new(FuturesUnordered::new()),
        };
        tokio::spawn(session.run(req.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A watch's next update, with the watch (see [`arm`]).
type NextUpdate = Abortable<
    Pin<Box<dyn Future<Output = (i64, RouterWatch, Option<router::Result<WatchUpdate>>)> + Send>>,
>;

/// The session's waits (see `Session::pending`). The lock is never
/// taken: the session owns it, the mutex only makes the session `Sync`.
type Pending = Mutex<FuturesUnordered<NextUpdate>>;

fn waits(pending: &mut Pending) -> &mut FuturesUnordered<NextUpdate> {
    pending.get_mut().unwrap_or_else(|e| e.into_inner())
}

/// Waits for `watch`'s next update in `pending`; the handle stops the
/// wait (and drops the watch).
fn arm(pending: &mut Pending, id: i64, mut watch: RouterWatch) -> AbortHandle {
    let (abort, registration) = AbortHandle::new_pair();
    let next = async move {
        let update = watch.next().await;
        (id, watch, update)
    };
    waits(pending).push(Abortable::new(Box::pin(next), registration));
    abort
}

/// A watch of a session. Its router watch sits in the session's
/// `pending` set while the session waits for its next update, or in
/// `held` with an update taken while it was paused.
struct Active {
    progress: WatchProgress,
    abort: AbortHandle,
    held: Option<(RouterWatch, Option<router::Result<WatchUpdate>>)>,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    /// When the watch last sent a response (for progress notifications).
    last_sent: Instant,
    /// Every event at or below this revision has been sent.
    sent: i64,
    /// The highest revision the client was told of for this watch (an
    /// event response's, a progress notification's); at most `sent`.
    reported: i64,
}

impl Active {
    /// Every event up to the returned revision is on the wire: the
    /// router's delivered revision once nothing of it waits in the queue
    /// (nor is held here).
    fn sent_up_to(&mut self) -> i64 {
        let delivered = self.progress.delivered();
        if self.held.is_none() && self.progress.is_drained() {
            self.sent = self.sent.max(delivered);
        }
        self.sent
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        // Its router watch, waiting in `pending`, goes too.
        self.abort.abort();
    }
}

struct Session {
    ctx: Arc<NodeContext>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watches: BTreeMap<i64, Active>,
    progress_interval: Duration,
    /// Revisions `RequestProgress` calls wait to report, oldest first.
    progress_asked: Vec<i64>,
    /// While an answer waits: watches that have sent up to this revision
    /// take no updates, and since when.
    pause: Option<(i64, Instant)>,
    /// Every watch's wait for its next update: only the watches woken are
    /// polled, whatever their number.
    pending: Pending,
}

/// What woke a session.
enum Wake {
    Request(Option<WatchRequest>),
    Update(i64, RouterWatch, Option<router::Result<WatchUpdate>>),
    /// A watch's wait was stopped (the watch was cancelled).
    Stopped,
    Tick,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        let mut tick = tokio::time::interval(PROGRESS_TICK);
        loop {
            let no_waits = waits(&mut self.pending).is_empty();
            let wake = tokio::select! {
                req = inbound.message() => Wake::Request(req.ok().flatten()),
                Some(next) = waits(&mut self.pending).next(), if !no_waits => match next {
                    Ok((id, watch, update)) => Wake::Update(id, watch, update),
                    Err(Aborted) => Wake::Stopped,
                },
                _ = tick.tick() => Wake::Tick,
                _ = self.out.closed() => return,
            };
            let alive = match wake {
                Wake::Request(None) => return,
                Wake::Request(Some(req)) => self.on_request(req).await,
                Wake::Update(id, watch, update) => self.take_update(id, watch, update).await,
                Wake::Stopped => true,
                Wake::Tick => self.on_tick().await,
            };
            if !alive {
                return;
            }
        }
    }

    /// `false`: the client is gone.
    async fn send(&self, resp: WatchResponse) -> bool {
        self.out.send(Ok(resp)).await.is_ok()
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let mut header = Some(ResponseHeader {
            revision,
            ..Default::default()
        });
        self.ctx.fill_header(&mut header);
        header
    }

    async fn current_revision(&self) -> Result<i64, Status> {
        self.ctx
            .router
            .current_revision()
            .await
            .map_err(errors::status)
    }

    async fn on_request(&mut self, req: WatchRequest) -> bool {
        match req.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                if self.watches.remove(&cancel.watch_id).is_none() {
                    return true;
                }
                let revision = self.current_revision().await.unwrap_or_default();
                self.send(WatchResponse {
                    header: self.header(revision),
                    watch_id: cancel.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                match self.current_revision().await {
                    Ok(revision) => self.progress_asked.push(revision),
                    Err(e) => debug!("progress request not answered: {e}"),
                }
                self.on_tick().await
            }
            // etcd ignores what it does not know.
            None => true,
        }
    }

    async fn create(&mut self, req: WatchCreateRequest) -> bool {
        let key = if req.key.is_empty() {
            vec![0]
        } else {
            req.key.clone()
        };
        let range = KeyRange::from_etcd(&key, &req.range_end);
        let refuse = |reason: &str| WatchResponse {
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_owned(),
            ..Default::default()
        };
        let current = match self.current_revision().await {
            Ok(revision) => revision,
            Err(status) => return self.out.send(Err(status)).await.is_ok(),
        };
        if range.end.is_some() && range.is_empty() {
            let resp = WatchResponse {
                header: self.header(current),
                ..refuse(ERR_EMPTY_RANGE)
            };
            return self.send(resp).await;
        }
        let id = if req.watch_id != 0 {
            req.watch_id
        } else {
            (0..).find(|id| !self.watches.contains_key(id)).unwrap_or(0)
        };
        if self.watches.contains_key(&id) || id < 0 {
            let resp = WatchResponse {
                header: self.header(current),
                ..refuse(ERR_DUPLICATE_ID)
            };
            return self.send(resp).await;
        }
        let start = if req.start_revision > 0 {
            req.start_revision
        } else {
            current + 1
        };
        let watch = match self.ctx.router.watch(range, start, req.prev_kv).await {
            Ok(watch) => watch,
            Err(e) => {
                let resp = WatchResponse {
                    header: self.header(current),
                    ..refuse(errors::status(e).message())
                };
                return self.send(resp).await;
            }
        };
        let filters = |f: FilterType| req.filters.contains(&(f as i32));
        let progress = watch.progress();
        let abort = arm(&mut self.pending, id, watch);
        self.watches.insert(
            id,
            Active {
                progress,
                abort,
                held: None,
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                fragment: req.fragment,
                progress_notify: req.progress_notify,
                last_sent: Instant::now(),
                sent: start - 1,
                reported: 0,
            },
        );
        self.send(WatchResponse {
            header: self.header(current),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await
    }

    /// The watch paused for a pending progress answer, if `id` is one.
    fn paused(&self, id: i64) -> bool {
        let Some((target, since)) = self.pause else {
            return false;
        };
        since.elapsed() < PROGRESS_PAUSE_MAX
            && self.watches.get(&id).is_some_and(|a| a.sent >= target)
    }

    /// Watch `id` took `update`: held while the watch is paused, answered
    /// otherwise, and the watch waits for its next one.
    async fn take_update(
        &mut self,
        id: i64,
        watch: RouterWatch,
        update: Option<router::Result<WatchUpdate>>,
    ) -> bool {
        if self.paused(id) {
            if let Some(active) = self.watches.get_mut(&id) {
                active.held = Some((watch, update));
            }
            return true;
        }
        let ended = update.is_none();
        let alive = self.on_update(id, update).await;
        if let Some(active) = self.watches.get_mut(&id).filter(|_| !ended) {
            active.abort = arm(&mut self.pending, id, watch);
        }
        alive
    }

    /// Answers the updates held while watches were paused (the pause is
    /// over).
    async fn resume_held(&mut self) -> bool {
        let held: Vec<i64> = self
            .watches
            .iter()
            .filter(|(_, a)| a.held.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            let Some((watch, update)) = self.watches.get_mut(&id).and_then(|a| a.held.take())
            else {
                continue;
            };
            if !self.take_update(id, watch, update).await {
                return false;
            }
        }
        true
    }

    async fn on_update(&mut self, id: i64, update: Option<router::Result<WatchUpdate>>) -> bool {
        let resp = match update {
            Some(Ok(WatchUpdate::Events { events, revision })) => {
                let header = self.header(revision);
                let Some(active) = self.watches.get_mut(&id) else {
                    return true;
                };
                // Every change up to `revision` is delivered: once this
                // response is on its way, progress may say so (and must
                // not say less: it would go below an event sent).
                active.sent = active.sent.max(revision);
                let events: Vec<Event> = events
                    .into_iter()
                    .filter(|e| {
                        let put = e.r#type == EventType::Put as i32;
                        !(put && active.no_put || !put && active.no_delete)
                    })
                    .collect();
                if events.is_empty() {
                    return true;
                }
                active.reported = active.reported.max(revision);
                active.last_sent = Instant::now();
                let fragment = active.fragment;
                let resp = WatchResponse {
                    header,
                    watch_id: id,
                    events,
                    ..Default::default()
                };
                if fragment {
                    for part in fragments(resp) {
                        if !self.send(part).await {
                            return false;
                        }
                    }
                    return true;
                }
                resp
            }
            Some(Ok(WatchUpdate::Compacted { compact_revision })) => {
                self.watches.remove(&id);
                WatchResponse {
                    header: self.header(compact_revision),
                    watch_id: id,
                    canceled: true,
                    compact_revision,
                    ..Default::default()
                }
            }
            Some(Err(e)) => {
                self.watches.remove(&id);
                WatchResponse {
                    header: self.header(0),
                    watch_id: id,
                    canceled: true,
                    cancel_reason: errors::status(e).message().to_owned(),
                    ..Default::default()
                }
            }
            None => {
                self.watches.remove(&id);
                return true;
            }
        };
        self.send(resp).await
    }

    /// Progress notifications of idle watches, and `RequestProgress`
    /// answers whose revision every watch has sent.
    async fn on_tick(&mut self) -> bool {
        let interval = self.progress_interval;
        let mut notify = Vec::new();
        for (id, active) in self.watches.iter_mut() {
            let sent = active.sent_up_to();
            if active.progress_notify && active.last_sent.elapsed() >= interval {
                active.last_sent = Instant::now();
                active.reported = active.reported.max(sent);
                notify.push((*id, sent));
            }
        }
        for (id, revision) in notify {
            let resp = WatchResponse {
                header: self.header(revision),
                watch_id: id,
                ..Default::default()
            };
            if !self.send(resp).await {
                return false;
            }
        }
        // A pause that lasted its longest ends for the updates it held (a
        // pause that ends with its answer resumes them there).
        let expired = self
            .pause
            .is_some_and(|(_, since)| since.elapsed() >= PROGRESS_PAUSE_MAX);
        if expired && !self.resume_held().await {
            return false;
        }
        if self.progress_asked.is_empty() {
            return true;
        }
        let asked = self.progress_asked[0];
        let everywhere = self.watches.values_mut().map(Active::sent_up_to).min();
        let revision = everywhere.unwrap_or(asked);
        let top = self.watches.values().map(|a| a.reported).max();
        let wanted = top.unwrap_or(0).max(asked);
        if revision < wanted {
            // Those ahead wait for the others to reach what they reported.
            let since = self.pause.map_or_else(Instant::now, |(_, since)| since);
            self.pause = Some((wanted, since));
            return true;
        }
        self.pause = None;
        self.progress_asked.retain(|r| *r > revision);
        for active in self.watches.values_mut() {
            active.reported = active.reported.max(revision);
        }
        // Sent before the answer: the held updates are above it.
        let answered = self
            .send(WatchResponse {
                header: self.header(revision),
                watch_id: -1,
                ..Default::default()
            })
            .await;
        answered && self.resume_held().await
    }
}

/// `resp` cut into responses below etcd's request limit, each with at
/// least one event, all but the last flagged `fragment` (as etcd's
/// `sendFragments`); `resp` itself when it fits.
fn fragments(resp: WatchResponse) -> Vec<WatchResponse> {
    if resp.events.len() <= 1 || resp.encoded_len() < MAX_RESPONSE_BYTES {
        return vec![resp];
    }
    let empty = WatchResponse {
        header: resp.header,
        watch_id: resp.watch_id,
        ..Default::default()
    };
    let mut parts = Vec::new();
    let mut current = empty.clone();
    for event in resp.events {
        if !current.events.is_empty()
            && current.encoded_len() + event.encoded_len() + 8 >= MAX_RESPONSE_BYTES
        {
            let full = std::mem::replace(&mut current, empty.clone());
            parts.push(WatchResponse {
                fragment: true,
                ..full
            });
        }
        current.events.push(event);
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::mvccpb::KeyValue;

    fn event(size: usize) -> Event {
        Event {
            kv: Some(KeyValue {
                key: b"k".to_vec(),
                value: vec![b'v'; size],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn large_responses_are_cut_into_fragments_below_the_limit() {
        let small = WatchResponse {
            watch_id: 3,
            events: vec![event(10), event(10)],
            ..Default::default()
        };
        assert_eq!(fragments(small.clone()), vec![small]);
        let big = WatchResponse {
            watch_id: 3,
            events: (0..5).map(|_| event(MAX_RESPONSE_BYTES / 3)).collect(),
            ..Default::default()
        };
        let parts = fragments(big.clone());
        assert!(parts.len() >= 3, "{} parts", parts.len());
        let (last, rest) = parts.split_last().unwrap();
        assert!(rest.iter().all(|p| p.fragment && p.watch_id == 3));
        assert!(!last.fragment);
        assert!(parts.iter().all(|p| p.encoded_len() < MAX_RESPONSE_BYTES));
        let events: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(events, big.events);
        // One event larger than the limit still goes, alone.
        let huge = WatchResponse {
            events: vec![event(MAX_RESPONSE_BYTES), event(1)],
            ..Default::default()
        };
        assert_eq!(fragments(huge).len(), 2);
    }
}
