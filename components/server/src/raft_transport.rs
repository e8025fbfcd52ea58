//! Raft messages between nodes over gRPC.
//!
//! [`GrpcTransport`] is the node's [`raftstore::Transport`]: `send` only
//! queues the message for its destination node, so a replica thread never
//! waits on the network. One sender task per destination node owns one
//! connection and one long-lived `RaftTransport.Send` stream, shared by all
//! regions, and ships the queue in [`RaftMessageBatch`]es. On any error it
//! drops what is queued (raft retransmits), backs off, re-resolves the
//! node's address and reconnects. [`RaftTransportService`] is the receiving
//! side: it hands every message of every batch to [`Store::on_raft_message`].
//! Region snapshots travel apart, one stream each (`raft_snapshot`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::raft_serverpb::raft_transport_client::RaftTransportClient;
use proto::raft_serverpb::raft_transport_server::{RaftTransport, RaftTransportServer};
use proto::raft_serverpb::{Done, RaftMessage, RaftMessageBatch, SnapshotChunk};
use raftstore::{SnapshotDone, Store, Transport};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::raft_snapshot;

/// Largest gRPC message either side accepts: a batch is cut at
/// [`TransportConfig::max_batch_bytes`], but one message alone may exceed it.
pub const MAX_RAFT_GRPC_BYTES: usize = 64 * 1024 * 1024;

// Shared with request forwarding, which lives in the router.
pub use router::resolve::{PdResolver, Resolver, StaticResolver};

#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Messages queued per destination node; more are dropped.
    pub queue_capacity: usize,
    pub max_batch_messages: usize,
    pub max_batch_bytes: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            queue_capacity: 4096,
            max_batch_messages: 256,
            max_batch_bytes: 4 * 1024 * 1024,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A warning that is logged at most once per interval, counting how many
/// were suppressed in between, so a dead peer does not flood the log.
struct RateLimited {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimited {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn new() -> RateLimited {
        RateLimited {
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed count)` when the caller should log now.
    fn check(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Self::INTERVAL) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

struct NodeQueue {
    tx: mpsc::Sender<RaftMessage>,
    full_warn: RateLimited,
}

/// The gRPC [`Transport`]: per-destination-node queues drained by one
/// sender task each. Dropping it ends the sender tasks.
pub struct GrpcTransport {
    runtime: Handle,
    resolver: Arc<dyn Resolver>,
    config: TransportConfig,
    queues: Mutex<HashMap<u64, Arc<NodeQueue>>>,
    snapshots: Arc<raft_snapshot::SendOptions>,
}

impl GrpcTransport {
    /// `runtime` runs the sender tasks; `send` may then be called from any
    /// thread, inside a runtime or not.
    pub fn new(runtime: Handle, resolver: Arc<dyn Resolver>) -> GrpcTransport {
        GrpcTransport::with_config(runtime, resolver, TransportConfig::default())
    }

    pub fn with_config(
        runtime: Handle,
        resolver: Arc<dyn Resolver>,
        config: TransportConfig,
    ) -> GrpcTransport {
        let snapshots = Arc::new(raft_snapshot::SendOptions {
            connect_timeout: config.connect_timeout,
            permits: Arc::new(Semaphore::new(raft_snapshot::MAX_CONCURRENT_SENDS)),
        });
        GrpcTransport {
            runtime,
            resolver,
            config,
            queues: Mutex::new(HashMap::new()),
            snapshots,
        }
    }

    fn queue(&self, node_id: u64) -> Arc<NodeQueue> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = queues.get(&node_id) {
            if !q.tx.is_closed() {
                return q.clone();
            }
        }
        let (tx, rx) = mpsc::channel(self.config.queue_capacity.max(1));
        let sender = Sender {
            node_id,
            rx,
            resolver: self.resolver.clone(),
            config: self.config.clone(),
            error_warn: RateLimited::new(),
        };
        self.runtime.spawn(sender.run());
        let q = Arc::new(NodeQueue {
            tx,
            full_warn: RateLimited::new(),
        });
        queues.insert(node_id, q.clone());
        q
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msg: RaftMessage) {
        let Some(to) = msg.to_peer.map(|p| p.node_id) else {
            debug!(
                region_id = msg.region_id,
                "raft message without a destination; dropped"
            );
            return;
        };
        let q = self.queue(to);
        match q.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                if let Some(suppressed) = q.full_warn.check() {
                    warn!(
                        to_node = to,
                        region_id = msg.region_id,
                        suppressed,
                        "raft send queue full; message dropped"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(to_node = to, "raft sender stopped; message dropped");
            }
        }
    }

    fn send_snapshot(&self, msg: RaftMessage, path: PathBuf, done: SnapshotDone) {
        let Some(to) = msg.to_peer.map(|p| p.node_id) else {
            done(false);
            return;
        };
        let resolver = self.resolver.clone();
        let options = self.snapshots.clone();
        self.runtime.spawn(async move {
            let region_id = msg.region_id;
            let sent = raft_snapshot::send(resolver.as_ref(), to, msg, path, &options).await;
            if let Err(e) = &sent {
                warn!(
                    region_id,
                    to_node = to,
                    "region snapshot not delivered: {e}"
                );
            }
            done(sent.is_ok());
        });
    }
}

/// Why a connection to a node ended.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("no address known")]
    Unresolved,
    #[error("bad address {url}: {err}")]
    BadUrl {
        url: String,
        err: tonic::transport::Error,
    },
    #[error("connect {url}: {err}")]
    Connect {
        url: String,
        err: tonic::transport::Error,
    },
    #[error("stream failed: {0}")]
    Stream(tonic::Status),
    #[error("stream closed by the peer")]
    Closed,
}

/// The task that owns the connection to one node.
struct Sender {
    node_id: u64,
    rx: mpsc::Receiver<RaftMessage>,
    resolver: Arc<dyn Resolver>,
    config: TransportConfig,
    error_warn: RateLimited,
}

impl Sender {
    async fn run(mut self) {
        let mut backoff = self.config.min_backoff;
        loop {
            // Connect only once there is something to send.
            let Some(first) = self.rx.recv().await else {
                return;
            };
            match self.stream(first, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    if let Some(suppressed) = self.error_warn.check() {
                        warn!(to_node = self.node_id, suppressed, "raft transport: {e}");
                    } else {
                        debug!(to_node = self.node_id, "raft transport: {e}");
                    }
                    self.resolver.invalidate(self.node_id);
                    // Stale by the time we reconnect; raft resends what matters.
                    while self.rx.try_recv().is_ok() {}
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    while self.rx.try_recv().is_ok() {}
                }
            }
        }
    }

    /// Connects and streams batches until the queue closes (`Ok`) or the
    /// connection fails.
    async fn stream(
        &mut self,
        first: RaftMessage,
        backoff: &mut Duration,
    ) -> Result<(), SendError> {
        let url = self
            .resolver
            .resolve(self.node_id)
            .await
            .ok_or(SendError::Unresolved)?;
        let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|err| SendError::BadUrl {
                url: url.clone(),
                err,
            })?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|err| SendError::Connect {
            url: url.clone(),
            err,
        })?;
        let mut client = RaftTransportClient::new(channel)
            .max_encoding_message_size(MAX_RAFT_GRPC_BYTES)
            .max_decoding_message_size(MAX_RAFT_GRPC_BYTES);
        // A short stream queue: batching happens in the message queue,
        // which keeps growing while this one is full.
        let (btx, brx) = mpsc::channel::<RaftMessageBatch>(4);
        let call = client.send(ReceiverStream::new(brx));
        tokio::pin!(call);
        info!(to_node = self.node_id, %url, "raft transport connected");
        let mut next = Some(first);
        loop {
            let head = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    res = &mut call => return Err(ended(res)),
                    m = self.rx.recv() => match m {
                        Some(m) => m,
                        None => return Ok(()),
                    },
                },
            };
            let batch = self.batch(head);
            tokio::select! {
                res = &mut call => return Err(ended(res)),
                sent = btx.send(batch) => {
                    if sent.is_err() {
                        return Err(SendError::Closed);
                    }
                    *backoff = self.config.min_backoff;
                }
            }
        }
    }

    /// `head` plus whatever is queued, within the batch limits.
    fn batch(&mut self, head: RaftMessage) -> RaftMessageBatch {
        let mut bytes = head.encoded_len();
        let mut messages = vec![head];
        while messages.len() < self.config.max_batch_messages && bytes < self.config.max_batch_bytes
        {
            let Ok(m) = self.rx.try_recv() else { break };
            bytes += m.encoded_len();
            messages.push(m);
        }
        RaftMessageBatch { messages }
    }
}

fn ended(res: Result<tonic::Response<Done>, tonic::Status>) -> SendError {
    match res {
        Ok(_) => SendError::Closed,
        Err(status) => SendError::Stream(status),
    }
}

/// The receiving side of the raft transport.
pub struct RaftTransportService {
    store: Arc<Store>,
    stop: watch::Receiver<bool>,
    batches: Arc<AtomicU64>,
    messages: Arc<AtomicU64>,
    malformed_warn: Arc<RateLimited>,
}

impl RaftTransportService {
    /// Streams end when `stop` turns true, so a graceful server shutdown
    /// does not wait forever on senders' long-lived streams.
    pub fn new(store: Arc<Store>, stop: watch::Receiver<bool>) -> RaftTransportService {
        RaftTransportService {
            store,
            stop,
            batches: Arc::default(),
            messages: Arc::default(),
            malformed_warn: Arc::new(RateLimited::new()),
        }
    }

    /// Counters of batches and messages received, shared with the caller.
    pub fn with_counters(
        mut self,
        batches: Arc<AtomicU64>,
        messages: Arc<AtomicU64>,
    ) -> RaftTransportService {
        self.batches = batches;
        self.messages = messages;
        self
    }

    pub fn into_server(self) -> RaftTransportServer<RaftTransportService> {
        RaftTransportServer::new(self)
            .max_decoding_message_size(MAX_RAFT_GRPC_BYTES)
            .max_encoding_message_size(MAX_RAFT_GRPC_BYTES)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn send(
        &self,
        request: tonic::Request<tonic::Streaming<RaftMessageBatch>>,
    ) -> Result<tonic::Response<Done>, tonic::Status> {
        let remote = request.remote_addr();
        let mut stream = request.into_inner();
        let mut stop = self.stop.clone();
        loop {
            let stopped = async {
                // A dropped stop sender means nobody can stop us: never.
                if stop.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let batch = tokio::select! {
                _ = stopped => break,
                b = stream.message() => b,
            };
            let batch = match batch {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(status) => {
                    debug!(?remote, "raft stream ended: {status}");
                    return Err(status);
                }
            };
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.messages
                .fetch_add(batch.messages.len() as u64, Ordering::Relaxed);
            for msg in batch.messages {
                if msg.region_id == 0 || msg.to_peer.is_none() || msg.from_peer.is_none() {
                    if let Some(suppressed) = self.malformed_warn.check() {
                        warn!(
                            ?remote,
                            region_id = msg.region_id,
                            suppressed,
                            "malformed raft message; dropped"
                        );
                    }
                    continue;
                }
                self.store.on_raft_message(msg);
            }
        }
        Ok(tonic::Response::new(Done {}))
    }

    async fn snapshot(
        &self,
        request: tonic::Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<tonic::Response<Done>, tonic::Status> {
        raft_snapshot::receive(&self.store, request.into_inner())
            .await
            .map(tonic::Response::new)
    }
}
