//! Per-key linearizability: partitions a projected history (single-key ops
//! only, see `crate::project`) by key (P-compositionality,
//! as porcupine does) and runs the WGL search with the etcd model on each.
//!
//! Contract: for each key, the searched ops are the Ok ops (Put, Get with
//! linearizable consistency, Cas, Delete) with their real-time intervals,
//! plus, without a return (they may take effect any time after their
//! invocation): Unknown Put/Cas learned to have applied (must take effect,
//! producing what was observed) and Unknown Deletes (optional). Dropped:
//! Failed ops, serializable reads (checked by the revision rules), Unknown
//! reads, and — unless [`Config::exact_unknown_writes`] — Unknown Put/Cas
//! whose value nobody observed: their only possible trace is a version
//! raised before a learned write, which the model allows for up to their
//! number and for the free revisions ([`EtcdModel::padding`]). Each key gets its own [`Budget`]; a key
//! whose search runs out is `Inconclusive`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::history::{show, show_ns, Consistency, History, Key, Outcome, Request, Response};
use crate::learn::Knowledge;
use crate::model::{EtcdModel, EtcdOp, Model};
use crate::report::{KeyCheck, Rule, Verdict, Violation};
use crate::wgl::{self, Budget, Event};

/// Settings of the linearizability check.
#[derive(Clone, Debug)]
pub struct Config {
    /// Wall-time budget per key (default 10 s).
    pub max_time_per_key: Option<Duration>,
    /// Search-step budget per key (default none).
    pub max_steps_per_key: Option<u64>,
    /// Keep unobserved Unknown Put/Cas in the search as optional ops
    /// instead of the version-padding shortcut. Exact but exponential in
    /// the number of such ops; for cross-checking on small histories.
    pub exact_unknown_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_time_per_key: Some(Duration::from_secs(10)),
            max_steps_per_key: None,
            exact_unknown_writes: false,
        }
    }
}

/// The events of one key and which history op each came from.
struct KeyEvents {
    events: Vec<Event<EtcdOp>>,
    origin: Vec<usize>,
    padding: usize,
}

fn partition(
    history: &History,
    knowledge: &Knowledge,
    config: &Config,
) -> BTreeMap<Key, KeyEvents> {
    let mut keys: BTreeMap<Key, KeyEvents> = BTreeMap::new();
    for (i, op) in history.ops.iter().enumerate() {
        let entry = keys
            .entry(op.request.key().clone())
            .or_insert_with(|| KeyEvents {
                events: Vec::new(),
                origin: Vec::new(),
                padding: 0,
            });
        let (model_op, ret) = match (&op.request, &op.outcome) {
            (_, Outcome::Failed(_)) => continue,
            (Request::Get { consistency, .. }, Outcome::Ok(Response::Get { revision, kv })) => {
                if *consistency == Consistency::Serializable {
                    continue;
                }
                let get = EtcdOp::Get {
                    revision: *revision,
                    kv: kv.clone(),
                };
                (get, Some(op.complete_ns))
            }
            (Request::Put { value, .. }, Outcome::Ok(Response::Put { revision, prev })) => {
                let put = EtcdOp::Put {
                    value: value.clone(),
                    revision: *revision,
                    prev: prev.clone(),
                };
                (put, Some(op.complete_ns))
            }
            (
                Request::Cas {
                    expected_mod_revision,
                    value,
                    ..
                },
                Outcome::Ok(Response::Cas {
                    revision,
                    succeeded,
                    kv,
                }),
            ) => {
                let cas = EtcdOp::Cas {
                    expected: *expected_mod_revision,
                    value: value.clone(),
                    revision: *revision,
                    succeeded: *succeeded,
                    kv: kv.clone(),
                };
                (cas, Some(op.complete_ns))
            }
            (Request::Delete { .. }, Outcome::Ok(Response::Delete { revision, deleted })) => {
                let del = EtcdOp::Delete {
                    revision: *revision,
                    deleted: deleted.clone(),
                };
                (del, Some(op.complete_ns))
            }
            // Multi-key ops are projected first (see `crate::project`).
            (Request::Get { .. } | Request::MultiPut { .. } | Request::RangeAll { .. }, _) => {
                continue
            }
            (Request::Delete { .. }, _) => (EtcdOp::UnknownDelete, None),
            (Request::Put { value, .. }, _) | (Request::Cas { value, .. }, _) => {
                let expected = match &op.request {
                    Request::Cas {
                        expected_mod_revision,
                        ..
                    } => Some(*expected_mod_revision),
                    _ => None,
                };
                if let Some(kv) = knowledge.learned.get(&i) {
                    (
                        EtcdOp::Learned {
                            expected,
                            kv: kv.clone(),
                        },
                        None,
                    )
                } else if config.exact_unknown_writes {
                    let value = value.clone();
                    let unknown = match expected {
                        Some(expected) => EtcdOp::UnknownCas { expected, value },
                        None => EtcdOp::UnknownPut { value },
                    };
                    (unknown, None)
                } else {
                    entry.padding += 1;
                    continue;
                }
            }
        };
        entry.events.push(Event {
            call: op.invoke_ns,
            ret,
            op: model_op,
        });
        entry.origin.push(i);
    }
    keys
}

/// Checks every key of the history.
pub(crate) fn check_keys(
    history: &History,
    knowledge: &Knowledge,
    config: &Config,
) -> Vec<KeyCheck> {
    let budget = Budget {
        max_steps: config.max_steps_per_key,
        max_time: config.max_time_per_key,
    };
    let mut revs: Vec<i64> = history
        .ops
        .iter()
        .filter_map(|op| op.acked_write_revision())
        .chain(knowledge.learned.values().map(|kv| kv.mod_revision))
        .collect();
    revs.sort_unstable();
    revs.dedup();
    let known_revisions = Arc::new(revs);
    partition(history, knowledge, config)
        .into_iter()
        .map(|(key, ke)| {
            let model = EtcdModel {
                padding: ke.padding,
                known_revisions: Arc::clone(&known_revisions),
            };
            let search = wgl::search(&model, &ke.events, &budget);
            let verdict = match search.verdict {
                wgl::Verdict::Linearizable(_) => Verdict::Ok,
                wgl::Verdict::NotLinearizable { longest } => {
                    Verdict::Violation(explain(history, &key, &model, &ke, &longest, search.steps))
                }
                wgl::Verdict::Inconclusive { reason, .. } => Verdict::Inconclusive(reason),
            };
            KeyCheck {
                key,
                ops: ke.events.len(),
                verdict,
                steps: search.steps,
                elapsed: search.elapsed,
            }
        })
        .collect()
}

fn explain(
    history: &History,
    key: &Key,
    model: &EtcdModel,
    ke: &KeyEvents,
    longest: &[usize],
    steps: u64,
) -> Violation {
    let describe = |e: usize| history.ops[ke.origin[e]].describe();
    let states = wgl::replay(model, &ke.events, longest);
    let state = states.last().cloned().unwrap_or_default();
    let (blocking, candidates) = wgl::frontier(&ke.events, longest);
    let mut text = format!(
        "the {} operations on key {} have no linearization (searched {steps} steps). \
         The longest linearizable prefix found has {} of them",
        ke.events.len(),
        show(key),
        longest.len()
    );
    const SHOWN: usize = 8;
    if longest.len() > SHOWN {
        text.push_str(&format!("; its last {SHOWN}:"));
    } else {
        text.push(':');
    }
    let start = longest.len().saturating_sub(SHOWN);
    for (pos, &e) in longest.iter().enumerate().skip(start) {
        let after = states
            .get(pos + 1)
            .map(|s| model.describe_state(s))
            .unwrap_or_default();
        text.push_str(&format!("\n  {}  => {after}", describe(e)));
    }
    text.push_str(&format!(
        "\nAfter it the key is {}, and no operation that could come next is legal there:",
        model.describe_state(&state)
    ));
    let mut ops: Vec<usize> = longest
        .last()
        .map(|&e| vec![history.ops[ke.origin[e]].id])
        .unwrap_or_default();
    // Writes with known revisions take effect in revision order.
    let done: std::collections::HashSet<usize> = longest.iter().copied().collect();
    let first_write = (0..ke.events.len())
        .filter(|e| !done.contains(e))
        .filter_map(|e| model.order(&ke.events[e].op).map(|o| (o, e)))
        .min();
    for &e in candidates.iter().take(12) {
        let why = match (model.order(&ke.events[e].op), first_write) {
            (Some(o), Some((first, f))) if o > first => format!(
                "writes take effect in revision order, and #{} at revision {first} has not yet",
                history.ops[ke.origin[f]].id
            ),
            _ => model.why_not(&state, &ke.events[e].op),
        };
        text.push_str(&format!("\n  {}: {why}", describe(e)));
        ops.push(history.ops[ke.origin[e]].id);
    }
    if candidates.len() > 12 {
        text.push_str(&format!("\n  ... and {} more", candidates.len() - 12));
    }
    if let Some(b) = blocking {
        let ret = ke.events[b].ret.unwrap_or(u64::MAX);
        text.push_str(&format!(
            "\n#{} completed at {} so it must precede everything invoked later. \
             (Earlier alternatives were searched too; the prefix is the deepest the search got.) \
             Look for a stale or lost write, a read served from an old state, or a write applied twice.",
            history.ops[ke.origin[b]].id,
            show_ns(ret)
        ));
    }
    let revisions = candidates
        .iter()
        .filter_map(|&e| history.ops[ke.origin[e]].response().map(|r| r.revision()))
        .collect();
    Violation {
        rule: Rule::Linearizability,
        keys: vec![key.clone()],
        revisions,
        ops,
        explanation: text,
    }
}
