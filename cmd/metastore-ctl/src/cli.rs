//! The command line: global flags and commands (clap derive).

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Where a dev node (`scripts/run.sh`) serves its embedded PD: on its client
/// URL, next to the etcd API. A `metastore-pd` member listens on
/// `http://127.0.0.1:2479` by default.
pub const DEFAULT_PD_ENDPOINTS: &str = "http://127.0.0.1:2379";

#[derive(Parser, Debug)]
#[command(
    name = "metastore-ctl",
    version,
    about = "Operator's tool for MetaStore: nodes, regions and the placement driver's scheduling",
    after_help = "Keys: printed as text when valid UTF-8 without control characters, otherwise \
                  (and under --hex) as 0x followed by hex; given as 0x<hex> or as typed.\n\
                  Exit codes: 0 success, 1 failure (PD unreachable or failing, not found, \
                  timeout), 2 bad usage (flags, invalid arguments, unsupported commands)."
)]
pub struct Cli {
    /// Comma-separated PD client URLs: a dev node's client URL (embedded
    /// PD), or the metastore-pd members' client URLs.
    #[arg(long, global = true, value_name = "URLS", default_value = DEFAULT_PD_ENDPOINTS)]
    pub pd_endpoints: String,
    /// Output format.
    #[arg(short = 'w', long, global = true, value_enum, default_value_t = Format::Table)]
    pub write_out: Format,
    /// Print every key in hex (0x...), also the printable ones.
    #[arg(long, global = true)]
    pub hex: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Nodes (stores) of the cluster.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Regions: list, show, split, merge.
    #[command(subcommand)]
    Region(RegionCommand),
    /// PD's schedulers, their settings and the operators they hand out.
    Scheduler,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Every node with its URLs and how many regions and leaders it holds.
    List,
}

#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// All regions in key order.
    List,
    /// The region containing KEY.
    Show { key: String },
    /// Splits the region containing KEY at KEY and waits for the split.
    Split {
        key: String,
        /// How long to wait for the split, e.g. 20s, 1500ms, 2m.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Asks PD to merge two adjacent regions whose replicas are on the same
    /// nodes: the left one (the source) into the right one (the target),
    /// whichever order the ids come in. The source region's leader carries
    /// it out when PD hands it over; this does not wait for it.
    Merge { first: u64, second: u64 },
}

/// `20`, `20s`, `1500ms` or `2m`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (digits, unit) = match raw.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => raw.split_at(i),
        None => (raw, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 20s, 1500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{raw:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
}

/// The PD endpoints of `--pd-endpoints`.
pub fn endpoints(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    #[test]
    fn flags_anywhere_and_defaults() {
        let cli = Cli::try_parse_from(["metastore-ctl", "region", "list", "-w", "json"]).unwrap();
        assert_eq!(cli.write_out, Format::Json);
        assert_eq!(cli.pd_endpoints, DEFAULT_PD_ENDPOINTS);
        assert!(matches!(cli.command, Command::Region(RegionCommand::List)));
        let cli = Cli::try_parse_from(["metastore-ctl", "--hex", "region", "split", "k"]).unwrap();
        assert!(cli.hex);
        match cli.command {
            Command::Region(RegionCommand::Split { key, timeout }) => {
                assert_eq!((key.as_str(), timeout), ("k", Duration::from_secs(20)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from(["metastore-ctl", "region", "merge", "1"]).is_err());
        assert!(Cli::try_parse_from(["metastore-ctl", "region", "merge", "1", "x"]).is_err());
        let cli = Cli::try_parse_from(["metastore-ctl", "region", "merge", "7", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Region(RegionCommand::Merge {
                first: 7,
                second: 2
            })
        ));
        assert!(Cli::try_parse_from(["metastore-ctl", "-w", "yaml", "scheduler"]).is_err());
    }

    #[test]
    fn endpoint_lists() {
        assert_eq!(
            endpoints(" http://a:1, ,b:2,"),
            vec!["http://a:1".to_owned(), "b:2".to_owned()]
        );
        assert!(endpoints(" , ").is_empty());
    }
}
