//! Rule 4: version chains per key.
//!
//! Contract: the known writes of a key (acknowledged, and learned writes of
//! unknown outcome), ordered by revision, form a chain in which
//! - each acknowledged Put/Cas's prev_kv, and each Delete's deleted kv, is
//!   the previous write of the chain (same mod_revision and value; absent
//!   after a delete or at creation);
//! - a succeeded Cas's expected_mod_revision is that predecessor's revision
//!   (0 when absent);
//! - versions count 1 on creation, +1 per put; create_revision is constant
//!   until a delete and equals the creating write's revision; every
//!   observed Kv of a write shows the version and create_revision the chain
//!   gives it;
//! - no two writes have the same predecessor ("fork": both overwrote one
//!   version).
//!
//! Writes of unknown outcome that were not learned may still have applied;
//! where they could explain a gap (an unlearned delete before an empty
//! prev_kv, any unlearned write before a learned write) the check is
//! lenient there rather than report a false violation.

use std::collections::{BTreeMap, HashMap};

use crate::history::{show, show_kv, History, Key, Kv, Request, Response};
use crate::learn::{describe_source, Knowledge};
use crate::report::{Rule, Violation};
use crate::revisions::{Effect, KnownWrite, Unlearned};

/// Checks rule 4 on every key.
pub(crate) fn check(
    history: &History,
    knowledge: &Knowledge,
    writes: &BTreeMap<Key, Vec<KnownWrite>>,
    unlearned: &HashMap<Key, Unlearned>,
    out: &mut Vec<Violation>,
) {
    for (key, ws) in writes {
        let u = unlearned.get(key).copied().unwrap_or_default();
        check_key(history, knowledge, key, ws, u, out);
    }
}

/// The prev_kv a write reported (None: absent), when it is known.
fn reported_prev<'a>(history: &'a History, w: &KnownWrite) -> Option<Option<&'a Kv>> {
    if w.learned {
        return None;
    }
    match history.ops[w.op].response()? {
        Response::Put { prev, .. } => Some(prev.as_ref()),
        Response::Cas { kv, .. } => Some(kv.as_ref()),
        Response::Delete { deleted, .. } => Some(deleted.as_ref()),
        // Reads; multi-key responses are projected first.
        Response::Get { .. } | Response::MultiPut { .. } | Response::RangeAll { .. } => None,
    }
}

fn expected_of(history: &History, w: &KnownWrite) -> Option<i64> {
    match history.ops[w.op].request {
        Request::Cas {
            expected_mod_revision,
            ..
        } => Some(expected_mod_revision),
        _ => None,
    }
}

fn check_key(
    history: &History,
    knowledge: &Knowledge,
    key: &Key,
    ws: &[KnownWrite],
    u: Unlearned,
    out: &mut Vec<Violation>,
) {
    let strict_learned = u.writes == 0 && u.deletes == 0;
    // Revision → (version, create_revision) the chain gives each put.
    let mut derived: HashMap<i64, (i64, i64, usize)> = HashMap::new();
    let mut forks: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    let mut pred: Option<&KnownWrite> = None;
    let violation = |ops: Vec<usize>, revisions: Vec<i64>, rule: Rule, text: String| Violation {
        rule,
        keys: vec![key.clone()],
        revisions,
        ops: ops.iter().map(|&i| history.ops[i].id).collect(),
        explanation: text,
    };
    for w in ws {
        let me = history.ops[w.op].describe();
        let pred_text = match pred {
            Some(p) => format!(
                "the previous known write of the key is {}",
                history.ops[p.op].describe()
            ),
            None => "no earlier write of the key is known".to_string(),
        };
        let mut ops = vec![w.op];
        ops.extend(pred.map(|p| p.op));
        let revs: Vec<i64> = pred.map(|p| p.rev).into_iter().chain([w.rev]).collect();
        let pred_put = pred.and_then(|p| match &p.effect {
            Effect::Put(v) => Some((p, v)),
            Effect::Delete => None,
        });
        if let Some(prev) = reported_prev(history, w) {
            if let Some(p) = prev {
                forks.entry(p.mod_revision).or_default().push(w.op);
            }
            let problem = match (prev, pred_put) {
                (Some(p), Some((q, v))) if p.mod_revision != q.rev || &p.value != v => {
                    Some(format!("its prev_kv is {p}, but {pred_text}"))
                }
                (None, Some(_)) if u.deletes == 0 => {
                    Some(format!("its prev_kv is empty, but {pred_text}"))
                }
                (Some(p), None) => Some(format!(
                    "its prev_kv is {p}, but {pred_text}, so the key was absent"
                )),
                _ => None,
            };
            if let Some(problem) = problem {
                out.push(violation(
                    ops.clone(),
                    revs.clone(),
                    Rule::VersionChain,
                    format!(
                        "the write\n{me}\ndoes not follow the previous write of {}: {problem}. A write must \
                         see (and replace) the latest version; this is a lost update or a write applied \
                         to a stale state.",
                        show(key)
                    ),
                ));
            }
            if let Some(expected) = expected_of(history, w) {
                let actual = prev.map_or(0, |p| p.mod_revision);
                if expected != actual {
                    out.push(violation(
                        ops.clone(),
                        revs.clone(),
                        Rule::VersionChain,
                        format!(
                            "the Cas\n{me}\nsucceeded although its compare mod_revision == {expected} was false: \
                             the key's mod_revision was {actual} (prev_kv {}). The compare must be evaluated \
                             on the state the write is applied to.",
                            show_kv(prev)
                        ),
                    ));
                }
            }
            if let Effect::Put(_) = w.effect {
                let d = prev.map_or((1, w.rev), |p| (p.version + 1, p.create_revision));
                derived.insert(w.rev, (d.0, d.1, w.op));
            }
        } else if let Some(kv) = knowledge.learned.get(&w.op) {
            derived.insert(w.rev, (kv.version, kv.create_revision, w.op));
            let expected = expected_of(history, w);
            if let Some(e) = expected.filter(|e| *e != 0) {
                forks.entry(e).or_default().push(w.op);
            }
            if strict_learned {
                let (want, cas_want) = match pred_put {
                    Some((q, _)) => {
                        let (v, c, _) = derived.get(&q.rev).copied().unwrap_or((0, 0, 0));
                        ((v + 1, c), q.rev)
                    }
                    None => ((1, w.rev), 0),
                };
                let mut problems = Vec::new();
                if (kv.version, kv.create_revision) != want {
                    problems.push(format!(
                        "it was observed as {kv}, but the chain gives version {} and create_revision {}",
                        want.0, want.1
                    ));
                }
                if expected.is_some_and(|e| e != cas_want) {
                    problems.push(format!(
                        "it is a Cas that applied although the key's mod_revision was {cas_want}"
                    ));
                }
                if !problems.is_empty() {
                    out.push(violation(
                        ops.clone(),
                        revs.clone(),
                        Rule::VersionChain,
                        format!(
                            "the write of unknown outcome\n{me}\napplied at revision {} (learned), but {}; {pred_text}.",
                            w.rev,
                            problems.join("; ")
                        ),
                    ));
                }
            }
        }
        pred = Some(w);
    }

    // Every observation of a write shows the version/create the chain gives.
    let mut bad: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for obs in knowledge.observations.iter().filter(|o| &o.key == key) {
        let Some(&(version, create, _)) = derived.get(&obs.kv.mod_revision) else {
            continue;
        };
        if obs.kv.version != version || obs.kv.create_revision != create {
            bad.entry(obs.kv.mod_revision).or_default().push(format!(
                "  {} seen by {}",
                obs.kv,
                describe_source(history, key, obs.source)
            ));
        }
    }
    for (rev, lines) in bad {
        let Some(&(version, create, op)) = derived.get(&rev) else {
            continue;
        };
        out.push(violation(
            vec![op],
            vec![rev],
            Rule::VersionChain,
            format!(
                "the write\n{}\nshould carry version {version} and create_revision {create} (version: 1 on \
                 creation, +1 per put; create_revision: the creating write's revision), but was observed as:\n{}",
                history.ops[op].describe(),
                lines.join("\n")
            ),
        ));
    }

    for (rev, writers) in forks.into_iter().filter(|(_, w)| w.len() > 1) {
        let lines: Vec<String> = writers
            .iter()
            .map(|&i| format!("  {}", history.ops[i].describe()))
            .collect();
        let version = derived
            .get(&rev)
            .map(|(v, _, _)| format!(" (version {v})"))
            .unwrap_or_default();
        out.push(violation(
            writers.clone(),
            vec![rev],
            Rule::Fork,
            format!(
                "{} writes of {} all replaced the version written at revision {rev}{version}:\n{}\nOnly one \
                 write can overwrite a given version; the others must see its result (a Cas comparing \
                 against it must fail). Two proposals were applied to the same base state.",
                writers.len(),
                show(key),
                lines.join("\n")
            ),
        ));
    }
}
