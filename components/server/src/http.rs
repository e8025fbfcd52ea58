//! etcd's plain HTTP endpoints on the client port.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Json;
use serde::Serialize;

use crate::maintenance::{ETCD_CLUSTER_VERSION, ETCD_VERSION};
use crate::NodeContext;

#[derive(Serialize)]
struct Version {
    etcdserver: &'static str,
    etcdcluster: &'static str,
}

#[derive(Serialize)]
struct Health {
    health: String,
    reason: String,
}

pub fn routes(ctx: Arc<NodeContext>) -> axum::Router {
    axum::Router::new()
        .route("/version", get(version))
        .route("/health", get(health))
        .with_state(ctx)
}

async fn version() -> Json<Version> {
    Json(Version {
        etcdserver: ETCD_VERSION,
        etcdcluster: ETCD_CLUSTER_VERSION,
    })
}

/// Healthy when the node's regions have a leader, as etcd reports
/// "RAFT NO LEADER" otherwise.
async fn health(State(ctx): State<Arc<NodeContext>>) -> (StatusCode, Json<Health>) {
    let regions = ctx.router.store().regions();
    let leaderless = regions.is_empty() || regions.iter().any(|r| r.status().leader_peer_id == 0);
    if leaderless {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                health: "false".into(),
                reason: "RAFT NO LEADER".into(),
            }),
        )
    } else {
        (
            StatusCode::OK,
            Json(Health {
                health: "true".into(),
                reason: String::new(),
            }),
        )
    }
}
