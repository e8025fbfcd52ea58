//! Command line, shaped after etcd's `benchmark` tool: same global flags,
//! subcommand names, flag names and defaults where etcd has them.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "metastore-bench",
    version,
    about = "Low-level benchmark for etcd v3 API servers (MetaStore or etcd) over gRPC",
    long_about = "Low-level benchmark for etcd v3 API servers (MetaStore or etcd) over gRPC.\n\n\
        --conns gRPC connections are opened (each its own HTTP/2 connection, spread \
        round-robin over --endpoints) and --clients concurrent request loops are \
        assigned to them round-robin. Requests are closed-loop: each client sends \
        its next request when the previous one has completed, subject to --rate.\n\n\
        A progress bar goes to stderr; the report goes to stdout."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// gRPC endpoints (comma-separated; scheme optional, http assumed)
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Total number of gRPC connections
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub conns: u64,
    /// Total number of gRPC clients (concurrent request loops)
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub clients: u64,
    /// Connect only to the leader node (found with Maintenance.Status)
    #[arg(long, global = true)]
    pub target_leader: bool,
    /// Dial timeout for client connections (Go duration: 500ms, 5s, 1m; 0 = none)
    #[arg(long, global = true, default_value = "0s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Output format of the final report
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable
    L,
    /// Serializable
    S,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Benchmark put
    Put(PutArgs),
    /// Benchmark range
    Range(RangeArgs),
    /// Benchmark txn-put (transactions made only of puts)
    TxnPut(TxnPutArgs),
    /// Benchmark a mixed load of read-only and write-only transactions
    TxnMixed(TxnMixedArgs),
    /// Benchmark watch: creates watchers, then puts to the watched keys and
    /// measures event delivery latency (put sent -> event received)
    Watch(WatchArgs),
    /// Benchmark lease keepalive
    LeaseKeepalive(LeaseArgs),
    /// Benchmark the revision oracle: AllocRevisions on the placement
    /// driver's leader (--endpoints are PD client URLs)
    Oracle(OracleArgs),
    /// Benchmark paged lists as Kubernetes' API server makes them: pages of
    /// --limit keys over PREFIX, each next page from the last key + "\0" at
    /// the first page's revision; one request is one whole list, and every
    /// page's `count` is checked against the keys still to come
    List(ListArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Key prefix to list (every key starting with it)
    pub prefix: String,
    /// Keys per page (0: one page with every key)
    #[arg(long, default_value_t = 500)]
    pub limit: i64,
    /// Total number of whole lists
    #[arg(long, default_value_t = 10)]
    pub total: u64,
    /// Maximum lists per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Linearizable (l) or Serializable (s) first page; continuation pages
    /// read at the first page's revision
    #[arg(long, value_enum, default_value_t = Consistency::L)]
    pub consistency: Consistency,
}

#[derive(Args, Debug, Clone)]
pub struct OracleArgs {
    /// Total number of AllocRevisions requests
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Revisions asked for per request
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
}

#[derive(Args, Debug, Clone)]
pub struct PutArgs {
    /// Key size of put request
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size of put request
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Maximum puts per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Total number of put requests
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Maximum possible keys
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub key_space_size: u64,
    /// Use sequential keys
    #[arg(long)]
    pub sequential_keys: bool,
    /// Prefix put before every key (so that a range or a list can select
    /// exactly the keys written)
    #[arg(long, default_value = "")]
    pub key_prefix: String,
    /// Put every key with one lease of this TTL in seconds, granted first
    /// (0: no lease)
    #[arg(long, default_value_t = 0)]
    pub lease_ttl: i64,
}

#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Key to read (or start of the range)
    pub key: String,
    /// End of the range (exclusive); none reads the single key
    pub end: Option<String>,
    /// Maximum range requests per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Total number of range requests
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Linearizable (l) or Serializable (s)
    #[arg(long, value_enum, default_value_t = Consistency::L)]
    pub consistency: Consistency,
    /// Maximum number of results per range (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Only get the count of keys
    #[arg(long)]
    pub count_only: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TxnPutArgs {
    /// Key size of txn put
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size of txn put
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of puts per txn
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub txn_ops: u64,
    /// Maximum txns per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Total number of txn requests
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Maximum possible keys
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub key_space_size: u64,
}

#[derive(Args, Debug, Clone)]
pub struct TxnMixedArgs {
    /// Key (or start of the range) that reads cover; default: every key
    pub key: Option<String>,
    /// End of the read range (exclusive); none with KEY reads the single key
    pub end: Option<String>,
    /// Key size of the writes
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size of the writes
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Maximum txns per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Total number of txn requests
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Maximum possible keys written
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub key_space_size: u64,
    /// Read operation range result limit
    #[arg(long, default_value_t = 1000)]
    pub limit: i64,
    /// Linearizable (l) or Serializable (s) reads
    #[arg(long, value_enum, default_value_t = Consistency::L)]
    pub consistency: Consistency,
    /// Read/write ops ratio (1 = as many reads as writes; 9 = 90% reads)
    #[arg(long, default_value_t = 1.0)]
    pub rw_ratio: f64,
}

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Total watch streams
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub streams: u64,
    /// Total watchers per stream
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub watch_per_stream: u64,
    /// Total number of keys to be watched
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub watched_key_total: u64,
    /// Number of keys to put per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub put_rate: u64,
    /// Number of put requests
    #[arg(long, default_value_t = 1000)]
    pub put_total: u64,
    /// Key size of watch request
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    /// Value size of the puts (at least 8: the send time travels in the value)
    #[arg(long, default_value_t = 32)]
    pub val_size: usize,
    /// How long to wait, after the last put, for events still due
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub event_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// Total number of lease keepalive requests
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Maximum keepalives per second (0 is no limit)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// TTL (seconds) of the lease each client grants and keeps alive
    #[arg(long, default_value_t = 100)]
    pub ttl: i64,
}

/// Parses Go's duration syntax (as etcd's `--dial-timeout` takes it):
/// a sequence of decimal numbers with units ns, us/µs, ms, s, m, h; bare
/// `0` is allowed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {s:?}"))?;
        if num_len == 0 {
            return Err(format!("invalid duration {s:?}"));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("invalid number in duration {s:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("unknown unit {u:?} in duration {s:?}")),
        };
        total += n * unit;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_follow_etcd_benchmark() {
        let cli = Cli::try_parse_from(["metastore-bench", "put"]).unwrap();
        assert_eq!(cli.global.endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(cli.global.conns, 1);
        assert_eq!(cli.global.clients, 1);
        assert!(!cli.global.target_leader);
        assert_eq!(cli.global.dial_timeout, Duration::ZERO);
        let Command::Put(p) = cli.command else {
            panic!("not put")
        };
        assert_eq!((p.key_size, p.val_size, p.total), (8, 8, 10000));
        assert_eq!((p.key_space_size, p.rate, p.sequential_keys), (1, 0, false));
    }

    #[test]
    fn global_flags_work_on_either_side_of_the_subcommand() {
        let cli = Cli::try_parse_from([
            "metastore-bench",
            "--endpoints=a:1,b:2",
            "--conns=100",
            "range",
            "foo",
            "--consistency",
            "s",
            "--clients",
            "1000",
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.global.endpoints, vec!["a:1", "b:2"]);
        assert_eq!((cli.global.conns, cli.global.clients), (100, 1000));
        assert_eq!(cli.global.output, OutputFormat::Json);
        let Command::Range(r) = cli.command else {
            panic!("not range")
        };
        assert_eq!(r.key, "foo");
        assert_eq!(r.end, None);
        assert_eq!(r.consistency, Consistency::S);
    }

    #[test]
    fn zero_conns_is_rejected() {
        assert!(Cli::try_parse_from(["metastore-bench", "--conns", "0", "put"]).is_err());
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("10us").unwrap(), Duration::from_micros(10));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }
}
