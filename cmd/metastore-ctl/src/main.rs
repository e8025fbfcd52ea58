//! `metastore-ctl`: the operator's tool. It talks to the placement driver
//! (PD) over gRPC and shows the cluster as PD sees it — nodes, regions,
//! scheduling — and asks PD for region splits and merges.
//!
//! ```text
//! metastore-ctl store list
//! metastore-ctl region list -w json
//! metastore-ctl region show foo
//! metastore-ctl region split foo --timeout 30s
//! metastore-ctl region merge 2 7
//! metastore-ctl scheduler
//! ```
//!
//! PD is found with `--pd-endpoints` (default: a dev node's client URL,
//! where the node serves its embedded PD). Results go to stdout, errors to
//! stderr as one line; the exit code is 0 on success, 1 on failure and 2
//! for bad usage (see [`error::CtlError`]).

mod cli;
mod error;
mod keys;
mod output;
mod region;
mod scheduler;
mod store;
mod table;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pd::{RpcPdClient, RpcPdClientConfig};

use crate::cli::{Cli, Command, RegionCommand, StoreCommand};
use crate::error::{CtlError, Result};
use crate::output::Output;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&CtlError::Failed(format!("cannot start: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(text) => {
            // A closed stdout (`| head`) is not worth a panic or an error.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &CtlError) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "metastore-ctl: {}", e.one_line());
    ExitCode::from(e.exit_code())
}

async fn connect(raw: &str) -> Result<RpcPdClient> {
    let endpoints = cli::endpoints(raw);
    if endpoints.is_empty() {
        return Err(CtlError::Usage("--pd-endpoints: no URL given".into()));
    }
    let config = RpcPdClientConfig {
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(10),
    };
    RpcPdClient::connect(&endpoints, config)
        .await
        .map_err(|e| match e {
            pd::PdError::InvalidArgument(m) => CtlError::Usage(format!("--pd-endpoints: {m}")),
            other => {
                let msg = other.to_string();
                // A node with a separate PD serves no PD API.
                let hint = if msg.contains("Unimplemented") {
                    " (not a PD endpoint: only a dev node serves its embedded PD on its client \
                     URL; give the metastore-pd members' client URLs)"
                } else {
                    ""
                };
                CtlError::Failed(format!(
                    "cannot reach PD at {}: {msg}{hint}",
                    endpoints.join(",")
                ))
            }
        })
}

async fn run(cli: Cli) -> Result<String> {
    let out = Output::new(cli.write_out, cli.hex);
    // Checked before PD is asked anything.
    let key = match &cli.command {
        Command::Region(RegionCommand::Show { key } | RegionCommand::Split { key, .. }) => {
            keys::parse(key).map_err(CtlError::Usage)?
        }
        _ => Vec::new(),
    };
    let pd = connect(&cli.pd_endpoints).await?;
    match cli.command {
        Command::Store(StoreCommand::List) => store::list(&pd, &out).await,
        Command::Region(cmd) => match cmd {
            RegionCommand::List => region::render(&region::list(&pd).await?, &out),
            RegionCommand::Show { .. } => {
                region::render(&[region::show(&pd, &key, &out).await?], &out)
            }
            RegionCommand::Split { timeout, .. } => {
                region::render(&region::split(&pd, &key, timeout, &out).await?, &out)
            }
            RegionCommand::Merge { first, second } => {
                let (source, target) = region::merge(&pd, first, second).await?;
                region::render_merge(&source, &target, &out)
            }
        },
        Command::Scheduler => scheduler::status(&pd, &out).await,
    }
}
