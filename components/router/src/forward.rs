//! The sending side of request forwarding (`forwardpb.RegionForward`) and
//! the wire form of router errors, used by both sides.
//!
//! [`Forwarder`] keeps one lazily connected gRPC channel per destination
//! node; a failed call drops it and the node's cached address, so the next
//! call resolves and connects afresh. Errors keep their kind across the
//! wire: region errors come back as [`Error::Region`] (the router retries
//! them), etcd request errors as [`Error::Mvcc`] (passed to the client).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mvcc::exec::{WriteRequest, WriteResponse};
use proto::etcdserverpb::{RangeRequest, RangeResponse};
use proto::forwardpb::{
    self, error::Kind, etcd_error, region_forward_client::RegionForwardClient,
    write_request as wreq, write_response as wresp,
};
use proto::metapb;
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

use crate::resolve::Resolver;
use crate::{Error, Result, RETRY_DEADLINE};

/// Where a forwarded request goes: the node believed to hold the leader of
/// the region, and the region as the sender located it.
#[derive(Clone, Debug)]
pub struct Target {
    pub node_id: u64,
    pub region_id: u64,
    pub epoch: Option<metapb::RegionEpoch>,
}

impl Target {
    fn header(&self) -> Option<forwardpb::RequestHeader> {
        Some(forwardpb::RequestHeader {
            region_id: self.region_id,
            region_epoch: self.epoch,
        })
    }
}

/// Forward calls are cut at this size only by the etcd request limits the
/// client-facing server enforces; responses (a large Range) may be bigger.
const MAX_FORWARD_MESSAGE_BYTES: usize = usize::MAX;

pub struct Forwarder {
    resolver: Arc<dyn Resolver>,
    clients: Mutex<HashMap<u64, RegionForwardClient<Channel>>>,
}

impl Forwarder {
    pub fn new(resolver: Arc<dyn Resolver>) -> Forwarder {
        Forwarder {
            resolver,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, RegionForwardClient<Channel>>> {
        // The map stays consistent whatever panicked while holding it.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn client(&self, node_id: u64) -> Result<RegionForwardClient<Channel>> {
        if let Some(c) = self.clients().get(&node_id) {
            return Ok(c.clone());
        }
        let url = self
            .resolver
            .resolve(node_id)
            .await
            .ok_or_else(|| Error::Unreachable {
                node_id,
                reason: "no address known".into(),
            })?;
        let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| Error::Unreachable {
            node_id,
            reason: format!("bad address {url}: {e}"),
        })?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client = RegionForwardClient::new(channel)
            .max_decoding_message_size(MAX_FORWARD_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_FORWARD_MESSAGE_BYTES);
        // A concurrent caller may have raced us here; either channel works.
        Ok(self.clients().entry(node_id).or_insert(client).clone())
    }

    /// Runs one RPC on `node_id` with a bounded wait; a transport failure
    /// drops the channel and the cached address.
    ///
    /// A failure is retryable (`Unreachable`) when the request cannot have
    /// run: the connection was never made or the server refused the stream.
    /// Otherwise a request that is not `idempotent` (a write, a compaction)
    /// may have been applied with its reply lost; running it again could
    /// apply it twice, so its outcome is reported unknown (`Timeout`, etcd's
    /// "request timed out").
    async fn call<T, F, Fut>(&self, node_id: u64, idempotent: bool, f: F) -> Result<T>
    where
        F: FnOnce(RegionForwardClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client(node_id).await?;
        match tokio::time::timeout(RETRY_DEADLINE, f(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                debug!(node_id, "forwarding failed: {status}");
                self.clients().remove(&node_id);
                self.resolver.invalidate(node_id);
                if idempotent || not_sent(&status) {
                    Err(Error::Unreachable {
                        node_id,
                        reason: status.message().to_string(),
                    })
                } else {
                    Err(Error::Timeout)
                }
            }
            Err(_) => Err(Error::Timeout),
        }
    }

    pub async fn write(&self, target: &Target, req: &WriteRequest) -> Result<WriteResponse> {
        let request = match req.clone() {
            WriteRequest::Put(p) => wreq::Request::Put(p),
            WriteRequest::DeleteRange(d) => wreq::Request::DeleteRange(d),
            WriteRequest::Txn(t) => wreq::Request::Txn(t),
        };
        let msg = forwardpb::WriteRequest {
            header: target.header(),
            request: Some(request),
        };
        let resp = self
            .call(
                target.node_id,
                false,
                |mut c| async move { c.write(msg).await },
            )
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        match resp.response {
            Some(wresp::Response::Put(p)) => Ok(WriteResponse::Put(p)),
            Some(wresp::Response::DeleteRange(d)) => Ok(WriteResponse::DeleteRange(d)),
            Some(wresp::Response::Txn(t)) => Ok(WriteResponse::Txn(t)),
            None => Err(Error::Remote("forwarded write without a response".into())),
        }
    }

    pub async fn range(&self, target: &Target, req: &RangeRequest) -> Result<RangeResponse> {
        let msg = forwardpb::RangeRequest {
            header: target.header(),
            request: Some(req.clone()),
        };
        let resp = self
            .call(
                target.node_id,
                true,
                |mut c| async move { c.range(msg).await },
            )
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        resp.response
            .ok_or_else(|| Error::Remote("forwarded range without a response".into()))
    }

    /// Returns the leader's linearizable revision and its applied index
    /// once the compaction was applied there.
    pub async fn compact(
        &self,
        target: &Target,
        revision: i64,
        physical: bool,
    ) -> Result<(i64, u64)> {
        let msg = forwardpb::CompactRequest {
            header: target.header(),
            revision,
            physical,
        };
        let resp = self
            .call(target.node_id, false, |mut c| async move {
                c.compact(msg).await
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok((resp.current_revision, resp.applied_index))
    }

    /// The leader's linearizable revision and an applied index covering
    /// every write at or below it.
    pub async fn read_index(&self, target: &Target) -> Result<(i64, u64)> {
        let msg = forwardpb::ReadIndexRequest {
            header: target.header(),
        };
        let resp = self
            .call(target.node_id, true, |mut c| async move {
                c.read_index(msg).await
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok((resp.revision, resp.applied_index))
    }
}

/// The wire form of an error of a request served for another node.
pub fn error_to_wire(err: &Error) -> forwardpb::Error {
    use raftstore::Error as R;
    let kind = match err {
        Error::Mvcc(m) | Error::Region(R::Mvcc(m)) => Kind::Etcd(etcd_to_wire(m)),
        Error::Region(R::NotLeader { region_id, leader }) => {
            Kind::NotLeader(forwardpb::NotLeader {
                region_id: *region_id,
                leader: *leader,
            })
        }
        Error::Region(R::EpochNotMatch { region_id, current }) => {
            Kind::EpochNotMatch(forwardpb::EpochNotMatch {
                region_id: *region_id,
                current: Some(current.clone()),
            })
        }
        // A replica shutting down or gone: the sender looks elsewhere.
        Error::Region(R::RegionNotFound(id) | R::Stopped(id)) => {
            Kind::RegionNotFound(forwardpb::RegionNotFound { region_id: *id })
        }
        Error::NoRegion(_) => Kind::RegionNotFound(forwardpb::RegionNotFound { region_id: 0 }),
        Error::Region(R::StaleCommand(s)) => Kind::StaleCommand(s.clone()),
        Error::Pd(e) => Kind::PlacementDriver(e.to_string()),
        Error::RemotePd(s) => Kind::PlacementDriver(s.clone()),
        other => Kind::Other(other.to_string()),
    };
    forwardpb::Error { kind: Some(kind) }
}

/// The router error a forwarded request's error stands for.
pub fn error_from_wire(err: forwardpb::Error) -> Error {
    use raftstore::Error as R;
    match err.kind {
        Some(Kind::NotLeader(n)) => Error::Region(R::NotLeader {
            region_id: n.region_id,
            leader: n.leader,
        }),
        Some(Kind::EpochNotMatch(e)) => Error::Region(R::EpochNotMatch {
            region_id: e.region_id,
            current: e.current.unwrap_or_default(),
        }),
        Some(Kind::RegionNotFound(r)) => Error::Region(R::RegionNotFound(r.region_id)),
        Some(Kind::StaleCommand(s)) => Error::Region(R::StaleCommand(s)),
        Some(Kind::Etcd(e)) => Error::Mvcc(etcd_from_wire(e)),
        Some(Kind::PlacementDriver(s)) => Error::RemotePd(s),
        Some(Kind::Other(s)) => Error::Remote(s),
        None => Error::Remote("forwarded request failed without an error".into()),
    }
}

fn etcd_to_wire(e: &mvcc::Error) -> forwardpb::EtcdError {
    use etcd_error::Kind as K;
    use mvcc::Error as M;
    let (kind, detail) = match e {
        M::EmptyKey => (K::EmptyKey, String::new()),
        M::KeyNotFound => (K::KeyNotFound, String::new()),
        M::ValueProvided => (K::ValueProvided, String::new()),
        M::LeaseProvided => (K::LeaseProvided, String::new()),
        M::InvalidSortOption => (K::InvalidSortOption, String::new()),
        M::TooManyOps => (K::TooManyOps, String::new()),
        M::DuplicateKey => (K::DuplicateKey, String::new()),
        M::LeaseNotFound => (K::LeaseNotFound, String::new()),
        M::Compacted => (K::Compacted, String::new()),
        M::FutureRev => (K::FutureRev, String::new()),
        M::Corrupted(s) => (K::Corrupted, s.clone()),
        M::Storage(s) => (K::Storage, s.clone()),
    };
    forwardpb::EtcdError {
        kind: kind as i32,
        detail,
    }
}

fn etcd_from_wire(e: forwardpb::EtcdError) -> mvcc::Error {
    use etcd_error::Kind as K;
    use mvcc::Error as M;
    match K::try_from(e.kind).unwrap_or(K::Unknown) {
        K::EmptyKey => M::EmptyKey,
        K::KeyNotFound => M::KeyNotFound,
        K::ValueProvided => M::ValueProvided,
        K::LeaseProvided => M::LeaseProvided,
        K::InvalidSortOption => M::InvalidSortOption,
        K::TooManyOps => M::TooManyOps,
        K::DuplicateKey => M::DuplicateKey,
        K::LeaseNotFound => M::LeaseNotFound,
        K::Compacted => M::Compacted,
        K::FutureRev => M::FutureRev,
        K::Corrupted => M::Corrupted(e.detail),
        // A kind this node does not know (a newer sender) is still a
        // failure of the request, reported with what detail there is.
        K::Storage | K::Unknown => M::Storage(e.detail),
    }
}

/// Whether a failed call certainly never reached the server's handler: the
/// connection could not be made, or HTTP/2 refused the stream (a server
/// shutting down answers so for streams it will not process).
fn not_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let msg = status.message().to_ascii_lowercase();
    [
        "tcp connect error",
        "error trying to connect",
        "connection refused",
        "refused stream",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write to a node nobody listens on never ran: retryable. (If the
    /// transport's wording changed, writes after a leader crash would fail
    /// with "request timed out" instead of reaching the new leader.)
    #[tokio::test]
    async fn write_to_a_closed_port_is_retryable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let urls = HashMap::from([(7, format!("http://127.0.0.1:{port}"))]);
        let f = Forwarder::new(Arc::new(crate::resolve::StaticResolver::new(urls)));
        let target = Target {
            node_id: 7,
            region_id: 1,
            epoch: None,
        };
        let put = WriteRequest::Put(proto::etcdserverpb::PutRequest {
            key: b"k".to_vec(),
            ..Default::default()
        });
        let err = f.write(&target, &put).await.unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
        assert!(err.is_retryable());
    }

    #[test]
    fn a_failure_after_sending_is_not_taken_for_unsent() {
        assert!(!not_sent(&tonic::Status::unavailable("connection reset")));
        assert!(!not_sent(&tonic::Status::cancelled("h2 protocol error")));
        assert!(not_sent(&tonic::Status::unavailable(
            "tcp connect error: Connection refused"
        )));
    }

    #[test]
    fn etcd_errors_round_trip() {
        use mvcc::Error as M;
        let all = || {
            [
                M::EmptyKey,
                M::KeyNotFound,
                M::ValueProvided,
                M::LeaseProvided,
                M::InvalidSortOption,
                M::TooManyOps,
                M::DuplicateKey,
                M::LeaseNotFound,
                M::Compacted,
                M::FutureRev,
                M::Corrupted("x".into()),
                M::Storage("y".into()),
            ]
        };
        for (e, copy) in all().into_iter().zip(all()) {
            match error_from_wire(error_to_wire(&Error::Mvcc(copy))) {
                Error::Mvcc(back) => assert_eq!(back, e),
                other => panic!("{e:?} came back as {other:?}"),
            }
        }
    }

    #[test]
    fn region_errors_stay_retryable() {
        let leader = metapb::Peer {
            id: 3,
            node_id: 7,
            role: 0,
        };
        let errs = [
            Error::Region(raftstore::Error::NotLeader {
                region_id: 1,
                leader: Some(leader),
            }),
            Error::Region(raftstore::Error::EpochNotMatch {
                region_id: 1,
                current: metapb::Region::default(),
            }),
            Error::Region(raftstore::Error::RegionNotFound(1)),
            Error::Region(raftstore::Error::Stopped(1)),
            Error::Region(raftstore::Error::StaleCommand("x".into())),
        ];
        for e in errs {
            let back = error_from_wire(error_to_wire(&e));
            assert!(back.is_retryable(), "{e:?} came back as {back:?}");
        }
        match error_from_wire(error_to_wire(&Error::Region(raftstore::Error::NotLeader {
            region_id: 1,
            leader: Some(leader),
        }))) {
            Error::Region(raftstore::Error::NotLeader { leader: l, .. }) => {
                assert_eq!(l, Some(leader))
            }
            other => panic!("{other:?}"),
        }
    }
}
