//! A seeded workload generator for history-checking runs.
//!
//! Contract: [`Generator::next`] returns the next request of a client over
//! a few hot keys, drawn with the configured weights; every Put/Cas value,
//! and every value of a MultiPut, is unique (`c{client}-{seq}`, unique as
//! long as client ids are). A MultiPut puts 2..=`multi_put_max_keys`
//! distinct keys (fewer when the workload has fewer keys: one key when it
//! has one), in key order; a RangeAll reads every key under `key_prefix`.
//! The multi-key weights default to 0, so a default workload draws the
//! same requests as before they existed. A Cas
//! compares against the mod_revision the client last observed for the key
//! (0 when it saw it absent or never saw it); with
//! [`WorkloadConfig::stale_cas_percent`] it deliberately uses the one it
//! observed before that, to produce failing compares. Clients report
//! outcomes back with [`Generator::observe`]. Given the seed and the
//! sequence of `next`/`observe` calls the output is deterministic. No I/O.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{Consistency, Key, Outcome, Request, Response};

/// What to generate.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Number of (hot) keys; at least 1 is used.
    pub keys: usize,
    /// Keys are `{key_prefix}{i}`; use a fresh prefix per run.
    pub key_prefix: String,
    /// Weight of Put.
    pub put: u32,
    /// Weight of linearizable Range.
    pub get_linearizable: u32,
    /// Weight of serializable Range.
    pub get_serializable: u32,
    /// Weight of a read-only Txn (linearizable).
    pub read_only_txn: u32,
    /// Weight of Cas.
    pub cas: u32,
    /// Weight of Delete.
    pub delete: u32,
    /// Percentage of Cas requests that compare against an older observed
    /// mod_revision.
    pub stale_cas_percent: u32,
    /// Weight of MultiPut (one Txn putting several keys at one revision).
    pub multi_put: u32,
    /// Most keys of one MultiPut (at least 2 are used; capped at `keys`).
    pub multi_put_max_keys: usize,
    /// Weight of a linearizable RangeAll (Range over the key prefix).
    pub range_all: u32,
    /// Weight of a serializable RangeAll.
    pub range_all_serializable: u32,
    /// Weight of a RangeAll sent as a read-only Txn (linearizable).
    pub range_all_txn: u32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            keys: 4,
            key_prefix: "checker/".to_string(),
            put: 30,
            get_linearizable: 20,
            get_serializable: 10,
            read_only_txn: 10,
            cas: 25,
            delete: 5,
            stale_cas_percent: 10,
            multi_put: 0,
            multi_put_max_keys: 3,
            range_all: 0,
            range_all_serializable: 0,
            range_all_txn: 0,
        }
    }
}

impl WorkloadConfig {
    /// This workload with multi-key operations mixed in: MultiPuts of 2–3
    /// keys at weight `multi_put`, RangeAlls at weight `range_all` (half
    /// linearizable Ranges, a quarter serializable, a quarter read-only
    /// Txns).
    pub fn with_multi_key(mut self, multi_put: u32, range_all: u32) -> WorkloadConfig {
        self.multi_put = multi_put;
        self.range_all = range_all - range_all / 2;
        self.range_all_serializable = range_all / 4;
        self.range_all_txn = range_all / 2 - range_all / 4;
        self
    }
}

#[derive(Clone, Debug, Default)]
struct ClientView {
    seq: u64,
    /// Key → (last observed mod_revision, the distinct one before it).
    seen: HashMap<Key, (i64, Option<i64>)>,
}

/// Generates requests for many clients.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    config: WorkloadConfig,
    keys: Vec<Key>,
    clients: HashMap<usize, ClientView>,
}

impl Generator {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64, config: WorkloadConfig) -> Generator {
        let keys = (0..config.keys.max(1))
            .map(|i| format!("{}{i}", config.key_prefix).into_bytes())
            .collect();
        Generator {
            rng: StdRng::seed_from_u64(seed),
            config,
            keys,
            clients: HashMap::new(),
        }
    }

    /// The keys requests go to.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The next request of `client`.
    pub fn next(&mut self, client: usize) -> Request {
        let c = &self.config;
        let weights = [
            c.put,
            c.get_linearizable,
            c.get_serializable,
            c.read_only_txn,
            c.cas,
            c.delete,
            c.multi_put,
            c.range_all,
            c.range_all_serializable,
            c.range_all_txn,
        ];
        let total: u32 = weights.iter().sum();
        let mut pick = if total == 0 {
            0
        } else {
            self.rng.gen_range(0..total)
        };
        let mut kind = 0;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                kind = i;
                break;
            }
            pick -= w;
        }
        let key = self.keys[self.rng.gen_range(0..self.keys.len())].clone();
        let stale = self.rng.gen_range(0..100) < self.config.stale_cas_percent;
        let view = self.clients.entry(client).or_default();
        let mut value = || {
            view.seq += 1;
            format!("c{client}-{}", view.seq).into_bytes()
        };
        match kind {
            0 => Request::Put {
                value: value(),
                key,
            },
            1..=3 => Request::Get {
                key,
                consistency: if kind == 2 {
                    Consistency::Serializable
                } else {
                    Consistency::Linearizable
                },
                txn: kind == 3,
            },
            4 => {
                let value = value();
                let (last, before) = view.seen.get(&key).copied().unwrap_or((0, None));
                let expected = if stale { before.unwrap_or(0) } else { last };
                Request::Cas {
                    key,
                    expected_mod_revision: expected,
                    value,
                }
            }
            5 => Request::Delete { key },
            6 => {
                let n = self.keys.len();
                let most = self.config.multi_put_max_keys.max(2).min(n);
                let count = self.rng.gen_range(most.min(2)..=most);
                let mut picked = rand::seq::index::sample(&mut self.rng, n, count).into_vec();
                picked.sort_unstable();
                let keys: Vec<Key> = picked.iter().map(|&i| self.keys[i].clone()).collect();
                let values = keys
                    .iter()
                    .map(|_| {
                        view.seq += 1;
                        format!("c{client}-{}", view.seq).into_bytes()
                    })
                    .collect();
                Request::MultiPut { keys, values }
            }
            kind => Request::RangeAll {
                prefix: self.config.key_prefix.clone().into_bytes(),
                consistency: if kind == 8 {
                    Consistency::Serializable
                } else {
                    Consistency::Linearizable
                },
                txn: kind == 9,
            },
        }
    }

    /// Tells the generator what `client` learned from `request`'s outcome.
    pub fn observe(&mut self, client: usize, request: &Request, outcome: &Outcome) {
        let Outcome::Ok(resp) = outcome else { return };
        let observed: Vec<(&Key, i64)> = match (request, resp) {
            (Request::MultiPut { keys, .. }, Response::MultiPut { revision, .. }) => {
                keys.iter().map(|k| (k, *revision)).collect()
            }
            (Request::RangeAll { .. }, Response::RangeAll { kvs, .. }) => self
                .keys
                .iter()
                .map(|k| {
                    let m = kvs
                        .iter()
                        .find(|e| &e.key == k)
                        .map_or(0, |e| e.kv.mod_revision);
                    (k, m)
                })
                .collect(),
            (_, Response::Put { revision, .. }) => vec![(request.key(), *revision)],
            (_, Response::Get { kv, .. }) => {
                vec![(request.key(), kv.as_ref().map_or(0, |kv| kv.mod_revision))]
            }
            (
                _,
                Response::Cas {
                    revision,
                    succeeded: true,
                    ..
                },
            ) => vec![(request.key(), *revision)],
            (_, Response::Cas { kv, .. }) => {
                vec![(request.key(), kv.as_ref().map_or(0, |kv| kv.mod_revision))]
            }
            (_, Response::Delete { .. }) => vec![(request.key(), 0)],
            // A response of another kind than the request: nothing learned.
            (_, Response::MultiPut { .. } | Response::RangeAll { .. }) => Vec::new(),
        };
        let view = self.clients.entry(client).or_default();
        for (key, observed) in observed {
            let entry = view.seen.entry(key.clone()).or_insert((0, None));
            if entry.0 != observed {
                *entry = (observed, Some(entry.0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_unique_values() {
        let mut a = Generator::new(7, WorkloadConfig::default());
        let mut b = Generator::new(7, WorkloadConfig::default());
        let mut values = std::collections::HashSet::new();
        for i in 0..500 {
            let (ra, rb) = (a.next(i % 5), b.next(i % 5));
            assert_eq!(ra, rb);
            if let Some(v) = ra.written_value() {
                assert!(values.insert(v.to_vec()));
            }
        }
    }

    #[test]
    fn cas_uses_observed_revision() {
        let config = WorkloadConfig {
            put: 0,
            get_linearizable: 0,
            get_serializable: 0,
            read_only_txn: 0,
            delete: 0,
            stale_cas_percent: 0,
            keys: 1,
            ..WorkloadConfig::default()
        };
        let mut g = Generator::new(1, config);
        let req = g.next(0);
        assert!(matches!(
            req,
            Request::Cas {
                expected_mod_revision: 0,
                ..
            }
        ));
        g.observe(
            0,
            &req,
            &Outcome::Ok(Response::Cas {
                revision: 9,
                succeeded: true,
                kv: None,
            }),
        );
        assert!(matches!(
            g.next(0),
            Request::Cas {
                expected_mod_revision: 9,
                ..
            }
        ));
    }

    #[test]
    fn multi_key_requests() {
        let config = WorkloadConfig {
            keys: 5,
            multi_put_max_keys: 4,
            ..WorkloadConfig::default()
        }
        .with_multi_key(50, 50);
        let mut g = Generator::new(3, config);
        let (mut puts, mut ranges) = (0, 0);
        let mut values = std::collections::HashSet::new();
        for i in 0..400 {
            match g.next(i % 3) {
                Request::MultiPut { keys, values: vs } => {
                    puts += 1;
                    assert!((2..=4).contains(&keys.len()), "{keys:?}");
                    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
                    assert_eq!(keys.len(), vs.len());
                    for v in vs {
                        assert!(values.insert(v));
                    }
                }
                Request::RangeAll { prefix, .. } => {
                    ranges += 1;
                    assert_eq!(prefix, b"checker/".to_vec());
                }
                other => {
                    for v in other.written_values() {
                        assert!(values.insert(v.to_vec()));
                    }
                }
            }
        }
        assert!(puts > 50 && ranges > 50, "{puts} {ranges}");
    }
}
