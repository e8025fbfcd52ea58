//! The Wing–Gong/Lowe linearizability search (porcupine's `checkSingle`),
//! generic over a [`Model`].
//!
//! Contract: [`search`] decides whether the given events (one per
//! operation: call time, optional return time, the op) have a
//! linearization — a total order respecting real time (an op whose return
//! precedes another's call comes first) in which every op is legal in the
//! model. An event without a return time may be linearized anywhere after
//! its call, including after everything; if the model says it is
//! [`Model::optional`] it may also be left out (which must be equivalent to
//! linearizing it last). The answer is one of: a linearization, "none
//! exists" with the longest linearizable prefix found (for diagnostics), or
//! "inconclusive" when the [`Budget`] ran out.
//!
//! Algorithm (as porcupine): call and return entries sorted by time (a call
//! before a return at equal times: touching intervals overlap) in a doubly
//! linked list; depth-first, repeatedly take the first call entry (before
//! the first return entry) whose op is legal, remove ("lift") its call and
//! return entries and restart from the head; reaching a return entry (or
//! the end) means the op it belongs to can no longer be linearized, so undo
//! ("unlift") the last choice and try the next candidate. A cache of
//! (set of linearized ops, state) pairs prunes revisits. Two additions for
//! ops without return: an optional op whose step does not change the state
//! is not taken (leaving it out is never worse), and of several available
//! ops of one [`Model::class`] only the first is tried at each point.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::model::Model;

/// One operation for the search.
#[derive(Clone, Debug)]
pub struct Event<O> {
    /// When the op was invoked.
    pub call: u64,
    /// When it returned; None = never (outcome unknown).
    pub ret: Option<u64>,
    /// The op (input and output).
    pub op: O,
}

/// Limits for one search.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Give up after this many search steps.
    pub max_steps: Option<u64>,
    /// Give up after this much wall time.
    pub max_time: Option<Duration>,
}

/// The search's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization: indices into the events, in order (optional ops
    /// that were left out do not appear).
    Linearizable(Vec<usize>),
    /// No linearization exists; the longest linearizable prefix found.
    NotLinearizable {
        /// Indices into the events.
        longest: Vec<usize>,
    },
    /// The budget ran out.
    Inconclusive {
        /// Indices into the events.
        longest: Vec<usize>,
        /// Which limit was hit.
        reason: String,
    },
}

/// A verdict with search statistics.
#[derive(Clone, Debug)]
pub struct Search {
    /// The answer.
    pub verdict: Verdict,
    /// Search steps taken.
    pub steps: u64,
    /// Wall time spent.
    pub elapsed: Duration,
}

const HEAD: usize = 0;

/// Doubly linked list of call/return entries with dancing-links removal.
struct Entries {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per entry: the op index and whether it is a call.
    op: Vec<usize>,
    is_call: Vec<bool>,
    /// Per op: its call entry and return entry.
    call_entry: Vec<usize>,
    return_entry: Vec<Option<usize>>,
    tail: usize,
}

impl Entries {
    fn new<O>(events: &[Event<O>]) -> Entries {
        let mut raw: Vec<(u64, bool, usize)> = Vec::with_capacity(events.len() * 2);
        for (i, e) in events.iter().enumerate() {
            raw.push((e.call, true, i));
            if let Some(r) = e.ret {
                raw.push((r.max(e.call), false, i));
            }
        }
        // Time order; at equal times calls first (touching intervals overlap).
        raw.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
        let m = raw.len();
        let tail = m + 1;
        let mut entries = Entries {
            next: (1..=m + 1).chain(std::iter::once(tail)).collect(),
            prev: std::iter::once(HEAD).chain(0..=m).collect(),
            op: vec![usize::MAX; m + 2],
            is_call: vec![false; m + 2],
            call_entry: vec![0; events.len()],
            return_entry: vec![None; events.len()],
            tail,
        };
        for (pos, &(_, is_call, i)) in raw.iter().enumerate() {
            let e = pos + 1;
            entries.op[e] = i;
            entries.is_call[e] = is_call;
            if is_call {
                entries.call_entry[i] = e;
            } else {
                entries.return_entry[i] = Some(e);
            }
        }
        entries
    }

    fn remove(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn restore(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = e;
        self.prev[n] = e;
    }

    fn lift(&mut self, op: usize) {
        self.remove(self.call_entry[op]);
        if let Some(r) = self.return_entry[op] {
            self.remove(r);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(r) = self.return_entry[op] {
            self.restore(r);
        }
        self.restore(self.call_entry[op]);
    }
}

struct Frame<S> {
    op: usize,
    /// The state before `op`.
    state: S,
    /// Taken as a state-preserving op (no alternatives at its node).
    forced: bool,
    /// The scan phase it was taken in.
    phase: Phase,
}

/// At each node, ops with a return are tried first, then ops without one
/// (which can always wait): trying the latter early rarely helps and, as
/// they stay available forever, makes every node branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    WithReturn,
    WithoutReturn,
}

fn descend(tried: &mut Vec<Vec<u64>>, depth: usize) {
    if tried.len() <= depth {
        tried.push(Vec::new());
    }
    tried[depth].clear();
}

/// The first available (called before the first pending return) required
/// op that is legal in `state` and leaves it unchanged.
fn first_pure<M: Model>(
    model: &M,
    events: &[Event<M::Op>],
    list: &Entries,
    optional: &[bool],
    state: &M::State,
) -> Option<usize> {
    let mut e = list.next[HEAD];
    while e != list.tail && list.is_call[e] {
        let op = list.op[e];
        if !optional[op] && model.step(state, &events[op].op).as_ref() == Some(state) {
            return Some(op);
        }
        e = list.next[e];
    }
    None
}

/// Searches for a linearization of `events` under `model`.
pub fn search<M: Model>(model: &M, events: &[Event<M::Op>], budget: &Budget) -> Search {
    let started = Instant::now();
    let n = events.len();
    let mut list = Entries::new(events);
    let optional: Vec<bool> = events
        .iter()
        .map(|e| e.ret.is_none() && model.optional(&e.op))
        .collect();
    let class: Vec<Option<u64>> = events
        .iter()
        .map(|e| match e.ret {
            None => model.class(&e.op),
            Some(_) => None,
        })
        .collect();
    let mut remaining = optional.iter().filter(|o| !**o).count();
    // Ops with an order, sorted; the linearized ones are always a prefix.
    let mut ordered: Vec<(i64, usize)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| model.order(&e.op).map(|o| (o, i)))
        .collect();
    ordered.sort_unstable();
    let has_order: Vec<bool> = events
        .iter()
        .map(|e| model.order(&e.op).is_some())
        .collect();
    let mut turn = 0usize;

    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut calls: Vec<Frame<M::State>> = Vec::new();
    let mut tried: Vec<Vec<u64>> = vec![Vec::new()];
    let mut longest: Vec<usize> = Vec::new();
    let mut state = model.init();
    let mut entry = list.next[HEAD];
    let mut steps: u64 = 0;

    // A fresh node: nothing tried yet at this depth.
    let mut fresh = true;
    let mut phase = Phase::WithReturn;

    let verdict = loop {
        if remaining == 0 {
            break Verdict::Linearizable(calls.iter().map(|f| f.op).collect());
        }
        steps += 1;
        if let Some(reason) = over_budget(budget, steps, started) {
            if calls.len() > longest.len() {
                longest = calls.iter().map(|f| f.op).collect();
            }
            break Verdict::Inconclusive { longest, reason };
        }
        if fresh {
            fresh = false;
            // An available op that is legal and leaves the state unchanged
            // (a read) can be linearized first without loss of generality:
            // in any linearization from here, moving it to the front keeps
            // every state and respects real time. So take it, and if that
            // fails, this whole node fails.
            let pure = first_pure(model, events, &list, &optional, &state)
                .filter(|&op| !has_order[op] || ordered.get(turn).map(|x| x.1) == Some(op));
            if let Some(op) = pure {
                set_bit(&mut bits, op, true);
                if cache.insert((bits.clone(), state.clone())) {
                    calls.push(Frame {
                        op,
                        state: state.clone(),
                        forced: true,
                        phase,
                    });
                    list.lift(op);
                    remaining -= 1;
                    if has_order[op] {
                        turn += 1;
                    }
                    descend(&mut tried, calls.len());
                    fresh = true;
                    phase = Phase::WithReturn;
                    entry = list.next[HEAD];
                } else {
                    set_bit(&mut bits, op, false);
                    phase = Phase::WithoutReturn;
                    entry = list.tail;
                }
                continue;
            }
        }
        if entry != list.tail && list.is_call[entry] {
            let op = list.op[entry];
            let depth = calls.len();
            let in_phase = (events[op].ret.is_some()) == (phase == Phase::WithReturn);
            let out_of_turn = has_order[op] && ordered.get(turn).map(|x| x.1) != Some(op);
            let skip = match class[op] {
                _ if !in_phase || out_of_turn => true,
                Some(c) if tried[depth].contains(&c) => true,
                Some(c) => {
                    tried[depth].push(c);
                    false
                }
                None => false,
            };
            if !skip {
                if let Some(next_state) = model.step(&state, &events[op].op) {
                    if !(optional[op] && next_state == state) {
                        set_bit(&mut bits, op, true);
                        if cache.insert((bits.clone(), next_state.clone())) {
                            let prev_state = std::mem::replace(&mut state, next_state);
                            calls.push(Frame {
                                op,
                                state: prev_state,
                                forced: false,
                                phase,
                            });
                            list.lift(op);
                            if !optional[op] {
                                remaining -= 1;
                            }
                            if has_order[op] {
                                turn += 1;
                            }
                            descend(&mut tried, calls.len());
                            fresh = true;
                            phase = Phase::WithReturn;
                            entry = list.next[HEAD];
                            continue;
                        }
                        set_bit(&mut bits, op, false);
                    }
                }
            }
            entry = list.next[entry];
        } else if phase == Phase::WithReturn {
            // Done with ops that have a return; now those without.
            phase = Phase::WithoutReturn;
            entry = list.next[HEAD];
        } else {
            // A return entry (its op can no longer be linearized) or the
            // end of the list: undo the last choice.
            if calls.len() > longest.len() {
                longest = calls.iter().map(|f| f.op).collect();
            }
            let Some(frame) = calls.pop() else {
                break Verdict::NotLinearizable { longest };
            };
            state = frame.state;
            set_bit(&mut bits, frame.op, false);
            list.unlift(frame.op);
            if !optional[frame.op] {
                remaining += 1;
            }
            if has_order[frame.op] {
                turn -= 1;
            }
            phase = frame.phase;
            entry = if frame.forced {
                // The forced choice failed, so its node fails too.
                phase = Phase::WithoutReturn;
                list.tail
            } else {
                list.next[list.call_entry[frame.op]]
            };
        }
    };
    Search {
        verdict,
        steps,
        elapsed: started.elapsed(),
    }
}

fn over_budget(budget: &Budget, steps: u64, started: Instant) -> Option<String> {
    if let Some(max) = budget.max_steps {
        if steps > max {
            return Some(format!("gave up after {max} search steps"));
        }
    }
    if let Some(max) = budget.max_time {
        if steps.is_multiple_of(1024) && started.elapsed() > max {
            return Some(format!("gave up after {:.1} s", max.as_secs_f64()));
        }
    }
    None
}

fn set_bit(bits: &mut [u64], i: usize, on: bool) {
    let (w, b) = (i / 64, i % 64);
    if on {
        bits[w] |= 1 << b;
    } else {
        bits[w] &= !(1 << b);
    }
}

/// States after each op of `order`, starting from the initial state;
/// stops early if an op is illegal.
pub fn replay<M: Model>(model: &M, events: &[Event<M::Op>], order: &[usize]) -> Vec<M::State> {
    let mut states = vec![model.init()];
    for &i in order {
        let Some(last) = states.last() else { break };
        match model.step(last, &events[i].op) {
            Some(s) => states.push(s),
            None => break,
        }
    }
    states
}

/// After the ops of `done` were linearized: the not-yet-linearized op that
/// returned first (everything invoked after its return must come after it)
/// and the ops that could be linearized next (invoked no later than that
/// return).
pub fn frontier<O>(events: &[Event<O>], done: &[usize]) -> (Option<usize>, Vec<usize>) {
    let done: HashSet<usize> = done.iter().copied().collect();
    let open: Vec<usize> = (0..events.len()).filter(|i| !done.contains(i)).collect();
    let blocking = open
        .iter()
        .copied()
        .filter_map(|i| events[i].ret.map(|r| (r, i)))
        .min()
        .map(|(_, i)| i);
    let limit = blocking.and_then(|b| events[b].ret).unwrap_or(u64::MAX);
    let candidates = open
        .into_iter()
        .filter(|&i| events[i].call <= limit)
        .collect();
    (blocking, candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register: Write(v) or Read(v observed).
    struct Register;

    #[derive(Debug, Clone)]
    enum RegOp {
        Write(u8),
        Read(u8),
    }

    impl Model for Register {
        type State = u8;
        type Op = RegOp;
        fn init(&self) -> u8 {
            0
        }
        fn step(&self, s: &u8, op: &RegOp) -> Option<u8> {
            match op {
                RegOp::Write(v) => Some(*v),
                RegOp::Read(v) => (v == s).then_some(*s),
            }
        }
        fn optional(&self, op: &RegOp) -> bool {
            matches!(op, RegOp::Write(_))
        }
    }

    fn ev(call: u64, ret: Option<u64>, op: RegOp) -> Event<RegOp> {
        Event { call, ret, op }
    }

    const NO_LIMIT: Budget = Budget {
        max_steps: None,
        max_time: None,
    };

    #[test]
    fn concurrent_write_and_read_either_way() {
        let events = vec![
            ev(0, Some(10), RegOp::Write(1)),
            ev(5, Some(15), RegOp::Read(0)),
            ev(6, Some(16), RegOp::Read(1)),
        ];
        let s = search(&Register, &events, &NO_LIMIT);
        assert!(
            matches!(s.verdict, Verdict::Linearizable(_)),
            "{:?}",
            s.verdict
        );
    }

    #[test]
    fn stale_read_is_not_linearizable() {
        let events = vec![
            ev(0, Some(10), RegOp::Write(1)),
            ev(11, Some(12), RegOp::Read(1)),
            ev(13, Some(14), RegOp::Read(0)),
        ];
        let s = search(&Register, &events, &NO_LIMIT);
        match s.verdict {
            Verdict::NotLinearizable { longest } => assert_eq!(longest, vec![0, 1]),
            other => panic!("{other:?}"),
        }
        let (blocking, candidates) = frontier(&events, &[0, 1]);
        assert_eq!(blocking, Some(2));
        assert_eq!(candidates, vec![2]);
    }

    #[test]
    fn op_without_return_may_take_effect_late_or_never() {
        // Write(2) never returned: may apply after the first read, or never.
        let events = vec![
            ev(0, None, RegOp::Write(2)),
            ev(1, Some(2), RegOp::Read(0)),
            ev(3, Some(4), RegOp::Read(2)),
        ];
        assert!(matches!(
            search(&Register, &events, &NO_LIMIT).verdict,
            Verdict::Linearizable(_)
        ));
        let never = vec![ev(0, None, RegOp::Write(2)), ev(1, Some(2), RegOp::Read(0))];
        assert!(matches!(
            search(&Register, &never, &NO_LIMIT).verdict,
            Verdict::Linearizable(_)
        ));
    }

    #[test]
    fn budget_makes_it_inconclusive() {
        let events = vec![
            ev(0, Some(10), RegOp::Write(1)),
            ev(0, Some(10), RegOp::Write(2)),
            ev(11, Some(12), RegOp::Read(3)),
        ];
        let tight = Budget {
            max_steps: Some(2),
            max_time: None,
        };
        assert!(matches!(
            search(&Register, &events, &tight).verdict,
            Verdict::Inconclusive { .. }
        ));
        assert!(matches!(
            search(&Register, &events, &NO_LIMIT).verdict,
            Verdict::NotLinearizable { .. }
        ));
    }
}
