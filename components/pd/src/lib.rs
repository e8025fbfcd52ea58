//! The placement driver (PD) of MetaStore.
//!
//! PD is the cluster's source of truth for everything that is not user data:
//!
//! - **cluster identity**: a cluster id fixed when the PD cluster is created
//!   (a hash of the initial member list, random for a single member),
//!   carried in every response so a node never mixes clusters;
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
//! PD is a raft-replicated state machine of 1, 3 or 5 members ([`PdCore`]
//! is one member): every mutation — bootstrap, nodes, region meta changes,
//! the allocators' high-water marks — is a raft entry applied on every
//! member, persisted with the raft log in one RocksDB per member
//! ([`storage::Storage`]); members talk raft over gRPC on their peer URLs
//! ([`transport`]). Only the leader serves; followers answer `NOT_LEADER`.
//!
//! Allocators commit a high-water mark ahead of what they hand out (a
//! window), so their fast path is an in-memory increment on the leader. A
//! new leader serves only after applying every earlier entry, and starts
//! above the committed mark; a deposed leader stops at the end of its
//! leader lease, before any new leader can be elected (the argument is in
//! `raft_node` and docs/architecture.md). So revisions increase in real time
//! across leader changes, crashes and partitions. [`PdCore::close`] commits
//! the exact position so a clean restart continues without a gap.
//!
//! PD schedules on its leader: each region heartbeat is answered with at
//! most one step for the region's leader — replica placement, then leader
//! and region balance, then operators' requests, then the merge checker
//! ([`schedule`]) — decided from per-node load counters
//! kept up to date as regions change ([`load`]), not by walking regions.
//! Nodes send their regions' heartbeats in batches
//! ([`PdClient::region_heartbeats`]): one RPC per node and round, and one
//! raft proposal for the meta changes of the whole batch.
//!
//! Besides the nodes' contract, PD takes requests from operators' tools
//! (`metastore-ctl`): a split of the region containing a key, handed to the
//! region's leader with a heartbeat response ([`PdClient::split_region`]),
//! a merge of two adjacent regions handed to the left one's leader
//! ([`PdClient::merge_regions`]), and what its scheduling is doing
//! ([`operators`]).
//!
//! Nodes use PD through the [`PdClient`] trait: [`LocalPdClient`] when a
//! single-member PD is embedded in the same process, [`RpcPdClient`] over
//! gRPC ([`service::PdService`]) otherwise, which follows the leader.
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
//! core.close().await?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod load;
pub mod local;
mod merge;
pub mod operators;
mod oracle_batch;
pub mod pd_core;
mod raft_node;
pub mod rpc_client;
pub mod schedule;
pub mod service;
mod split;
mod state;
pub mod storage;
pub mod transport;

pub use crate::client::{
    CompactOutcome, CompactStatus, HeartbeatOutcome, PdClient, PdError, RegionHeartbeat,
    RegionOperator, RegionWithLeader, Result, INITIAL_REVISION,
};
pub use crate::local::LocalPdClient;
pub use crate::operators::{CheckerMerge, PendingOperator, SchedulerInfo, SchedulingStatus};
pub use crate::oracle_batch::OracleBatchStats;
pub use crate::pd_core::{HeartbeatStats, PdConfig, PdCore};
pub use crate::rpc_client::{RpcPdClient, RpcPdClientConfig};
