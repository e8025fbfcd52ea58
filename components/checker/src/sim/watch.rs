//! Watch streams derived from a simulated [`Store`]'s full history —
//! correct ones, and deliberately broken ones — for testing the watch
//! checker ([`crate::check_watches`]).
//!
//! Contract: [`stream`] answers a watch request (a [`Watch`] whose
//! responses are ignored) as etcd would after the run: a created response
//! at [`StreamConfig::created_at`], then — unless the start revision is
//! below [`StreamConfig::compacted`], which cancels the watch as compacted
//! — every change of the store in the range passing the filters, from the
//! start revision (for start 0: from created_at + 1) up to
//! [`StreamConfig::until`] (default: the store's revision), in revision
//! order, whole revisions batched into responses at random, prev_kv as
//! etcd fills it (absent for a create event, or when the revision before
//! is compacted), progress notifications at random revision boundaries
//! when the watch asks for them, and — when the stream is not cut by
//! `until` — a final answer to a RequestProgress at the store's revision.
//! [`break_stream`] then breaks a stream in one [`WatchBreak`] way and
//! says which rule must catch it. Deterministic given the seed.
//!
//! A dropped event of a write of unknown outcome is caught only when
//! something else (another watch, a KV read) saw that write: tests break
//! one of two watches over the same keys.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Store;
use crate::history::Kv;
use crate::report::Rule;
use crate::watch::{EventType, Watch, WatchEvent, WatchResponse};

/// How [`stream`] answers a watch.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Seed of the batching and progress notifications.
    pub seed: u64,
    /// The store's revision when the watch was created (the created
    /// response's header); 0 = the store's revision at the end.
    pub created_at: i64,
    /// The last revision delivered before the stream broke; None: the
    /// stream is whole and ends with a RequestProgress answer.
    pub until: Option<i64>,
    /// The revision the store was compacted at (0 = never).
    pub compacted: i64,
    /// Chance in percent of a progress notification after each revision,
    /// when the watch asks for them.
    pub progress_percent: u32,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            seed: 1,
            created_at: 0,
            until: None,
            compacted: 0,
            progress_percent: 15,
        }
    }
}

/// The events of `request` at `revision`.
fn events_at(store: &Store, request: &Watch, revision: i64, compacted: i64) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    for (key, kv) in store.changes_at(revision) {
        let kind = match kv {
            Some(_) => EventType::Put,
            None => EventType::Delete,
        };
        if !request.matches(kind, &key) {
            continue;
        }
        let create = kv.as_ref().is_some_and(|kv| kv.version == 1);
        let prev_kv = if request.prev_kv && !create && revision > compacted {
            store.read_at(&key, revision - 1)
        } else {
            None
        };
        let kv = kv.unwrap_or(Kv {
            value: Vec::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
        });
        out.push(WatchEvent {
            kind,
            key,
            kv,
            prev_kv,
        });
    }
    out
}

/// A correct stream answering `request` (see the module doc).
pub fn stream(store: &Store, request: &Watch, config: &StreamConfig) -> Watch {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut out = Watch {
        responses: Vec::new(),
        ..request.clone()
    };
    let end = store.revision();
    let now = match config.created_at {
        0 => end,
        at => at.min(end),
    };
    out.responses.push(WatchResponse {
        revision: now,
        created: true,
        ..WatchResponse::default()
    });
    let start = request.start_revision;
    if start > 0 && start < config.compacted {
        out.responses.push(WatchResponse {
            revision: now,
            canceled: true,
            compact_revision: config.compacted,
            ..WatchResponse::default()
        });
        return out;
    }
    let from = if start == 0 { now + 1 } else { start };
    let to = config.until.map_or(end, |u| u.min(end));
    let mut pending: Vec<WatchEvent> = Vec::new();
    let flush = |pending: &mut Vec<WatchEvent>, responses: &mut Vec<WatchResponse>| {
        if !pending.is_empty() {
            responses.push(WatchResponse {
                revision: end,
                events: std::mem::take(pending),
                ..WatchResponse::default()
            });
        }
    };
    for revision in from..=to {
        let events = events_at(store, request, revision, config.compacted);
        if !events.is_empty() {
            pending.extend(events);
            if rng.gen_bool(0.5) {
                flush(&mut pending, &mut out.responses);
            }
        }
        if request.progress_notify && rng.gen_range(0..100) < config.progress_percent {
            flush(&mut pending, &mut out.responses);
            out.responses.push(WatchResponse {
                revision,
                progress: true,
                ..WatchResponse::default()
            });
        }
    }
    flush(&mut pending, &mut out.responses);
    if config.until.is_none() {
        out.responses.push(WatchResponse {
            revision: end,
            progress: true,
            requested: true,
            ..WatchResponse::default()
        });
    }
    out
}

/// A deliberate defect of a watch stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchBreak {
    /// One event left out — reliable (atomic when its revision has other
    /// events in the watch).
    DropEvent,
    /// One event delivered twice in a row — unique.
    DuplicateEvent,
    /// The events of one revision split over two responses — atomic.
    SplitRevision,
    /// Two neighbouring events of different revisions swapped — ordered.
    Reorder,
    /// A Put event's prev_kv replaced by its own kv (read at the event's
    /// revision instead of the one before) — prev_kv.
    WrongPrevKv,
    /// A progress notification at the highest revision of a response with
    /// events, inserted before it — bookmarkable.
    EarlyProgress,
}

impl WatchBreak {
    /// Every defect.
    pub const ALL: [WatchBreak; 6] = [
        WatchBreak::DropEvent,
        WatchBreak::DuplicateEvent,
        WatchBreak::SplitRevision,
        WatchBreak::Reorder,
        WatchBreak::WrongPrevKv,
        WatchBreak::EarlyProgress,
    ];
}

/// (response, event) positions of every event of `w`, in stream order.
fn positions(w: &Watch) -> Vec<(usize, usize)> {
    w.responses
        .iter()
        .enumerate()
        .flat_map(|(j, r)| (0..r.events.len()).map(move |k| (j, k)))
        .collect()
}

fn at(w: &Watch, (j, k): (usize, usize)) -> &WatchEvent {
    &w.responses[j].events[k]
}

/// Breaks `w` in the way `how` (the choice among candidates drawn from
/// `seed`); returns the rule that must catch it, or None when the stream
/// offers no place to break it that way (w is then unchanged).
pub fn break_stream(w: &mut Watch, how: WatchBreak, seed: u64) -> Option<Rule> {
    let mut rng = StdRng::seed_from_u64(seed);
    let all = positions(w);
    let rev = |w: &Watch, p| at(w, p).kv.mod_revision;
    let mut pick = |candidates: Vec<(usize, usize)>| -> Option<(usize, usize)> {
        (!candidates.is_empty()).then(|| candidates[rng.gen_range(0..candidates.len())])
    };
    match how {
        WatchBreak::DropEvent => {
            let last = w.last_revision();
            let count = |r: i64| all.iter().filter(|p| rev(w, **p) == r).count();
            let due: Vec<(usize, usize)> =
                all.iter().copied().filter(|p| rev(w, *p) < last).collect();
            let alone: Vec<(usize, usize)> = due
                .iter()
                .copied()
                .filter(|p| count(rev(w, *p)) == 1)
                .collect();
            let rule = if alone.is_empty() {
                Rule::WatchAtomic
            } else {
                Rule::WatchReliable
            };
            let (j, k) = pick(if alone.is_empty() { due } else { alone })?;
            let r = &mut w.responses[j];
            r.events.remove(k);
            if r.events.is_empty() && !(r.created || r.canceled || r.progress) {
                w.responses.remove(j);
            }
            Some(rule)
        }
        WatchBreak::DuplicateEvent => {
            let (j, k) = pick(all)?;
            let e = w.responses[j].events[k].clone();
            w.responses[j].events.insert(k + 1, e);
            Some(Rule::WatchUnique)
        }
        WatchBreak::SplitRevision => {
            let split: Vec<(usize, usize)> = all
                .iter()
                .copied()
                .filter(|&(j, k)| k > 0 && rev(w, (j, k)) == rev(w, (j, k - 1)))
                .collect();
            let (j, k) = pick(split)?;
            let tail = w.responses[j].events.split_off(k);
            let response = WatchResponse {
                events: tail,
                ..w.responses[j].clone()
            };
            w.responses.insert(j + 1, response);
            Some(Rule::WatchAtomic)
        }
        WatchBreak::Reorder => {
            let pairs: Vec<usize> = (1..all.len())
                .filter(|&n| rev(w, all[n - 1]) != rev(w, all[n]))
                .collect();
            let n = pick(pairs.into_iter().map(|n| (n, 0)).collect())?.0;
            let (a, b) = (all[n - 1], all[n]);
            let first = at(w, a).clone();
            let second = std::mem::replace(&mut w.responses[b.0].events[b.1], first);
            w.responses[a.0].events[a.1] = second;
            Some(Rule::WatchOrdered)
        }
        WatchBreak::WrongPrevKv => {
            let candidates: Vec<(usize, usize)> = all
                .iter()
                .copied()
                .filter(|p| at(w, *p).kind == EventType::Put && at(w, *p).prev_kv.is_some())
                .collect();
            let (j, k) = pick(candidates)?;
            let e = &mut w.responses[j].events[k];
            e.prev_kv = Some(e.kv.clone());
            Some(Rule::WatchPrevKv)
        }
        WatchBreak::EarlyProgress => {
            let with_events: Vec<(usize, usize)> = (0..w.responses.len())
                .filter(|&j| !w.responses[j].events.is_empty())
                .map(|j| (j, 0))
                .collect();
            let (j, _) = pick(with_events)?;
            let top = w.responses[j]
                .events
                .iter()
                .map(|e| e.kv.mod_revision)
                .max()
                .unwrap_or(0);
            let progress = WatchResponse {
                revision: top,
                progress: true,
                requested: !w.progress_notify,
                ..WatchResponse::default()
            };
            w.responses.insert(j, progress);
            Some(Rule::WatchBookmarkable)
        }
    }
}
