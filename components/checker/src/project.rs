//! Projection of multi-key operations onto per-key ones, so that every
//! per-key check (linearizability, learning, revision rules 1–5) stays
//! P-compositional.
//!
//! Contract: [`project`] returns a history of single-key operations only,
//! in the original order. A single-key op is copied. A multi-key op becomes
//! one op per key it touched, each with the original's id, client, times,
//! endpoint and kind of outcome:
//! - `MultiPut{keys, values}` → one `Put(keys[i], values[i])` per key; when
//!   Ok at revision R, each part is Ok at R with prev_kv `prevs[i]` (all
//!   parts share R: rule 1 tells the parts of one op from two ops by the
//!   id). Failed/Unknown parts are Failed/Unknown.
//! - `RangeAll{prefix}` → one `Get` per key of the history's *universe*
//!   starting with `prefix`, with the RangeAll's consistency and txn flag;
//!   when Ok at header R, each part is Ok at R showing the key's returned
//!   KeyValue, or "absent" when the key was not returned. The universe is
//!   every key some op of the history names (single-key ops, MultiPut
//!   keys) or some RangeAll returned; so a key returned by one RangeAll is
//!   a part of every RangeAll over its prefix. A key returned outside the
//!   prefix is still projected (and judged like any other); when a key is
//!   returned twice, the first entry counts.
//!
//! The projected history has duplicate ids (parts of one op): it is never
//! validated itself — [`crate::History::validate`] runs on the original —
//! and reports cite the original ids; [`annotate`] adds the original
//! multi-key op to every violation that names one.

use std::collections::{BTreeSet, HashMap};

use crate::history::{History, Key, Operation, Outcome, Request, Response};
use crate::report::{Report, Rule, Verdict, Violation};

/// A projected history and, for each of its ops, the index of the
/// original op.
#[derive(Clone, Debug)]
pub(crate) struct Projection {
    pub history: History,
    pub origin: Vec<usize>,
}

/// Projects `history` (see the module doc).
pub(crate) fn project(history: &History) -> Projection {
    let universe = universe(history);
    let mut ops = Vec::with_capacity(history.ops.len());
    let mut origin = Vec::with_capacity(history.ops.len());
    for (i, op) in history.ops.iter().enumerate() {
        let part = |request: Request, outcome: Outcome| Operation {
            id: op.id,
            client: op.client,
            invoke_ns: op.invoke_ns,
            complete_ns: op.complete_ns,
            request,
            outcome,
            endpoint: op.endpoint.clone(),
        };
        match &op.request {
            Request::MultiPut { keys, values } => {
                for (n, (key, value)) in keys.iter().zip(values).enumerate() {
                    let outcome = match &op.outcome {
                        Outcome::Ok(Response::MultiPut { revision, prevs }) => {
                            Outcome::Ok(Response::Put {
                                revision: *revision,
                                prev: prevs.get(n).cloned().flatten(),
                            })
                        }
                        other => other.clone(),
                    };
                    let request = Request::Put {
                        key: key.clone(),
                        value: value.clone(),
                    };
                    ops.push(part(request, outcome));
                    origin.push(i);
                }
            }
            Request::RangeAll {
                prefix,
                consistency,
                txn,
            } => {
                let mut keys: BTreeSet<&Key> =
                    universe.iter().filter(|k| k.starts_with(prefix)).collect();
                let mut shown = HashMap::new();
                if let Outcome::Ok(Response::RangeAll { kvs, .. }) = &op.outcome {
                    for e in kvs {
                        keys.insert(&e.key);
                        shown.entry(&e.key).or_insert(&e.kv);
                    }
                }
                for key in keys {
                    let outcome = match &op.outcome {
                        Outcome::Ok(Response::RangeAll { revision, .. }) => {
                            Outcome::Ok(Response::Get {
                                revision: *revision,
                                kv: shown.get(key).map(|kv| (*kv).clone()),
                            })
                        }
                        other => other.clone(),
                    };
                    let request = Request::Get {
                        key: key.clone(),
                        consistency: *consistency,
                        txn: *txn,
                    };
                    ops.push(part(request, outcome));
                    origin.push(i);
                }
            }
            _ => {
                ops.push(op.clone());
                origin.push(i);
            }
        }
    }
    Projection {
        history: History { ops },
        origin,
    }
}

/// Every key an op names or a RangeAll returned.
fn universe(history: &History) -> BTreeSet<Key> {
    let mut keys = BTreeSet::new();
    for op in &history.ops {
        match (&op.request, &op.outcome) {
            (Request::MultiPut { keys: ks, .. }, _) => keys.extend(ks.iter().cloned()),
            (Request::RangeAll { .. }, Outcome::Ok(Response::RangeAll { kvs, .. })) => {
                keys.extend(kvs.iter().map(|e| e.key.clone()))
            }
            (Request::RangeAll { .. }, _) => {}
            (request, _) => {
                keys.insert(request.key().clone());
            }
        }
    }
    keys
}

/// Appends to every violation of `report` that names a multi-key op of
/// `history` the description of that op (the violation itself describes
/// only its per-key part).
pub(crate) fn annotate(history: &History, report: &mut Report) {
    let multi: HashMap<usize, &Operation> = history
        .ops
        .iter()
        .filter(|op| op.request.is_multi_key())
        .map(|op| (op.id, op))
        .collect();
    if multi.is_empty() {
        return;
    }
    let note = |v: &mut Violation| {
        if v.rule == Rule::MultiKeyAtomicity {
            return; // describes the whole op already
        }
        let mut seen = BTreeSet::new();
        for id in &v.ops {
            if let Some(op) = multi.get(id) {
                if seen.insert(*id) {
                    v.explanation.push_str(&format!(
                        "\n(#{id} is one key of the multi-key operation {})",
                        op.describe()
                    ));
                }
            }
        }
    };
    for check in report.linearizability.iter_mut().flatten() {
        if let Verdict::Violation(v) = &mut check.verdict {
            note(v);
        }
    }
    for v in &mut report.violations {
        note(v);
    }
}
