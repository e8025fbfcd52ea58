//! The per-watch rules (see the module doc of `crate::watch`) and the
//! grouping of their findings into one violation per watch and rule.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::history::{show, show_kv, Key};
use crate::report::{Rule, Violation};
use crate::watch::timeline::{Change, Known, Timeline, Trace};
use crate::watch::{EventType, Watch, WatchEvent};

/// Findings shown in full per violation.
const SHOWN: usize = 12;

/// One problem of one watch.
struct Finding {
    line: String,
    keys: Vec<Key>,
    revisions: Vec<i64>,
    ops: Vec<usize>,
}

/// Findings by (watch, rule).
#[derive(Default)]
pub(crate) struct Findings {
    by: BTreeMap<(usize, Rule), Vec<Finding>>,
}

impl Findings {
    fn add(
        &mut self,
        watch: usize,
        rule: Rule,
        line: String,
        key: &Key,
        rev: i64,
        ops: Vec<usize>,
    ) {
        self.by.entry((watch, rule)).or_default().push(Finding {
            line,
            keys: vec![key.clone()],
            revisions: vec![rev],
            ops,
        });
    }

    /// One violation per (watch, rule), in that order.
    pub(crate) fn into_violations(self, watches: &[Watch]) -> Vec<Violation> {
        let mut out = Vec::new();
        for ((w, rule), findings) in self.by {
            let keys: BTreeSet<Key> = findings.iter().flat_map(|f| f.keys.clone()).collect();
            let revisions: BTreeSet<i64> =
                findings.iter().flat_map(|f| f.revisions.clone()).collect();
            let ops: BTreeSet<usize> = findings.iter().flat_map(|f| f.ops.clone()).collect();
            let mut lines: Vec<String> = findings
                .iter()
                .take(SHOWN)
                .map(|f| format!("  {}", f.line))
                .collect();
            if findings.len() > SHOWN {
                lines.push(format!("  ... and {} more", findings.len() - SHOWN));
            }
            out.push(Violation {
                rule,
                keys: keys.into_iter().collect(),
                revisions: revisions.into_iter().collect(),
                ops: ops.into_iter().collect(),
                explanation: format!(
                    "watch #{w} ({}): {} problem(s):\n{}\n{}",
                    watches[w].describe(),
                    findings.len(),
                    lines.join("\n"),
                    guidance(rule)
                ),
            });
        }
        out
    }
}

/// What a developer should look at, per rule.
fn guidance(rule: Rule) -> &'static str {
    match rule {
        Rule::WatchOrdered => {
            "A watch delivers its events in revision order, the created response first and nothing after a \
             cancel; look for events from two sources (catch-up and live, or several regions) merged without \
             ordering them by revision."
        }
        Rule::WatchUnique => {
            "An event is delivered at most once per watch; look for a catch-up overlapping the live events \
             at the switch, or a resend after a leader change or region split."
        }
        Rule::WatchAtomic => {
            "The events of one revision come whole and in one response (a multi-key write is one revision); \
             look for per-region feeds delivering parts of a revision separately, or a batch cut inside a \
             revision."
        }
        Rule::WatchReliable => {
            "Every event of the watched range from the start revision up to the highest revision the watch \
             has seen must be delivered; look for a gap at the catch-up/live switch, or events dropped at a \
             leader change, region split or merge."
        }
        Rule::WatchValid => {
            "Every event must be a write of the history at its revision, on its key, with its value, version \
             and create_revision (a Delete event carries only the key and mod_revision); look for events built \
             from the wrong state or revision."
        }
        Rule::WatchBookmarkable => {
            "A progress notification at revision R promises that every event <= R was sent before it; look \
             for a progress notification sent while the watcher was still catching up, or carrying the \
             store's revision instead of the watcher's."
        }
        Rule::WatchPrevKv => {
            "prev_kv is the key's KeyValue just before the event's revision (absent when the key did not \
             exist, or the revision before is compacted), and only sent when asked for; look for prev_kv read \
             at the wrong revision."
        }
        Rule::WatchFiltered => {
            "A watch delivers only events on keys of its range that pass its filters (no_put, no_delete)."
        }
        Rule::WatchResumable => {
            "A watch from revision S delivers nothing below S and is canceled as compacted only when S is \
             below the compaction revision; a watch resumed after a break must start at the last revision \
             seen + 1, or events are lost between the two."
        }
        _ => "",
    }
}

/// The events of a watch with the index of their response.
type Events<'a> = [(usize, &'a WatchEvent)];

/// Checks one watch against the timeline.
pub(crate) fn check_watch(
    i: usize,
    w: &Watch,
    watches: &[Watch],
    t: &Timeline<'_>,
    compacted: i64,
    f: &mut Findings,
) {
    let events: Vec<(usize, &WatchEvent)> = w
        .responses
        .iter()
        .enumerate()
        .flat_map(|(j, r)| r.events.iter().map(move |e| (j, e)))
        .collect();
    filtered(i, w, &events, f);
    ordered(i, w, &events, f);
    unique(i, &events, f);
    bookmarkable(i, w, f);
    resumable(i, w, watches, t, compacted, &events, f);
    valid(i, t, &events, f);
    prev_kv(i, w, t, compacted, &events, f);
    delivery(i, w, t, &events, f);
}

fn rev(e: &WatchEvent) -> i64 {
    e.kv.mod_revision
}

fn filtered(i: usize, w: &Watch, events: &Events, f: &mut Findings) {
    for &(j, e) in events {
        let why = if !w.contains(&e.key) {
            "its key is outside the watched range"
        } else if w.no_put && e.kind == EventType::Put {
            "the watch filters Put events out (no_put)"
        } else if w.no_delete && e.kind == EventType::Delete {
            "the watch filters Delete events out (no_delete)"
        } else {
            continue;
        };
        let line = format!("response #{j}: {}: {why}", e.describe());
        f.add(i, Rule::WatchFiltered, line, &e.key, rev(e), Vec::new());
    }
}

fn ordered(i: usize, w: &Watch, events: &Events, f: &mut Findings) {
    let mut top: Option<(i64, usize)> = None;
    for &(j, e) in events {
        if let Some((m, mj)) = top.filter(|(m, _)| rev(e) < *m) {
            let line = format!(
                "response #{j}: {} at revision {} comes after an event at revision {m} (response #{mj})",
                e.describe(),
                rev(e)
            );
            f.add(i, Rule::WatchOrdered, line, &e.key, rev(e), Vec::new());
        } else {
            top = Some((rev(e), j));
        }
    }
    for (j, r) in w.responses.iter().enumerate().skip(1) {
        if r.created {
            let line = format!("response #{j} is a created response after {j} other response(s)");
            f.add(i, Rule::WatchOrdered, line, &w.key, r.revision, Vec::new());
        }
    }
    if let Some(c) = w.responses.iter().position(|r| r.canceled) {
        for (j, r) in w.responses.iter().enumerate().skip(c + 1) {
            let line = format!("response #{j} follows the canceled response #{c}");
            f.add(i, Rule::WatchOrdered, line, &w.key, r.revision, Vec::new());
        }
    }
}

fn unique(i: usize, events: &Events, f: &mut Findings) {
    let mut seen: HashMap<(&Key, i64), usize> = HashMap::new();
    for &(j, e) in events {
        match seen.entry((&e.key, rev(e))) {
            Entry::Vacant(v) => {
                v.insert(j);
            }
            Entry::Occupied(first) => {
                let line = format!(
                    "response #{j}: {} delivered again (first in response #{})",
                    e.describe(),
                    first.get()
                );
                f.add(i, Rule::WatchUnique, line, &e.key, rev(e), Vec::new());
            }
        }
    }
}

fn bookmarkable(i: usize, w: &Watch, f: &mut Findings) {
    let mut top_event: Option<(i64, usize)> = None;
    let mut top_progress: Option<(i64, usize)> = None;
    for (j, r) in w.responses.iter().enumerate() {
        if r.progress {
            if let Some((p, pj)) = top_progress.filter(|(p, _)| r.revision < *p) {
                let line = format!(
                    "response #{j}: a progress notification at revision {} after one at {p} (response #{pj})",
                    r.revision
                );
                f.add(
                    i,
                    Rule::WatchBookmarkable,
                    line,
                    &w.key,
                    r.revision,
                    Vec::new(),
                );
            }
            if let Some((e, ej)) = top_event.filter(|(e, _)| r.revision < *e) {
                let line = format!(
                    "response #{j}: a progress notification at revision {} after an event at revision {e} \
                     (response #{ej})",
                    r.revision
                );
                f.add(
                    i,
                    Rule::WatchBookmarkable,
                    line,
                    &w.key,
                    r.revision,
                    Vec::new(),
                );
            }
            if top_progress.is_none_or(|(p, _)| r.revision > p) {
                top_progress = Some((r.revision, j));
            }
        }
        for e in &r.events {
            if let Some((p, pj)) = top_progress.filter(|(p, _)| rev(e) <= *p) {
                let line = format!(
                    "response #{j}: {} comes after the progress notification at revision {p} (response #{pj})",
                    e.describe()
                );
                f.add(i, Rule::WatchBookmarkable, line, &e.key, rev(e), Vec::new());
            }
            if top_event.is_none_or(|(m, _)| rev(e) > m) {
                top_event = Some((rev(e), j));
            }
        }
    }
}

fn resumable(
    i: usize,
    w: &Watch,
    watches: &[Watch],
    t: &Timeline<'_>,
    compacted: i64,
    events: &Events,
    f: &mut Findings,
) {
    let start = w.start_revision;
    if start > 0 {
        for &(j, e) in events.iter().filter(|(_, e)| rev(e) < start) {
            let line = format!(
                "response #{j}: {} is below the start revision {start}",
                e.describe()
            );
            f.add(i, Rule::WatchResumable, line, &e.key, rev(e), Vec::new());
        }
    }
    for (j, r) in w.responses.iter().enumerate() {
        let c = r.compact_revision;
        if c == 0 {
            continue;
        }
        let mut why = Vec::new();
        if start == 0 {
            why.push("a watch from now cannot have been compacted".to_string());
        } else if start >= c {
            why.push(format!("its start revision {start} is not below {c}"));
        }
        if c > compacted {
            why.push(format!(
                "the store was compacted at most at revision {compacted}"
            ));
        }
        if !why.is_empty() {
            let line = format!(
                "response #{j}: canceled as compacted at revision {c}, but {}",
                why.join(", and ")
            );
            f.add(i, Rule::WatchResumable, line, &w.key, c, Vec::new());
        }
    }
    let Some(p) = w.resumed_from else { return };
    let Some(from) = watches[p].resume_revision() else {
        return;
    };
    if start <= from {
        return;
    }
    for (r, c) in t
        .between(from, start - 1)
        .filter(|(_, c)| w.matches(c.kind(), &c.key))
    {
        let line = format!(
            "resumes watch #{p} at revision {start}, but #{p} had seen up to {}: {} was delivered by neither",
            from - 1,
            describe_change(t, c)
        );
        f.add(i, Rule::WatchResumable, line, &c.key, r, vec![t.id(c.op)]);
    }
}

/// "Put "k"="v" at 5 by op #3 (acknowledged)".
fn describe_change(t: &Timeline<'_>, c: &Change) -> String {
    let what = match &c.value {
        Some(v) => format!("Put {}={}", show(&c.key), show(v)),
        None => format!("Delete {}", show(&c.key)),
    };
    let how = t
        .placement(c.op)
        .map(|(_, k)| k.describe())
        .unwrap_or_default();
    format!("{what} at revision {} by op #{} ({how})", c.rev, t.id(c.op))
}

fn valid(i: usize, t: &Timeline<'_>, events: &Events, f: &mut Findings) {
    for &(j, e) in events {
        let r = rev(e);
        let mut problems = Vec::new();
        let mut ops = Vec::new();
        let taken_by = |ops: &mut Vec<usize>| match t.at(r).next() {
            Some(c) => {
                ops.push(t.id(c.op));
                format!("revision {r} belongs to {}", describe_change(t, c))
            }
            None => format!("no write of the history is known to have taken revision {r}"),
        };
        match e.kind {
            EventType::Put => {
                let kv = &e.kv;
                if kv.version < 1
                    || kv.create_revision < 1
                    || kv.create_revision > r
                    || (kv.version == 1) != (kv.create_revision == r)
                {
                    problems.push(
                        "its version and create_revision contradict each other or its revision"
                            .to_string(),
                    );
                }
                match t.trace(&e.key, &kv.value) {
                    Trace::Nobody => {
                        problems.push("no operation of the history wrote its value".into())
                    }
                    Trace::OtherKey(m) => {
                        ops.push(t.id(m));
                        problems.push(format!(
                            "its value was written to another key by {}",
                            t.history.ops[m].describe()
                        ));
                    }
                    Trace::NotApplied(m) => {
                        ops.push(t.id(m));
                        problems.push(format!(
                            "its value is that of {}, reported as not applied",
                            t.history.ops[m].describe()
                        ));
                    }
                    Trace::Unplaced(m) => {
                        ops.push(t.id(m));
                        let taken = taken_by(&mut ops);
                        problems.push(format!(
                            "its value is that of {} (outcome unknown), but {taken}",
                            t.history.ops[m].describe()
                        ));
                    }
                    Trace::Placed {
                        op,
                        rev: at,
                        known,
                        change,
                    } => {
                        ops.push(t.id(op));
                        if at != r {
                            problems.push(format!(
                                "{} applied at revision {at} ({}), not at {r}",
                                t.history.ops[op].describe(),
                                known.describe()
                            ));
                        } else if let Some(want) = change.kv.as_ref().filter(|want| *want != kv) {
                            let source = match known {
                                Known::Acked => {
                                    "from the write's prev_kv or the key's earlier changes"
                                        .to_string()
                                }
                                k => k.describe(),
                            };
                            problems.push(format!(
                                "the write's KeyValue is {want} ({source}), not {kv}"
                            ));
                        }
                    }
                }
            }
            EventType::Delete => {
                if !e.kv.value.is_empty() || e.kv.version != 0 || e.kv.create_revision != 0 {
                    problems.push(format!(
                        "a Delete event's kv carries only the key and mod_revision, not {}",
                        e.kv
                    ));
                }
                let deleted = t.at(r).any(|c| c.key == e.key && c.value.is_none());
                if !deleted {
                    let taken = taken_by(&mut ops);
                    problems.push(format!(
                        "no Delete of the key (acknowledged, or of unknown outcome and unplaced) took revision {r}: {taken}"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            let line = format!("response #{j}: {}: {}", e.describe(), problems.join("; "));
            f.add(i, Rule::WatchValid, line, &e.key, r, ops);
        }
    }
}

fn prev_kv(
    i: usize,
    w: &Watch,
    t: &Timeline<'_>,
    compacted: i64,
    events: &Events,
    f: &mut Findings,
) {
    for &(j, e) in events {
        let r = rev(e);
        if !w.prev_kv {
            if let Some(p) = &e.prev_kv {
                let line = format!(
                    "response #{j}: {} carries prev_kv {p}, but the watch did not ask for prev_kv",
                    e.describe()
                );
                f.add(i, Rule::WatchPrevKv, line, &e.key, r, Vec::new());
            }
            continue;
        }
        let before = t.before(&e.key, r);
        let held = before.filter(|c| c.value.is_some());
        let problem = match (&e.prev_kv, held) {
            (None, None) => None,
            (None, Some(c)) => {
                let compacted_away = r - 1 < compacted;
                let maybe_deleted = t.unsure(&e.key).is_some_and(|u| !u.deletes.is_empty());
                (!compacted_away && !maybe_deleted).then(|| {
                    format!(
                        "prev_kv is absent, but the key held the value of {} just before",
                        describe_change(t, c)
                    )
                })
            }
            (Some(p), None) => Some(format!(
                "prev_kv is {p}, but the key did not exist just before revision {r} ({})",
                match before {
                    Some(c) => format!("last change: {}", describe_change(t, c)),
                    None => "no earlier write of it is known".to_string(),
                }
            )),
            (Some(p), Some(c)) => {
                let same = match &c.kv {
                    Some(kv) => p == kv,
                    None => {
                        c.value.as_deref() == Some(p.value.as_slice()) && p.mod_revision == c.rev
                    }
                };
                (!same).then(|| {
                    format!(
                        "prev_kv is {p}, but just before revision {r} the key held {} ({})",
                        show_kv(c.kv.as_ref()),
                        describe_change(t, c)
                    )
                })
            }
        };
        if let Some(problem) = problem {
            let ops = held.map(|c| vec![t.id(c.op)]).unwrap_or_default();
            let line = format!("response #{j}: {}: {problem}", e.describe());
            f.add(i, Rule::WatchPrevKv, line, &e.key, r, ops);
        }
    }
}

/// Atomic and reliable: each revision in one response, and whole; every
/// revision of the window delivered.
fn delivery(i: usize, w: &Watch, t: &Timeline<'_>, events: &Events, f: &mut Findings) {
    let mut by_rev: BTreeMap<i64, Vec<(usize, &WatchEvent)>> = BTreeMap::new();
    for &(j, e) in events {
        by_rev.entry(rev(e)).or_default().push((j, e));
    }
    for (&r, evs) in &by_rev {
        let responses: BTreeSet<usize> = evs.iter().map(|(j, _)| *j).collect();
        if responses.len() > 1 {
            let shown: Vec<String> = responses.iter().map(|j| format!("#{j}")).collect();
            let line = format!(
                "the events of revision {r} arrived in responses {}",
                shown.join(", ")
            );
            f.add(i, Rule::WatchAtomic, line, &evs[0].1.key, r, Vec::new());
        }
    }
    let Some(start) = w.window_start() else {
        return;
    };
    let last = w.last_revision();
    let mut expected: BTreeMap<i64, Vec<&Change>> = BTreeMap::new();
    for (r, c) in t.between(start, last) {
        if w.matches(c.kind(), &c.key) {
            expected.entry(r).or_default().push(c);
        }
    }
    for (r, changes) in expected {
        let got: BTreeSet<&Key> = by_rev
            .get(&r)
            .into_iter()
            .flatten()
            .map(|(_, e)| &e.key)
            .collect();
        let missing: Vec<&Change> = changes
            .into_iter()
            .filter(|c| !got.contains(&c.key))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let shown: Vec<String> = missing.iter().map(|c| describe_change(t, c)).collect();
        let ops: Vec<usize> = missing.iter().map(|c| t.id(c.op)).collect();
        let (rule, line) = if got.is_empty() {
            (
                Rule::WatchReliable,
                format!(
                    "revision {r} (in the window [{start}, {last}]) was not delivered: {}",
                    shown.join("; ")
                ),
            )
        } else {
            let keys: Vec<String> = got.iter().map(|k| show(k)).collect();
            (
                Rule::WatchAtomic,
                format!(
                    "revision {r} was delivered on {} only, without {}",
                    keys.join(", "),
                    shown.join("; ")
                ),
            )
        };
        f.add(i, rule, line, &missing[0].key, r, ops);
    }
}
