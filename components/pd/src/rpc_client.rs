//! [`PdClient`] over gRPC, following the PD leader, with TSO-style batching
//! of revision requests (one oracle RPC in flight per client, see
//! `oracle_batch.rs`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::metapb;
use proto::pdpb::{self, pd_client::PdClient as GrpcClient};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::client::{
    HeartbeatOutcome, PdClient, PdError, RegionHeartbeat, RegionOperator, RegionWithLeader, Result,
};
use crate::operators::{PendingOperator, SchedulingStatus};
use crate::oracle_batch::{OracleBatchStats, OracleBatcher, OracleRpc};

#[derive(Debug, Clone)]
pub struct RpcPdClientConfig {
    /// Per endpoint; a dead endpoint costs at most this before the next one
    /// is tried.
    pub connect_timeout: Duration,
    /// Per RPC; also the deadline for one call including finding the leader
    /// and retrying after NOT_LEADER or a broken connection.
    pub request_timeout: Duration,
}

impl Default for RpcPdClientConfig {
    fn default() -> Self {
        RpcPdClientConfig {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Talks to the PD leader: asks the configured endpoints (in list order) for
/// the members and the leader, connects to the leader's client URL, and
/// starts over when the connection breaks or a member answers NOT_LEADER.
///
/// Cheap to clone; clones share the connection and the revision batcher:
/// `alloc_revisions` and `current_revision` calls from all clones (all the
/// regions of a node) share one RPC in flight at a time. Must be created
/// inside a tokio runtime, which runs the batcher task.
#[derive(Debug, Clone)]
pub struct RpcPdClient {
    inner: Arc<Inner>,
    oracle: OracleBatcher,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<Endpoint>,
    config: RpcPdClientConfig,
    /// 0 until learned from the first PD reached; afterwards every endpoint
    /// must report the same id.
    cluster_id: AtomicU64,
    conn: tokio::sync::Mutex<Option<Conn>>,
    generation: AtomicU64,
}

#[derive(Debug, Clone)]
struct Conn {
    generation: u64,
    url: String,
    client: GrpcClient<Channel>,
}

/// tonic's transport errors say little at the top level ("transport error");
/// the cause is in the source chain.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Statuses after which the request may not have reached a working PD, so
/// another endpoint is worth a try.
fn is_connection_failure(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => true,
        // A member dying mid-call (its connection torn down under the
        // stream) surfaces as an HTTP/2 error rather than a status.
        Code::Internal => s.message().contains("h2 protocol error"),
        _ => false,
    }
}

fn status_to_error(s: &Status) -> PdError {
    if is_connection_failure(s) {
        PdError::Unavailable(format!("{:?}: {}", s.code(), s.message()))
    } else {
        PdError::Other(format!("{:?}: {}", s.code(), s.message()))
    }
}

/// The message of a NOT_LEADER header error.
fn not_leader(h: Option<&pdpb::ResponseHeader>) -> Option<String> {
    let e = h?.error.as_ref()?;
    (e.r#type == pdpb::ErrorType::NotLeader as i32).then(|| e.message.clone())
}

/// Responses whose header [`Inner::call`] inspects for NOT_LEADER.
trait HasHeader {
    fn header(&self) -> Option<&pdpb::ResponseHeader>;
}

macro_rules! has_header {
    ($($t:ty),* $(,)?) => {
        $(impl HasHeader for $t {
            fn header(&self) -> Option<&pdpb::ResponseHeader> {
                self.header.as_ref()
            }
        })*
    };
}

has_header!(
    pdpb::GetMembersResponse,
    pdpb::IsBootstrappedResponse,
    pdpb::BootstrapResponse,
    pdpb::AllocIdResponse,
    pdpb::PutNodeResponse,
    pdpb::GetNodeResponse,
    pdpb::GetAllNodesResponse,
    pdpb::GetRegionResponse,
    pdpb::ScanRegionsResponse,
    pdpb::RegionHeartbeatResponse,
    pdpb::RegionHeartbeatsResponse,
    pdpb::AllocRevisionsResponse,
    pdpb::CurrentRevisionResponse,
    pdpb::SplitRegionResponse,
    pdpb::MergeRegionsResponse,
    pdpb::GetOperatorsResponse,
    pdpb::GetSchedulersResponse,
    pdpb::CompactResponse,
    pdpb::GetCompactionRevisionResponse,
    pdpb::AlarmResponse,
);

fn is_not_found(h: Option<&pdpb::ResponseHeader>) -> bool {
    h.and_then(|h| h.error.as_ref()).is_some_and(|e| {
        e.r#type == pdpb::ErrorType::RegionNotFound as i32
            || e.r#type == pdpb::ErrorType::NodeNotFound as i32
    })
}

impl Inner {
    fn request_header(&self) -> Option<pdpb::RequestHeader> {
        Some(pdpb::RequestHeader {
            cluster_id: self.cluster_id.load(Ordering::Acquire),
        })
    }

    /// Maps a response header's error to a [`PdError`].
    fn check(&self, h: Option<&pdpb::ResponseHeader>) -> Result<()> {
        let Some(h) = h else {
            return Err(PdError::Other("response without header".into()));
        };
        let Some(e) = &h.error else {
            return Ok(());
        };
        use pdpb::ErrorType as T;
        Err(match T::try_from(e.r#type).unwrap_or(T::Unknown) {
            T::Ok => return Ok(()),
            T::ClusterIdMismatch => PdError::ClusterIdMismatch {
                expected: self.cluster_id.load(Ordering::Acquire),
                actual: h.cluster_id,
            },
            _ => PdError::from_proto(e),
        })
    }

    /// Asks `ep` for the members; checks (and learns) the cluster id.
    async fn members_of(
        &self,
        ep: &Endpoint,
    ) -> std::result::Result<(GrpcClient<Channel>, pdpb::GetMembersResponse), String> {
        let url = ep.uri().to_string();
        let channel = ep.connect().await.map_err(|e| {
            debug!(endpoint = %url, error = %error_chain(&e), "PD endpoint unreachable");
            format!("{url}: {}", error_chain(&e))
        })?;
        let mut client = GrpcClient::new(channel);
        let resp = client
            .get_members(pdpb::GetMembersRequest {
                header: self.request_header(),
            })
            .await
            .map_err(|s| format!("{url}: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let actual = resp.header.as_ref().map_or(0, |h| h.cluster_id);
        self.check(resp.header.as_ref())
            .map_err(|e| format!("{url}: {e}"))?;
        if actual == 0 {
            return Err(format!("{url}: no cluster id in response"));
        }
        match self
            .cluster_id
            .compare_exchange(0, actual, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(known) if known == actual => {}
            Err(known) => {
                warn!(endpoint = %url, expected = known, actual, "PD endpoint belongs to another cluster");
                return Err(format!("{url}: cluster id {actual}, expected {known}"));
            }
        }
        Ok((client, resp))
    }

    /// Connects to the leader named by the first endpoint, in list order,
    /// that knows one. While endpoints answer but none knows a leader (an
    /// election), keeps asking until the request timeout.
    async fn connect_any(&self) -> Result<Conn> {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let mut errors = Vec::new();
            let mut answered = false;
            for ep in &self.endpoints {
                let (client, resp) = match self.members_of(ep).await {
                    Ok(r) => r,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                answered = true;
                let url = ep.uri().to_string();
                let Some(leader) = resp.leader else {
                    errors.push(format!("{url}: no leader known"));
                    continue;
                };
                // A leader advertising no client URL (a single member
                // started without them) is the member we asked.
                let same = leader.client_urls.is_empty()
                    || leader
                        .client_urls
                        .iter()
                        .any(|u| u.trim_end_matches('/') == url.trim_end_matches('/'));
                let (client, url) = if same {
                    (client, url)
                } else {
                    let mut found = None;
                    for lu in &leader.client_urls {
                        let Ok(lep) = parse_endpoint(lu, &self.config) else {
                            continue;
                        };
                        match lep.connect().await {
                            Ok(ch) => {
                                found = Some((GrpcClient::new(ch), lep.uri().to_string()));
                                break;
                            }
                            Err(e) => errors.push(format!("leader {lu}: {}", error_chain(&e))),
                        }
                    }
                    match found {
                        Some(f) => f,
                        None => continue,
                    }
                };
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                info!(endpoint = %url, leader = %leader.name, "connected to PD leader");
                return Ok(Conn {
                    generation,
                    url,
                    client,
                });
            }
            if !answered || Instant::now() >= deadline {
                return Err(PdError::Unavailable(format!(
                    "no PD leader reachable ({})",
                    errors.join("; ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn conn(&self) -> Result<Conn> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect_any().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Drops the connection unless someone already replaced it.
    async fn invalidate(&self, generation: u64) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.generation == generation) {
            *guard = None;
        }
    }

    /// Runs one RPC against the leader. After a connection failure or a
    /// NOT_LEADER answer it finds the leader again and retries, with
    /// backoff, until the request timeout. Retrying is safe for every PD
    /// call: allocations at worst skip values, and a repeated bootstrap
    /// reports AlreadyBootstrapped.
    async fn call<R, F, Fut>(&self, f: F) -> Result<R>
    where
        R: HasHeader,
        F: Fn(GrpcClient<Channel>, Option<pdpb::RequestHeader>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, Status>>,
    {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let last = match self.conn().await {
                Ok(conn) => match f(conn.client.clone(), self.request_header()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        match not_leader(r.header()) {
                            None => return Ok(r),
                            Some(m) => {
                                debug!(endpoint = %conn.url, message = %m, "PD member is not the leader");
                                self.invalidate(conn.generation).await;
                                PdError::NotLeader(m)
                            }
                        }
                    }
                    Err(s) if is_connection_failure(&s) => {
                        warn!(endpoint = %conn.url, code = ?s.code(), message = s.message(), "PD call failed, reconnecting");
                        self.invalidate(conn.generation).await;
                        status_to_error(&s)
                    }
                    Err(s) => return Err(status_to_error(&s)),
                },
                Err(e) => e,
            };
            if Instant::now() + backoff >= deadline {
                return Err(last);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// The batcher's RPCs: each one a [`Inner::call`], so the combined request
/// follows the leader and retries like any other.
#[async_trait::async_trait]
impl OracleRpc for Inner {
    async fn alloc_revisions(&self, count: u32) -> Result<i64> {
        let resp = self
            .call(|mut c, header| async move {
                c.alloc_revisions(pdpb::AllocRevisionsRequest { header, count })
                    .await
            })
            .await?;
        self.check(resp.header.as_ref())?;
        Ok(resp.first)
    }

    async fn current_revision(&self) -> Result<i64> {
        let resp = self
            .call(|mut c, header| async move {
                c.current_revision(pdpb::CurrentRevisionRequest { header })
                    .await
            })
            .await?;
        self.check(resp.header.as_ref())?;
        Ok(resp.revision)
    }
}

fn parse_endpoint(raw: &str, config: &RpcPdClientConfig) -> Result<Endpoint> {
    let raw = raw.trim();
    let url = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| PdError::InvalidArgument(format!("bad PD endpoint {raw:?}: {e}")))?;
    if ep.uri().host().is_none() {
        return Err(PdError::InvalidArgument(format!(
            "bad PD endpoint {raw:?}: no host"
        )));
    }
    Ok(ep
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(3)))
}

impl RpcPdClient {
    /// Connects to the first reachable endpoint (`http://host:port`, scheme
    /// optional) and learns the cluster id. `Err(InvalidArgument)` for an
    /// empty list or a malformed URL, `Err(Unavailable)` if none answers.
    pub async fn connect<S: AsRef<str>>(
        endpoints: &[S],
        config: RpcPdClientConfig,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(PdError::InvalidArgument("no PD endpoints given".into()));
        }
        let endpoints = endpoints
            .iter()
            .map(|e| parse_endpoint(e.as_ref(), &config))
            .collect::<Result<Vec<_>>>()?;
        let inner = Arc::new(Inner {
            endpoints,
            config,
            cluster_id: AtomicU64::new(0),
            conn: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
        });
        let first = inner.connect_any().await?;
        *inner.conn.lock().await = Some(first);
        let oracle = OracleBatcher::spawn(inner.clone());
        Ok(RpcPdClient { inner, oracle })
    }

    /// The URL of the endpoint currently in use, if connected.
    pub async fn current_endpoint(&self) -> Option<String> {
        self.inner.conn.lock().await.as_ref().map(|c| c.url.clone())
    }

    /// The members as reported by the PD currently connected.
    pub async fn get_members(&self) -> Result<pdpb::GetMembersResponse> {
        let resp =
            self.inner
                .call(|mut c, header| async move {
                    c.get_members(pdpb::GetMembersRequest { header }).await
                })
                .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp)
    }

    /// The operators PD is handing out to region leaders (see
    /// [`crate::PdCore::operators`]). Those this client does not understand
    /// (from a newer PD) are left out.
    pub async fn get_operators(&self) -> Result<Vec<PendingOperator>> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.get_operators(pdpb::GetOperatorsRequest { header }).await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp
            .operators
            .into_iter()
            .filter_map(PendingOperator::from_proto)
            .collect())
    }

    /// PD's schedulers and their settings.
    pub async fn get_schedulers(&self) -> Result<SchedulingStatus> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.get_schedulers(pdpb::GetSchedulersRequest { header })
                    .await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(SchedulingStatus::from_proto(resp))
    }

    /// How well this client (and its clones) batched revision requests so
    /// far: RPCs sent against calls answered.
    pub fn oracle_stats(&self) -> OracleBatchStats {
        self.oracle.stats()
    }
}

/// A heartbeat's wire form, without header.
fn heartbeat_to_proto(hb: &RegionHeartbeat) -> pdpb::RegionHeartbeatRequest {
    pdpb::RegionHeartbeatRequest {
        header: None,
        region: Some(hb.region.clone()),
        leader: Some(hb.leader),
        pending_peers: hb.pending_peers.clone(),
        down_peers: hb.down_peers.clone(),
        approximate_size: hb.approximate_size,
        approximate_keys: hb.approximate_keys,
    }
}

/// The region of a GetRegion response, if any.
fn found_region(resp: pdpb::GetRegionResponse) -> Option<RegionWithLeader> {
    RegionWithLeader::from_proto(pdpb::RegionWithLeader {
        region: resp.region,
        leader: resp.leader,
        approximate_size: resp.approximate_size,
        approximate_keys: resp.approximate_keys,
    })
}

#[async_trait::async_trait]
impl PdClient for RpcPdClient {
    async fn cluster_id(&self) -> Result<u64> {
        let known = self.inner.cluster_id.load(Ordering::Acquire);
        if known != 0 {
            return Ok(known);
        }
        let resp = self.get_members().await?;
        Ok(resp.header.map_or(0, |h| h.cluster_id))
    }

    async fn is_bootstrapped(&self) -> Result<bool> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.is_bootstrapped(pdpb::IsBootstrappedRequest { header })
                    .await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp.bootstrapped)
    }

    async fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> Result<()> {
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::BootstrapRequest {
                    header,
                    node: Some(node.clone()),
                    region: Some(region.clone()),
                };
                async move { c.bootstrap(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())
    }

    async fn alloc_id(&self) -> Result<u64> {
        let resp = self
            .inner
            .call(|mut c, header| async move { c.alloc_id(pdpb::AllocIdRequest { header }).await })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        if resp.id == 0 {
            return Err(PdError::Other("PD returned id 0".into()));
        }
        Ok(resp.id)
    }

    async fn put_node(&self, node: metapb::Node) -> Result<()> {
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::PutNodeRequest {
                    header,
                    node: Some(node.clone()),
                };
                async move { c.put_node(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())
    }

    async fn get_node(&self, id: u64) -> Result<Option<metapb::Node>> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.get_node(pdpb::GetNodeRequest {
                    header,
                    node_id: id,
                })
                .await
            })
            .await?;
        if is_not_found(resp.header.as_ref()) {
            return Ok(None);
        }
        self.inner.check(resp.header.as_ref())?;
        Ok(resp.node)
    }

    async fn get_all_nodes(&self) -> Result<Vec<metapb::Node>> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.get_all_nodes(pdpb::GetAllNodesRequest { header }).await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp.nodes)
    }

    async fn get_region(&self, key: &[u8]) -> Result<Option<RegionWithLeader>> {
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::GetRegionRequest {
                    header,
                    key: key.to_vec(),
                };
                async move { c.get_region(req).await }
            })
            .await?;
        if is_not_found(resp.header.as_ref()) {
            return Ok(None);
        }
        self.inner.check(resp.header.as_ref())?;
        Ok(found_region(resp))
    }

    async fn get_region_by_id(&self, id: u64) -> Result<Option<RegionWithLeader>> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.get_region_by_id(pdpb::GetRegionByIdRequest {
                    header,
                    region_id: id,
                })
                .await
            })
            .await?;
        if is_not_found(resp.header.as_ref()) {
            return Ok(None);
        }
        self.inner.check(resp.header.as_ref())?;
        Ok(found_region(resp))
    }

    async fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<RegionWithLeader>> {
        // The wire limit is u32; a larger one is as good as "no limit".
        let limit = u32::try_from(limit).unwrap_or(0);
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::ScanRegionsRequest {
                    header,
                    start_key: start.to_vec(),
                    end_key: end.to_vec(),
                    limit,
                };
                async move { c.scan_regions(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp
            .regions
            .into_iter()
            .filter_map(RegionWithLeader::from_proto)
            .collect())
    }

    async fn region_heartbeat(&self, hb: RegionHeartbeat) -> Result<Option<RegionOperator>> {
        let resp = self
            .inner
            .call(|mut c, header| {
                let mut req = heartbeat_to_proto(&hb);
                req.header = header;
                async move { c.region_heartbeat(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(crate::client::operator_from_proto(&resp))
    }

    async fn region_heartbeats(&self, hbs: Vec<RegionHeartbeat>) -> Result<Vec<HeartbeatOutcome>> {
        if hbs.is_empty() {
            return Ok(Vec::new());
        }
        let heartbeats: Vec<pdpb::RegionHeartbeatRequest> =
            hbs.iter().map(heartbeat_to_proto).collect();
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::RegionHeartbeatsRequest {
                    header,
                    heartbeats: heartbeats.clone(),
                };
                async move { c.region_heartbeats(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        if resp.responses.len() != hbs.len() {
            return Err(PdError::Other(format!(
                "PD answered {} of {} heartbeats",
                resp.responses.len(),
                hbs.len()
            )));
        }
        Ok(resp
            .responses
            .iter()
            .map(|r| {
                self.inner.check(r.header.as_ref())?;
                Ok(crate::client::operator_from_proto(r))
            })
            .collect())
    }

    async fn alloc_revisions(&self, count: u32) -> Result<i64> {
        self.oracle.alloc_revisions(count).await
    }

    async fn current_revision(&self) -> Result<i64> {
        self.oracle.current_revision().await
    }

    async fn split_region(&self, key: &[u8]) -> Result<RegionWithLeader> {
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::SplitRegionRequest {
                    header,
                    key: key.to_vec(),
                };
                async move { c.split_region(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        resp.region
            .and_then(RegionWithLeader::from_proto)
            .ok_or_else(|| PdError::Other("split answered without the region".into()))
    }

    async fn merge_regions(
        &self,
        source_id: u64,
        target_id: u64,
    ) -> Result<(RegionWithLeader, RegionWithLeader)> {
        let resp = self
            .inner
            .call(|mut c, header| {
                let req = pdpb::MergeRegionsRequest {
                    header,
                    source_id,
                    target_id,
                };
                async move { c.merge_regions(req).await }
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        let region = |r: Option<pdpb::RegionWithLeader>| {
            r.and_then(RegionWithLeader::from_proto)
                .ok_or_else(|| PdError::Other("merge answered without both regions".into()))
        };
        Ok((region(resp.source)?, region(resp.target)?))
    }

    async fn compact(&self, revision: i64) -> Result<crate::CompactOutcome> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.compact(pdpb::CompactRequest { header, revision }).await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        crate::CompactOutcome::from_proto(&resp)
            .ok_or_else(|| PdError::Other(format!("unknown compaction status {}", resp.status)))
    }

    async fn compaction_revision(&self) -> Result<i64> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.get_compaction_revision(pdpb::GetCompactionRevisionRequest { header })
                    .await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp.compaction_revision)
    }

    async fn alarm(
        &self,
        action: pdpb::alarm_request::AlarmAction,
        member_id: u64,
        alarm: pdpb::AlarmType,
    ) -> Result<Vec<pdpb::AlarmMember>> {
        let resp = self
            .inner
            .call(|mut c, header| async move {
                c.alarm(pdpb::AlarmRequest {
                    header,
                    action: action as i32,
                    member_id,
                    alarm: alarm as i32,
                })
                .await
            })
            .await?;
        self.inner.check(resp.header.as_ref())?;
        Ok(resp.alarms)
    }
}
