//! Randomized tests: histories simulated against a sequential etcd-like
//! store must pass; the same histories with one deliberate defect must
//! fail.

use std::time::Instant;

use checker::sim::{simulate, Broken, SimConfig, Store};
use checker::{
    check, check_linearizable, reread_plan, Config, History, Outcome, Request, RereadResult,
    Rereads, Response, Rule, WorkloadConfig,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn sim(seed: u64, clients: usize, ops: usize, keys: usize, unknown: u32) -> (History, Store) {
    simulate(&SimConfig {
        seed,
        clients,
        ops,
        workload: WorkloadConfig {
            keys,
            ..WorkloadConfig::default()
        },
        unknown_percent: unknown,
        failed_percent: 3,
        max_latency_ns: 1_000_000,
        broken: Broken::No,
    })
}

fn rereads(h: &History, store: &Store) -> Rereads {
    store.rereads(&reread_plan(h))
}

#[test]
fn simulated_histories_pass() {
    for seed in 0..60 {
        let (h, store) = sim(
            seed,
            1 + (seed as usize % 8),
            300,
            1 + (seed as usize % 4),
            10,
        );
        let report = check(&h, &rereads(&h, &store), &Config::default()).unwrap();
        assert!(report.is_ok(), "seed {seed}:\n{report}");
    }
}

#[test]
fn exact_mode_agrees_on_small_histories() {
    let exact = Config {
        exact_unknown_writes: true,
        ..Config::default()
    };
    for seed in 0..40 {
        let (h, _) = sim(seed, 4, 60, 2, 15);
        let fast = check_linearizable(&h, &Config::default()).unwrap();
        let slow = check_linearizable(&h, &exact).unwrap();
        assert!(fast.is_ok(), "seed {seed}:\n{fast}");
        assert!(slow.is_ok(), "seed {seed}:\n{slow}");
    }
}

/// Indices of acknowledged writes.
fn acked(h: &History) -> Vec<usize> {
    (0..h.ops.len())
        .filter(|&i| h.ops[i].acked_write_revision().is_some())
        .collect()
}

/// A linearizable read now returns the value a write that completed before
/// it was invoked had already replaced.
fn stale_read(h: &History, store: &Store, rng: &mut StdRng) -> Option<History> {
    let mut pairs = Vec::new();
    for (g, op) in h.ops.iter().enumerate() {
        let Some(Response::Get { kv, .. }) = op.response() else {
            continue;
        };
        if op.is_serializable_read() {
            continue;
        }
        for w in acked(h) {
            let wop = &h.ops[w];
            if wop.request.key() != op.request.key() || wop.complete_ns >= op.invoke_ns {
                continue;
            }
            let rev = wop.acked_write_revision()?;
            if let Some(old) = store.read_at(op.request.key(), rev - 1) {
                if kv.as_ref() != Some(&old) {
                    pairs.push((g, old));
                }
            }
        }
    }
    let (g, old) = pairs.choose(rng)?.clone();
    let mut h = h.clone();
    if let Outcome::Ok(Response::Get { kv, .. }) = &mut h.ops[g].outcome {
        *kv = Some(old);
    }
    Some(h)
}

/// A Cas whose compare failed now claims success on the same base version
/// as a Cas that really succeeded.
fn duplicate_cas(h: &History, store: &Store, rng: &mut StdRng) -> Option<History> {
    let mut pairs = Vec::new();
    for (a, op) in h.ops.iter().enumerate() {
        let Some(Response::Cas {
            succeeded: true,
            kv: Some(prev),
            ..
        }) = op.response()
        else {
            continue;
        };
        for (b, other) in h.ops.iter().enumerate() {
            if other.request.key() == op.request.key()
                && matches!(
                    other.response(),
                    Some(Response::Cas {
                        succeeded: false,
                        ..
                    })
                )
            {
                pairs.push((a, b, prev.clone()));
            }
        }
    }
    let (a, b, prev) = pairs.choose(rng)?.clone();
    let mut h = h.clone();
    let expected = prev.mod_revision;
    if let Request::Cas {
        expected_mod_revision,
        ..
    } = &mut h.ops[b].request
    {
        *expected_mod_revision = expected;
    }
    h.ops[b].outcome = Outcome::Ok(Response::Cas {
        revision: store.revision() + 1 + a as i64,
        succeeded: true,
        kv: Some(prev),
    });
    Some(h)
}

fn duplicate_revision(h: &History, rng: &mut StdRng) -> Option<History> {
    let writes = acked(h);
    let a = *writes.choose(rng)?;
    let b = *writes.choose(rng)?;
    if a == b {
        return None;
    }
    let rev = h.ops[a].acked_write_revision()?;
    let mut h = h.clone();
    set_revision(&mut h.ops[b].outcome, rev);
    Some(h)
}

fn set_revision(outcome: &mut Outcome, rev: i64) {
    if let Outcome::Ok(
        Response::Put { revision, .. }
        | Response::Cas { revision, .. }
        | Response::Delete { revision, .. },
    ) = outcome
    {
        *revision = rev;
    }
}

fn revision_inversion(h: &History, rng: &mut StdRng) -> Option<History> {
    let writes = acked(h);
    let pairs: Vec<(usize, usize)> = writes
        .iter()
        .flat_map(|&a| writes.iter().map(move |&b| (a, b)))
        .filter(|&(a, b)| h.ops[a].complete_ns < h.ops[b].invoke_ns)
        .collect();
    let &(a, b) = pairs.choose(rng)?;
    let (ra, rb) = (
        h.ops[a].acked_write_revision()?,
        h.ops[b].acked_write_revision()?,
    );
    let mut h = h.clone();
    set_revision(&mut h.ops[a].outcome, rb);
    set_revision(&mut h.ops[b].outcome, ra);
    Some(h)
}

/// An acknowledged write whose value a read saw is now reported Failed.
fn failed_but_observed(h: &History, rng: &mut StdRng) -> Option<History> {
    let seen: std::collections::HashSet<Vec<u8>> = h
        .ops
        .iter()
        .filter_map(|op| match op.response()? {
            Response::Get { kv, .. } => kv.as_ref().map(|kv| kv.value.clone()),
            _ => None,
        })
        .collect();
    let candidates: Vec<usize> = acked(h)
        .into_iter()
        .filter(|&i| {
            h.ops[i]
                .request
                .written_value()
                .is_some_and(|v| seen.contains(v))
        })
        .collect();
    let w = *candidates.choose(rng)?;
    let mut h = h.clone();
    h.ops[w].outcome = Outcome::Failed("mutated".into());
    Some(h)
}

#[test]
fn mutated_histories_fail() {
    let mut applied = [0usize; 6];
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, store) = sim(seed, 2 + seed as usize % 6, 200, 1 + seed as usize % 3, 5);
        let mutants: Vec<(usize, &str, Option<History>, Option<Rule>)> = vec![
            (
                0,
                "stale read",
                stale_read(&h, &store, &mut rng),
                Some(Rule::Linearizability),
            ),
            (
                1,
                "duplicate cas",
                duplicate_cas(&h, &store, &mut rng),
                Some(Rule::Linearizability),
            ),
            (
                2,
                "duplicate revision",
                duplicate_revision(&h, &mut rng),
                Some(Rule::UniqueRevision),
            ),
            (
                3,
                "revision inversion",
                revision_inversion(&h, &mut rng),
                Some(Rule::RealTimeOrder),
            ),
            (
                4,
                "failed but observed",
                failed_but_observed(&h, &mut rng),
                Some(Rule::FailedWriteObserved),
            ),
        ];
        for (kind, name, mutant, rule) in mutants {
            let Some(m) = mutant else { continue };
            applied[kind] += 1;
            let report = check(&m, &rereads(&m, &store), &Config::default()).unwrap();
            assert!(!report.is_ok(), "seed {seed}, {name}: not caught\n{report}");
            if let Some(rule) = rule {
                assert!(
                    report.violates(rule),
                    "seed {seed}, {name}: no {rule}\n{report}"
                );
            }
        }
        // A lost write: the store forgets one acknowledged write.
        let writes = acked(&h);
        if let Some(&w) = writes.choose(&mut rng) {
            applied[5] += 1;
            let key = h.ops[w].request.key().clone();
            let rev = h.ops[w].acked_write_revision().unwrap_or_default();
            let mut rr = rereads(&h, &store);
            rr.insert(
                (key.clone(), rev),
                RereadResult::Kv(store.read_at(&key, rev - 1)),
            );
            let report = check(&h, &rr, &Config::default()).unwrap();
            assert!(
                report.violates(Rule::LostWrite),
                "seed {seed}: lost write not caught\n{report}"
            );
        }
    }
    println!("mutations applied: {applied:?}");
    assert!(
        applied.iter().all(|&n| n >= 5),
        "too few mutations applied: {applied:?}"
    );
}

#[test]
fn random_mutations_of_small_histories_are_caught_in_exact_mode_too() {
    let exact = Config {
        exact_unknown_writes: true,
        ..Config::default()
    };
    let mut applied = 0;
    for seed in 100..130u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, store) = sim(seed, 4, 60, 2, 15);
        for m in [
            stale_read(&h, &store, &mut rng),
            duplicate_cas(&h, &store, &mut rng),
        ]
        .into_iter()
        .flatten()
        {
            applied += 1;
            let report = check_linearizable(&m, &exact).unwrap();
            assert!(
                report.violates(Rule::Linearizability),
                "seed {seed}\n{report}"
            );
        }
    }
    assert!(applied >= 10, "only {applied} mutations applied");
}

#[test]
fn five_thousand_ops_check_quickly() {
    let (h, store) = sim(4242, 16, 5000, 4, 10);
    let unknown = h
        .ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Unknown(_)))
        .count();
    let rr = rereads(&h, &store);
    let started = Instant::now();
    let report = check(&h, &rr, &Config::default()).unwrap();
    let elapsed = started.elapsed();
    println!("{report}");
    println!(
        "checked {} ops ({unknown} unknown) over 4 keys from 16 clients in {:.3} s",
        h.ops.len(),
        elapsed.as_secs_f64()
    );
    assert!(report.is_ok(), "{report}");

    // The same history with defects: found as fast.
    let mut rng = StdRng::seed_from_u64(7);
    for (name, mutant) in [
        ("stale read", stale_read(&h, &store, &mut rng)),
        ("duplicate cas", duplicate_cas(&h, &store, &mut rng)),
    ] {
        let Some(m) = mutant else { continue };
        let started = Instant::now();
        let report = check_linearizable(&m, &Config::default()).unwrap();
        println!(
            "{name}: found in {:.3} s: {}",
            started.elapsed().as_secs_f64(),
            report.violates(Rule::Linearizability)
        );
        assert!(report.violates(Rule::Linearizability), "{name}\n{report}");
    }
}

fn sim_multi_key(seed: u64, clients: usize, ops: usize, broken: Broken) -> (History, Store) {
    simulate(&SimConfig {
        seed,
        clients,
        ops,
        workload: WorkloadConfig {
            keys: 4,
            ..WorkloadConfig::default()
        }
        .with_multi_key(20, 20),
        unknown_percent: 10,
        failed_percent: 3,
        max_latency_ns: 1_000_000,
        broken,
    })
}

#[test]
fn simulated_multi_key_histories_pass() {
    let (mut multi_puts, mut range_alls) = (0, 0);
    for seed in 0..40 {
        let (h, store) = sim_multi_key(seed, 1 + (seed as usize % 8), 300, Broken::No);
        let report = check(&h, &rereads(&h, &store), &Config::default()).unwrap();
        assert!(report.is_ok(), "seed {seed}:\n{report}");
        multi_puts += report.multi_puts;
        range_alls += report.range_alls;
    }
    println!("{multi_puts} MultiPuts acknowledged, {range_alls} RangeAlls ok");
    assert!(multi_puts > 1000 && range_alls > 1000);
}

#[test]
fn torn_multi_key_operations_are_caught() {
    for (broken, rule) in [
        (Broken::TornMultiPut, Rule::MultiKeyAtomicity),
        (Broken::TornRangeAll, Rule::ReadState),
    ] {
        let mut atomicity = 0;
        for seed in 0..20 {
            let (h, store) = sim_multi_key(seed, 2 + seed as usize % 6, 200, broken);
            let report = check(&h, &rereads(&h, &store), &Config::default()).unwrap();
            assert!(
                !report.is_ok(),
                "{broken:?} seed {seed}: not caught\n{report}"
            );
            assert!(
                report.violates(rule),
                "{broken:?} seed {seed}: no {rule}\n{report}"
            );
            atomicity += usize::from(report.violates(Rule::MultiKeyAtomicity));
        }
        println!("{broken:?}: rule 6 in {atomicity} of 20 seeds");
        assert!(
            atomicity >= 10,
            "{broken:?}: rule 6 in only {atomicity} of 20 seeds"
        );
    }
}
