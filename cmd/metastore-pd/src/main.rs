//! `metastore-pd`: runs a MetaStore placement driver member.
//!
//! Members started with the same `--initial-cluster` form one raft group;
//! without it the member is a cluster of its own. The flags follow etcd's
//! naming. A restarted member reuses its data dir and ignores
//! `--initial-cluster`, as etcd does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use pd::{PdConfig, PdCore, PdError};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(name = "metastore-pd", version, about = "MetaStore placement driver")]
struct Cli {
    /// Human-readable name of this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Where PD keeps its state [default: <name>.metastore-pd].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Comma-separated URLs to serve the PD API on.
    #[arg(long, default_value = "http://127.0.0.1:2479")]
    listen_client_urls: String,
    /// Comma-separated URLs reported to clients [default: the listen URLs].
    #[arg(long)]
    advertise_client_urls: Option<String>,
    /// Comma-separated URLs for PD member traffic.
    #[arg(long, default_value = "http://127.0.0.1:2480")]
    listen_peer_urls: String,
    /// name=peer-url,... of every member of a new cluster, this one included
    /// [default: this member alone]. Ignored once the data dir exists.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Voters every region is given, on distinct nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    max_replicas: u64,
    /// How long a node may be unreachable before its replicas are rebuilt
    /// on other nodes, in seconds.
    #[arg(long, default_value_t = 1800)]
    max_node_down_time: u64,
    /// The merge checker merges a region into its right neighbour only if
    /// each has at most this many keys, and so have both together
    /// (approximate, from the heartbeats); 0 turns the merge checker off.
    #[arg(long, default_value_t = 200_000)]
    max_merge_region_keys: u64,
    /// Likewise for their size, in MiB; 0 turns the merge checker off.
    #[arg(long, default_value_t = 20)]
    max_merge_region_size: u64,
    /// How long neither region may have been split or merged before the
    /// merge checker merges them, in seconds (counted from when this PD
    /// leader first saw their current version).
    #[arg(long, default_value_t = 600)]
    split_merge_interval: u64,
    /// Merges the merge checker keeps in flight at most, cluster-wide,
    /// counting those still moving replicas onto their target's nodes; 0
    /// turns it off.
    #[arg(long, default_value_t = 4)]
    merge_limit: usize,
}

/// A URL we can listen on: http only, explicit host and port, no path.
struct HttpUrl {
    host: String,
    port: u16,
}

impl HttpUrl {
    fn parse(flag: &str, raw: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--{flag}: invalid URL {raw:?}: {why}");
        let uri: http::Uri = raw.parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("TLS is not supported yet, use http://")),
            Some(_) => return Err(bad("scheme must be http://")),
            None => return Err(bad("must start with http://")),
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("must not have a path"));
        }
        // http::Uri keeps IPv6 literals in brackets; the resolver wants them bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(HttpUrl { host, port })
    }
}

fn split_list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_urls(flag: &str, raw: &str) -> Result<Vec<(String, HttpUrl)>, String> {
    let parts = split_list(raw);
    if parts.is_empty() {
        return Err(format!("--{flag}: no URL given"));
    }
    parts
        .into_iter()
        .map(|p| HttpUrl::parse(flag, p).map(|u| (p.to_owned(), u)))
        .collect()
}

struct Settings {
    name: String,
    data_dir: PathBuf,
    client_urls: Vec<(String, HttpUrl)>,
    advertise_client_urls: Vec<String>,
    peer_urls: Vec<(String, HttpUrl)>,
    initial_cluster: Vec<(String, String)>,
    schedule: pd::schedule::ScheduleConfig,
}

fn settings(cli: Cli) -> Result<Settings, String> {
    if cli.name.is_empty() || cli.name.contains([',', '=']) {
        return Err(format!(
            "--name: {:?} must be non-empty and contain no ',' or '='",
            cli.name
        ));
    }
    let client_urls = parse_urls("listen-client-urls", &cli.listen_client_urls)?;
    let peer_urls = parse_urls("listen-peer-urls", &cli.listen_peer_urls)?;
    let advertise_client_urls = match &cli.advertise_client_urls {
        Some(raw) => parse_urls("advertise-client-urls", raw)?
            .into_iter()
            .map(|(s, _)| s)
            .collect(),
        None => client_urls.iter().map(|(s, _)| s.clone()).collect(),
    };

    let mut initial_cluster: Vec<(String, String)> = Vec::new();
    if let Some(raw) = &cli.initial_cluster {
        for entry in split_list(raw) {
            let (name, url) = entry.split_once('=').ok_or_else(|| {
                format!("--initial-cluster: entry {entry:?} is not of the form name=peer-url")
            })?;
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("--initial-cluster: entry {entry:?} has no name"));
            }
            HttpUrl::parse("initial-cluster", url.trim())?;
            if initial_cluster.iter().any(|(n, _)| n == name) {
                return Err(format!(
                    "--initial-cluster: member name {name:?} appears more than once"
                ));
            }
            initial_cluster.push((name.to_owned(), url.trim().to_owned()));
        }
        if initial_cluster.is_empty() {
            return Err("--initial-cluster: no member given".into());
        }
        if !initial_cluster.iter().any(|(n, _)| *n == cli.name) {
            let names: Vec<&str> = initial_cluster.iter().map(|(n, _)| n.as_str()).collect();
            return Err(format!(
                "--initial-cluster has no member named {:?} (it names {})",
                cli.name,
                names.join(", ")
            ));
        }
    }

    let data_dir = cli
        .data_dir
        .unwrap_or_else(|| PathBuf::from(format!("{}.metastore-pd", cli.name)));
    Ok(Settings {
        name: cli.name,
        data_dir,
        client_urls,
        advertise_client_urls,
        peer_urls,
        initial_cluster,
        schedule: pd::schedule::ScheduleConfig {
            max_replicas: cli.max_replicas as usize,
            max_node_down_time: std::time::Duration::from_secs(cli.max_node_down_time),
            max_merge_region_keys: cli.max_merge_region_keys,
            max_merge_region_size: cli.max_merge_region_size.checked_mul(1 << 20).ok_or_else(
                || {
                    format!(
                        "--max-merge-region-size: {} MiB is too large",
                        cli.max_merge_region_size
                    )
                },
            )?,
            split_merge_interval: std::time::Duration::from_secs(cli.split_merge_interval),
            merge_limit: cli.merge_limit,
            ..Default::default()
        },
    })
}

async fn bind(url: &str, u: &HttpUrl) -> Result<TcpListener, String> {
    let addr = if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        format!("{}:{}", u.host, u.port)
    };
    TcpListener::bind((u.host.as_str(), u.port))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => format!("address already in use: {addr} ({url})"),
            _ => format!("cannot listen on {addr} ({url}): {e}"),
        })
}

async fn run(s: Settings) -> Result<(), String> {
    // Signal handlers first: a signal arriving during startup must still
    // lead to a clean close.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;

    let mut listeners = Vec::new();
    let mut bound: Vec<SocketAddr> = Vec::new();
    for (raw, u) in &s.client_urls {
        let l = bind(raw, u).await?;
        if let Ok(a) = l.local_addr() {
            bound.push(a);
        }
        listeners.push(l);
    }

    let mut config = PdConfig::new(&s.data_dir);
    config.name = s.name.clone();
    config.client_urls = s.advertise_client_urls.clone();
    config.peer_urls = s.peer_urls.iter().map(|(u, _)| u.clone()).collect();
    config.initial_cluster = s.initial_cluster.clone();
    config.schedule = s.schedule.clone();
    let core = PdCore::open(config).map_err(|e| {
        let detail = match e {
            PdError::Storage(m) => m,
            other => other.to_string(),
        };
        let hint = if detail.contains("lock file") {
            " (is another metastore-pd using it?)"
        } else {
            ""
        };
        format!("unusable data dir: {detail}{hint}")
    })?;

    // A single member has no peers to talk to; not binding its peer URL
    // keeps it from failing on a port it does not need.
    let mut peer_server = None;
    let (stop_peers, peers_stopped) = tokio::sync::oneshot::channel::<()>();
    if core.members().len() > 1 {
        let mut peer_listeners = Vec::new();
        for (raw, u) in &s.peer_urls {
            peer_listeners.push(bind(raw, u).await?);
        }
        peer_server = Some(tokio::spawn(pd::transport::serve_peers(
            core.clone(),
            peer_listeners,
            async {
                let _ = peers_stopped.await;
            },
        )));
    }

    info!(
        name = %s.name,
        data_dir = %s.data_dir.display(),
        cluster_id = core.cluster_id(),
        member_id = core.member_id(),
        members = core.members().len(),
        listen = ?bound,
        "metastore-pd serving"
    );
    let shutdown = async move {
        let which = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        info!(signal = which, "shutting down");
    };
    let served = pd::service::serve_listeners(core.clone(), listeners, shutdown).await;
    // Close even after a server error: the oracle must persist its position
    // (through raft, so the peer traffic keeps flowing until then).
    let closed = core.close().await;
    let _ = stop_peers.send(());
    if let Some(p) = peer_server {
        match p.await {
            Ok(Err(e)) => error!(error = %e, "peer server failed"),
            Err(e) => error!(error = %e, "peer server task failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Err(e) = &served {
        error!(error = %e, "server failed");
    }
    served.map_err(|e| format!("server failed: {e}"))?;
    closed.map_err(|e| format!("clean shutdown failed: {e}"))?;
    info!("metastore-pd stopped");
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message is multi-line (tip, usage); its first line says it all.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    let settings = match settings(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
