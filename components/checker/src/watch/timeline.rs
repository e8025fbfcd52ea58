//! The events of the history: which write changed which key at which
//! revision, as far as the KV history and the watches tell.
//!
//! Contract: [`Timeline::build`] places every write of the original history
//! that applied (see the module doc of `crate::watch`): acknowledged ones at
//! their revision; ones of unknown outcome at the lowest revision a KV
//! response showed one of their values at, else at the first revision a
//! watch event (in watch, response, event order) or an event's prev_kv
//! showed one of their values at, or — for a Delete — the first revision a
//! Delete event of its key showed that no placed write took. A write is
//! placed whole: every key it writes gets a [`Change`] at its revision. A
//! revision taken by a placed write of another op never places an unknown
//! one (the watch's event is then judged invalid). Writes of unknown
//! outcome left unplaced make their keys *unsure* ([`Unsure`]).

use std::collections::{BTreeMap, HashMap};

use crate::history::{History, Key, Kv, Outcome, Request, Response};
use crate::learn::Knowledge;
use crate::project::Projection;
use crate::watch::{EventType, Watch};

/// How the checker knows a write applied at its revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// Acknowledged with this revision.
    Acked,
    /// Outcome unknown; a KV response showed one of its values.
    LearnedKv,
    /// Outcome unknown; an event (or prev_kv) of this watch showed it.
    LearnedWatch(usize),
}

impl Known {
    pub(crate) fn describe(self) -> String {
        match self {
            Known::Acked => "acknowledged".to_string(),
            Known::LearnedKv => "outcome unknown, seen in a KV response".to_string(),
            Known::LearnedWatch(w) => format!("outcome unknown, seen by watch #{w}"),
        }
    }
}

/// One key's change at one revision: one key of a placed write.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub key: Key,
    pub rev: i64,
    /// The value put; None for a delete.
    pub value: Option<Vec<u8>>,
    /// The full KeyValue of a put, when known.
    pub kv: Option<Kv>,
    /// Index of the write in the original history.
    pub op: usize,
}

impl Change {
    pub(crate) fn kind(&self) -> EventType {
        match self.value {
            Some(_) => EventType::Put,
            None => EventType::Delete,
        }
    }
}

/// Writes of unknown outcome on a key that nothing placed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Unsure {
    /// Ops (original indexes) that may have put the key.
    pub puts: Vec<usize>,
    /// Ops that may have deleted it.
    pub deletes: Vec<usize>,
}

/// What a value on a key traces back to.
pub(crate) enum Trace<'a> {
    /// No op wrote this value to any key.
    Nobody,
    /// The op at this original index wrote it to another key.
    OtherKey(usize),
    /// The op wrote it but was reported as not applied.
    NotApplied(usize),
    /// The op's outcome is unknown and nothing placed it.
    Unplaced(usize),
    /// The op applied at `rev`; `change` is its change of the key.
    Placed {
        op: usize,
        rev: i64,
        known: Known,
        change: &'a Change,
    },
}

/// The placed writes.
pub(crate) struct Timeline<'a> {
    pub history: &'a History,
    projection: &'a Projection,
    knowledge: &'a Knowledge,
    changes: Vec<Change>,
    /// Revision → indexes into `changes`.
    by_rev: BTreeMap<i64, Vec<usize>>,
    /// Key → revision → index into `changes` (the first at that revision).
    by_key: HashMap<Key, BTreeMap<i64, usize>>,
    /// Original op index → (revision, how known).
    placed: HashMap<usize, (i64, Known)>,
    unsure: HashMap<Key, Unsure>,
}

/// The keys an op writes and what it writes to each (None: delete).
fn parts(request: &Request) -> Vec<(&Key, Option<&Vec<u8>>)> {
    match request {
        Request::Put { key, value } | Request::Cas { key, value, .. } => vec![(key, Some(value))],
        Request::MultiPut { keys, values } => keys.iter().zip(values.iter().map(Some)).collect(),
        Request::Delete { key } => vec![(key, None)],
        Request::Get { .. } | Request::RangeAll { .. } => Vec::new(),
    }
}

/// The KeyValue a put at `rev` produced, given what it overwrote.
fn put_kv(value: &[u8], rev: i64, prev: Option<&Kv>) -> Kv {
    Kv {
        value: value.to_vec(),
        create_revision: prev.map_or(rev, |p| p.create_revision),
        mod_revision: rev,
        version: prev.map_or(1, |p| p.version + 1),
    }
}

impl<'a> Timeline<'a> {
    /// Places every write (see the module doc).
    pub(crate) fn build(
        history: &'a History,
        projection: &'a Projection,
        knowledge: &'a Knowledge,
        watches: &[Watch],
    ) -> Timeline<'a> {
        let mut t = Timeline {
            history,
            projection,
            knowledge,
            changes: Vec::new(),
            by_rev: BTreeMap::new(),
            by_key: HashMap::new(),
            placed: HashMap::new(),
            unsure: HashMap::new(),
        };
        // The projected parts of each original op.
        let mut parts_of: HashMap<usize, Vec<usize>> = HashMap::new();
        for (p, &m) in projection.origin.iter().enumerate() {
            parts_of.entry(m).or_default().push(p);
        }
        for (m, op) in history.ops.iter().enumerate() {
            let my_parts = parts_of.get(&m).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(rev) = op.acked_write_revision() {
                // The kv of each put, from the prev_kv of its projected part.
                let kvs: HashMap<&Key, Kv> = my_parts
                    .iter()
                    .filter_map(|&p| {
                        let part = &projection.history.ops[p];
                        let value = part.request.written_value()?;
                        let prev = match part.response()? {
                            Response::Put { prev, .. } => prev.as_ref(),
                            Response::Cas { kv, .. } => kv.as_ref(),
                            _ => return None,
                        };
                        Some((part.request.key(), put_kv(value, rev, prev)))
                    })
                    .collect();
                t.place(m, rev, Known::Acked, |key| kvs.get(key).cloned());
            } else if matches!(op.outcome, Outcome::Unknown(_)) {
                let learned: Vec<(&Key, &Kv)> = my_parts
                    .iter()
                    .filter_map(|&p| {
                        let kv = knowledge.learned.get(&p)?;
                        Some((projection.history.ops[p].request.key(), kv))
                    })
                    .collect();
                if let Some(rev) = learned.iter().map(|(_, kv)| kv.mod_revision).min() {
                    let kvs: HashMap<&Key, &Kv> = learned
                        .into_iter()
                        .filter(|(_, kv)| kv.mod_revision == rev)
                        .collect();
                    t.place(m, rev, Known::LearnedKv, |key| {
                        kvs.get(key).cloned().cloned()
                    });
                }
            }
        }
        for (w, watch) in watches.iter().enumerate() {
            for e in watch.responses.iter().flat_map(|r| &r.events) {
                match e.kind {
                    EventType::Put => t.learn_value(&e.key, &e.kv, w),
                    EventType::Delete => t.learn_delete(&e.key, e.kv.mod_revision, w),
                }
                if let Some(prev) = &e.prev_kv {
                    t.learn_value(&e.key, prev, w);
                }
            }
        }
        for (m, op) in history.ops.iter().enumerate() {
            if !matches!(op.outcome, Outcome::Unknown(_)) || t.placed.contains_key(&m) {
                continue;
            }
            for (key, value) in parts(&op.request) {
                let u = t.unsure.entry(key.clone()).or_default();
                match value {
                    Some(_) => u.puts.push(m),
                    None => u.deletes.push(m),
                }
            }
        }
        t.derive_kvs();
        t
    }

    /// Places the original op `m` at `rev`, every key it writes; `kv` gives
    /// the KeyValue of a key's put when known.
    fn place(&mut self, m: usize, rev: i64, known: Known, kv: impl Fn(&Key) -> Option<Kv>) {
        self.placed.insert(m, (rev, known));
        for (key, value) in parts(&self.history.ops[m].request) {
            let i = self.changes.len();
            self.changes.push(Change {
                key: key.clone(),
                rev,
                value: value.cloned(),
                kv: value.and_then(|_| kv(key)),
                op: m,
            });
            self.by_rev.entry(rev).or_default().push(i);
            self.by_key
                .entry(key.clone())
                .or_default()
                .entry(rev)
                .or_insert(i);
        }
    }

    /// Whether a placed write of another op than `m` took `rev`.
    fn taken_by_other(&self, rev: i64, m: Option<usize>) -> bool {
        self.at(rev).any(|c| Some(c.op) != m)
    }

    /// A value seen on `key` at `kv.mod_revision` by watch `w`: places its
    /// writer if its outcome is unknown and nothing placed it yet; fills in
    /// the KeyValue of a placed change at that revision when unknown.
    fn learn_value(&mut self, key: &Key, kv: &Kv, w: usize) {
        let m = match self.trace(key, &kv.value) {
            Trace::Unplaced(m) => m,
            Trace::Placed { rev, change, .. } => {
                if rev == kv.mod_revision && change.kv.is_none() {
                    let i = self.by_key[key][&rev];
                    self.changes[i].kv = Some(kv.clone());
                }
                return;
            }
            Trace::Nobody | Trace::OtherKey(_) | Trace::NotApplied(_) => return,
        };
        let rev = kv.mod_revision;
        if rev <= 0 || self.taken_by_other(rev, Some(m)) {
            return;
        }
        self.place(m, rev, Known::LearnedWatch(w), |k| {
            (k == key).then(|| kv.clone())
        });
    }

    /// A Delete event of `key` at `rev` seen by watch `w`: places the first
    /// unplaced Delete of the key of unknown outcome when no placed write
    /// took `rev`.
    fn learn_delete(&mut self, key: &Key, rev: i64, w: usize) {
        if rev <= 0 || self.by_rev.contains_key(&rev) {
            return;
        }
        let candidate = (0..self.history.ops.len()).find(|&m| {
            let op = &self.history.ops[m];
            matches!(op.outcome, Outcome::Unknown(_))
                && !self.placed.contains_key(&m)
                && matches!(&op.request, Request::Delete { key: k } if k == key)
        });
        if let Some(m) = candidate {
            self.place(m, rev, Known::LearnedWatch(w), |_| None);
        }
    }

    /// Fills the KeyValue of puts from the key's previous change, for keys
    /// with no unplaced write (their chain is complete).
    fn derive_kvs(&mut self) {
        for (key, revs) in &self.by_key {
            if self.unsure.contains_key(key) {
                continue;
            }
            let mut state: Option<Kv> = None;
            for (&rev, &i) in revs {
                let c = &mut self.changes[i];
                match &c.value {
                    None => state = None,
                    Some(value) => {
                        let kv =
                            c.kv.get_or_insert_with(|| put_kv(value, rev, state.as_ref()))
                                .clone();
                        state = Some(kv);
                    }
                }
            }
        }
    }

    /// Traces `value` seen on `key` to its writer.
    pub(crate) fn trace(&self, key: &Key, value: &[u8]) -> Trace<'_> {
        let Some(&p) = self.knowledge.writer.get(value) else {
            return Trace::Nobody;
        };
        let m = self.projection.origin[p];
        if self.projection.history.ops[p].request.key() != key {
            return Trace::OtherKey(m);
        }
        if let Some(&(rev, known)) = self.placed.get(&m) {
            let i = self.by_key[key][&rev];
            let change = &self.changes[i];
            if change.op == m {
                return Trace::Placed {
                    op: m,
                    rev,
                    known,
                    change,
                };
            }
            // Another write of the key took the same revision (a rule 1
            // violation of the KV history): find this op's own change.
            let own = self.by_rev[&rev]
                .iter()
                .map(|&i| &self.changes[i])
                .find(|c| c.op == m && &c.key == key)
                .expect("a placed op has a change per key");
            return Trace::Placed {
                op: m,
                rev,
                known,
                change: own,
            };
        }
        match &self.history.ops[m].outcome {
            Outcome::Unknown(_) => Trace::Unplaced(m),
            _ => Trace::NotApplied(m),
        }
    }

    /// The changes at `rev`.
    pub(crate) fn at(&self, rev: i64) -> impl Iterator<Item = &Change> {
        self.by_rev
            .get(&rev)
            .into_iter()
            .flatten()
            .map(|&i| &self.changes[i])
    }

    /// The changes at revisions in [from, to], by revision.
    pub(crate) fn between(&self, from: i64, to: i64) -> impl Iterator<Item = (i64, &Change)> {
        let range = from..(to + 1).max(from);
        let changes = &self.changes;
        self.by_rev
            .range(range)
            .flat_map(move |(&rev, is)| is.iter().map(move |&i| (rev, &changes[i])))
    }

    /// The last change of `key` below `rev`.
    pub(crate) fn before(&self, key: &Key, rev: i64) -> Option<&Change> {
        let revs = self.by_key.get(key)?;
        revs.range(..rev)
            .next_back()
            .map(|(_, &i)| &self.changes[i])
    }

    /// The revision op `m` applied at, and how that is known.
    pub(crate) fn placement(&self, m: usize) -> Option<(i64, Known)> {
        self.placed.get(&m).copied()
    }

    /// The unplaced writes of unknown outcome on `key`.
    pub(crate) fn unsure(&self, key: &Key) -> Option<&Unsure> {
        self.unsure.get(key)
    }

    /// Ops of unknown outcome placed by watch events.
    pub(crate) fn learned_from_watches(&self) -> usize {
        self.placed
            .values()
            .filter(|(_, k)| matches!(k, Known::LearnedWatch(_)))
            .count()
    }

    /// The original op's id.
    pub(crate) fn id(&self, m: usize) -> usize {
        self.history.ops[m].id
    }
}
