//! Raft traffic between PD members: the `pd_raftpb.PdRaft` gRPC service on
//! each member's peer URL, and one sending task per peer.
//!
//! The raft thread never blocks on the network: it hands encoded messages
//! to an unbounded queue per peer. Each peer's task keeps one connection,
//! sends whatever queued up meanwhile as one batch, and backs off after a
//! failure. Messages that fail to go out are dropped; raft retransmits.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use proto::pd_raftpb::{self, pd_raft_client::PdRaftClient, pd_raft_server};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::raft_node::{RaftMsg, Shared, Transport};

const MAX_BATCH: usize = 4096;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// An encoded raft message, and whether it carries a snapshot (whose fate
/// raft must be told).
type Queued = (Vec<u8>, bool);

pub(crate) struct PeerTransport {
    peers: HashMap<u64, mpsc::UnboundedSender<Queued>>,
}

impl PeerTransport {
    /// Starts one sending task per other member on `rt`; they report
    /// delivery problems back through `raft_tx`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        shared: &Arc<Shared>,
        raft_tx: &Sender<RaftMsg>,
    ) -> PeerTransport {
        let mut peers = HashMap::new();
        for m in shared.members.read().iter() {
            if m.member_id == shared.self_id {
                continue;
            }
            let Some(url) = m.peer_urls.first().cloned() else {
                warn!(member = %m.name, "PD member without peer URL; unreachable");
                continue;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            peers.insert(m.member_id, tx);
            rt.spawn(peer_loop(
                m.member_id,
                url,
                rx,
                shared.clone(),
                raft_tx.clone(),
            ));
        }
        PeerTransport { peers }
    }
}

impl Transport for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let Some(q) = self.peers.get(&m.to) else {
                continue;
            };
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            match m.write_to_bytes() {
                Ok(b) => {
                    let _ = q.send((b, snapshot));
                }
                Err(e) => warn!(error = %e, "cannot encode raft message"),
            }
        }
    }
}

async fn peer_loop(
    to: u64,
    url: String,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    shared: Arc<Shared>,
    raft_tx: Sender<RaftMsg>,
) {
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(3))
            .tcp_nodelay(true),
        Err(e) => {
            warn!(%url, error = %e, "bad PD peer URL; member unreachable");
            return;
        }
    };
    // Lazy: the channel (re)connects by itself; a failed call is our cue
    // to back off.
    let mut client = PdRaftClient::new(endpoint.connect_lazy());
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    // A lost snapshot must be reported, or raft waits for it forever.
    let report = |snapshots: usize, delivered: bool| {
        for _ in 0..snapshots {
            let _ = raft_tx.send(RaftMsg::SnapshotStatus { to, delivered });
        }
    };
    while let Some(first) = rx.recv().await {
        let mut queued = vec![first];
        while queued.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => queued.push(m),
                Err(_) => break,
            }
        }
        let snapshots = queued.iter().filter(|(_, s)| *s).count();
        if shared.isolated.load(Ordering::Relaxed) {
            report(snapshots, false);
            continue;
        }
        let (from, known) = {
            let members = shared.members.read();
            let from = members
                .iter()
                .find(|m| m.member_id == shared.self_id)
                .cloned();
            let known = members
                .iter()
                .filter(|m| m.member_id != shared.self_id && m.member_id != to)
                .filter(|m| !m.client_urls.is_empty())
                .cloned()
                .collect();
            (from, known)
        };
        let batch = pd_raftpb::RaftBatch {
            cluster_id: shared.cluster_id,
            from,
            messages: queued.into_iter().map(|(b, _)| b).collect(),
            known,
        };
        match client.send(batch).await {
            Ok(_) => {
                if failing {
                    debug!(%url, "PD peer reachable again");
                }
                failing = false;
                backoff = MIN_BACKOFF;
                report(snapshots, true);
            }
            Err(s) => {
                if !failing {
                    debug!(%url, code = ?s.code(), message = s.message(), "PD peer unreachable");
                }
                failing = true;
                report(snapshots, false);
                let _ = raft_tx.send(RaftMsg::Unreachable(to));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                // Whatever queued during the backoff is stale by now.
                let mut dropped = 0;
                while let Ok((_, s)) = rx.try_recv() {
                    dropped += usize::from(s);
                }
                report(dropped, false);
                client = PdRaftClient::new(endpoint.connect_lazy());
            }
        }
    }
}

/// Receives raft messages from other members.
#[derive(Clone)]
pub struct PdRaftService {
    shared: Arc<Shared>,
    raft_tx: Sender<RaftMsg>,
}

impl PdRaftService {
    pub(crate) fn new(shared: Arc<Shared>, raft_tx: Sender<RaftMsg>) -> Self {
        PdRaftService { shared, raft_tx }
    }

    pub fn into_server(self) -> pd_raft_server::PdRaftServer<PdRaftService> {
        pd_raft_server::PdRaftServer::new(self)
    }
}

#[tonic::async_trait]
impl pd_raft_server::PdRaft for PdRaftService {
    async fn send(
        &self,
        req: Request<pd_raftpb::RaftBatch>,
    ) -> Result<Response<pd_raftpb::RaftBatchResponse>, Status> {
        let req = req.into_inner();
        if req.cluster_id != self.shared.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster id {} does not match this PD's {}",
                req.cluster_id, self.shared.cluster_id
            )));
        }
        if self.shared.isolated.load(Ordering::Relaxed) {
            return Err(Status::unavailable("isolated"));
        }
        let Some(from) = req.from else {
            return Err(Status::invalid_argument("raft batch without sender"));
        };
        if self.shared.blocked.lock().contains(&from.member_id) {
            return Err(Status::unavailable("blocked"));
        }
        {
            let mut members = self.shared.members.write();
            let Some(m) = members.iter_mut().find(|m| m.member_id == from.member_id) else {
                return Err(Status::permission_denied(format!(
                    "member {} is not part of this PD cluster",
                    from.member_id
                )));
            };
            if m.client_urls != from.client_urls {
                m.client_urls = from.client_urls;
            }
            // Second-hand knowledge only fills gaps: what a member says
            // about itself wins.
            for k in req.known {
                if k.member_id == self.shared.self_id {
                    continue;
                }
                if let Some(m) = members.iter_mut().find(|m| m.member_id == k.member_id) {
                    if m.client_urls.is_empty() {
                        m.client_urls = k.client_urls;
                    }
                }
            }
        }
        let mut msgs = Vec::with_capacity(req.messages.len());
        for b in &req.messages {
            let m = Message::parse_from_bytes(b)
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            if m.from != from.member_id {
                return Err(Status::invalid_argument("raft message from another member"));
            }
            msgs.push(m);
        }
        self.raft_tx
            .send(RaftMsg::Step(msgs))
            .map_err(|_| Status::unavailable("PD member is stopped"))?;
        Ok(Response::new(pd_raftpb::RaftBatchResponse {}))
    }
}

/// Serves the member-to-member raft traffic on `listeners` (the peer URLs)
/// until `shutdown` completes.
pub async fn serve_peers<F>(
    core: Arc<crate::PdCore>,
    listeners: Vec<TcpListener>,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    let service = core.peer_service();
    drop(core);
    let incoming = futures::stream::select_all(
        listeners
            .into_iter()
            .map(|l| TcpIncoming::from(l).with_nodelay(Some(true))),
    );
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
