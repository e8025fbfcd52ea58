//! Watch streams derived from simulated histories: correct ones pass, and
//! each deliberately broken mode is caught by its rule.

use checker::sim::watch::{break_stream, stream, StreamConfig, WatchBreak};
use checker::sim::{simulate, Broken, SimConfig, Store};
use checker::{check_watches, History, Watch, WorkloadConfig};

const PREFIX: &[u8] = b"checker/";

fn sim(seed: u64, broken: Broken) -> (History, Store) {
    simulate(&SimConfig {
        seed,
        clients: 1 + seed as usize % 6,
        ops: 250,
        workload: WorkloadConfig {
            keys: 2 + seed as usize % 4,
            delete: 15,
            ..WorkloadConfig::default()
        }
        .with_multi_key(20, 8),
        unknown_percent: 12,
        failed_percent: 3,
        max_latency_ns: 1_000_000,
        broken,
    })
}

/// The watches of a run: two prefix watches from the first revision (the
/// first, with prev_kv and progress notifications, is the one tests
/// break; the second sees the same events), one key from now, keys >= a
/// key without deletes, a range without puts, and a chain of two watches
/// of the prefix broken at the middle of the run and resumed.
fn watches(store: &Store, seed: u64, compacted: i64) -> Vec<Watch> {
    let end = store.revision();
    let mid = (end / 2).max(1);
    let from = compacted.max(1);
    let config = |n: u64| StreamConfig {
        seed: seed * 101 + n,
        compacted,
        ..StreamConfig::default()
    };
    let full = Watch {
        prev_kv: true,
        progress_notify: true,
        ..Watch::prefix(PREFIX, from)
    };
    let plain = Watch::prefix(PREFIX, from);
    let one = Watch {
        prev_kv: true,
        ..Watch::key(b"checker/1", 0)
    };
    let above = Watch {
        range_end: vec![0],
        no_delete: true,
        progress_notify: true,
        ..Watch::key(b"checker/1", mid / 2 + from)
    };
    let range = Watch {
        range_end: b"checker/2".to_vec(),
        no_put: true,
        ..Watch::key(b"checker/0", from)
    };
    let mut out = vec![
        stream(store, &full, &config(0)),
        stream(store, &plain, &config(1)),
        stream(
            store,
            &one,
            &StreamConfig {
                created_at: mid,
                ..config(2)
            },
        ),
        stream(store, &above, &config(3)),
        stream(store, &range, &config(4)),
    ];
    let before_break = stream(
        store,
        &full,
        &StreamConfig {
            until: Some(mid),
            ..config(5)
        },
    );
    let resumed = Watch {
        resumed_from: Some(out.len()),
        start_revision: before_break.resume_revision().unwrap(),
        ..full
    };
    out.push(before_break);
    out.push(stream(store, &resumed, &config(6)));
    out
}

#[test]
fn streams_of_simulated_histories_pass() {
    let mut events = 0;
    let mut learned = 0;
    for seed in 0..30 {
        let (history, store) = sim(seed, Broken::No);
        let report = check_watches(&history, &watches(&store, seed, 0), 0).unwrap();
        assert!(report.is_ok(), "seed {seed}:\n{report}");
        let summary = report.watches.unwrap();
        events += summary.events;
        learned += summary.learned;
    }
    assert!(events > 3000, "{events} events");
    assert!(learned > 10, "{learned} writes of unknown outcome placed");
}

#[test]
fn streams_over_a_compacted_store_pass() {
    for seed in 0..15 {
        let (history, store) = sim(seed, Broken::No);
        let compacted = store.revision() / 3;
        let mut ws = watches(&store, seed, compacted);
        // A watch from before the compaction is canceled as compacted.
        let old = Watch::prefix(PREFIX, compacted - 1);
        ws.push(stream(
            &store,
            &old,
            &StreamConfig {
                compacted,
                ..StreamConfig::default()
            },
        ));
        assert!(ws.last().unwrap().responses[1].compact_revision == compacted);
        let report = check_watches(&history, &ws, compacted).unwrap();
        assert!(report.is_ok(), "seed {seed}:\n{report}");
        // Without the compaction, the cancel (and missing prev_kvs) are wrong.
        let report = check_watches(&history, &ws, 0).unwrap();
        assert!(!report.is_ok(), "seed {seed}:\n{report}");
    }
}

#[test]
fn every_broken_mode_is_caught_by_its_rule() {
    for how in WatchBreak::ALL {
        let mut caught = 0;
        for seed in 0..25 {
            let (history, store) = sim(seed, Broken::No);
            let mut ws = watches(&store, seed, 0);
            let Some(rule) = break_stream(&mut ws[0], how, seed) else {
                continue;
            };
            let report = check_watches(&history, &ws, 0).unwrap();
            assert!(
                report.violates(rule),
                "seed {seed}, {how:?}: expected a {rule} violation:\n{report}"
            );
            let v = report.all_violations().find(|v| v.rule == rule).unwrap();
            assert!(v.explanation.starts_with("watch #0 "), "{v}");
            caught += 1;
        }
        assert!(
            caught >= 20,
            "{how:?}: only {caught} streams could be broken"
        );
    }
}

#[test]
fn a_store_applying_multi_puts_in_pieces_is_caught_by_watches() {
    let mut caught = 0;
    for seed in 0..10 {
        let (history, store) = sim(seed, Broken::TornMultiPut);
        let report = check_watches(&history, &watches(&store, seed, 0), 0).unwrap();
        caught += usize::from(!report.is_ok());
    }
    assert!(caught >= 8, "only {caught} of 10 torn runs caught");
}

#[test]
fn streams_are_deterministic() {
    let (_, store) = sim(3, Broken::No);
    assert_eq!(watches(&store, 3, 0), watches(&store, 3, 0));
    assert_ne!(watches(&store, 3, 0), watches(&store, 4, 0));
}
