//! Learning from observations: which write produced each observed value,
//! and which writes of unknown outcome are thereby known to have applied.
//!
//! Contract: [`learn`] takes a projected history (single-key ops only, see
//! `crate::project`; the caller validated the original) and walks every
//! observed `Kv` — Get results, Cas results, prev_kvs of
//! Puts and Deletes, and re-reads when given — and traces its value to the
//! one write that carries it. An Unknown write whose value is observed is
//! *learned*: it applied, producing the first observed `Kv` (at that
//! `mod_revision`). It reports, grouped per write or value:
//! [`Rule::FailedWriteObserved`] (value of a Failed write or of a Cas that
//! answered "compare failed"), [`Rule::UnknownValue`] (value written by no
//! op of that key) and [`Rule::AppliedTwice`] (one write's value at two
//! `mod_revision`s, or at another revision than its response reported).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::history::{show, History, Key, Kv, Outcome, Response};
use crate::report::{Rule, Violation};
use crate::revisions::{RereadResult, Rereads};

/// Where a `Kv` was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Source {
    /// In the response of the op at this index.
    Op(usize),
    /// In the re-read at this revision.
    Reread(i64),
}

/// One observed `Kv` of a key.
#[derive(Clone, Debug)]
pub(crate) struct Observation {
    pub key: Key,
    pub kv: Kv,
    pub source: Source,
}

/// Where a value was seen, and at which mod_revision.
type Seen = (Source, i64);

/// What the checker knows after learning.
#[derive(Debug, Default)]
pub(crate) struct Knowledge {
    /// Written value → index of the op writing it.
    pub writer: HashMap<Vec<u8>, usize>,
    /// Index of an Unknown Put/Cas known to have applied → what it produced.
    pub learned: BTreeMap<usize, Kv>,
    /// Every observed `Kv`, history ops first (in order), then re-reads.
    pub observations: Vec<Observation>,
    /// Problems found while learning.
    pub violations: Vec<Violation>,
}

/// The `Kv` the response of a single-key op shows (None for a multi-key
/// response: those are projected first).
pub(crate) fn observed_kv(resp: &Response) -> Option<&Kv> {
    match resp {
        Response::Put { prev, .. } => prev.as_ref(),
        Response::Get { kv, .. } => kv.as_ref(),
        Response::Cas { kv, .. } => kv.as_ref(),
        Response::Delete { deleted, .. } => deleted.as_ref(),
        Response::MultiPut { .. } | Response::RangeAll { .. } => None,
    }
}

/// Describes where a kv was seen.
pub(crate) fn describe_source(history: &History, key: &[u8], source: Source) -> String {
    match source {
        Source::Op(i) => history.ops[i].describe(),
        Source::Reread(r) => format!("re-read of {} at revision {r}", show(key)),
    }
}

fn source_ids(history: &History, sources: &[Source]) -> Vec<usize> {
    sources
        .iter()
        .filter_map(|s| match s {
            Source::Op(i) => Some(history.ops[*i].id),
            Source::Reread(_) => None,
        })
        .collect()
}

/// Learns from every observation of a projected history (its ops, then
/// `rereads` when given).
pub(crate) fn learn(history: &History, rereads: Option<&Rereads>) -> Knowledge {
    let mut k = Knowledge::default();
    for (i, op) in history.ops.iter().enumerate() {
        if let Some(v) = op.request.written_value() {
            k.writer.insert(v.to_vec(), i);
        }
    }
    for (i, op) in history.ops.iter().enumerate() {
        if let Some(kv) = op.response().and_then(observed_kv) {
            k.observations.push(Observation {
                key: op.request.key().clone(),
                kv: kv.clone(),
                source: Source::Op(i),
            });
        }
    }
    if let Some(rereads) = rereads {
        let mut sorted: Vec<(&(Key, i64), &RereadResult)> = rereads.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        for ((key, rev), res) in sorted {
            if let RereadResult::Kv(Some(kv)) = res {
                k.observations.push(Observation {
                    key: key.clone(),
                    kv: kv.clone(),
                    source: Source::Reread(*rev),
                });
            }
        }
    }

    let mut failed: BTreeMap<usize, Vec<Source>> = BTreeMap::new();
    let mut unknown: BTreeMap<(Key, Vec<u8>), Vec<Seen>> = BTreeMap::new();
    let mut revisions: BTreeMap<usize, BTreeMap<i64, Vec<Source>>> = BTreeMap::new();
    for obs in &k.observations {
        let Some(&w) = k.writer.get(&obs.kv.value) else {
            unknown
                .entry((obs.key.clone(), obs.kv.value.clone()))
                .or_default()
                .push((obs.source, obs.kv.mod_revision));
            continue;
        };
        let writer = &history.ops[w];
        if writer.request.key() != &obs.key {
            unknown
                .entry((obs.key.clone(), obs.kv.value.clone()))
                .or_default()
                .push((obs.source, obs.kv.mod_revision));
            continue;
        }
        match &writer.outcome {
            Outcome::Failed(_)
            | Outcome::Ok(Response::Cas {
                succeeded: false, ..
            }) => failed.entry(w).or_default().push(obs.source),
            Outcome::Unknown(_) => {
                k.learned.entry(w).or_insert_with(|| obs.kv.clone());
            }
            Outcome::Ok(_) => {}
        }
        revisions
            .entry(w)
            .or_default()
            .entry(obs.kv.mod_revision)
            .or_default()
            .push(obs.source);
    }

    for (w, sources) in failed {
        let writer = &history.ops[w];
        let key = writer.request.key();
        let seen: Vec<String> = sources
            .iter()
            .take(5)
            .map(|s| format!("  seen by {}", describe_source(history, key, *s)))
            .collect();
        let mut ops = vec![writer.id];
        ops.extend(source_ids(history, &sources));
        k.violations.push(Violation {
            rule: Rule::FailedWriteObserved,
            keys: vec![key.clone()],
            revisions: Vec::new(),
            ops,
            explanation: format!(
                "the write {} was reported as not applied, yet its value was observed {} time(s):\n{}\n\
                 A write answered with an error (or a Cas answered 'compare failed') must never take effect; \
                 look for an error path that still proposes or applies the write.",
                writer.describe(),
                sources.len(),
                seen.join("\n")
            ),
        });
    }
    for ((key, value), seen) in unknown {
        let revisions: BTreeSet<i64> = seen.iter().map(|(_, r)| *r).collect();
        let lines: Vec<String> = seen
            .iter()
            .take(5)
            .map(|(s, _)| format!("  seen by {}", describe_source(history, &key, *s)))
            .collect();
        let written_elsewhere = k
            .writer
            .get(&value)
            .map(|&w| format!(" (op #{} wrote it to another key)", history.ops[w].id))
            .unwrap_or_default();
        k.violations.push(Violation {
            rule: Rule::UnknownValue,
            keys: vec![key.clone()],
            revisions: revisions.into_iter().collect(),
            ops: source_ids(history, &seen.iter().map(|(s, _)| *s).collect::<Vec<_>>()),
            explanation: format!(
                "key {} showed the value {} that no operation of the history wrote to it{written_elsewhere}:\n{}\n\
                 The store returned data it was never given for this key (corruption, a mix-up between keys, \
                 or data left over from an earlier run under the same keys).",
                show(&key),
                show(&value),
                lines.join("\n")
            ),
        });
    }
    for (w, by_rev) in revisions {
        let writer = &history.ops[w];
        let acked = writer.acked_write_revision();
        let mut revs: BTreeSet<i64> = by_rev.keys().copied().collect();
        if let Some(r) = acked {
            revs.insert(r);
        }
        if revs.len() < 2 {
            continue;
        }
        let key = writer.request.key();
        let lines: Vec<String> = by_rev
            .iter()
            .map(|(rev, sources)| {
                format!(
                    "  at mod_revision {rev}: seen by {}",
                    describe_source(history, key, sources[0])
                )
            })
            .collect();
        let mut ops = vec![writer.id];
        for sources in by_rev.values() {
            ops.extend(source_ids(history, sources));
        }
        let acked_text = acked
            .map(|r| format!(" Its response reported revision {r}."))
            .unwrap_or_default();
        k.violations.push(Violation {
            rule: Rule::AppliedTwice,
            keys: vec![key.clone()],
            revisions: revs.into_iter().collect(),
            ops,
            explanation: format!(
                "the value of {} appears at more than one revision.{acked_text}\n{}\n\
                 One write must take exactly one revision: it was applied twice (e.g. a retried proposal \
                 applied again), or a response or a read reports the wrong revision.",
                writer.describe(),
                lines.join("\n")
            ),
        });
    }
    k
}
