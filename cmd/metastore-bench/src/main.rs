//! metastore-bench: throughput/latency benchmark for any etcd v3 endpoint
//! (MetaStore or etcd), with the command shape of etcd's `benchmark` tool.

mod cli;
mod conn;
mod histogram;
mod keys;
mod kv;
mod lease;
mod list;
mod oracle;
mod progress;
mod rate;
mod runner;
mod stats;
mod watch;

use clap::Parser;
use cli::{Cli, Command, Consistency, OutputFormat};
use rate::RateLimiter;
use serde_json::json;
use stats::{Report, Section};
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let format = cli.global.output;
    match rt.block_on(run(cli)) {
        Ok((text, js)) => {
            match format {
                OutputFormat::Json => println!("{js}"),
                OutputFormat::Text => print!("{text}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn consistency_note(c: Consistency) {
    // etcd prints this too; on stderr here so JSON output stays clean.
    match c {
        Consistency::L => eprintln!("bench with linearizable range"),
        Consistency::S => eprintln!("bench with serializable range"),
    }
}

/// Runs the benchmark and returns its report as text and as JSON.
async fn run(cli: Cli) -> Result<(String, serde_json::Value), String> {
    let g = &cli.global;
    // Validate before dialing so a typo does not cost a connection storm.
    match &cli.command {
        Command::Put(a) => keys::check_key_size(a.key_size, a.key_space_size)?,
        Command::TxnPut(a) => kv::check_txn_put(a)?,
        Command::TxnMixed(a) => {
            keys::check_key_size(a.key_size, a.key_space_size)?;
            if !(a.rw_ratio >= 0.0 && a.rw_ratio.is_finite()) {
                return Err(format!("--rw-ratio must be >= 0, got {}", a.rw_ratio));
            }
        }
        Command::Watch(a) => watch::check(a)?,
        Command::Range(_) | Command::LeaseKeepalive(_) | Command::Oracle(_) | Command::List(_) => {}
    }
    if g.clients < g.conns {
        eprintln!(
            "warning: --clients {} < --conns {}: only {} connections will carry requests",
            g.clients, g.conns, g.clients
        );
    }

    let oracle_global;
    let g = if let Command::Oracle(_) = &cli.command {
        // PD followers refuse: every connection goes to the leader.
        let endpoints: Vec<String> = g.endpoints.iter().map(|e| conn::normalize(e)).collect();
        let mut leader_only = g.clone();
        leader_only.endpoints = vec![oracle::leader_url(&endpoints).await?];
        leader_only.target_leader = false;
        oracle_global = leader_only;
        &oracle_global
    } else {
        g
    };
    let conns = conn::connect(g).await?;
    let clients = g.clients as usize;
    let ch = |i: usize| conn::for_client(&conns, i);

    let mut extra = serde_json::Map::new();
    extra.insert("endpoints".into(), json!(g.endpoints));
    extra.insert("conns".into(), json!(g.conns));
    extra.insert("clients".into(), json!(g.clients));

    let text;
    let js;
    match &cli.command {
        Command::Put(a) => {
            let value = Arc::new(keys::random_bytes(a.val_size));
            let lease = if a.lease_ttl > 0 {
                lease::grant(ch(0), a.lease_ttl)
                    .await
                    .map_err(|e| format!("granting the puts' lease: {e}"))?
            } else {
                0
            };
            let workers = (0..clients)
                .map(|i| kv::PutWorker::new(ch(i), value.clone(), a, lease))
                .collect();
            let out = runner::run(workers, a.total, 1, RateLimiter::new(a.rate), Some("put")).await;
            let r = Report {
                command: "put",
                main: Section {
                    name: "put",
                    stats: &out.classes[0],
                    elapsed: out.elapsed,
                },
                parts: vec![],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::Range(a) => {
            consistency_note(a.consistency);
            let workers = (0..clients)
                .map(|i| kv::RangeWorker::new(ch(i), a))
                .collect();
            let out =
                runner::run(workers, a.total, 1, RateLimiter::new(a.rate), Some("range")).await;
            let r = Report {
                command: "range",
                main: Section {
                    name: "range",
                    stats: &out.classes[0],
                    elapsed: out.elapsed,
                },
                parts: vec![],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::List(a) => {
            consistency_note(a.consistency);
            let workers = (0..clients)
                .map(|i| list::ListWorker::new(ch(i), a))
                .collect();
            let out =
                runner::run(workers, a.total, 1, RateLimiter::new(a.rate), Some("list")).await;
            extra.insert("limit".into(), json!(a.limit));
            let r = Report {
                command: "list",
                main: Section {
                    name: "list",
                    stats: &out.classes[0],
                    elapsed: out.elapsed,
                },
                parts: vec![],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::TxnPut(a) => {
            let value = Arc::new(keys::random_bytes(a.val_size));
            let workers = (0..clients)
                .map(|i| kv::TxnPutWorker::new(ch(i), value.clone(), a))
                .collect();
            let out = runner::run(
                workers,
                a.total,
                1,
                RateLimiter::new(a.rate),
                Some("txn-put"),
            )
            .await;
            let r = Report {
                command: "txn-put",
                main: Section {
                    name: "txn-put",
                    stats: &out.classes[0],
                    elapsed: out.elapsed,
                },
                parts: vec![],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::TxnMixed(a) => {
            consistency_note(a.consistency);
            let value = Arc::new(keys::random_bytes(a.val_size));
            let workers = (0..clients)
                .map(|i| kv::TxnMixedWorker::new(ch(i), value.clone(), a))
                .collect();
            let out = runner::run(
                workers,
                a.total,
                2,
                RateLimiter::new(a.rate),
                Some("txn-mixed"),
            )
            .await;
            let all = out.all();
            extra.insert("rw_ratio".into(), json!(a.rw_ratio));
            let r = Report {
                command: "txn-mixed",
                main: Section {
                    name: "txn-mixed",
                    stats: &all,
                    elapsed: out.elapsed,
                },
                parts: vec![
                    Section {
                        name: "read",
                        stats: &out.classes[kv::READ],
                        elapsed: out.elapsed,
                    },
                    Section {
                        name: "write",
                        stats: &out.classes[kv::WRITE],
                        elapsed: out.elapsed,
                    },
                ],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::Watch(a) => {
            let out = watch::run(g, &conns, a).await;
            extra.extend(out.extra.clone());
            let r = Report {
                command: "watch",
                main: Section {
                    name: "watch events",
                    stats: &out.events,
                    elapsed: out.events_elapsed,
                },
                parts: vec![
                    Section {
                        name: "watch-create",
                        stats: &out.create,
                        elapsed: out.create_elapsed,
                    },
                    Section {
                        name: "put",
                        stats: &out.puts,
                        elapsed: out.puts_elapsed,
                    },
                ],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::Oracle(a) => {
            let workers = (0..clients)
                .map(|i| oracle::OracleWorker::new(ch(i), a.batch))
                .collect();
            let out = runner::run(workers, a.total, 1, None, Some("oracle")).await;
            extra.insert("batch".into(), json!(a.batch));
            extra.insert(
                "revisions_per_sec".into(),
                json!(
                    out.classes[0].ok_count() as f64 * a.batch as f64
                        / out.elapsed.as_secs_f64().max(1e-9)
                ),
            );
            let r = Report {
                command: "oracle",
                main: Section {
                    name: "alloc-revisions",
                    stats: &out.classes[0],
                    elapsed: out.elapsed,
                },
                parts: vec![],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
        Command::LeaseKeepalive(a) => {
            let workers = futures::future::join_all(
                (0..clients).map(|i| lease::LeaseWorker::new(ch(i), a.ttl)),
            )
            .await;
            let out = runner::run(
                workers,
                a.total,
                1,
                RateLimiter::new(a.rate),
                Some("lease-keepalive"),
            )
            .await;
            let r = Report {
                command: "lease-keepalive",
                main: Section {
                    name: "lease-keepalive",
                    stats: &out.classes[0],
                    elapsed: out.elapsed,
                },
                parts: vec![],
                extra,
            };
            (text, js) = (r.to_text(), r.to_json());
        }
    }
    Ok((text, js))
}

#[cfg(test)]
mod fake_server_tests;
