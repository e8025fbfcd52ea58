//! Node id → peer URL, shared by the raft transport (server) and request
//! forwarding ([`crate::forward`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use pd::PdClient;
use tracing::debug;

/// Finds the peer URL (`http://host:port`) of a node.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, node_id: u64) -> BoxFuture<'_, Option<String>>;

    /// Called after a connection to `node_id` failed, so a cached address
    /// can be looked up afresh (the node may have moved).
    fn invalidate(&self, _node_id: u64) {}
}

/// A fixed node → URL map (tests, tools).
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    urls: HashMap<u64, String>,
}

impl StaticResolver {
    pub fn new(urls: HashMap<u64, String>) -> StaticResolver {
        StaticResolver { urls }
    }
}

impl Resolver for StaticResolver {
    fn resolve(&self, node_id: u64) -> BoxFuture<'_, Option<String>> {
        let url = self.urls.get(&node_id).cloned();
        Box::pin(async move { url })
    }
}

/// Resolves through the placement driver: a node's first advertised peer
/// URL, cached until a connection to it fails.
pub struct PdResolver {
    pd: Arc<dyn PdClient>,
    cache: Mutex<HashMap<u64, String>>,
}

impl PdResolver {
    pub fn new(pd: Arc<dyn PdClient>) -> PdResolver {
        PdResolver {
            pd,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        // The map stays consistent whatever panicked while holding it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Resolver for PdResolver {
    fn resolve(&self, node_id: u64) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            if let Some(url) = self.cache().get(&node_id).cloned() {
                return Some(url);
            }
            let node = match self.pd.get_node(node_id).await {
                Ok(Some(node)) => node,
                Ok(None) => {
                    debug!(node_id, "node unknown to the placement driver");
                    return None;
                }
                Err(e) => {
                    debug!(node_id, "resolving node address: {e}");
                    return None;
                }
            };
            let url = node.peer_urls.into_iter().next()?;
            self.cache().insert(node_id, url.clone());
            Some(url)
        })
    }

    fn invalidate(&self, node_id: u64) {
        self.cache().remove(&node_id);
    }
}
