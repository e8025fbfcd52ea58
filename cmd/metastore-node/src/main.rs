//! `metastore-node`: serves etcd v3 clients and hosts region replicas.
//!
//! With no arguments it runs a single-node dev cluster with an embedded
//! placement driver, data in `./default.metastore`, clients on
//! `http://127.0.0.1:2379`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use server::units::{ByteSize, Interval, IntervalOrZero};
use server::Config;

#[derive(Parser, Debug)]
#[command(
    name = "metastore-node",
    version,
    about = "etcd-compatible, sharded key-value store node"
)]
struct Args {
    /// Human-readable name of this node.
    #[arg(long)]
    name: Option<String>,
    /// Directory for the node's data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Comma-separated URLs to serve etcd clients on.
    #[arg(long, value_delimiter = ',')]
    listen_client_urls: Option<Vec<String>>,
    /// Comma-separated client URLs to advertise to the cluster.
    #[arg(long, value_delimiter = ',')]
    advertise_client_urls: Option<Vec<String>>,
    /// Comma-separated URLs for traffic from other nodes.
    #[arg(long, value_delimiter = ',')]
    listen_peer_urls: Option<Vec<String>>,
    /// Comma-separated peer URLs to advertise to the cluster.
    #[arg(long, value_delimiter = ',')]
    advertise_peer_urls: Option<Vec<String>>,
    /// Comma-separated placement driver client URLs; absent = embedded PD.
    #[arg(long, value_delimiter = ',')]
    pd_endpoints: Option<Vec<String>>,
    /// A region splits once its history holds more than this many bytes
    /// (e.g. 96MiB, the default).
    #[arg(long)]
    region_max_size: Option<ByteSize>,
    /// A region splits once it holds more than this many keys (default
    /// 960000).
    #[arg(long)]
    region_max_keys: Option<u64>,
    /// How often region leaders measure their regions (default 10s).
    #[arg(long)]
    split_check_interval: Option<Interval>,
    /// How often region leaders check that their replicas hold the same
    /// data (default 10m; 0 disables); a difference raises etcd's CORRUPT
    /// alarm.
    #[arg(long)]
    consistency_check_interval: Option<IntervalOrZero>,
    /// Threads driving the node's region replicas (default 2; at least
    /// 1).
    #[arg(long)]
    raft_pollers: Option<usize>,
    /// How long a watch asking for progress notifications may stay silent
    /// before it gets one (default 10m).
    #[arg(long)]
    experimental_watch_progress_notify_interval: Option<Interval>,
    /// TOML file with the same settings (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn config_from(args: Args) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_toml_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(name) = args.name {
        if args.data_dir.is_none() && args.config.is_none() {
            cfg.data_dir = PathBuf::from(format!("{name}.metastore"));
        }
        cfg.name = name;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.listen_client_urls {
        cfg.listen_client_urls = v;
    }
    if let Some(v) = args.advertise_client_urls {
        cfg.advertise_client_urls = v;
    }
    if let Some(v) = args.listen_peer_urls {
        cfg.listen_peer_urls = v;
    }
    if let Some(v) = args.advertise_peer_urls {
        cfg.advertise_peer_urls = v;
    }
    if let Some(v) = args.pd_endpoints {
        cfg.pd_endpoints = v;
    }
    if let Some(v) = args.region_max_size {
        cfg.region_max_size = v;
    }
    if let Some(v) = args.region_max_keys {
        cfg.region_max_keys = v;
    }
    if let Some(v) = args.split_check_interval {
        cfg.split_check_interval = v;
    }
    if let Some(v) = args.consistency_check_interval {
        cfg.consistency_check_interval = v;
    }
    if let Some(v) = args.raft_pollers {
        cfg.raft_pollers = v;
    }
    if let Some(v) = args.experimental_watch_progress_notify_interval {
        cfg.watch_progress_notify_interval = v;
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match config_from(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("metastore-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metastore-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut node = match server::node::start(cfg).await {
            Ok(node) => node,
            Err(e) => {
                eprintln!("metastore-node: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("metastore-node: cannot watch SIGTERM: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let code = tokio::select! {
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
            _ = term.recv() => ExitCode::SUCCESS,
            why = node.wait_failure() => {
                eprintln!("metastore-node: {why}");
                ExitCode::FAILURE
            }
        };
        tracing::info!("shutting down");
        node.shutdown().await;
        code
    })
}
