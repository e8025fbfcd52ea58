//! Node settings, from flags or a TOML file with the same names.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::units::{ByteSize, Interval, IntervalOrZero};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_urls: Vec<String>,
    pub advertise_peer_urls: Vec<String>,
    /// Placement driver endpoints; empty runs an embedded one (dev mode).
    pub pd_endpoints: Vec<String>,
    /// A region splits once its history holds more bytes than this...
    pub region_max_size: ByteSize,
    /// ... or more keys than this.
    pub region_max_keys: u64,
    /// How often region leaders measure their regions for splitting.
    pub split_check_interval: Interval,
    /// How often region leaders start a consistency check of their
    /// replicas (zero: never).
    pub consistency_check_interval: IntervalOrZero,
    /// Threads driving the node's region replicas (at least 1).
    pub raft_pollers: usize,
    /// How long a watch asking for progress notifications may stay silent
    /// before it gets one (etcd's
    /// `--experimental-watch-progress-notify-interval`).
    #[serde(rename = "experimental-watch-progress-notify-interval")]
    pub watch_progress_notify_interval: Interval,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "default".into(),
            data_dir: PathBuf::from("default.metastore"),
            listen_client_urls: vec!["http://127.0.0.1:2379".into()],
            advertise_client_urls: Vec::new(),
            listen_peer_urls: vec!["http://127.0.0.1:2380".into()],
            advertise_peer_urls: Vec::new(),
            pd_endpoints: Vec::new(),
            region_max_size: ByteSize(96 << 20),
            region_max_keys: 960_000,
            split_check_interval: Interval(std::time::Duration::from_secs(10)),
            consistency_check_interval: IntervalOrZero(
                raftstore::DEFAULT_CONSISTENCY_CHECK_INTERVAL,
            ),
            raft_pollers: raftstore::DEFAULT_POLLERS,
            watch_progress_notify_interval: Interval(std::time::Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("invalid config file {path}: {err}")]
    Parse { path: PathBuf, err: String },
    #[error("invalid URL {url:?}: {why}")]
    Url { url: String, why: &'static str },
    #[error("raft-pollers must be at least 1")]
    NoPollers,
}

impl Config {
    pub fn from_toml_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_owned(),
            err,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            err: e.message().to_string(),
        })
    }

    /// Fills advertise URLs left empty from the listen URLs, and checks
    /// every URL and the poller count.
    pub fn finish(mut self) -> Result<Config, ConfigError> {
        if self.raft_pollers == 0 {
            return Err(ConfigError::NoPollers);
        }
        if self.advertise_client_urls.is_empty() {
            self.advertise_client_urls = self.listen_client_urls.clone();
        }
        if self.advertise_peer_urls.is_empty() {
            self.advertise_peer_urls = self.listen_peer_urls.clone();
        }
        if self.listen_client_urls.is_empty() {
            return Err(ConfigError::Url {
                url: String::new(),
                why: "at least one client URL is needed",
            });
        }
        for url in self.listen_client_urls.iter().chain(&self.listen_peer_urls) {
            socket_addr(url)?;
        }
        for url in self
            .advertise_client_urls
            .iter()
            .chain(&self.advertise_peer_urls)
            .chain(&self.pd_endpoints)
        {
            host_port(url)?;
        }
        Ok(self)
    }
}

/// `http://host:port` → (host, port).
fn host_port(url: &str) -> Result<(&str, u16), ConfigError> {
    let bad = |why| ConfigError::Url {
        url: url.to_string(),
        why,
    };
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") || url.starts_with("unix://") {
        return Err(bad("only http:// URLs are supported"));
    } else {
        return Err(bad("expected http://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
    let port = port.parse::<u16>().map_err(|_| bad("invalid port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok((host, port))
}

/// The address to listen on for a listen URL (an IP, or `localhost`).
pub fn socket_addr(url: &str) -> Result<SocketAddr, ConfigError> {
    let (host, port) = host_port(url)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host == "localhost" {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse().map_err(|_| ConfigError::Url {
            url: url.to_string(),
            why: "listen URLs need an IP address or localhost",
        })?
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            socket_addr("http://127.0.0.1:2379").unwrap(),
            "127.0.0.1:2379".parse().unwrap()
        );
        assert_eq!(socket_addr("http://localhost:1/").unwrap().port(), 1);
        assert!(socket_addr("https://127.0.0.1:2379").is_err());
        assert!(socket_addr("127.0.0.1:2379").is_err());
        assert!(socket_addr("http://127.0.0.1").is_err());
        assert!(socket_addr("http://127.0.0.1:99999").is_err());
        assert!(socket_addr("http://example.com:80").is_err());
    }

    #[test]
    fn toml_uses_flag_names_and_rejects_unknown_keys() {
        let cfg: Config = toml::from_str(
            "name = \"n1\"\ndata-dir = \"/tmp/x\"\nlisten-client-urls = [\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        let cfg = cfg.finish().unwrap();
        assert_eq!(cfg.name, "n1");
        assert_eq!(cfg.advertise_client_urls, vec!["http://127.0.0.1:1"]);
        assert!(toml::from_str::<Config>("nmae = \"x\"").is_err());
        let cfg: Config = toml::from_str(
            "region-max-size = \"1MiB\"\nregion-max-keys = 100\nsplit-check-interval = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(cfg.region_max_size, ByteSize(1 << 20));
        assert_eq!(cfg.region_max_keys, 100);
        assert_eq!(
            cfg.split_check_interval.0,
            std::time::Duration::from_millis(500)
        );
        let cfg: Config = toml::from_str("consistency-check-interval = \"0\"").unwrap();
        assert!(cfg.consistency_check_interval.0.is_zero());
        let cfg: Config = toml::from_str("consistency-check-interval = \"2s\"").unwrap();
        assert_eq!(
            cfg.consistency_check_interval.0,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(
            Config::default().consistency_check_interval.0,
            std::time::Duration::from_secs(600)
        );
        let cfg: Config = toml::from_str("raft-pollers = 4").unwrap();
        assert_eq!(cfg.raft_pollers, 4);
        let cfg: Config = toml::from_str("raft-pollers = 0").unwrap();
        assert!(matches!(cfg.finish(), Err(ConfigError::NoPollers)));
        let cfg: Config = toml::from_str("region-max-size = 4096").unwrap();
        assert_eq!(cfg.region_max_size, ByteSize(4096));
        assert!(toml::from_str::<Config>("region-max-size = \"big\"").is_err());
    }
}
