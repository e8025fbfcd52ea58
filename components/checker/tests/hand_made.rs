//! Hand-made histories that are, and are not, linearizable and
//! revision-correct.

mod common;

use checker::{
    check, check_linearizable, check_revisions, Config, Consistency, History, HistoryError,
    Outcome, Report, Rereads, Rule,
};
use common::{kv, Truth, H};

fn run(h: &H, truth: &Truth) -> Report {
    let history = h.history();
    let rereads = truth.rereads(&history);
    let report = check(&history, &rereads, &Config::default()).unwrap();
    println!("{report}");
    report
}

fn assert_ok(report: &Report) {
    assert!(report.is_ok(), "expected OK:\n{report}");
}

fn assert_violates(report: &Report, rule: Rule) {
    assert!(!report.is_ok());
    assert!(
        report.violates(rule),
        "expected a {rule} violation:\n{report}"
    );
}

#[test]
fn concurrent_puts_in_either_order() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put(1, (1, 9), "k", "b", 3, Some(kv("a", 1, 2, 2)));
    h.get(2, (20, 21), "k", 3, Some(kv("b", 2, 2, 3)));
    assert_ok(&run(
        &h,
        &Truth(vec![
            ("k", 2, Some(kv("a", 1, 2, 2))),
            ("k", 3, Some(kv("b", 2, 2, 3))),
        ]),
    ));

    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 3, Some(kv("b", 1, 2, 2)));
    h.put(1, (1, 9), "k", "b", 2, None);
    h.get(2, (20, 21), "k", 3, Some(kv("a", 2, 2, 3)));
    assert_ok(&run(
        &h,
        &Truth(vec![
            ("k", 2, Some(kv("b", 1, 2, 2))),
            ("k", 3, Some(kv("a", 2, 2, 3))),
        ]),
    ));
}

fn two_puts() -> (H, Truth) {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put(0, (20, 30), "k", "b", 3, Some(kv("a", 1, 2, 2)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("b", 2, 2, 3))),
    ]);
    (h, truth)
}

#[test]
fn stale_read_after_completed_write() {
    // Old header and old value: not linearizable, and the header goes back
    // in real time.
    let (mut h, truth) = two_puts();
    h.get(1, (40, 50), "k", 2, Some(kv("a", 1, 2, 2)));
    let report = run(&h, &truth);
    assert_violates(&report, Rule::Linearizability);
    assert_violates(&report, Rule::RealTimeOrder);
}

#[test]
fn read_only_txn_returns_old_value_after_newer_write() {
    let (mut h, truth) = two_puts();
    h.get_with(
        1,
        (40, 50),
        "k",
        Consistency::Linearizable,
        true,
        3,
        Some(kv("a", 1, 2, 2)),
    );
    let report = run(&h, &truth);
    assert_violates(&report, Rule::Linearizability);
    assert_violates(&report, Rule::ReadState);
}

#[test]
fn two_cas_with_the_same_expected_both_succeeded() {
    // The fork bug: 70 puts, then two Cas on mod_revision 71 both succeed,
    // writing version 71 twice.
    let mut h = H::default();
    let mut truth = Vec::new();
    for i in 0..70i64 {
        let prev = (i > 0).then(|| kv(&format!("v{}", i - 1), i, 2, i + 1));
        let t = i as u64 * 10;
        h.put(0, (t, t + 5), "k", &format!("v{i}"), i + 2, prev);
        truth.push(("k", i + 2, Some(kv(&format!("v{i}"), i + 1, 2, i + 2))));
    }
    let base = kv("v69", 70, 2, 71);
    h.cas(1, (1000, 1010), "k", 71, "x", 72, true, Some(base.clone()));
    h.cas(2, (1001, 1011), "k", 71, "y", 73, true, Some(base));
    h.get(3, (1020, 1030), "k", 73, Some(kv("y", 71, 2, 73)));
    truth.push(("k", 72, Some(kv("x", 71, 2, 72))));
    truth.push(("k", 73, Some(kv("y", 71, 2, 73))));
    let report = run(&h, &Truth(truth));
    assert_violates(&report, Rule::Linearizability);
    assert_violates(&report, Rule::Fork);
    assert_violates(&report, Rule::VersionChain);
}

#[test]
fn unknown_write_never_observed_is_fine() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (20, 30), "k", "u", Outcome::Unknown("timeout".into()));
    h.get(2, (40, 50), "k", 2, Some(kv("a", 1, 2, 2)));
    let report = run(&h, &Truth(vec![("k", 2, Some(kv("a", 1, 2, 2)))]));
    assert_ok(&report);
    assert_eq!(report.learned, 0);
}

#[test]
fn unknown_write_observed_is_learned() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (20, 30), "k", "u", Outcome::Unknown("timeout".into()));
    h.get(2, (40, 50), "k", 3, Some(kv("u", 2, 2, 3)));
    h.put(2, (60, 70), "k", "c", 4, Some(kv("u", 2, 2, 3)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("u", 2, 2, 3))),
        ("k", 4, Some(kv("c", 3, 2, 4))),
    ]);
    let report = run(&h, &truth);
    assert_ok(&report);
    assert_eq!(report.learned, 1);
}

#[test]
fn unknown_write_applied_after_the_client_gave_up() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (20, 30), "k", "u", Outcome::Unknown("timeout".into()));
    h.get(2, (40, 50), "k", 2, Some(kv("a", 1, 2, 2)));
    h.get(2, (60, 70), "k", 3, Some(kv("u", 2, 2, 3)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("u", 2, 2, 3))),
    ]);
    assert_ok(&run(&h, &truth));
}

#[test]
fn unobserved_unknown_writes_may_raise_the_version() {
    // u1 applied unobserved; u2 is seen at version 3.
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (20, 30), "k", "u1", Outcome::Unknown("timeout".into()));
    h.put_with(1, (40, 50), "k", "u2", Outcome::Unknown("timeout".into()));
    h.get(2, (60, 70), "k", 4, Some(kv("u2", 3, 2, 4)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("u1", 2, 2, 3))),
        ("k", 4, Some(kv("u2", 3, 2, 4))),
    ]);
    assert_ok(&run(&h, &truth));
    let exact = Config {
        exact_unknown_writes: true,
        ..Config::default()
    };
    let report = check_linearizable(&h.history(), &exact).unwrap();
    assert_ok(&report);

    // Without u1 the version jump has no explanation.
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (40, 50), "k", "u2", Outcome::Unknown("timeout".into()));
    h.get(2, (60, 70), "k", 4, Some(kv("u2", 3, 2, 4)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 4, Some(kv("u2", 3, 2, 4))),
    ]);
    let report = run(&h, &truth);
    assert_violates(&report, Rule::Linearizability);
    assert_violates(&report, Rule::VersionChain);
}

#[test]
fn failed_write_observed() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (20, 30), "k", "f", Outcome::Failed("no leader".into()));
    h.get(2, (40, 50), "k", 3, Some(kv("f", 2, 2, 3)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("f", 2, 2, 3))),
    ]);
    assert_violates(&run(&h, &truth), Rule::FailedWriteObserved);
}

#[test]
fn failed_compare_whose_value_is_observed() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.cas(1, (20, 30), "k", 7, "x", 2, false, Some(kv("a", 1, 2, 2)));
    h.get(2, (40, 50), "k", 3, Some(kv("x", 2, 2, 3)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("x", 2, 2, 3))),
    ]);
    assert_violates(&run(&h, &truth), Rule::FailedWriteObserved);
}

#[test]
fn value_nobody_wrote() {
    let mut h = H::default();
    h.get(0, (0, 10), "k", 5, Some(kv("ghost", 1, 5, 5)));
    let truth = Truth(vec![("k", 5, Some(kv("ghost", 1, 5, 5)))]);
    assert_violates(&run(&h, &truth), Rule::UnknownValue);
}

#[test]
fn duplicate_revision() {
    let mut h = H::default();
    h.put(0, (0, 10), "k1", "a", 2, None);
    h.put(1, (5, 15), "k2", "b", 2, None);
    let truth = Truth(vec![
        ("k1", 2, Some(kv("a", 1, 2, 2))),
        ("k2", 2, Some(kv("b", 1, 2, 2))),
    ]);
    let report = run(&h, &truth);
    assert_violates(&report, Rule::UniqueRevision);
    assert!(!report.violates(Rule::Linearizability));
}

#[test]
fn real_time_revision_inversion() {
    let mut h = H::default();
    h.put(0, (0, 10), "k1", "a", 3, None);
    h.put(1, (20, 30), "k2", "b", 2, None);
    let truth = Truth(vec![
        ("k1", 3, Some(kv("a", 1, 3, 3))),
        ("k2", 2, Some(kv("b", 1, 2, 2))),
    ]);
    let report = run(&h, &truth);
    assert_violates(&report, Rule::RealTimeOrder);
    assert!(
        !report.violates(Rule::Linearizability),
        "per key it is linearizable"
    );

    // A read may not observe an older revision than a completed read did.
    let mut h = H::default();
    h.put(0, (0, 10), "k1", "a", 2, None);
    h.put(0, (20, 30), "k2", "b", 3, None);
    h.get(1, (40, 50), "k2", 3, Some(kv("b", 1, 3, 3)));
    h.get(1, (60, 70), "k1", 2, Some(kv("a", 1, 2, 2)));
    let truth = Truth(vec![
        ("k1", 2, Some(kv("a", 1, 2, 2))),
        ("k2", 3, Some(kv("b", 1, 3, 3))),
    ]);
    assert_violates(&run(&h, &truth), Rule::RealTimeOrder);
}

#[test]
fn read_whose_reread_differs() {
    // The store says u (an unknown write) was at revision 3; the read at
    // header 3 showed a.
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put_with(1, (5, 100), "k", "u", Outcome::Unknown("timeout".into()));
    h.get(2, (20, 30), "k", 3, Some(kv("a", 1, 2, 2)));
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, Some(kv("u", 2, 2, 3))),
    ]);
    let report = run(&h, &truth);
    assert_violates(&report, Rule::ReadState);
    assert_eq!(report.learned, 1);
}

#[test]
fn acked_write_missing_from_reread() {
    let (h, _) = two_puts();
    let truth = Truth(vec![("k", 2, Some(kv("a", 1, 2, 2)))]);
    assert_violates(&run(&h, &truth), Rule::LostWrite);
}

#[test]
fn missing_reread_is_reported() {
    let (h, _) = two_puts();
    let violations = check_revisions(&h.history(), &Rereads::new()).unwrap();
    assert!(
        violations.iter().any(|v| v.rule == Rule::MissingReread),
        "{violations:?}"
    );
}

#[test]
fn delete_of_absent_key() {
    let mut h = H::default();
    h.delete(0, (0, 10), "k", 1, None);
    h.put(0, (20, 30), "k", "a", 2, None);
    h.delete(1, (40, 50), "k", 3, Some(kv("a", 1, 2, 2)));
    h.delete(2, (60, 70), "k", 3, None);
    h.get(2, (80, 90), "k", 3, None);
    h.cas(0, (100, 110), "k", 0, "b", 4, true, None);
    let truth = Truth(vec![
        ("k", 2, Some(kv("a", 1, 2, 2))),
        ("k", 3, None),
        ("k", 4, Some(kv("b", 1, 4, 4))),
    ]);
    assert_ok(&run(&h, &truth));
}

#[test]
fn serializable_stale_read() {
    // Old header, old value: fine for a serializable read.
    let (mut h, truth) = two_puts();
    h.get_with(
        1,
        (40, 50),
        "k",
        Consistency::Serializable,
        false,
        2,
        Some(kv("a", 1, 2, 2)),
    );
    assert_ok(&run(&h, &truth));

    // New header, old value: not the state at its revision.
    let (mut h, truth) = two_puts();
    h.get_with(
        1,
        (40, 50),
        "k",
        Consistency::Serializable,
        false,
        3,
        Some(kv("a", 1, 2, 2)),
    );
    let lin = check_linearizable(&h.history(), &Config::default()).unwrap();
    assert_ok(&lin);
    assert_violates(&run(&h, &truth), Rule::ReadState);
}

#[test]
fn duplicate_values_are_rejected() {
    let mut h = H::default();
    h.put(0, (0, 10), "k", "a", 2, None);
    h.put(1, (20, 30), "k2", "a", 3, None);
    let err = check_linearizable(&h.history(), &Config::default()).unwrap_err();
    assert!(matches!(err, HistoryError::DuplicateValue { .. }), "{err}");
    assert!(check_revisions(&h.history(), &Rereads::new()).is_err());
}

#[test]
fn json_round_trip() {
    let (mut h, _) = two_puts();
    h.put_with(1, (5, 100), "k", "u", Outcome::Unknown("timeout".into()));
    h.ops.push(checker::Operation {
        id: 9,
        client: 3,
        invoke_ns: 1,
        complete_ns: 2,
        request: checker::Request::Put {
            key: vec![0xff, 0],
            value: vec![1, 2, 3],
        },
        outcome: Outcome::Failed("x".into()),
        endpoint: String::new(),
    });
    let history = h.history();
    let text = history.to_json().unwrap();
    assert!(text.contains("\"value\": \"a\""), "{text}");
    assert_eq!(History::from_json(&text).unwrap(), history);
    assert!(History::from_json("{").is_err());
}

#[test]
fn budget_exhausted_is_inconclusive() {
    let (mut h, _) = two_puts();
    h.get(1, (40, 50), "k", 3, Some(kv("b", 2, 2, 3)));
    let config = Config {
        max_steps_per_key: Some(1),
        ..Config::default()
    };
    let report = check_linearizable(&h.history(), &config).unwrap();
    println!("{report}");
    assert!(!report.is_ok());
    assert_eq!(report.inconclusive().count(), 1);
}
