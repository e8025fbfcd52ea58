//! Forwarding over gRPC (`forwardpb.RegionForward`, served by the other
//! node's `server::forward` on its peer URLs).
//!
//! [`GrpcForwarder`] keeps one lazily connected gRPC channel per
//! destination node; a failed call drops it and the node's cached address,
//! so the next call resolves and connects afresh. Errors keep their class
//! across the wire ([`super::wire`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mvcc::exec::{WriteRequest, WriteResponse};
use mvcc::KeyRange;
use proto::etcdserverpb::{RangeRequest, RangeResponse};
use proto::forwardpb::{
    self, region_forward_client::RegionForwardClient, write_request as wreq,
    write_response as wresp,
};
use proto::forwardpb::{txn_step_request::Step, txn_step_response};
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

use super::wire::error_from_wire;
use super::{span_bounds, Forward, ReadIndex, RegionChanges, RegionHash, Target};
use crate::lease::{LeaseAnswer, LeaseOp};
use crate::resolve::Resolver;
use crate::{Error, Result, RETRY_DEADLINE};

/// Forward calls are cut at this size only by the etcd request limits the
/// client-facing server enforces; responses (a large Range) may be bigger.
const MAX_FORWARD_MESSAGE_BYTES: usize = usize::MAX;

pub struct GrpcForwarder {
    resolver: Arc<dyn Resolver>,
    clients: Mutex<HashMap<u64, RegionForwardClient<Channel>>>,
}

impl GrpcForwarder {
    pub fn new(resolver: Arc<dyn Resolver>) -> GrpcForwarder {
        GrpcForwarder {
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
    /// apply it twice, so its outcome is reported unknown
    /// ([`Error::OutcomeUnknown`], etcd's "request timed out").
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
                    Err(Error::OutcomeUnknown(format!(
                        "forwarding to node {node_id} failed: {}",
                        status.message()
                    )))
                }
            }
            Err(_) => Err(Error::timed_out("forwarded request")),
        }
    }
}

#[async_trait::async_trait]
impl Forward for GrpcForwarder {
    async fn write(&self, target: &Target, req: &WriteRequest) -> Result<WriteResponse> {
        let request = match req.clone() {
            WriteRequest::Put(p) => wreq::Request::Put(p),
            WriteRequest::DeleteRange(d) => wreq::Request::DeleteRange(d),
            WriteRequest::Txn(t) => wreq::Request::Txn(t),
            // Revokes run as transactions over their regions, whose steps
            // are forwarded instead.
            WriteRequest::LeaseRevoke(_) => {
                return Err(Error::Internal("a lease revoke is not forwarded".into()))
            }
        };
        let msg = forwardpb::WriteRequest {
            header: Some(target.header()),
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
            None => Err(Error::Internal("forwarded write without a response".into())),
        }
    }

    async fn range(&self, target: &Target, req: &RangeRequest) -> Result<RangeResponse> {
        let msg = forwardpb::RangeRequest {
            header: Some(target.header()),
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
            .ok_or_else(|| Error::Internal("forwarded range without a response".into()))
    }

    /// Returns the leader's linearizable revision and its applied index
    /// once the compaction was applied there.
    async fn compact(&self, target: &Target, revision: i64, physical: bool) -> Result<(i64, u64)> {
        let msg = forwardpb::CompactRequest {
            header: Some(target.header()),
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

    async fn lease(&self, target: &Target, op: LeaseOp) -> Result<LeaseAnswer> {
        let msg = op.to_wire(target.header());
        let resp = self
            .call(target.node_id, op.is_idempotent(), |mut c| async move {
                c.lease(msg).await
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok(op.answer_from_wire(resp))
    }

    async fn txn_step(
        &self,
        target: &Target,
        step: Step,
    ) -> Result<Option<txn_step_response::Result>> {
        let msg = forwardpb::TxnStepRequest {
            header: Some(target.header()),
            step: Some(step),
        };
        let resp = self
            .call(target.node_id, false, |mut c| async move {
                c.txn_step(msg).await
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok(resp.result)
    }

    async fn hash(&self, target: &Target, span: &KeyRange, revision: i64) -> Result<RegionHash> {
        let (start, end) = span_bounds(span);
        let msg = forwardpb::HashRequest {
            header: Some(target.header()),
            revision,
            start,
            end,
        };
        let resp = self
            .call(
                target.node_id,
                true,
                |mut c| async move { c.hash(msg).await },
            )
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok(RegionHash {
            hash: mvcc::RangeHash {
                crc: resp.hash,
                len: resp.hashed_bytes,
            },
            compact_revision: resp.compact_revision,
            revision: resp.hash_revision,
        })
    }

    async fn watch_events(
        &self,
        target: &Target,
        span: &KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Result<RegionChanges> {
        let (start, end) = span_bounds(span);
        let msg = forwardpb::WatchEventsRequest {
            header: Some(target.header()),
            start,
            end,
            from_revision: from,
            prev_kv,
        };
        let resp = self
            .call(target.node_id, true, |mut c| async move {
                c.watch_events(msg).await
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok(RegionChanges {
            changes: resp
                .changes
                .into_iter()
                .map(|c| (c.sub, c.event.unwrap_or_default()))
                .collect(),
            resolved: resp.resolved,
            compact_revision: resp.compact_revision,
        })
    }

    /// The leader's linearizable revision and an applied index covering
    /// every write at or below it.
    async fn read_index(&self, target: &Target) -> Result<ReadIndex> {
        let msg = forwardpb::ReadIndexRequest {
            header: Some(target.header()),
        };
        let resp = self
            .call(target.node_id, true, |mut c| async move {
                c.read_index(msg).await
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(error_from_wire(e));
        }
        Ok(ReadIndex {
            revision: resp.revision,
            applied_index: resp.applied_index,
            resolved: resp.resolved_revision,
        })
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
        let f = GrpcForwarder::new(Arc::new(crate::resolve::StaticResolver::new(urls)));
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
}
