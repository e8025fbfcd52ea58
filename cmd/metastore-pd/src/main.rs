//! `metastore-pd`: runs a MetaStore placement driver member.
//!
//! Only a single-member PD is supported for now; the flags already follow
//! etcd's naming so that a replicated PD can keep them.

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
    /// name=peer-url,... [default: <name>=<listen-peer-urls>].
    #[arg(long)]
    initial_cluster: Option<String>,
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
    peer_urls: Vec<String>,
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

    let initial_cluster = cli.initial_cluster.clone().unwrap_or_else(|| {
        peer_urls
            .iter()
            .map(|(u, _)| format!("{}={u}", cli.name))
            .collect::<Vec<_>>()
            .join(",")
    });
    let mut members: Vec<&str> = Vec::new();
    for entry in split_list(&initial_cluster) {
        let (name, url) = entry.split_once('=').ok_or_else(|| {
            format!("--initial-cluster: entry {entry:?} is not of the form name=peer-url")
        })?;
        HttpUrl::parse("initial-cluster", url)?;
        if !members.contains(&name) {
            members.push(name);
        }
    }
    if members.is_empty() {
        return Err("--initial-cluster: no member given".into());
    }
    if members.len() > 1 {
        return Err(format!(
            "multi-member PD is not supported yet (--initial-cluster names {} members: {})",
            members.len(),
            members.join(", ")
        ));
    }
    if members[0] != cli.name {
        return Err(format!(
            "--initial-cluster has no member named {:?} (it names {:?})",
            cli.name, members[0]
        ));
    }

    let data_dir = cli
        .data_dir
        .unwrap_or_else(|| PathBuf::from(format!("{}.metastore-pd", cli.name)));
    Ok(Settings {
        name: cli.name,
        data_dir,
        client_urls,
        advertise_client_urls,
        peer_urls: peer_urls.into_iter().map(|(s, _)| s).collect(),
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
    config.peer_urls = s.peer_urls.clone();
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

    info!(
        name = %s.name,
        data_dir = %s.data_dir.display(),
        cluster_id = core.cluster_id(),
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
    // Close even after a server error: the oracle must persist its position.
    let closed = core.close();
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
            return ExitCode::from(2);
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
