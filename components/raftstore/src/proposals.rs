//! The proposals a replica has put in its raft log and still owes an
//! answer, and what each answer claims.
//!
//! Every proposal is answered exactly once, with one of:
//! * its entry's result once the entry at its index applies with its term
//!   (the [`Applied`] index and revision, or the error apply found: epoch,
//!   term or revision refused — not applied, on every replica alike);
//! * `StaleCommand` — **did not apply, never will**: the entry applied at
//!   its index has another term (a committed slot is final), or raft-rs
//!   turned a membership change it refused into an empty entry;
//! * `OutcomeUnknown` — **may or may not apply**: the replica can no longer
//!   learn its fate. When a snapshot replaces the log past it (the snapshot
//!   may hold it), when the replica stops, and when after a term change the
//!   local log no longer holds it at its index: a new leader's entries
//!   replaced it here, but other replicas may still hold it and a later
//!   leader may commit it (with five replicas that is possible even though
//!   this one lost it). Answering those at once, rather than when the slot
//!   applies, frees what the proposer holds for them (latches, in-flight
//!   revisions) as soon as nothing here can tell more.
//!
//! Proposals are kept in index order (a replica appends at the end of its
//! log); a proposal's index is answered when that index applies, and every
//! proposal below it then has been answered or lost its slot.

use std::collections::VecDeque;

use crate::apply::EntryResult;
use crate::msg::{Applied, ProposeCallback};
use crate::Error;

struct Proposal {
    index: u64,
    term: u64,
    cb: ProposeCallback,
    /// raft-rs turns a membership change it refuses into an empty normal
    /// entry; such a proposal must not be answered with success.
    conf_change: bool,
}

#[derive(Default)]
pub(crate) struct Proposals {
    queue: VecDeque<Proposal>,
}

impl Proposals {
    /// A proposal appended at `index` in `term`.
    pub(crate) fn push(&mut self, index: u64, term: u64, cb: ProposeCallback, conf_change: bool) {
        self.queue.push_back(Proposal {
            index,
            term,
            cb,
            conf_change,
        });
    }

    /// Answers the proposals up to the applied entry `r`.
    pub(crate) fn on_applied(&mut self, r: EntryResult) {
        let mut res = Some(r.result.map(|()| Applied {
            index: r.index,
            revision: r.revision,
        }));
        while let Some(p) = self.queue.front() {
            if p.index > r.index {
                break;
            }
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            if p.index == r.index && p.term == r.term && p.conf_change && !r.is_conf {
                (p.cb)(Err(Error::StaleCommand(
                    "raft refused the membership change".into(),
                )));
            } else if p.index == r.index && p.term == r.term {
                if let Some(res) = res.take() {
                    (p.cb)(res);
                }
            } else {
                // Its log slot was committed with another leader's entry.
                (p.cb)(Err(Error::StaleCommand(
                    "proposal overwritten by a new leader".into(),
                )));
            }
        }
    }

    /// Once the replica is in `term`, answers `OutcomeUnknown` to the
    /// proposals of earlier terms that the local log no longer holds:
    /// `log_term(index)` is the term of the local entry at `index`, `None`
    /// if there is none (truncated, or compacted into a snapshot).
    pub(crate) fn fail_replaced(&mut self, term: u64, log_term: impl Fn(u64) -> Option<u64>) {
        if self.queue.front().is_none_or(|p| p.term == term) {
            return;
        }
        let (kept, replaced): (VecDeque<Proposal>, VecDeque<Proposal>) = self
            .queue
            .drain(..)
            .partition(|p| p.term == term || log_term(p.index) == Some(p.term));
        self.queue = kept;
        for p in replaced {
            (p.cb)(Err(Error::OutcomeUnknown(format!(
                "a leader of term {term} replaced the entry at index {} here",
                p.index
            ))));
        }
    }

    /// Answers every proposal with `err` (the replica lost track of all of
    /// them: a snapshot, a stop).
    pub(crate) fn fail_all(&mut self, err: impl Fn() -> Error) {
        for p in self.queue.drain(..) {
            (p.cb)(Err(err()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Answers = Arc<Mutex<Vec<(u64, crate::Result<Applied>)>>>;

    fn cb(answers: &Answers, index: u64) -> ProposeCallback {
        let answers = answers.clone();
        Box::new(move |res| answers.lock().unwrap().push((index, res)))
    }

    fn applied(index: u64, term: u64) -> EntryResult {
        EntryResult {
            index,
            term,
            is_conf: false,
            result: Ok(()),
            revision: index as i64 * 10,
        }
    }

    #[test]
    fn answers_by_slot() {
        let answers = Answers::default();
        let mut p = Proposals::default();
        p.push(5, 2, cb(&answers, 5), false);
        p.push(6, 2, cb(&answers, 6), false);
        p.push(7, 2, cb(&answers, 7), true);
        p.on_applied(applied(5, 2));
        // Index 6 went to another leader's entry; 7, a refused membership
        // change, came back as an empty normal entry.
        p.on_applied(applied(6, 3));
        p.on_applied(applied(7, 2));
        let a = answers.lock().unwrap();
        assert!(matches!(
            a[0],
            (
                5,
                Ok(Applied {
                    index: 5,
                    revision: 50
                })
            )
        ));
        assert!(matches!(a[1], (6, Err(Error::StaleCommand(_)))));
        assert!(matches!(a[2], (7, Err(Error::StaleCommand(_)))));
    }

    #[test]
    fn replaced_entries_have_an_unknown_outcome_at_once() {
        let answers = Answers::default();
        let mut p = Proposals::default();
        p.push(5, 2, cb(&answers, 5), false);
        p.push(6, 2, cb(&answers, 6), false);
        // Still term 2: nothing to decide.
        p.fail_replaced(2, |_| None);
        assert!(answers.lock().unwrap().is_empty());
        // Term 3: index 5 still holds our entry, index 6 was replaced.
        p.fail_replaced(3, |i| Some(if i == 5 { 2 } else { 3 }));
        let a = answers.lock().unwrap();
        assert_eq!(a.len(), 1);
        assert!(matches!(a[0], (6, Err(Error::OutcomeUnknown(_)))));
        drop(a);
        p.fail_all(|| Error::OutcomeUnknown("stopped".into()));
        assert!(matches!(
            answers.lock().unwrap()[1],
            (5, Err(Error::OutcomeUnknown(_)))
        ));
    }
}
