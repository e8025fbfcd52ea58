//! etcd's revision rules over a whole history, across keys, with the
//! historical re-reads a driver makes after the run.
//!
//! Contract: [`reread_plan`] lists the `(key, revision)` pairs to re-read
//! (historical Range of `key` at `revision`) once nothing is in flight: the
//! header revision of every Ok read (Get, Cas whose compare failed, Delete
//! that deleted nothing) and the revision of every acknowledged write (Put
//! ok, Cas succeeded, Delete that deleted) — of the history projected onto
//! single-key ops (`crate::project`), so every key of a MultiPut at its
//! revision and every key of a RangeAll at its header revision — plus, for
//! rule 6, every key of a MultiPut of unknown outcome at each revision one
//! of its values was observed at in the history's responses. The driver
//! answers with [`Rereads`]. [`revision_rules`] then checks, on the
//! projected history:
//! 1. unique revisions: acknowledged writes, and learned writes of unknown
//!    outcome, never share a revision — except the puts of one MultiPut
//!    (one op id), which all take its revision;
//! 2. real-time order (linearizable ops only; the parts of a multi-key op
//!    count once): if A completed before B was invoked, header(A) <=
//!    header(B), strictly < when B is a write that took a revision
//!    (learned writes count as B from their invocation);
//! 3. a read at header revision R shows exactly the state at R: its re-read
//!    at R returns the same, and it agrees with the known writes of the key
//!    (the last one at or below R). Applied to the projected Gets of a
//!    RangeAll, this catches a multi-key read that misses (part of) a known
//!    write at or below its header revision;
//! 4. version chains per key (see [`crate::chains`]);
//! 5. no acknowledged write is missing: the re-read at its revision shows
//!    its value with that mod_revision (absent for a delete), unless
//!    compacted — for a MultiPut, on each of its keys.
//!
//! Rule 6 (multi-key atomicity) is `crate::atomicity`'s.
//!
//! A planned re-read that is not supplied is a [`Rule::MissingReread`]
//! violation (the driver must answer every pair, `Compacted` if need be);
//! rule 6's extra pairs are only used when supplied.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::history::{show, show_kv, Consistency, History, Key, Kv, Outcome, Request, Response};
use crate::learn::Knowledge;
use crate::project;
use crate::report::{Rule, Violation};
use crate::{atomicity, chains};

/// The answer to one historical re-read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RereadResult {
    /// The key's KeyValue at that revision (None: absent).
    Kv(Option<Kv>),
    /// The revision has been compacted.
    Compacted,
}

/// Re-read answers by (key, revision).
pub type Rereads = HashMap<(Key, i64), RereadResult>;

/// What a known write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    Put(Vec<u8>),
    Delete,
}

/// A write known to have applied: acknowledged, or of unknown outcome but
/// learned.
#[derive(Clone, Debug)]
pub(crate) struct KnownWrite {
    pub rev: i64,
    /// Index of the op in the history.
    pub op: usize,
    pub effect: Effect,
    pub learned: bool,
}

/// Writes of unknown outcome on a key that were not learned.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Unlearned {
    pub writes: usize,
    pub deletes: usize,
}

/// The (key, revision) pairs to re-read after the run, sorted, no
/// duplicates: those of the per-key rules for the projected history (every
/// key of a MultiPut at its revision, every key of a RangeAll at its header
/// revision, see `crate::project`), plus rule 6's for MultiPuts of unknown
/// outcome observed in the history.
pub fn reread_plan(history: &History) -> Vec<(Key, i64)> {
    let projection = project::project(history);
    let mut plan = atomicity::extra_rereads(history, &projection);
    for op in &projection.history.ops {
        if let Some((rev, _)) = read_of(op.response()) {
            plan.insert((op.request.key().clone(), rev));
        }
        if let Some(rev) = op.acked_write_revision() {
            plan.insert((op.request.key().clone(), rev));
        }
    }
    plan.into_iter().collect()
}

/// If the response is a read (Get, Cas whose compare failed, Delete of
/// nothing): its header revision and what it returned.
fn read_of(resp: Option<&Response>) -> Option<(i64, Option<&Kv>)> {
    match resp? {
        Response::Get { revision, kv } => Some((*revision, kv.as_ref())),
        Response::Cas {
            revision,
            succeeded: false,
            kv,
        } => Some((*revision, kv.as_ref())),
        Response::Delete {
            revision,
            deleted: None,
        } => Some((*revision, None)),
        _ => None,
    }
}

/// Known writes per key, sorted by revision.
pub(crate) fn known_writes(
    history: &History,
    knowledge: &Knowledge,
) -> BTreeMap<Key, Vec<KnownWrite>> {
    let mut out: BTreeMap<Key, Vec<KnownWrite>> = BTreeMap::new();
    for (i, op) in history.ops.iter().enumerate() {
        let effect = match &op.request {
            Request::Put { value, .. } | Request::Cas { value, .. } => Effect::Put(value.clone()),
            Request::Delete { .. } => Effect::Delete,
            // Never in a projected history.
            Request::Get { .. } | Request::MultiPut { .. } | Request::RangeAll { .. } => continue,
        };
        let (rev, learned) = if let Some(rev) = op.acked_write_revision() {
            (rev, false)
        } else if let Some(kv) = knowledge.learned.get(&i) {
            (kv.mod_revision, true)
        } else {
            continue;
        };
        out.entry(op.request.key().clone())
            .or_default()
            .push(KnownWrite {
                rev,
                op: i,
                effect,
                learned,
            });
    }
    for writes in out.values_mut() {
        writes.sort_by_key(|w| (w.rev, w.op));
    }
    out
}

/// Unknown-outcome writes per key that were not learned.
pub(crate) fn unlearned(history: &History, knowledge: &Knowledge) -> HashMap<Key, Unlearned> {
    let mut out: HashMap<Key, Unlearned> = HashMap::new();
    for (i, op) in history.ops.iter().enumerate() {
        if !matches!(op.outcome, Outcome::Unknown(_)) || knowledge.learned.contains_key(&i) {
            continue;
        }
        let entry = out.entry(op.request.key().clone()).or_default();
        match op.request {
            Request::Put { .. } | Request::Cas { .. } => entry.writes += 1,
            Request::Delete { .. } => entry.deletes += 1,
            Request::Get { .. } | Request::MultiPut { .. } | Request::RangeAll { .. } => {}
        }
    }
    out
}

/// Checks rules 1–5 (learning violations are not included).
pub(crate) fn revision_rules(
    history: &History,
    knowledge: &Knowledge,
    rereads: &Rereads,
) -> Vec<Violation> {
    let writes = known_writes(history, knowledge);
    let unlearned = unlearned(history, knowledge);
    let mut out = Vec::new();
    unique_revisions(history, &writes, &mut out);
    real_time(history, knowledge, &mut out);
    let mut missing = BTreeSet::new();
    read_states(
        history,
        &writes,
        &unlearned,
        rereads,
        &mut missing,
        &mut out,
    );
    chains::check(history, knowledge, &writes, &unlearned, &mut out);
    lost_writes(history, rereads, &mut missing, &mut out);
    if !missing.is_empty() {
        let shown: Vec<String> = missing
            .iter()
            .take(10)
            .map(|(k, r): &(Key, i64)| format!("({}, {r})", show(k)))
            .collect();
        out.push(Violation {
            rule: Rule::MissingReread,
            keys: missing.iter().map(|(k, _)| k.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
            revisions: missing.iter().map(|(_, r)| *r).collect(),
            ops: Vec::new(),
            explanation: format!(
                "{} planned re-reads were not supplied, e.g. {}. The driver must re-read every pair of \
                 reread_plan() (answering Compacted when the revision is compacted); rules 3 and 5 were \
                 not checked for these.",
                missing.len(),
                shown.join(", ")
            ),
        });
    }
    out
}

fn unique_revisions(
    history: &History,
    writes: &BTreeMap<Key, Vec<KnownWrite>>,
    out: &mut Vec<Violation>,
) {
    let mut by_rev: BTreeMap<i64, Vec<(&Key, &KnownWrite)>> = BTreeMap::new();
    for (key, ws) in writes {
        for w in ws {
            by_rev.entry(w.rev).or_default().push((key, w));
        }
    }
    // The parts of one MultiPut (one id) share its revision.
    let distinct = |ws: &Vec<(&Key, &KnownWrite)>| {
        ws.iter()
            .map(|(_, w)| history.ops[w.op].id)
            .collect::<BTreeSet<_>>()
            .len()
    };
    for (rev, ws) in by_rev.into_iter().filter(|(_, ws)| distinct(ws) > 1) {
        let lines: Vec<String> = ws
            .iter()
            .map(|(_, w)| {
                let how = if w.learned {
                    " (unknown outcome, learned)"
                } else {
                    ""
                };
                format!("  {}{how}", history.ops[w.op].describe())
            })
            .collect();
        out.push(Violation {
            rule: Rule::UniqueRevision,
            keys: ws.iter().map(|(k, _)| (*k).clone()).collect::<BTreeSet<_>>().into_iter().collect(),
            revisions: vec![rev],
            ops: ws.iter().map(|(_, w)| history.ops[w.op].id).collect(),
            explanation: format!(
                "{} writes took revision {rev}:\n{}\nEvery modifying request takes its own revision from the \
                 single store-wide counter (the puts of one MultiPut share one); look at revision allocation \
                 (the oracle window, a leader change reusing a window, or a retried write taking a second \
                 revision).",
                distinct(&ws),
                lines.join("\n")
            ),
        });
    }
}

#[derive(Clone, Copy)]
struct Timed {
    op: usize,
    invoke: u64,
    complete: u64,
    header: i64,
    write: bool,
}

fn real_time(history: &History, knowledge: &Knowledge, out: &mut Vec<Violation>) {
    let mut done: Vec<Timed> = Vec::new();
    for (i, op) in history.ops.iter().enumerate() {
        let Some(resp) = op.response() else { continue };
        if op.is_serializable_read() {
            continue;
        }
        // The parts of a multi-key op (consecutive, one id) count once.
        if done.last().is_some_and(|t| history.ops[t.op].id == op.id) {
            continue;
        }
        done.push(Timed {
            op: i,
            invoke: op.invoke_ns,
            complete: op.complete_ns,
            header: resp.revision(),
            write: op.acked_write_revision().is_some(),
        });
    }
    let mut learned_ids = BTreeSet::new();
    let mut started: Vec<Timed> = done
        .iter()
        .copied()
        .chain(
            knowledge
                .learned
                .iter()
                .filter(|(&i, _)| learned_ids.insert(history.ops[i].id))
                .map(|(&i, kv)| Timed {
                    op: i,
                    invoke: history.ops[i].invoke_ns,
                    complete: u64::MAX,
                    header: kv.mod_revision,
                    write: true,
                }),
        )
        .collect();
    done.sort_by_key(|t| (t.complete, t.op));
    started.sort_by_key(|t| (t.invoke, t.op));
    let mut next = 0;
    let mut best: Option<&Timed> = None;
    for b in &started {
        while next < done.len() && done[next].complete < b.invoke {
            if best.is_none_or(|x| done[next].header > x.header) {
                best = Some(&done[next]);
            }
            next += 1;
        }
        let Some(a) = best else { continue };
        if b.header < a.header || (b.write && b.header == a.header) {
            let (opa, opb) = (&history.ops[a.op], &history.ops[b.op]);
            let what = if b.write {
                "a write that starts after another op completed must take a higher revision"
            } else {
                "a linearizable read that starts after another op completed must observe at least its revision"
            };
            let learned = if knowledge.learned.contains_key(&b.op) {
                " (its outcome was unknown; its revision was learned from an observation)"
            } else {
                ""
            };
            out.push(Violation {
                rule: Rule::RealTimeOrder,
                keys: vec![opa.request.key().clone(), opb.request.key().clone()],
                revisions: vec![a.header, b.header],
                ops: vec![opa.id, opb.id],
                explanation: format!(
                    "{}\ncompleted before\n{}{learned}\nwas invoked, yet the latter has revision {} against {}: {what}. \
                     Look for a read served from a lagging replica without a read index, or a revision \
                     allocated from a stale oracle window.",
                    opa.describe(),
                    opb.describe(),
                    b.header,
                    a.header
                ),
            });
        }
    }
}

fn read_states(
    history: &History,
    writes: &BTreeMap<Key, Vec<KnownWrite>>,
    unlearned: &HashMap<Key, Unlearned>,
    rereads: &Rereads,
    missing: &mut BTreeSet<(Key, i64)>,
    out: &mut Vec<Violation>,
) {
    for op in &history.ops {
        let Some((rev, got)) = read_of(op.response()) else {
            continue;
        };
        let key = op.request.key();
        let consistency = match op.request {
            Request::Get {
                consistency: Consistency::Serializable,
                ..
            } => "serializable ",
            _ => "",
        };
        match rereads.get(&(key.clone(), rev)) {
            None => {
                missing.insert((key.clone(), rev));
            }
            Some(RereadResult::Compacted) => {}
            Some(RereadResult::Kv(again)) => {
                if again.as_ref() != got {
                    out.push(Violation {
                        rule: Rule::ReadState,
                        keys: vec![key.clone()],
                        revisions: vec![rev],
                        ops: vec![op.id],
                        explanation: format!(
                            "the {consistency}read\n{}\nreturned {} at header revision {rev}, but re-reading {} at \
                             revision {rev} after the run returns {}. A read must show exactly the state at \
                             its header revision: either the read was served from a state that is not the \
                             one at that revision, or the header revision is wrong.",
                            op.describe(),
                            show_kv(got),
                            show(key),
                            show_kv(again.as_ref())
                        ),
                    });
                }
            }
        }
        let ws = writes.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let last = ws.iter().rev().find(|w| w.rev <= rev);
        let problem = match (got, last) {
            (Some(kv), _) if kv.mod_revision > rev => Some(format!(
                "it shows mod_revision {}, above its own header revision",
                kv.mod_revision
            )),
            (Some(kv), Some(w)) if kv.mod_revision < w.rev => Some(format!(
                "it shows the value written at revision {}, but {} had already taken effect at revision {} <= {rev}",
                kv.mod_revision,
                history.ops[w.op].describe(),
                w.rev
            )),
            (Some(kv), Some(w)) if kv.mod_revision == w.rev && w.effect != Effect::Put(kv.value.clone()) => {
                Some(format!(
                    "it shows {kv}, but the write at revision {} is {}",
                    w.rev,
                    history.ops[w.op].describe()
                ))
            }
            (None, Some(w)) if matches!(w.effect, Effect::Put(_)) => {
                if unlearned.get(key).is_some_and(|u| u.deletes > 0) {
                    None // a delete of unknown outcome may explain it
                } else {
                    Some(format!(
                        "it shows the key absent, but {} had taken effect at revision {} <= {rev} and no delete followed",
                        history.ops[w.op].describe(),
                        w.rev
                    ))
                }
            }
            _ => None,
        };
        if let Some(problem) = problem {
            let mut ops = vec![op.id];
            ops.extend(last.map(|w| history.ops[w.op].id));
            out.push(Violation {
                rule: Rule::ReadState,
                keys: vec![key.clone()],
                revisions: vec![rev],
                ops,
                explanation: format!(
                    "the {consistency}read\n{}\ndoes not agree with the known writes of {}: {problem}. A read at \
                     header revision R must show the last write of the key at or below R.",
                    op.describe(),
                    show(key)
                ),
            });
        }
    }
}

fn lost_writes(
    history: &History,
    rereads: &Rereads,
    missing: &mut BTreeSet<(Key, i64)>,
    out: &mut Vec<Violation>,
) {
    for op in &history.ops {
        let Some(rev) = op.acked_write_revision() else {
            continue;
        };
        let key = op.request.key();
        let again = match rereads.get(&(key.clone(), rev)) {
            None => {
                missing.insert((key.clone(), rev));
                continue;
            }
            Some(RereadResult::Compacted) => continue,
            Some(RereadResult::Kv(again)) => again,
        };
        let ok = match (op.request.written_value(), again) {
            (Some(value), Some(kv)) => kv.value == value && kv.mod_revision == rev,
            (None, None) => true,
            _ => false,
        };
        if !ok {
            let expected = match op.request.written_value() {
                Some(v) => format!("{} with mod_revision {rev}", show(v)),
                None => "the key absent".to_string(),
            };
            out.push(Violation {
                rule: Rule::LostWrite,
                keys: vec![key.clone()],
                revisions: vec![rev],
                ops: vec![op.id],
                explanation: format!(
                    "the acknowledged write\n{}\nis not in the store: re-reading {} at revision {rev} returns {} \
                     instead of {expected}. An acknowledged write must be durable and visible at its revision; \
                     look for a write acknowledged before it was committed/applied, or lost in a crash or \
                     snapshot.",
                    op.describe(),
                    show(key),
                    show_kv(again.as_ref())
                ),
            });
        }
    }
}
