//! The placement driver (PD) of MetaStore.
//!
//! PD is the cluster's source of truth for everything that is not user data:
//!
//! - **cluster identity**: a random cluster id, drawn when the PD data dir is
//!   created, carried in every response so a node never mixes clusters;
//! - **bootstrap**: the one-time creation of the cluster with its first node
//!   and the first region, which covers the whole keyspace;
//! - **nodes** (`metapb::Node`) and **regions** (`metapb::Region`), with each
//!   region's leader as learned from heartbeats. Regions live in a tree keyed
//!   by start key, so routers find the region owning a key;
//! - the **id allocator** for nodes, regions and peers;
//! - the **revision oracle**: the single, global sequence of etcd revisions.
//!   Every write takes its revision here, so revisions are unique and
//!   increasing across all regions.
//!
//! Allocators persist a high-water mark ahead of what they hand out (a
//! window), so their fast path is an in-memory increment and a crash never
//! hands out a value twice; [`PdCore::close`] persists the exact position so a
//! clean restart continues without a gap.
//!
//! This crate holds the single-member PD: [`PdCore`] keeps its state in one
//! RocksDB instance through [`storage::Storage`] (the piece a replicated PD
//! will replace). Nodes use PD through the [`PdClient`] trait:
//! [`LocalPdClient`] when PD is embedded in the same process,
//! [`RpcPdClient`] over gRPC ([`service::PdService`]) otherwise.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pd::{PdClient, PdConfig, PdCore, LocalPdClient};
//! let core = PdCore::open(PdConfig::new("/tmp/pd-data"))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = tokio::spawn(pd::service::serve(core.clone(), listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }));
//! let pd = LocalPdClient::new(core.clone());
//! let first = pd.alloc_revisions(1).await?;
//! # let _ = (first, server);
//! core.close()?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod local;
pub mod pd_core;
pub mod rpc_client;
pub mod schedule;
pub mod service;
pub mod storage;

pub use crate::client::{
    PdClient, PdError, RegionHeartbeat, RegionOperator, RegionWithLeader, Result,
};
pub use crate::local::LocalPdClient;
pub use crate::pd_core::{PdConfig, PdCore};
pub use crate::rpc_client::{RpcPdClient, RpcPdClientConfig};
