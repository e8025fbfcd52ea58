//! What a check found: [`Violation`]s, per-key linearizability results and
//! the combined [`Report`].
//!
//! Contract: every violation names the [`Rule`] it breaks, the keys,
//! revisions and op ids involved and a paragraph a developer can act on.
//! [`Report::is_ok`] is true only when nothing was violated and no key was
//! inconclusive (callers treat inconclusive as failure). `Display` prints a
//! summary and the violations (the first 30 in full).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{show, History, Key, Outcome, Response};
use crate::watch::WatchSummary;

/// The rule a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rule {
    /// No linearization of one key's operations exists.
    Linearizability,
    /// A value of a write reported as not applied (Failed, or a Cas whose
    /// compare failed) was observed.
    FailedWriteObserved,
    /// An observed value was written by no operation (of that key).
    UnknownValue,
    /// One write's value observed at two revisions, or at a revision other
    /// than the one its response reported.
    AppliedTwice,
    /// Rule 1: two writes (two ops, not the puts of one MultiPut) took the
    /// same revision.
    UniqueRevision,
    /// Rule 2: header revisions go backwards in real time.
    RealTimeOrder,
    /// Rule 3: a read does not show the state at its header revision.
    ReadState,
    /// Rule 4: prev_kv / version / create_revision chain broken.
    VersionChain,
    /// Rule 4: two writes overwrote the same version.
    Fork,
    /// Rule 5: an acknowledged write is not in the store at its revision.
    LostWrite,
    /// Rule 6: a MultiPut applied in pieces (at several revisions, or on
    /// some keys only), or a RangeAll saw part of one.
    MultiKeyAtomicity,
    /// A re-read the plan asked for was not supplied (a driver bug).
    MissingReread,
    /// Watch: event revisions decrease along a stream, the created
    /// response is not first, or something follows a cancel.
    WatchOrdered,
    /// Watch: one (key, mod_revision) delivered twice by one watch.
    WatchUnique,
    /// Watch: one revision's events split over responses, or delivered in
    /// part.
    WatchAtomic,
    /// Watch: a revision of the history in the watch's window not
    /// delivered.
    WatchReliable,
    /// Watch: an event that is no write of the history at its revision.
    WatchValid,
    /// Watch: an event at or below a progress notification's revision
    /// after it, or a progress notification going backwards.
    WatchBookmarkable,
    /// Watch: a wrong, or unasked-for, prev_kv.
    WatchPrevKv,
    /// Watch: an event outside the range or against the filters.
    WatchFiltered,
    /// Watch: an event below the start revision, a wrong compaction
    /// cancel, or a resumed watch leaving a gap.
    WatchResumable,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Rule::Linearizability => "linearizability",
            Rule::FailedWriteObserved => "failed write observed",
            Rule::UnknownValue => "unknown value",
            Rule::AppliedTwice => "applied twice",
            Rule::UniqueRevision => "rule 1: unique revisions",
            Rule::RealTimeOrder => "rule 2: real-time revision order",
            Rule::ReadState => "rule 3: read shows the state at its revision",
            Rule::VersionChain => "rule 4: version chain",
            Rule::Fork => "rule 4: fork",
            Rule::LostWrite => "rule 5: acknowledged write lost",
            Rule::MultiKeyAtomicity => "rule 6: multi-key atomicity",
            Rule::MissingReread => "missing re-read",
            Rule::WatchOrdered => "watch: ordered",
            Rule::WatchUnique => "watch: unique",
            Rule::WatchAtomic => "watch: atomic",
            Rule::WatchReliable => "watch: reliable",
            Rule::WatchValid => "watch: valid events",
            Rule::WatchBookmarkable => "watch: bookmarkable",
            Rule::WatchPrevKv => "watch: prev_kv",
            Rule::WatchFiltered => "watch: filtered",
            Rule::WatchResumable => "watch: resumable",
        };
        f.write_str(s)
    }
}

/// One violation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The rule broken.
    pub rule: Rule,
    /// Keys involved.
    pub keys: Vec<Key>,
    /// Revisions involved.
    pub revisions: Vec<i64>,
    /// Ids of the operations involved.
    pub ops: Vec<usize>,
    /// What happened, for a developer.
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self.keys.iter().map(|k| show(k)).collect();
        write!(
            f,
            "[{}] keys {} revisions {:?} ops {:?}\n    {}",
            self.rule,
            keys.join(","),
            self.revisions,
            self.ops,
            self.explanation.replace('\n', "\n    ")
        )
    }
}

/// Linearizability result for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Ok,
    /// None exists.
    Violation(Violation),
    /// The search budget ran out; treat as failure.
    Inconclusive(String),
}

/// The linearizability check of one key.
#[derive(Clone, Debug)]
pub struct KeyCheck {
    /// The key.
    pub key: Key,
    /// Operations searched (after dropping failed ops, serializable reads
    /// and unobserved writes of unknown outcome).
    pub ops: usize,
    /// The result.
    pub verdict: Verdict,
    /// Search steps.
    pub steps: u64,
    /// Search time.
    pub elapsed: Duration,
}

/// The result of a check.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Operations in the history.
    pub ops: usize,
    /// With outcome Ok.
    pub ok: usize,
    /// With outcome Failed.
    pub failed: usize,
    /// With outcome Unknown.
    pub unknown: usize,
    /// Writes of unknown outcome learned to have applied.
    pub learned: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Acknowledged MultiPuts.
    pub multi_puts: usize,
    /// Keys written by acknowledged MultiPuts (summed).
    pub multi_put_keys: usize,
    /// RangeAlls with outcome Ok.
    pub range_alls: usize,
    /// Keys returned by those RangeAlls (summed).
    pub range_all_keys: usize,
    /// Whether linearizability was checked, and per key how it went.
    pub linearizability: Option<Vec<KeyCheck>>,
    /// Whether the revision rules were checked (with how many re-reads).
    pub rereads: Option<usize>,
    /// Whether watches were checked ([`crate::check_watches`]), and what.
    pub watches: Option<WatchSummary>,
    /// Violations other than per-key linearizability ones.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Counts the ops of `history` (the original) and the keys of
    /// `projected` (its projection onto single-key ops).
    pub(crate) fn new(history: &History, projected: &History, learned: usize) -> Report {
        let mut r = Report {
            ops: history.ops.len(),
            learned,
            ..Report::default()
        };
        for op in &history.ops {
            match &op.outcome {
                Outcome::Ok(Response::MultiPut { prevs, .. }) => {
                    r.multi_puts += 1;
                    r.multi_put_keys += prevs.len();
                }
                Outcome::Ok(Response::RangeAll { kvs, .. }) => {
                    r.range_alls += 1;
                    r.range_all_keys += kvs.len();
                }
                _ => {}
            }
            match op.outcome {
                Outcome::Ok(_) => r.ok += 1,
                Outcome::Failed(_) => r.failed += 1,
                Outcome::Unknown(_) => r.unknown += 1,
            }
        }
        let keys: std::collections::HashSet<&Key> =
            projected.ops.iter().map(|op| op.request.key()).collect();
        r.keys = keys.len();
        r
    }

    /// No violation and no inconclusive key.
    pub fn is_ok(&self) -> bool {
        self.all_violations().next().is_none() && self.inconclusive().next().is_none()
    }

    /// Every violation, linearizability ones first.
    pub fn all_violations(&self) -> impl Iterator<Item = &Violation> {
        self.linearizability
            .iter()
            .flatten()
            .filter_map(|k| match &k.verdict {
                Verdict::Violation(v) => Some(v),
                _ => None,
            })
            .chain(self.violations.iter())
    }

    /// Keys whose search ran out of budget, with the reason.
    pub fn inconclusive(&self) -> impl Iterator<Item = (&Key, &str)> {
        self.linearizability
            .iter()
            .flatten()
            .filter_map(|k| match &k.verdict {
                Verdict::Inconclusive(why) => Some((&k.key, why.as_str())),
                _ => None,
            })
    }

    /// Whether some violation breaks `rule`.
    pub fn violates(&self, rule: Rule) -> bool {
        self.all_violations().any(|v| v.rule == rule)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "history: {} ops ({} ok, {} failed, {} unknown; {} unknown writes learned to have applied) over {} keys",
            self.ops, self.ok, self.failed, self.unknown, self.learned, self.keys
        )?;
        if self.multi_puts + self.range_alls > 0 {
            writeln!(
                f,
                "multi-key: {} MultiPuts acknowledged ({} keys), {} RangeAlls ok ({} keys returned)",
                self.multi_puts, self.multi_put_keys, self.range_alls, self.range_all_keys
            )?;
        }
        match &self.linearizability {
            None => writeln!(f, "linearizability: not checked")?,
            Some(keys) => {
                for k in keys {
                    let v = match &k.verdict {
                        Verdict::Ok => "ok".to_string(),
                        Verdict::Violation(_) => "VIOLATION".to_string(),
                        Verdict::Inconclusive(why) => format!("INCONCLUSIVE ({why})"),
                    };
                    writeln!(
                        f,
                        "linearizability of key {}: {v} ({} ops, {} steps, {:.1} ms)",
                        show(&k.key),
                        k.ops,
                        k.steps,
                        k.elapsed.as_secs_f64() * 1e3
                    )?;
                }
            }
        }
        match self.rereads {
            None => writeln!(f, "revision rules: not checked")?,
            Some(n) => writeln!(f, "revision rules: checked ({n} re-reads)")?,
        }
        if let Some(w) = &self.watches {
            writeln!(
                f,
                "watches: {} checked ({} responses, {} events, {} progress notifications; {} unknown writes placed by their events)",
                w.watches, w.responses, w.events, w.progress, w.learned
            )?;
        }
        let all: Vec<&Violation> = self.all_violations().collect();
        if all.is_empty() {
            let verdict = if self.is_ok() { "OK" } else { "NOT OK" };
            return writeln!(f, "no violations: {verdict}");
        }
        writeln!(f, "{} violations:", all.len())?;
        for v in all.iter().take(30) {
            writeln!(f, "  {v}")?;
        }
        if all.len() > 30 {
            writeln!(f, "  ... and {} more", all.len() - 30)?;
        }
        Ok(())
    }
}
