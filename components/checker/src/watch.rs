//! Watch streams recorded next to a KV [`History`], and their check against
//! it ([`check_watches`]), after etcd's robustness test's watch validation
//! and etcd's documented watch guarantees.
//!
//! Contract — the recording. A [`Watch`] is one watch of one client: its
//! request (range, start revision, options) and every [`WatchResponse`] it
//! received, in order. The range follows etcd: `range_end` empty = the key
//! `key` alone; `range_end` = "\0" = every key >= `key`; otherwise
//! [`key`, `range_end`) (empty when `range_end` <= `key`).
//! `start_revision` 0 = "from now". A fragmented response is recorded
//! reassembled, as one response. A progress notification is a response
//! with `progress` set, no events, neither created nor canceled, its header
//! revision the revision it vouches for; the answer to a stream-level
//! RequestProgress (etcd's watch_id -1) is recorded as such a response in
//! every watch of that stream, with `requested` set too. A Delete event's
//! `kv` is etcd's: the key and mod_revision only (empty value, version 0,
//! create_revision 0). `resumed_from` names the earlier watch (its index in
//! the slice) this one resumes after a broken stream: same range and
//! options, start revision > 0 (see [`Watch::resume_revision`]). A
//! recording that breaks these shapes is a
//! [`HistoryError::MalformedWatch`].
//!
//! Contract — the events of the history. The KV history is projected onto
//! single-key writes (`crate::project`) and its observations learned from
//! (`crate::learn`, no re-reads). A write *applied at R* produces one event
//! per key it changed at R: an acknowledged Put, Cas that succeeded,
//! MultiPut (one Put event per key, all at one revision) or Delete that
//! deleted something, at its response's revision; a write of unknown
//! outcome once some observation places it — a KV response showing one of
//! its values (at that mod_revision), or a watch event (or a watch event's
//! prev_kv) showing one of its values, or a Delete event of its key at a
//! revision no known write took. A placed write counts with *all* its keys
//! at that one revision, for every watch (a revision is all or nothing,
//! and one watch's sighting binds every other watch). A write of unknown
//! outcome that nothing places is optional: its events may be missing, and
//! a watch that delivers one places it. Failed writes, Cas that compared
//! false and Deletes of nothing produce no event. The full KeyValue of an
//! event is known from the write's own prev_kv (acknowledged), from the
//! observed KeyValue (learned), else from the key's previous change when
//! every write of the key is placed.
//!
//! Contract — the rules (each a [`Rule`](crate::Rule), one
//! [`Violation`](crate::Violation) per watch and rule, its explanation
//! starting with "watch #i", listing the offending revisions, its `ops`
//! the ids of the history's writes involved). A watch's *window* is
//! [S, L]: S = its start_revision, or for start 0 the smallest of its
//! created response's header + 1, the header + 1 of a progress
//! notification received first, and its first event's revision (etcd may
//! deliver events at or below the created header, and then owes every one
//! from there on); L = the highest revision it has seen, the highest of
//! its events' and progress notifications' revisions
//! ([`Watch::last_revision`]; [`Watch::window_start`] gives S).
//! - ordered: event revisions never decrease along the stream (the key
//!   order inside one revision is free; a repeated (revision, key) is
//!   unique's); the created response comes first; nothing follows a
//!   canceled response;
//! - unique: no (key, mod_revision) is delivered twice in one watch;
//! - atomic: the events of one revision arrive in one response, and a
//!   revision is delivered whole: when one event of revision R is
//!   delivered, every event of the history at R in the range (passing the
//!   filters) is;
//! - reliable: every event of the history in the range, passing the
//!   filters, at a revision in [S, L] is delivered (a revision missing
//!   whole; part of one is atomic's);
//! - valid: every event is a write of the history applied at its
//!   mod_revision on its key with its value (a Delete: a delete of the key
//!   at that revision), with a sane version/create_revision equal to the
//!   write's where known and the same in every watch;
//! - bookmarkable: a progress notification at P comes after every event
//!   <= P (no event <= P after it) and is not below an earlier progress
//!   notification or event of the stream;
//! - prev_kv: with prev_kv, an event's prev_kv is the key's KeyValue just
//!   before the event's revision per the history (absent if the key did
//!   not exist then); absent is also accepted when R-1 is below the
//!   compaction revision given to [`check_watches`] (etcd's lookup at R-1
//!   fails then) or a Delete of the key of unknown outcome may explain it.
//!   Without prev_kv, no event carries one;
//! - filtered: no event outside the range, no Put event with no_put, no
//!   Delete event with no_delete;
//! - resumable: with start S > 0, no event below S; a canceled response
//!   with compact_revision C only when S < C <= the compaction revision
//!   (never for start 0); a watch resumed from watch #p (`resumed_from`)
//!   at S continues it: if S is above #p's L + 1, no event of the history
//!   in the range lies in [L + 1, S - 1] (the chain delivered neither).
//!   Each watch of a chain is otherwise checked as its own watch from its S.
//!
//! Only watch rules are reported ([`check`](crate::check) reports the KV
//! history's own violations); `Report::watches` counts what was checked.

use serde::{Deserialize, Serialize};

use crate::bytes_repr;
use crate::error::HistoryError;
use crate::history::{show, History, Key, Kv};
use crate::report::Report;
use crate::{learn, project};

mod rules;
mod timeline;

/// The type of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A put (create or update) of the key.
    Put,
    /// A delete of the key.
    Delete,
}

/// One event of a watch response (etcd's `mvccpb.Event`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// Put or Delete.
    pub kind: EventType,
    /// The key.
    #[serde(with = "bytes_repr")]
    pub key: Key,
    /// The KeyValue; for a Delete, only mod_revision (etcd's format).
    pub kv: Kv,
    /// The KeyValue before the event, when the watch asked for prev_kv.
    pub prev_kv: Option<Kv>,
}

/// One response of a watch stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchResponse {
    /// header.revision.
    pub revision: i64,
    /// The response confirming the watch's creation.
    pub created: bool,
    /// The watch was canceled (by the server, or for compaction).
    pub canceled: bool,
    /// Set with `canceled` when the start revision was compacted.
    pub compact_revision: i64,
    /// A progress notification: no events, every event <= `revision` sent.
    pub progress: bool,
    /// With `progress`: the answer to a stream-level RequestProgress.
    pub requested: bool,
    /// The events, in order.
    pub events: Vec<WatchEvent>,
}

/// One watch: the request and every response received, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Watch {
    /// The client that opened it (for reports).
    pub client: usize,
    /// Which endpoint served it (free text, for reports).
    pub endpoint: String,
    /// The first key of the range.
    #[serde(with = "bytes_repr")]
    pub key: Key,
    /// etcd's range_end: empty = `key` alone, "\0" = every key >= `key`.
    #[serde(with = "bytes_repr")]
    pub range_end: Key,
    /// The first revision wanted; 0 = from now.
    pub start_revision: i64,
    /// Events carry prev_kv.
    pub prev_kv: bool,
    /// Put events filtered out.
    pub no_put: bool,
    /// Delete events filtered out.
    pub no_delete: bool,
    /// Periodic progress notifications asked for.
    pub progress_notify: bool,
    /// Index of the watch this one resumes after a broken stream.
    pub resumed_from: Option<usize>,
    /// The responses, in order.
    pub responses: Vec<WatchResponse>,
}

/// What [`check_watches`] looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchSummary {
    /// Watches.
    pub watches: usize,
    /// Responses, progress notifications included.
    pub responses: usize,
    /// Events.
    pub events: usize,
    /// Progress notifications.
    pub progress: usize,
    /// Writes of unknown outcome placed by watch events.
    pub learned: usize,
}

/// etcd's range end for every key starting with `prefix` ("\0" when no
/// key is above all of them).
pub fn prefix_end(prefix: &[u8]) -> Key {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Watch {
    /// A watch of `key` alone from `start_revision` (0 = now).
    pub fn key(key: &[u8], start_revision: i64) -> Watch {
        Watch {
            key: key.to_vec(),
            start_revision,
            ..Watch::default()
        }
    }

    /// A watch of every key starting with `prefix` from `start_revision`.
    pub fn prefix(prefix: &[u8], start_revision: i64) -> Watch {
        Watch {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            start_revision,
            ..Watch::default()
        }
    }

    /// Whether `key` is in the watched range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self.range_end.as_slice() {
            [] => key == self.key.as_slice(),
            [0] => key >= self.key.as_slice(),
            end => key >= self.key.as_slice() && key < end,
        }
    }

    /// Whether the watch delivers an event of this type on `key` (range and
    /// filters).
    pub fn matches(&self, kind: EventType, key: &[u8]) -> bool {
        self.contains(key)
            && match kind {
                EventType::Put => !self.no_put,
                EventType::Delete => !self.no_delete,
            }
    }

    /// The highest revision the watch has seen: of its events and progress
    /// notifications (0 when none).
    pub fn last_revision(&self) -> i64 {
        self.responses
            .iter()
            .flat_map(|r| {
                let progress = r.progress.then_some(r.revision);
                r.events.iter().map(|e| e.kv.mod_revision).chain(progress)
            })
            .max()
            .unwrap_or(0)
    }

    /// Where a watch resuming this one after a broken stream starts: the
    /// last revision seen + 1; with nothing seen, the start revision, or
    /// for start 0 the created response's header + 1 (None without one).
    pub fn resume_revision(&self) -> Option<i64> {
        let last = self.last_revision();
        if last > 0 {
            return Some(last + 1);
        }
        if self.start_revision > 0 {
            return Some(self.start_revision);
        }
        self.responses
            .iter()
            .find(|r| r.created)
            .map(|r| r.revision + 1)
    }

    /// The first revision whose events the watch owes (see the module doc),
    /// None when nothing tells (start 0, no created response, no event and
    /// no progress notification first).
    pub fn window_start(&self) -> Option<i64> {
        if self.start_revision > 0 {
            return Some(self.start_revision);
        }
        let created = self.responses.iter().find(|r| r.created);
        let first_progress = self
            .responses
            .iter()
            .find(|r| !r.created)
            .filter(|r| r.progress);
        let first_event = self
            .responses
            .iter()
            .flat_map(|r| &r.events)
            .map(|e| e.kv.mod_revision)
            .next();
        [
            created.map(|r| r.revision + 1),
            first_progress.map(|r| r.revision + 1),
            first_event,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// One line describing the watch for reports.
    pub fn describe(&self) -> String {
        let range = match self.range_end.as_slice() {
            [] => format!("key {}", show(&self.key)),
            [0] => format!("keys >= {}", show(&self.key)),
            end => format!("range [{}, {})", show(&self.key), show(end)),
        };
        let start = match self.start_revision {
            0 => "from now".to_string(),
            s => format!("from revision {s}"),
        };
        let mut options = Vec::new();
        for (on, name) in [
            (self.prev_kv, "prev_kv"),
            (self.no_put, "no_put"),
            (self.no_delete, "no_delete"),
            (self.progress_notify, "progress_notify"),
        ] {
            if on {
                options.push(name.to_string());
            }
        }
        if let Some(p) = self.resumed_from {
            options.push(format!("resumes watch #{p}"));
        }
        let options = if options.is_empty() {
            String::new()
        } else {
            format!(" [{}]", options.join(", "))
        };
        format!(
            "client {} via {:?}: {range} {start}{options}, {} responses",
            self.client,
            self.endpoint,
            self.responses.len()
        )
    }
}

impl WatchEvent {
    /// One short line for reports: `Put "k"={"v" ver=1 create=2 mod=2}`.
    pub fn describe(&self) -> String {
        match self.kind {
            EventType::Put => format!("Put {}={}", show(&self.key), self.kv),
            EventType::Delete => {
                format!("Delete {}@{}", show(&self.key), self.kv.mod_revision)
            }
        }
    }
}

/// Serializes watches as pretty JSON.
pub fn to_json(watches: &[Watch]) -> Result<String, HistoryError> {
    Ok(serde_json::to_string_pretty(watches)?)
}

/// Parses watches written by [`to_json`].
pub fn from_json(text: &str) -> Result<Vec<Watch>, HistoryError> {
    Ok(serde_json::from_str(text)?)
}

/// Checks the shapes the watch checker relies on (see the module doc).
pub fn validate(watches: &[Watch]) -> Result<(), HistoryError> {
    for (i, w) in watches.iter().enumerate() {
        let malformed = |reason: String| HistoryError::MalformedWatch { watch: i, reason };
        if w.start_revision < 0 {
            return Err(malformed(format!(
                "negative start revision {}",
                w.start_revision
            )));
        }
        for (j, r) in w.responses.iter().enumerate() {
            if r.progress && (!r.events.is_empty() || r.created || r.canceled) {
                return Err(malformed(format!(
                    "response #{j} is a progress notification with events or created/canceled set"
                )));
            }
            if r.requested && !r.progress {
                return Err(malformed(format!(
                    "response #{j} answers a RequestProgress but is not a progress notification"
                )));
            }
            if r.compact_revision != 0 && !r.canceled {
                return Err(malformed(format!(
                    "response #{j} has compact_revision {} but is not canceled",
                    r.compact_revision
                )));
            }
        }
        if let Some(p) = w.resumed_from {
            let Some(prior) = watches.get(p).filter(|_| p < i) else {
                return Err(malformed(format!(
                    "resumed_from #{p} does not name an earlier watch"
                )));
            };
            let same = (&prior.key, &prior.range_end, prior.prev_kv, prior.no_put)
                == (&w.key, &w.range_end, w.prev_kv, w.no_put)
                && prior.no_delete == w.no_delete;
            if !same {
                return Err(malformed(format!(
                    "resumes watch #{p} with another range or other options"
                )));
            }
            if w.start_revision == 0 {
                return Err(malformed(format!(
                    "resumes watch #{p} from now (start revision 0)"
                )));
            }
        }
    }
    Ok(())
}

/// Checks `watches`, recorded next to `history`, against it (see the
/// module doc); `compacted` is the highest revision the run compacted the
/// store at (0 = never). Only watch rules are reported.
pub fn check_watches(
    history: &History,
    watches: &[Watch],
    compacted: i64,
) -> Result<Report, HistoryError> {
    history.validate()?;
    validate(watches)?;
    let projection = project::project(history);
    let knowledge = learn::learn(&projection.history, None);
    let mut report = Report::new(history, &projection.history, knowledge.learned.len());
    let timeline = timeline::Timeline::build(history, &projection, &knowledge, watches);
    let mut findings = rules::Findings::default();
    for (i, w) in watches.iter().enumerate() {
        rules::check_watch(i, w, watches, &timeline, compacted, &mut findings);
    }
    report.violations = findings.into_violations(watches);
    let responses = watches.iter().flat_map(|w| &w.responses);
    report.watches = Some(WatchSummary {
        watches: watches.len(),
        responses: responses.clone().count(),
        events: responses.clone().map(|r| r.events.len()).sum(),
        progress: responses.filter(|r| r.progress).count(),
        learned: timeline.learned_from_watches(),
    });
    Ok(report)
}
