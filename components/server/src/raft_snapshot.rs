//! Region snapshots between nodes: the `RaftTransport.Snapshot` stream.
//!
//! A region snapshot is a file (raftstore's `snapshot::file`); its raft
//! message only describes it. [`send`] streams one to the node that must
//! install it: the message first, then the file in [`CHUNK_BYTES`] pieces,
//! read as they go, so a region of any size is neither one gRPC message
//! nor held in memory. [`receive`] writes the pieces to the receiving
//! node's snapshot directory through a `raftstore::SnapshotSink` (which
//! checks the size and checksum the descriptor gives) and delivers the
//! message once the file is complete; only then does the sender hear
//! `Done`, which it reports to raft as a delivered snapshot.
//!
//! Each snapshot gets its own connection: a long transfer never holds up
//! the raft messages of the node's other regions, which travel on the
//! `Send` stream. At most [`MAX_CONCURRENT_SENDS`] go out of a node at
//! once; others wait their turn.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::raft_serverpb::raft_transport_client::RaftTransportClient;
use proto::raft_serverpb::{Done, RaftMessage, SnapshotChunk};
use raftstore::{SnapshotSink, Store};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::raft_transport::{Resolver, MAX_RAFT_GRPC_BYTES};

/// Bytes of snapshot file per chunk.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Snapshots a node sends at the same time.
pub const MAX_CONCURRENT_SENDS: usize = 4;

/// Why a snapshot did not reach the other node.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no address known for node {0}")]
    Unresolved(u64),
    #[error("connect {url}: {err}")]
    Connect {
        url: String,
        err: tonic::transport::Error,
    },
    #[error("snapshot file {path}: {err}")]
    File { path: PathBuf, err: std::io::Error },
    #[error("refused: {0}")]
    Refused(tonic::Status),
    #[error("the transport stopped")]
    Stopped,
}

/// Limits and timeouts of [`send`].
pub struct SendOptions {
    pub connect_timeout: Duration,
    pub permits: Arc<Semaphore>,
}

/// Sends the snapshot `msg` describes, with its file at `path`, to node
/// `to` (see the module docs).
pub async fn send(
    resolver: &dyn Resolver,
    to: u64,
    msg: RaftMessage,
    path: PathBuf,
    options: &SendOptions,
) -> Result<(), SendError> {
    let Ok(_permit) = options.permits.acquire().await else {
        return Err(SendError::Stopped);
    };
    let file_err = |err| SendError::File {
        path: path.clone(),
        err,
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(file_err)?;
    let size = file.metadata().await.map_err(file_err)?.len();
    let url = resolver
        .resolve(to)
        .await
        .ok_or(SendError::Unresolved(to))?;
    let connect_err = |err| SendError::Connect {
        url: url.clone(),
        err,
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(connect_err)?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(connect_err)?;
    let mut client = RaftTransportClient::new(channel)
        .max_encoding_message_size(MAX_RAFT_GRPC_BYTES)
        .max_decoding_message_size(MAX_RAFT_GRPC_BYTES);
    let region_id = msg.region_id;
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let call = tokio::spawn(async move { client.snapshot(ReceiverStream::new(rx)).await });
    let mut head = Some(SnapshotChunk {
        message: Some(msg),
        data: Vec::new(),
    });
    loop {
        let chunk = match head.take() {
            Some(chunk) => chunk,
            None => {
                let mut data = vec![0u8; CHUNK_BYTES];
                let n = file.read(&mut data).await.map_err(file_err)?;
                if n == 0 {
                    break;
                }
                data.truncate(n);
                SnapshotChunk {
                    message: None,
                    data,
                }
            }
        };
        if tx.send(chunk).await.is_err() {
            // The call ended early; its outcome says why.
            break;
        }
    }
    drop(tx);
    match call.await {
        Ok(Ok(_)) => {
            info!(
                region_id,
                to_node = to,
                bytes = size,
                "region snapshot delivered"
            );
            Ok(())
        }
        Ok(Err(status)) => Err(SendError::Refused(status)),
        Err(e) => Err(SendError::Refused(tonic::Status::internal(e.to_string()))),
    }
}

/// Receives one snapshot stream into `store` (see the module docs).
pub async fn receive(
    store: &Arc<Store>,
    mut stream: tonic::Streaming<SnapshotChunk>,
) -> Result<Done, tonic::Status> {
    let first = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::invalid_argument("empty snapshot stream"))?;
    let Some(msg) = first.message.filter(|m| {
        m.region_id != 0 && m.to_peer.is_some() && m.from_peer.is_some() && first.data.is_empty()
    }) else {
        return Err(tonic::Status::invalid_argument(
            "a snapshot stream starts with its raft message alone",
        ));
    };
    let region_id = msg.region_id;
    let mut sink: SnapshotSink = store
        .snapshot_sink(&msg)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    while let Some(chunk) = stream.message().await? {
        if chunk.message.is_some() {
            return Err(tonic::Status::invalid_argument(
                "a snapshot stream carries one raft message",
            ));
        }
        sink = blocking(region_id, move || sink.write(&chunk.data).map(|()| sink)).await?;
    }
    let path = blocking(region_id, move || sink.finish()).await?;
    debug!(region_id, path = %path.display(), "region snapshot received");
    store.on_raft_message(msg);
    Ok(Done {})
}

/// Runs a file operation of the sink off the runtime; its failure refuses
/// the snapshot.
async fn blocking<T: Send + 'static>(
    region_id: u64,
    f: impl FnOnce() -> raftstore::Result<T> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(|e| {
            warn!(region_id, "region snapshot refused: {e}");
            tonic::Status::invalid_argument(e.to_string())
        })
}
