//! Rule 6: multi-key atomicity — a MultiPut takes effect on all its keys
//! at one revision or on none, and no read shows part of it.
//!
//! The per-key rules already judge each projected part (see
//! `crate::project`): rule 3 catches a RangeAll at R that misses a part of
//! an acknowledged (or learned) MultiPut at or below R, rule 5 an
//! acknowledged MultiPut missing from some key's re-read. This rule adds
//! what the per-key view cannot see, for MultiPuts of every outcome except
//! Failed (a Failed one observed is [`Rule::FailedWriteObserved`]):
//! - (a) one revision: the values of one MultiPut are observed (in
//!   responses or re-reads) at one mod_revision, its response's revision
//!   when acknowledged. A MultiPut of unknown outcome whose parts are
//!   learned at different revisions was applied in pieces.
//! - (b) all or nothing at its revision: when it applied at R (its
//!   acknowledged revision, else the lowest revision one of its values was
//!   observed at), the re-reads of its keys at R either all show its values
//!   with mod_revision R or none does (none, for an acknowledged one, is
//!   rule 5's lost write). Re-reads that were not supplied or are
//!   compacted are skipped: [`extra_rereads`] plans them only for values
//!   observed in the history's own responses.
//! - (c) no torn read: a RangeAll at header R that shows key k with a
//!   MultiPut's value (written at R_M = the shown mod_revision) shows every
//!   other key k' of that MultiPut with its value at R_M, or with a
//!   mod_revision above R_M (overwritten later), or absent if a Delete of
//!   k' acknowledged in (R_M, R], or of unknown outcome, may explain it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::history::{show, show_kv, History, Key, Kv, Outcome, Request, Response};
use crate::learn::{describe_source, observed_kv, Knowledge, Source};
use crate::project::Projection;
use crate::report::{Rule, Violation};
use crate::revisions::{RereadResult, Rereads};

/// Re-reads rule 6 (b) wants beyond the per-key plan: every key of a
/// MultiPut of unknown outcome at each revision one of its values was
/// observed at in `projection`'s responses.
pub(crate) fn extra_rereads(history: &History, projection: &Projection) -> BTreeSet<(Key, i64)> {
    let mut unknown: HashMap<(&Key, &[u8]), usize> = HashMap::new();
    for (m, op) in history.ops.iter().enumerate() {
        if let (Request::MultiPut { keys, values }, Outcome::Unknown(_)) =
            (&op.request, &op.outcome)
        {
            for (k, v) in keys.iter().zip(values) {
                unknown.insert((k, v.as_slice()), m);
            }
        }
    }
    let mut out = BTreeSet::new();
    if unknown.is_empty() {
        return out;
    }
    for op in &projection.history.ops {
        let Some(kv) = op.response().and_then(observed_kv) else {
            continue;
        };
        let Some(&m) = unknown.get(&(op.request.key(), kv.value.as_slice())) else {
            continue;
        };
        if let Request::MultiPut { keys, .. } = &history.ops[m].request {
            out.extend(keys.iter().map(|k| (k.clone(), kv.mod_revision)));
        }
    }
    out
}

/// A MultiPut: its index in the original history, its keys and values.
type MultiPutRef<'a> = (usize, &'a [Key], &'a [Vec<u8>]);

/// The MultiPut (original index) and key a value was written by, if any.
fn multi_put_part<'a>(
    history: &'a History,
    projection: &Projection,
    knowledge: &Knowledge,
    key: &Key,
    value: &[u8],
) -> Option<MultiPutRef<'a>> {
    let &p = knowledge.writer.get(value)?;
    if projection.history.ops.get(p)?.request.key() != key {
        return None;
    }
    let m = *projection.origin.get(p)?;
    match &history.ops[m].request {
        Request::MultiPut { keys, values } => Some((m, keys, values)),
        _ => None,
    }
}

/// Checks rule 6 on `history` (the original, multi-key ops included).
pub(crate) fn check(
    history: &History,
    projection: &Projection,
    knowledge: &Knowledge,
    rereads: Option<&Rereads>,
    out: &mut Vec<Violation>,
) {
    // (a) per MultiPut: key → revisions its value was observed at (with the
    // first source seen at each).
    let mut seen: BTreeMap<usize, BTreeMap<Key, BTreeMap<i64, Source>>> = BTreeMap::new();
    for obs in &knowledge.observations {
        let Some((m, _, _)) =
            multi_put_part(history, projection, knowledge, &obs.key, &obs.kv.value)
        else {
            continue;
        };
        if matches!(history.ops[m].outcome, Outcome::Failed(_)) {
            continue;
        }
        seen.entry(m)
            .or_default()
            .entry(obs.key.clone())
            .or_default()
            .entry(obs.kv.mod_revision)
            .or_insert(obs.source);
    }
    for (&m, by_key) in &seen {
        let op = &history.ops[m];
        let acked = op.acked_write_revision();
        let revs: BTreeSet<i64> = by_key
            .values()
            .flat_map(|r| r.keys().copied())
            .chain(acked)
            .collect();
        if revs.len() < 2 {
            continue;
        }
        let mut lines = Vec::new();
        for (key, at) in by_key {
            for (rev, source) in at {
                lines.push(format!(
                    "  {} at mod_revision {rev}: seen by {}",
                    show(key),
                    describe_source(&projection.history, key, *source)
                ));
            }
        }
        let acked_text = acked
            .map(|r| format!(" Its response reported revision {r}."))
            .unwrap_or_default();
        out.push(Violation {
            rule: Rule::MultiKeyAtomicity,
            keys: by_key.keys().cloned().collect(),
            revisions: revs.into_iter().collect(),
            ops: vec![op.id],
            explanation: format!(
                "the values of the multi-key write\n{}\nwere observed at more than one revision.{acked_text}\n{}\n\
                 All puts of one Txn take one revision: the write was applied in pieces (e.g. one region \
                 of a two-phase commit applied it at another revision, or twice), or a response or read \
                 reports the wrong revision.",
                op.describe(),
                lines.join("\n")
            ),
        });
    }

    // (b) all or nothing at its revision, in the re-reads.
    if let Some(rereads) = rereads {
        all_or_nothing(history, &seen, rereads, out);
    }

    // (c) no torn RangeAll.
    torn_reads(history, projection, knowledge, out);
}

fn all_or_nothing(
    history: &History,
    seen: &BTreeMap<usize, BTreeMap<Key, BTreeMap<i64, Source>>>,
    rereads: &Rereads,
    out: &mut Vec<Violation>,
) {
    for (m, op) in history.ops.iter().enumerate() {
        let Request::MultiPut { keys, values } = &op.request else {
            continue;
        };
        let rev = match (op.acked_write_revision(), &op.outcome) {
            (Some(r), _) => r,
            (None, Outcome::Unknown(_)) => {
                let first = seen
                    .get(&m)
                    .and_then(|by_key| by_key.values().flat_map(|r| r.keys().copied()).min());
                match first {
                    Some(r) => r,
                    None => continue,
                }
            }
            _ => continue,
        };
        let mut shows = Vec::new();
        let mut lacks = Vec::new();
        for (key, value) in keys.iter().zip(values) {
            let Some(RereadResult::Kv(got)) = rereads.get(&(key.clone(), rev)) else {
                continue;
            };
            let line = format!(
                "  {} re-read at {rev}: {}",
                show(key),
                show_kv(got.as_ref())
            );
            match got {
                Some(kv) if kv.value == *value && kv.mod_revision == rev => shows.push(line),
                _ => lacks.push(line),
            }
        }
        if shows.is_empty() || lacks.is_empty() {
            continue;
        }
        let how = if op.acked_write_revision().is_some() {
            "acknowledged at"
        } else {
            "of unknown outcome, observed applied at"
        };
        out.push(Violation {
            rule: Rule::MultiKeyAtomicity,
            keys: keys.clone(),
            revisions: vec![rev],
            ops: vec![op.id],
            explanation: format!(
                "the multi-key write\n{}\n({how} revision {rev}) is only partly in the store at its revision:\n\
                 shows it:\n{}\ndoes not:\n{}\nA Txn applies on all its keys or on none; look for a \
                 two-phase commit whose decision reached some regions only, or a region that lost or \
                 re-applied its part (crash, snapshot, split or merge).",
                op.describe(),
                shows.join("\n"),
                lacks.join("\n")
            ),
        });
    }
}

/// Per key: revisions of acknowledged deletes, and whether some delete of
/// unknown outcome exists.
fn deletes(history: &History) -> HashMap<&Key, (Vec<i64>, bool)> {
    let mut out: HashMap<&Key, (Vec<i64>, bool)> = HashMap::new();
    for op in &history.ops {
        let Request::Delete { key } = &op.request else {
            continue;
        };
        match &op.outcome {
            Outcome::Ok(Response::Delete {
                revision,
                deleted: Some(_),
            }) => out.entry(key).or_default().0.push(*revision),
            Outcome::Unknown(_) => out.entry(key).or_default().1 = true,
            _ => {}
        }
    }
    out
}

fn torn_reads(
    history: &History,
    projection: &Projection,
    knowledge: &Knowledge,
    out: &mut Vec<Violation>,
) {
    let deletes = deletes(history);
    for read in &history.ops {
        let Some(Response::RangeAll { revision, kvs }) = read.response() else {
            continue;
        };
        let mut shown: HashMap<&Key, &Kv> = HashMap::new();
        for e in kvs {
            shown.entry(&e.key).or_insert(&e.kv);
        }
        let mut torn: BTreeMap<usize, (i64, Vec<String>)> = BTreeMap::new();
        for e in kvs {
            let Some((m, keys, values)) =
                multi_put_part(history, projection, knowledge, &e.key, &e.kv.value)
            else {
                continue;
            };
            let at = e.kv.mod_revision;
            for (other, value) in keys.iter().zip(values) {
                let fine = match shown.get(other) {
                    Some(kv) => {
                        kv.mod_revision > at || (kv.mod_revision == at && kv.value == *value)
                    }
                    None => deletes.get(other).is_some_and(|(acked, unknown)| {
                        *unknown || acked.iter().any(|&r| r > at && r <= *revision)
                    }),
                };
                if !fine {
                    let line = format!(
                        "  it shows {} as {} where the write put {} at {at}, yet {} shows that write",
                        show(other),
                        show_kv(shown.get(other).copied()),
                        show(value),
                        show(&e.key),
                    );
                    let entry = torn.entry(m).or_insert((at, Vec::new()));
                    if !entry.1.contains(&line) {
                        entry.1.push(line);
                    }
                }
            }
        }
        for (m, (at, lines)) in torn {
            let write = &history.ops[m];
            out.push(Violation {
                rule: Rule::MultiKeyAtomicity,
                keys: match &write.request {
                    Request::MultiPut { keys, .. } => keys.clone(),
                    _ => Vec::new(),
                },
                revisions: vec![at, *revision],
                ops: vec![read.id, write.id],
                explanation: format!(
                    "the read\n{}\nsees only part of the multi-key write\n{}\n{}\nA read at header revision \
                     {revision} shows one state: every key of a Txn applied at {at} <= {revision}, or none. \
                     Look for a multi-region read whose regions were read at different revisions, or a \
                     read that did not wait for a two-phase commit's locks.",
                    read.describe(),
                    write.describe(),
                    lines.join("\n")
                ),
            });
        }
    }
}
