//! A reference in-memory etcd store and a simulator that produces
//! linearizable histories with it — for testing the checker and the
//! wiring of drivers, not a model of MetaStore.
//!
//! Contract: [`Store`] applies requests with etcd's semantics (one
//! store-wide revision counter starting at 1; every modifying request takes
//! the next revision — all the puts of a MultiPut the same one; versions,
//! create/mod revisions, prev_kv; a RangeAll returns every present key
//! under the prefix at one revision) and answers historical reads
//! ([`Store::read_at`], [`Store::rereads`]). A [`Broken`] mode makes it
//! deliberately break multi-key atomicity, for tests that the checker
//! notices.
//! [`simulate`] runs clients concurrently in virtual time: each request
//! takes effect atomically at one instant inside its interval (or, for an
//! Unknown outcome, maybe later or never; for Failed, never), so the
//! history is linearizable by construction. Serializable reads see the
//! state at a random recent revision. Deterministic given the config.
//! [`watch`] derives watch streams from a store's history
//! ([`Store::changes_at`]), correct or deliberately broken.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{Consistency, History, Key, KeyKv, Kv, Operation, Outcome, Request, Response};
use crate::revisions::{RereadResult, Rereads};
use crate::workload::{Generator, WorkloadConfig};

pub mod watch;

/// Deliberate multi-key defects of a [`Store`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Broken {
    /// Correct.
    #[default]
    No,
    /// Each put of a MultiPut takes its own revision; the response reports
    /// the first (a two-phase commit applying per region at different
    /// revisions).
    TornMultiPut,
    /// A RangeAll reads its i-th key at `revision - i` but reports
    /// `revision` (regions read at different revisions).
    TornRangeAll,
}

/// An etcd-like store with full history.
#[derive(Clone, Debug)]
pub struct Store {
    revision: i64,
    /// Per key: (revision, state from that revision on).
    history: BTreeMap<Key, Vec<(i64, Option<Kv>)>>,
    /// The defect, if any.
    pub broken: Broken,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            revision: 1,
            history: BTreeMap::new(),
            broken: Broken::No,
        }
    }
}

impl Store {
    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The key's KeyValue at `revision`.
    pub fn read_at(&self, key: &[u8], revision: i64) -> Option<Kv> {
        self.history
            .get(key)?
            .iter()
            .rev()
            .find(|(r, _)| *r <= revision)
            .and_then(|(_, kv)| kv.clone())
    }

    fn current(&self, key: &[u8]) -> Option<Kv> {
        self.read_at(key, self.revision)
    }

    fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> (i64, Option<Kv>) {
        self.revision += 1;
        let prev = self.write_at(key, value, self.revision);
        (self.revision, prev)
    }

    /// Writes `key` at `rev` (the current revision, already raised).
    fn write_at(&mut self, key: &[u8], value: Option<&[u8]>, rev: i64) -> Option<Kv> {
        let prev = self.read_at(key, rev - 1);
        let new = value.map(|v| Kv {
            value: v.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
        });
        self.history
            .entry(key.to_vec())
            .or_default()
            .push((rev, new));
        prev
    }

    /// Every change at `revision`, in key order: the key and its KeyValue
    /// from then on (None: deleted).
    pub fn changes_at(&self, revision: i64) -> Vec<(Key, Option<Kv>)> {
        self.history
            .iter()
            .filter_map(|(key, states)| {
                let (_, kv) = states.iter().find(|(r, _)| *r == revision)?;
                Some((key.clone(), kv.clone()))
            })
            .collect()
    }

    /// Every key under `prefix` present at `revision`.
    pub fn range_at(&self, prefix: &[u8], revision: i64) -> Vec<KeyKv> {
        let torn = self.broken == Broken::TornRangeAll;
        self.history
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .enumerate()
            .filter_map(|(i, (key, _))| {
                let at = if torn {
                    (revision - i as i64).max(1)
                } else {
                    revision
                };
                let kv = self.read_at(key, at)?;
                Some(KeyKv {
                    key: key.clone(),
                    kv,
                })
            })
            .collect()
    }

    /// Applies a request now; a serializable Get reads at `read_revision`
    /// (clamped to the current revision) instead of the current one.
    pub fn apply(&mut self, request: &Request, read_revision: Option<i64>) -> Response {
        match request {
            Request::Put { key, value } => {
                let (revision, prev) = self.write(key, Some(value));
                Response::Put { revision, prev }
            }
            Request::Get { key, .. } => {
                let revision = read_revision.map_or(self.revision, |r| r.min(self.revision));
                Response::Get {
                    revision,
                    kv: self.read_at(key, revision),
                }
            }
            Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => {
                let current = self.current(key);
                if current.as_ref().map_or(0, |kv| kv.mod_revision) == *expected_mod_revision {
                    let (revision, prev) = self.write(key, Some(value));
                    Response::Cas {
                        revision,
                        succeeded: true,
                        kv: prev,
                    }
                } else {
                    Response::Cas {
                        revision: self.revision,
                        succeeded: false,
                        kv: current,
                    }
                }
            }
            Request::MultiPut { keys, values } => {
                self.revision += 1;
                let first = self.revision;
                let mut prevs = Vec::with_capacity(keys.len());
                for (n, (key, value)) in keys.iter().zip(values).enumerate() {
                    if n > 0 && self.broken == Broken::TornMultiPut {
                        self.revision += 1;
                    }
                    prevs.push(self.write_at(key, Some(value), self.revision));
                }
                Response::MultiPut {
                    revision: first,
                    prevs,
                }
            }
            Request::RangeAll { prefix, .. } => {
                let revision = read_revision.map_or(self.revision, |r| r.min(self.revision));
                Response::RangeAll {
                    revision,
                    kvs: self.range_at(prefix, revision),
                }
            }
            Request::Delete { key } => {
                if self.current(key).is_some() {
                    let (revision, prev) = self.write(key, None);
                    Response::Delete {
                        revision,
                        deleted: prev,
                    }
                } else {
                    Response::Delete {
                        revision: self.revision,
                        deleted: None,
                    }
                }
            }
        }
    }

    /// Answers a re-read plan from the full history (nothing compacted).
    pub fn rereads(&self, plan: &[(Key, i64)]) -> Rereads {
        plan.iter()
            .map(|(k, r)| ((k.clone(), *r), RereadResult::Kv(self.read_at(k, *r))))
            .collect()
    }
}

/// Settings of [`simulate`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed for everything.
    pub seed: u64,
    /// Concurrent clients (each has one request in flight at a time).
    pub clients: usize,
    /// Total requests.
    pub ops: usize,
    /// The workload.
    pub workload: WorkloadConfig,
    /// Percentage of requests with an Unknown outcome (half of them apply,
    /// possibly after the client gave up).
    pub unknown_percent: u32,
    /// Percentage of requests that fail without applying.
    pub failed_percent: u32,
    /// Maximum request latency in virtual nanoseconds.
    pub max_latency_ns: u64,
    /// The store's defect (for tests that the checker finds it).
    pub broken: Broken,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            clients: 4,
            ops: 200,
            workload: WorkloadConfig::default(),
            unknown_percent: 5,
            failed_percent: 2,
            max_latency_ns: 2_000_000,
            broken: Broken::No,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Invoke(usize),
    Apply(usize),
    Complete(usize),
}

enum Fate {
    Ok,
    Failed,
    Unknown,
}

/// Simulates a run; returns the history and the store it ran against.
pub fn simulate(config: &SimConfig) -> (History, Store) {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut gen = Generator::new(config.seed ^ 0x9e37_79b9_7f4a_7c15, config.workload.clone());
    let mut store = Store {
        broken: config.broken,
        ..Store::default()
    };
    let mut ops: Vec<Operation> = Vec::new();
    let mut fates: Vec<Fate> = Vec::new();
    let mut responses: HashMap<usize, Response> = HashMap::new();
    let mut queue: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<_>, t: u64, e: Event| {
        seq += 1;
        queue.push(Reverse((t, seq, e)));
    };
    for c in 0..config.clients {
        let t = rng.gen_range(0..config.max_latency_ns.max(1));
        push(&mut queue, t, Event::Invoke(c));
    }
    while let Some(Reverse((now, _, event))) = queue.pop() {
        match event {
            Event::Invoke(client) => {
                if ops.len() >= config.ops {
                    continue;
                }
                let id = ops.len();
                let request = gen.next(client);
                let latency = rng.gen_range(4..config.max_latency_ns.max(5));
                let roll = rng.gen_range(0..100);
                let fate = if roll < config.failed_percent {
                    Fate::Failed
                } else if roll < config.failed_percent + config.unknown_percent {
                    Fate::Unknown
                } else {
                    Fate::Ok
                };
                match fate {
                    Fate::Ok => {
                        let at = now + rng.gen_range(1..latency - 1);
                        push(&mut queue, at, Event::Apply(id));
                    }
                    Fate::Unknown if rng.gen_bool(0.5) => {
                        let at = now + rng.gen_range(1..2 * latency);
                        push(&mut queue, at, Event::Apply(id));
                    }
                    Fate::Unknown | Fate::Failed => {}
                }
                push(&mut queue, now + latency, Event::Complete(id));
                ops.push(Operation {
                    id,
                    client,
                    invoke_ns: now,
                    complete_ns: now + latency,
                    request,
                    outcome: Outcome::Unknown("in flight".to_string()),
                    endpoint: format!("sim{}", client % 3),
                });
                fates.push(fate);
            }
            Event::Apply(id) => {
                let read_revision = match ops[id].request {
                    Request::Get {
                        consistency: Consistency::Serializable,
                        ..
                    }
                    | Request::RangeAll {
                        consistency: Consistency::Serializable,
                        ..
                    } => Some(store.revision() - rng.gen_range(0..4)),
                    _ => None,
                };
                let resp = store.apply(&ops[id].request, read_revision);
                responses.insert(id, resp);
            }
            Event::Complete(id) => {
                let outcome = match fates[id] {
                    Fate::Ok => match responses.remove(&id) {
                        Some(resp) => Outcome::Ok(resp),
                        None => Outcome::Unknown("not applied in time".to_string()),
                    },
                    Fate::Failed => Outcome::Failed("injected failure".to_string()),
                    Fate::Unknown => Outcome::Unknown("timed out".to_string()),
                };
                gen.observe(ops[id].client, &ops[id].request, &outcome);
                ops[id].outcome = outcome;
                let gap = rng.gen_range(0..config.max_latency_ns / 4 + 1);
                push(&mut queue, now + gap, Event::Invoke(ops[id].client));
            }
        }
    }
    (History { ops }, store)
}
