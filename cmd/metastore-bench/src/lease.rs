//! lease-keepalive: every client grants one lease, then renews it over its
//! own LeaseKeepAlive stream, one request in flight at a time.
//!
//! etcd's tool uses `KeepAliveOnce`, which opens a new stream per request;
//! real clients keep one stream open, so that is what is measured here (the
//! stream is reopened only after it breaks).

use crate::runner::Worker;
use crate::stats::BenchError;
use futures::channel::mpsc;
use futures::SinkExt;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use tonic::transport::Channel;
use tonic::Streaming;

struct Stream {
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    rx: Streaming<LeaseKeepAliveResponse>,
}

pub struct LeaseWorker {
    client: LeaseClient<Channel>,
    lease: Result<i64, BenchError>,
    stream: Option<Stream>,
}

fn check(resp: Option<LeaseKeepAliveResponse>) -> Result<(), BenchError> {
    match resp {
        Some(r) if r.ttl > 0 => Ok(()),
        Some(r) => Err(BenchError::new(
            "LeaseNotFound",
            format!("keepalive of lease {:x} answered TTL {}", r.id, r.ttl),
        )),
        None => Err(BenchError::new(
            "StreamClosed",
            "server closed the keepalive stream",
        )),
    }
}

/// Grants a lease of `ttl` seconds (the server chooses its id).
pub async fn grant(ch: Channel, ttl: i64) -> Result<i64, BenchError> {
    let r = LeaseClient::new(ch)
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await?
        .into_inner();
    if r.error.is_empty() {
        Ok(r.id)
    } else {
        Err(BenchError::new("LeaseGrant", r.error))
    }
}

impl LeaseWorker {
    /// Grants the lease and opens the stream. A failure is kept and reported
    /// for each of this client's requests, so counts still add up when the
    /// server lacks the Lease service.
    pub async fn new(ch: Channel, ttl: i64) -> Self {
        let lease = grant(ch.clone(), ttl).await;
        let client = LeaseClient::new(ch);
        let mut w = LeaseWorker {
            client,
            lease,
            stream: None,
        };
        if let Ok(id) = w.lease {
            // Opening the stream also sends one (untimed) keepalive: servers
            // answer the stream's headers only with the first response.
            if let Err(e) = w.open(id).await {
                w.lease = Err(e);
            }
        }
        w
    }

    async fn open(&mut self, id: i64) -> Result<(), BenchError> {
        let (mut tx, rx) = mpsc::channel(1);
        tx.send(LeaseKeepAliveRequest { id })
            .await
            .map_err(|e| BenchError::new("StreamClosed", e.to_string()))?;
        let mut rx = self.client.lease_keep_alive(rx).await?.into_inner();
        check(rx.message().await?)?;
        self.stream = Some(Stream { tx, rx });
        Ok(())
    }
}

async fn keepalive(s: &mut Stream, id: i64) -> Result<(), BenchError> {
    s.tx.send(LeaseKeepAliveRequest { id })
        .await
        .map_err(|e| BenchError::new("StreamClosed", e.to_string()))?;
    check(s.rx.message().await?)
}

impl Worker for LeaseWorker {
    type Req = ();

    fn prepare(&mut self, _i: u64) -> (usize, ()) {
        (0, ())
    }

    async fn send(&mut self, _: ()) -> Result<(), BenchError> {
        let id = self.lease.clone()?;
        let Some(s) = self.stream.as_mut() else {
            // The previous request broke the stream: reconnecting is part of
            // what this request costs.
            return self.open(id).await;
        };
        let res = keepalive(s, id).await;
        if res.is_err() {
            self.stream = None;
        }
        res
    }
}
