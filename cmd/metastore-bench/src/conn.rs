//! gRPC connections: `--conns` separate HTTP/2 connections, with
//! `--clients` assigned to them round-robin.

use crate::cli::Global;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::StatusRequest;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

pub fn normalize(ep: &str) -> String {
    let ep = ep.trim();
    if ep.contains("://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

async fn dial(url: &str, timeout: Duration) -> Result<Channel, String> {
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad endpoint {url:?}: {e}"))?
        .tcp_nodelay(true);
    if !timeout.is_zero() {
        ep = ep.connect_timeout(timeout);
    }
    // `connect` (not `connect_lazy`) so that an unreachable endpoint is
    // reported up front instead of as thousands of failed requests.
    let fut = ep.connect();
    let res = if timeout.is_zero() {
        fut.await
    } else {
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| format!("dial {url}: timed out after {timeout:?}"))?
    };
    res.map_err(|e| format!("dial {url}: {}", error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        // hyper and tonic often wrap an error in one that repeats its text.
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}

/// The endpoint whose member is the current leader, found by asking every
/// endpoint for its Status.
async fn find_leader(endpoints: &[String], timeout: Duration) -> Result<String, String> {
    let mut problems = Vec::new();
    for url in endpoints {
        let ch = match dial(url, timeout).await {
            Ok(ch) => ch,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let mut m = MaintenanceClient::new(ch);
        match m.status(StatusRequest {}).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let member = resp.header.as_ref().map(|h| h.member_id);
                if resp.leader != 0 && member == Some(resp.leader) {
                    return Ok(url.clone());
                }
            }
            Err(e) => problems.push(format!("status {url}: {}", e.message())),
        }
    }
    let mut msg = "--target-leader: no endpoint reports itself as the leader".to_string();
    if !problems.is_empty() {
        msg.push_str(&format!(" ({})", problems.join("; ")));
    }
    Err(msg)
}

/// Opens the connections. Connection `j` goes to endpoint `j % endpoints`,
/// so several endpoints share the load the way etcd's client balancer does.
pub async fn connect(g: &Global) -> Result<Vec<Channel>, String> {
    let mut endpoints: Vec<String> = g
        .endpoints
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| normalize(e))
        .collect();
    if endpoints.is_empty() {
        return Err("no --endpoints given".into());
    }
    if g.target_leader {
        endpoints = vec![find_leader(&endpoints, g.dial_timeout).await?];
    }
    let mut conns = Vec::with_capacity(g.conns as usize);
    for j in 0..g.conns as usize {
        // Each dial opens its own HTTP/2 connection; clones of one Channel
        // would multiplex everything onto a single socket.
        conns.push(dial(&endpoints[j % endpoints.len()], g.dial_timeout).await?);
    }
    Ok(conns)
}

/// The connection client `i` uses.
pub fn for_client(conns: &[Channel], i: usize) -> Channel {
    conns[i % conns.len()].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(normalize("127.0.0.1:2379"), "http://127.0.0.1:2379");
        assert_eq!(normalize(" http://[::1]:1 "), "http://[::1]:1");
    }
}
