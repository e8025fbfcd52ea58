//! Harness shared by the workspace's tests: real processes (metastore-node,
//! metastore-pd, etcd) on free loopback ports, the in-process raftstore
//! cluster with fault-injecting transport, and fault drivers (nemesis) for
//! both.
//!
//! - [`process`]: single servers ([`Node`], [`Pd`], [`Etcd`]), `etcdctl`,
//!   `metastore-ctl`, an `etcd-client` connector, ports and binary paths.
//! - [`cluster`]: 3-member clusters behind the [`Cluster`] trait —
//!   [`ProcessCluster`] (3 PD + 3 nodes) and [`EtcdCluster`].
//! - [`proxy`]: a TCP proxy that passes, delays, stalls or blackholes.
//! - [`nemesis`]: seeded background fault drivers: [`Nemesis`] for a
//!   [`Cluster`], [`RaftNemesis`] for the in-process cluster.
//! - [`raft_cluster`]: raftstore's in-process cluster, whose transport
//!   filters (partition, loss, delay, duplication) are its fault injection.
//! - [`router_cluster`]: whole node storage stacks (routers over that
//!   cluster, forwarding in process, an oracle per node that can be slowed
//!   with [`faulty_pd`]).
//! - [`history`]: seeded workloads recorded as histories and checked by the
//!   `checker` crate, through an [`Executor`]: [`EtcdExecutor`] (real
//!   processes, MetaStore or etcd) or [`RouterExecutor`] (in process).
//! - [`watch_recorder`]: watches recorded through the same run (both
//!   executors are [`WatchSource`]s) and checked against its history.

pub mod cluster;
pub mod etcd_executor;
pub mod faulty_pd;
pub mod history;
pub mod nemesis;
pub mod process;
pub mod proxy;
pub mod raft_cluster;
pub mod requests;
pub mod router_cluster;
pub mod router_executor;
pub mod watch_recorder;

pub use cluster::{Cluster, EtcdCluster, PdControl, ProcessCluster, ProcessClusterOptions};
pub use etcd_executor::{Claims, EtcdExecutor};
pub use faulty_pd::{FaultyPd, OracleFault};
pub use history::{Executor, RunConfig};
pub use nemesis::{
    Fault, Nemesis, NemesisConfig, NemesisEvent, NemesisLog, RaftFault, RaftNemesis,
    RaftNemesisConfig, Step,
};
pub use process::{bin_path, client, etcdctl, free_port, metastore_ctl, Etcd, Node, Pd};
pub use proxy::{Proxy, ProxyMode};
pub use router_cluster::RouterCluster;
pub use router_executor::RouterExecutor;
pub use watch_recorder::{WatchRecorder, WatchSource};

/// Sends the logs of in-process nodes to the test's output when `RUST_LOG`
/// names what to show (e.g. `RUST_LOG=router::txn=debug`); does nothing
/// otherwise, or when called again.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
