//! The WGL search with all its shortcuts (pure ops first, revision order,
//! phases, classes, optional no-ops) against a brute-force enumeration of
//! every real-time-respecting order, on many tiny random single-key
//! histories, linearizable or not.

use std::sync::Arc;

use checker::model::{EtcdModel, EtcdOp, EtcdState, Model};
use checker::wgl::{search, Budget, Event, Verdict};
use checker::Kv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether some order of `events` respecting real time is legal.
fn brute_force(model: &EtcdModel, events: &[Event<EtcdOp>]) -> bool {
    fn go(
        model: &EtcdModel,
        events: &[Event<EtcdOp>],
        left: &mut Vec<usize>,
        state: &EtcdState,
    ) -> bool {
        if left
            .iter()
            .all(|&i| events[i].ret.is_none() && model.optional(&events[i].op))
        {
            return true;
        }
        for pos in 0..left.len() {
            let i = left[pos];
            // i can go next unless another remaining op returned before i's call.
            let blocked = left
                .iter()
                .any(|&j| j != i && events[j].ret.is_some_and(|r| r < events[i].call));
            if blocked {
                continue;
            }
            if let Some(next) = model.step(state, &events[i].op) {
                left.remove(pos);
                let ok = go(model, events, left, &next);
                left.insert(pos, i);
                if ok {
                    return true;
                }
            }
            if events[i].ret.is_none() && model.optional(&events[i].op) {
                // Leave it out entirely.
                left.remove(pos);
                let ok = go(model, events, left, state);
                left.insert(pos, i);
                if ok {
                    return true;
                }
            }
        }
        false
    }
    let mut left: Vec<usize> = (0..events.len()).collect();
    go(model, events, &mut left, &model.init())
}

fn kv_of(value: &str, version: i64, create: i64, modr: i64) -> Kv {
    Kv {
        value: value.as_bytes().to_vec(),
        create_revision: create,
        mod_revision: modr,
        version,
    }
}

/// A tiny history produced by a sequential store, maybe perturbed.
fn tiny(rng: &mut StdRng) -> (EtcdModel, Vec<Event<EtcdOp>>) {
    let n = rng.gen_range(2..8);
    let mut state: Option<Kv> = None;
    let mut rev = 1i64;
    let mut known = Vec::new();
    let mut padding = 0;
    let mut events = Vec::new();
    let mut t = 100u64;
    for i in 0..n {
        t += rng.gen_range(1..20);
        if rng.gen_bool(0.2) {
            rev += 1; // a write to another key
        }
        let call = t - rng.gen_range(0..40);
        let ret = Some(t + rng.gen_range(0..40));
        let value = format!("v{i}");
        let write = |state: &mut Option<Kv>, rev: &mut i64, known: &mut Vec<i64>| {
            *rev += 1;
            known.push(*rev);
            let prev = state.clone();
            *state = Some(match &prev {
                None => kv_of(&value, 1, *rev, *rev),
                Some(p) => kv_of(&value, p.version + 1, p.create_revision, *rev),
            });
            prev
        };
        let (op, ret) = match rng.gen_range(0..7) {
            0 => {
                let prev = write(&mut state, &mut rev, &mut known);
                (
                    EtcdOp::Put {
                        value: value.as_bytes().to_vec(),
                        revision: rev,
                        prev,
                    },
                    ret,
                )
            }
            1 => (
                EtcdOp::Get {
                    revision: rev,
                    kv: state.clone(),
                },
                ret,
            ),
            2 => {
                let current = state.as_ref().map_or(0, |k| k.mod_revision);
                let expected = if rng.gen_bool(0.6) {
                    current
                } else {
                    rng.gen_range(0..rev + 1)
                };
                if expected == current {
                    let prev = write(&mut state, &mut rev, &mut known);
                    let op = EtcdOp::Cas {
                        expected,
                        value: value.as_bytes().to_vec(),
                        revision: rev,
                        succeeded: true,
                        kv: prev,
                    };
                    (op, ret)
                } else {
                    let op = EtcdOp::Cas {
                        expected,
                        value: value.as_bytes().to_vec(),
                        revision: rev,
                        succeeded: false,
                        kv: state.clone(),
                    };
                    (op, ret)
                }
            }
            3 => {
                let deleted = state.take();
                if deleted.is_some() {
                    rev += 1;
                    known.push(rev);
                }
                (
                    EtcdOp::Delete {
                        revision: rev,
                        deleted,
                    },
                    ret,
                )
            }
            4 => {
                // Unknown put: applied and observed, applied unobserved, or not.
                match rng.gen_range(0..3) {
                    0 => {
                        write(&mut state, &mut rev, &mut known);
                        let kv = state.clone().unwrap_or_else(|| kv_of("?", 0, 0, 0));
                        (EtcdOp::Learned { expected: None, kv }, None)
                    }
                    1 => {
                        write(&mut state, &mut rev, &mut known);
                        known.pop();
                        padding += 1;
                        continue;
                    }
                    _ => {
                        padding += 1;
                        continue;
                    }
                }
            }
            _ => {
                if rng.gen_bool(0.5) && state.is_some() {
                    state = None;
                    rev += 1;
                }
                (EtcdOp::UnknownDelete, None)
            }
        };
        events.push(Event { call, ret, op });
    }
    if rng.gen_bool(0.5) && !events.is_empty() {
        let i = rng.gen_range(0..events.len());
        perturb(rng, &mut events, i);
    }
    let model = EtcdModel {
        padding,
        known_revisions: Arc::new(known),
    };
    (model, events)
}

fn perturb(rng: &mut StdRng, events: &mut [Event<EtcdOp>], i: usize) {
    let bump = |kv: &mut Option<Kv>, rng: &mut StdRng| match kv {
        Some(k) => match rng.gen_range(0..4) {
            0 => k.version += 1,
            1 => k.mod_revision -= 1,
            2 => k.value = b"v0".to_vec(),
            _ => *kv = None,
        },
        None => *kv = Some(kv_of("v1", 1, 2, 2)),
    };
    match &mut events[i].op {
        EtcdOp::Put { revision, prev, .. } => {
            if rng.gen_bool(0.5) {
                *revision -= 2;
            } else {
                bump(prev, rng);
            }
        }
        EtcdOp::Get { revision, kv } => {
            if rng.gen_bool(0.3) {
                *revision -= 1;
            } else {
                bump(kv, rng);
            }
        }
        EtcdOp::Cas { succeeded, kv, .. } => {
            if rng.gen_bool(0.5) {
                *succeeded = !*succeeded;
            } else {
                bump(kv, rng);
            }
        }
        EtcdOp::Delete { deleted, .. } => bump(deleted, rng),
        EtcdOp::Learned { kv, .. } => kv.version += 1,
        _ => {}
    }
    if rng.gen_bool(0.3) {
        let j = rng.gen_range(0..events.len());
        let (a, b) = (events[i].call, events[j].call);
        events[i].call = b;
        events[j].call = a;
        for e in [i, j] {
            if let Some(r) = events[e].ret {
                events[e].ret = Some(r.max(events[e].call));
            }
        }
    }
}

#[test]
fn search_agrees_with_brute_force() {
    let budget = Budget {
        max_steps: None,
        max_time: None,
    };
    let mut rng = StdRng::seed_from_u64(99);
    let (mut yes, mut no) = (0, 0);
    for case in 0..20_000 {
        let (model, events) = tiny(&mut rng);
        let expected = brute_force(&model, &events);
        let got = search(&model, &events, &budget).verdict;
        let linearizable = matches!(got, Verdict::Linearizable(_));
        assert_eq!(
            linearizable, expected,
            "case {case}: {events:#?}\n{model:?}\n{got:?}"
        );
        if expected {
            yes += 1;
        } else {
            no += 1;
        }
    }
    println!("{yes} linearizable, {no} not");
    assert!(yes > 1000 && no > 1000, "{yes} linearizable, {no} not");
}
