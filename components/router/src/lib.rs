//! A node's storage for etcd KV requests: maps each request onto the region
//! that owns its keys, and serves it from any node.
//!
//! Two jobs, two homes:
//! * **routing** ([`Router`], contract in `router.rs`; [`locate`],
//!   [`forward`]): find the region of a request and where its leader is;
//!   run the request here if this node's replica is the ready leader,
//!   forward it to the leader's node otherwise (linearizable reads are
//!   served by a follower through the leader's read index), and retry what
//!   certainly did not apply until [`RETRY_DEADLINE`]; requests over
//!   several regions and region split (`regions`); etcd's Compact across
//!   regions and regions catching up with PD's compaction revision
//!   (`compaction`); writes over several regions by two-phase commit
//!   (`txn`); region merge, driven by the source region's leader
//!   (`merge`); HashKV of the whole keyspace from every region's replicas
//!   (`hash`); etcd's leases at the leaders of the regions owning them
//!   (`lease`); work that outlives its client's call (`detached`);
//! * **the leader-side protocols** ([`leader`], contract in
//!   `leader/mod.rs`): latches, evaluation, in-flight writes, the
//!   sequencer that gives writes their revisions in log order, and the read
//!   barrier.
//!
//! A write served here, end to end: `Router::write` → `locate` →
//! `RegionLeader::write` (latch, evaluate, register) →
//! `Sequencer::submit` → the drain task (oracle block of revisions,
//! `RegionHandle::propose_with`) → the replica's thread (raft, apply) →
//! the job's callback (releases latches and registration, answers the
//! caller's oneshot) → `RegionLeader::write` fills in the revisions. The
//! same path is drawn in docs/architecture.md.
//!
//! Failures are classified in [`error`]: etcd request errors, not applied
//! (retried), outcome unknown (never retried), node failures.

mod cache;
pub mod compaction;
mod detached;
pub mod error;
pub mod forward;
mod hash;
pub mod leader;
pub mod lease;
mod locate;
pub mod merge;
mod regions;
mod replicas;
pub mod resolve;
pub mod resolved;
mod router;
mod txn;
pub mod watch;

use std::time::Duration;

pub use error::{Error, Result};
pub use router::Router;

/// How long a request keeps retrying errors that certainly had no effect
/// (e.g. during an election) before it fails.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(5);

/// First and largest pause between two attempts of a request.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(200);
