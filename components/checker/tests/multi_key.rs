//! Hand-made histories with multi-key operations (MultiPut, RangeAll):
//! atomic ones pass, torn ones fail — and, where it matters, fail only by
//! rule 6 (the per-key rules alone would pass them).

mod common;

use checker::{check, Config, History, HistoryError, Outcome, Report, Rule};
use common::{kv, Truth, H};

fn run(h: &H, truth: &Truth) -> Report {
    let history = h.history();
    let rereads = truth.rereads(&history);
    let report = check(&history, &rereads, &Config::default()).unwrap();
    println!("{report}");
    report
}

fn assert_violates(report: &Report, rule: Rule) {
    assert!(!report.is_ok());
    assert!(
        report.violates(rule),
        "expected a {rule} violation:\n{report}"
    );
}

/// The rules a report breaks.
fn rules(report: &Report) -> Vec<Rule> {
    let mut rules: Vec<Rule> = report.all_violations().map(|v| v.rule).collect();
    rules.sort();
    rules.dedup();
    rules
}

fn unknown() -> Outcome {
    Outcome::Unknown("timeout".into())
}

/// a0 at 2, b0 at 3.
fn base() -> H {
    let mut h = H::default();
    h.put(0, (0, 10), "p/a", "a0", 2, None);
    h.put(0, (20, 30), "p/b", "b0", 3, None);
    h
}

#[test]
fn range_all_seeing_one_key_of_an_acknowledged_multi_put() {
    let mut h = base();
    h.multi_put(
        1,
        (40, 50),
        &[("p/a", "x"), ("p/b", "y")],
        4,
        vec![Some(kv("a0", 1, 2, 2)), Some(kv("b0", 1, 3, 3))],
    );
    // Shows a's new value but b's old one, at header 4.
    h.range_all(
        2,
        (60, 70),
        "p/",
        4,
        vec![("p/a", kv("x", 2, 2, 4)), ("p/b", kv("b0", 1, 3, 3))],
    );
    let truth = Truth(vec![
        ("p/a", 2, Some(kv("a0", 1, 2, 2))),
        ("p/b", 3, Some(kv("b0", 1, 3, 3))),
        ("p/a", 4, Some(kv("x", 2, 2, 4))),
        ("p/b", 4, Some(kv("y", 2, 3, 4))),
    ]);
    let report = run(&h, &truth);
    assert_violates(&report, Rule::MultiKeyAtomicity);
    // The projected Get of b is what rule 3 and the per-key search catch.
    assert_violates(&report, Rule::ReadState);
    assert_violates(&report, Rule::Linearizability);
    let text = report.to_string();
    assert!(
        text.contains("sees only part of the multi-key write"),
        "{text}"
    );
    assert!(
        text.contains("is one key of the multi-key operation"),
        "{text}"
    );
}

#[test]
fn range_all_seeing_one_key_of_a_multi_put_of_unknown_outcome() {
    // The store really applied only a's part (a torn two-phase commit) and
    // its re-reads agree with the read: every per-key rule passes; only
    // rule 6 sees that the write was applied in part.
    let mut h = base();
    h.multi_put_with(1, (40, 50), &[("p/a", "x"), ("p/b", "y")], unknown());
    h.range_all(
        2,
        (60, 70),
        "p/",
        4,
        vec![("p/a", kv("x", 2, 2, 4)), ("p/b", kv("b0", 1, 3, 3))],
    );
    let truth = Truth(vec![
        ("p/a", 2, Some(kv("a0", 1, 2, 2))),
        ("p/b", 3, Some(kv("b0", 1, 3, 3))),
        ("p/a", 4, Some(kv("x", 2, 2, 4))),
    ]);
    let report = run(&h, &truth);
    assert_eq!(report.learned, 1);
    assert_eq!(rules(&report), vec![Rule::MultiKeyAtomicity], "{report}");
    let text = report.to_string();
    assert!(text.contains("sees only part"), "{text}");
    assert!(text.contains("only partly in the store"), "{text}");
}

#[test]
fn range_all_after_an_overwrite_or_delete_is_not_torn() {
    // a was overwritten after the MultiPut, b deleted: the read shows
    // neither of its values for them, which is fine.
    let mut h = base();
    h.multi_put(
        1,
        (40, 50),
        &[("p/a", "x"), ("p/b", "y"), ("p/c", "z")],
        4,
        vec![Some(kv("a0", 1, 2, 2)), Some(kv("b0", 1, 3, 3)), None],
    );
    h.put(2, (60, 70), "p/a", "a1", 5, Some(kv("x", 2, 2, 4)));
    h.delete(2, (80, 90), "p/b", 6, Some(kv("y", 2, 3, 4)));
    h.range_all(
        3,
        (100, 110),
        "p/",
        6,
        vec![("p/a", kv("a1", 3, 2, 5)), ("p/c", kv("z", 1, 4, 4))],
    );
    let truth = Truth(vec![
        ("p/a", 2, Some(kv("a0", 1, 2, 2))),
        ("p/b", 3, Some(kv("b0", 1, 3, 3))),
        ("p/a", 4, Some(kv("x", 2, 2, 4))),
        ("p/b", 4, Some(kv("y", 2, 3, 4))),
        ("p/c", 4, Some(kv("z", 1, 4, 4))),
        ("p/a", 5, Some(kv("a1", 3, 2, 5))),
        ("p/b", 6, None),
    ]);
    let report = run(&h, &truth);
    assert!(report.is_ok(), "{report}");
}

#[test]
fn two_multi_puts_sharing_a_revision() {
    let mut h = H::default();
    h.put(0, (0, 10), "p/a", "a0", 2, None);
    h.multi_put(
        1,
        (20, 30),
        &[("p/a", "x"), ("p/b", "y")],
        3,
        vec![Some(kv("a0", 1, 2, 2)), None],
    );
    let mut truth = vec![
        ("p/a", 2, Some(kv("a0", 1, 2, 2))),
        ("p/a", 3, Some(kv("x", 2, 2, 3))),
        ("p/b", 3, Some(kv("y", 1, 3, 3))),
    ];
    // One MultiPut's puts share its revision: fine.
    let report = run(&h, &Truth(truth.clone()));
    assert!(report.is_ok(), "{report}");

    h.multi_put(
        2,
        (25, 35),
        &[("p/c", "z"), ("p/d", "w")],
        3,
        vec![None, None],
    );
    truth.push(("p/c", 3, Some(kv("z", 1, 3, 3))));
    truth.push(("p/d", 3, Some(kv("w", 1, 3, 3))));
    let report = run(&h, &Truth(truth));
    assert_violates(&report, Rule::UniqueRevision);
    let text = report.to_string();
    assert!(text.contains("2 writes took revision 3"), "{text}");
}

/// a0 at 2, b0 at 3, the MultiPut (a=x, b=y) with `outcome`, then reads of
/// a and b at header 5 that see a's part at 4 and b's part at 5; the store
/// agrees.
fn split_multi_put(outcome: Outcome) -> Report {
    let mut h = base();
    h.multi_put_with(1, (40, 50), &[("p/a", "x"), ("p/b", "y")], outcome);
    h.get(2, (60, 70), "p/a", 5, Some(kv("x", 2, 2, 4)));
    h.get(2, (80, 90), "p/b", 5, Some(kv("y", 2, 3, 5)));
    let truth = Truth(vec![
        ("p/a", 2, Some(kv("a0", 1, 2, 2))),
        ("p/b", 3, Some(kv("b0", 1, 3, 3))),
        ("p/a", 4, Some(kv("x", 2, 2, 4))),
        ("p/b", 5, Some(kv("y", 2, 3, 5))),
    ]);
    run(&h, &truth)
}

#[test]
fn multi_put_whose_keys_reread_with_different_mod_revisions() {
    // Acknowledged at 4: b's part is missing at 4 and shows up at 5.
    let acked = checker::Response::MultiPut {
        revision: 4,
        prevs: vec![Some(kv("a0", 1, 2, 2)), Some(kv("b0", 1, 3, 3))],
    };
    let report = split_multi_put(Outcome::Ok(acked));
    assert_violates(&report, Rule::MultiKeyAtomicity);
    assert_violates(&report, Rule::LostWrite);
    assert_violates(&report, Rule::AppliedTwice);

    // Of unknown outcome: each part alone is a fine learned write; only
    // rule 6 sees one Txn at two revisions.
    let report = split_multi_put(unknown());
    assert_eq!(report.learned, 2);
    assert_eq!(rules(&report), vec![Rule::MultiKeyAtomicity], "{report}");
    let text = report.to_string();
    assert!(
        text.contains("observed at more than one revision"),
        "{text}"
    );
}

#[test]
fn concurrent_multi_key_history_passes() {
    let mut h = H::default();
    h.put(0, (0, 10), "p/a", "a0", 2, None);
    h.multi_put(
        1,
        (20, 60),
        &[("p/a", "x1"), ("p/b", "y1")],
        4,
        vec![Some(kv("a0", 1, 2, 2)), None],
    );
    h.put(2, (25, 35), "p/c", "c0", 3, None);
    h.put(3, (30, 80), "p/a", "a1", 5, Some(kv("x1", 2, 2, 4)));
    // Concurrent with all of them: sees the state at 5.
    h.range_all(
        4,
        (15, 90),
        "p/",
        5,
        vec![
            ("p/a", kv("a1", 3, 2, 5)),
            ("p/b", kv("y1", 1, 4, 4)),
            ("p/c", kv("c0", 1, 3, 3)),
        ],
    );
    // Linearized before the MultiPut and the put of c.
    h.range_all(5, (16, 21), "p/", 2, vec![("p/a", kv("a0", 1, 2, 2))]);
    // Serializable, behind: the state at 3.
    h.range_all_with(
        6,
        (100, 110),
        "p/",
        checker::Consistency::Serializable,
        3,
        vec![("p/a", kv("a0", 1, 2, 2)), ("p/c", kv("c0", 1, 3, 3))],
    );
    // Of unknown outcome, learned at 6 from a read of b.
    h.multi_put_with(7, (95, 200), &[("p/b", "y2"), ("p/c", "z2")], unknown());
    h.get(6, (210, 220), "p/b", 6, Some(kv("y2", 2, 4, 6)));
    h.get(6, (230, 240), "p/c", 6, Some(kv("z2", 2, 3, 6)));
    h.range_all(
        5,
        (250, 260),
        "p/",
        6,
        vec![
            ("p/a", kv("a1", 3, 2, 5)),
            ("p/b", kv("y2", 2, 4, 6)),
            ("p/c", kv("z2", 2, 3, 6)),
        ],
    );
    h.delete(1, (300, 310), "p/a", 7, Some(kv("a1", 3, 2, 5)));
    h.range_all(
        4,
        (320, 330),
        "p/",
        7,
        vec![("p/b", kv("y2", 2, 4, 6)), ("p/c", kv("z2", 2, 3, 6))],
    );
    let truth = Truth(vec![
        ("p/a", 2, Some(kv("a0", 1, 2, 2))),
        ("p/c", 3, Some(kv("c0", 1, 3, 3))),
        ("p/a", 4, Some(kv("x1", 2, 2, 4))),
        ("p/b", 4, Some(kv("y1", 1, 4, 4))),
        ("p/a", 5, Some(kv("a1", 3, 2, 5))),
        ("p/b", 6, Some(kv("y2", 2, 4, 6))),
        ("p/c", 6, Some(kv("z2", 2, 3, 6))),
        ("p/a", 7, None),
    ]);
    let report = run(&h, &truth);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.learned, 2);
    assert_eq!(report.multi_puts, 1);
    assert_eq!(report.range_alls, 5);
    assert_eq!(report.keys, 3);
}

#[test]
fn malformed_multi_puts_are_rejected() {
    let mut h = H::default();
    h.multi_put(
        0,
        (0, 10),
        &[("p/a", "x"), ("p/a", "y")],
        2,
        vec![None, None],
    );
    let err = check(&h.history(), &Default::default(), &Config::default()).unwrap_err();
    assert!(
        matches!(err, HistoryError::MalformedMultiKey { .. }),
        "{err}"
    );

    let mut h = H::default();
    h.multi_put(0, (0, 10), &[("p/a", "x"), ("p/b", "y")], 2, vec![None]);
    let err = check(&h.history(), &Default::default(), &Config::default()).unwrap_err();
    assert!(
        matches!(err, HistoryError::MalformedMultiKey { .. }),
        "{err}"
    );

    let mut h = H::default();
    h.put(0, (0, 10), "p/a", "x", 2, None);
    h.multi_put(0, (20, 30), &[("p/b", "x")], 3, vec![None]);
    let err = check(&h.history(), &Default::default(), &Config::default()).unwrap_err();
    assert!(matches!(err, HistoryError::DuplicateValue { .. }), "{err}");
}

#[test]
fn multi_key_json_round_trip() {
    let mut h = base();
    h.multi_put(
        1,
        (40, 50),
        &[("p/a", "x"), ("p/b", "y")],
        4,
        vec![Some(kv("a0", 1, 2, 2)), None],
    );
    h.range_all(2, (60, 70), "p/", 4, vec![("p/a", kv("x", 2, 2, 4))]);
    let history = h.history();
    let text = history.to_json().unwrap();
    assert!(text.contains("\"p/b\""), "{text}");
    assert_eq!(History::from_json(&text).unwrap(), history);
}
