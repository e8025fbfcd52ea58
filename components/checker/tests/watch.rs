//! Hand-made watch streams over a small hand-made history: the correct
//! stream passes, and a stream broken against each watch rule fails by
//! that rule.

mod common;

use checker::watch::{self, prefix_end};
use checker::{
    check_watches, EventType, History, HistoryError, Kv, Outcome, Report, Rule, Watch, WatchEvent,
    WatchResponse,
};
use common::{k, kv, H};

/// The history (prefix "w/"):
/// - #0 Put a=a1 @2; #1 Put b=b1 @3; #2 MultiPut a=a2, c=c1 @4;
/// - #3 Delete b @5; #4 Put a=a3 @6;
/// - #5 Put c=c2, outcome unknown (applied at 7 in the streams below);
/// - #6 Put b=b2, failed; #7 Delete c, outcome unknown; #8 Put b=b3 @8.
fn history() -> History {
    let mut h = H::default();
    h.put(0, (0, 10), "w/a", "a1", 2, None);
    h.put(0, (10, 20), "w/b", "b1", 3, None);
    h.multi_put(
        1,
        (20, 30),
        &[("w/a", "a2"), ("w/c", "c1")],
        4,
        vec![Some(a1()), None],
    );
    h.delete(0, (30, 40), "w/b", 5, Some(b1()));
    h.put(0, (40, 50), "w/a", "a3", 6, Some(a2()));
    h.put_with(2, (50, 60), "w/c", "c2", Outcome::Unknown("timeout".into()));
    h.put_with(
        0,
        (60, 70),
        "w/b",
        "b2",
        Outcome::Failed("no leader".into()),
    );
    let req = checker::Request::Delete { key: k("w/c") };
    h.op(3, (70, 80), req, Outcome::Unknown("timeout".into()));
    h.put(0, (80, 90), "w/b", "b3", 8, None);
    h.history()
}

fn a1() -> Kv {
    kv("a1", 1, 2, 2)
}
fn b1() -> Kv {
    kv("b1", 1, 3, 3)
}
fn a2() -> Kv {
    kv("a2", 2, 2, 4)
}
fn c1() -> Kv {
    kv("c1", 1, 4, 4)
}
fn a3() -> Kv {
    kv("a3", 3, 2, 6)
}
fn c2() -> Kv {
    kv("c2", 2, 4, 7)
}
fn b3() -> Kv {
    kv("b3", 1, 8, 8)
}

fn put(key: &str, kv: Kv, prev: Option<Kv>) -> WatchEvent {
    WatchEvent {
        kind: EventType::Put,
        key: k(key),
        kv,
        prev_kv: prev,
    }
}

fn del(key: &str, rev: i64, prev: Option<Kv>) -> WatchEvent {
    WatchEvent {
        kind: EventType::Delete,
        key: k(key),
        kv: kv("", 0, 0, rev),
        prev_kv: prev,
    }
}

fn resp(events: Vec<WatchEvent>) -> WatchResponse {
    WatchResponse {
        revision: 8,
        events,
        ..WatchResponse::default()
    }
}

fn progress(revision: i64) -> WatchResponse {
    WatchResponse {
        revision,
        progress: true,
        ..WatchResponse::default()
    }
}

fn created(revision: i64) -> WatchResponse {
    WatchResponse {
        revision,
        created: true,
        ..WatchResponse::default()
    }
}

/// The correct stream of a prefix watch from revision 1 with prev_kv.
fn full() -> Watch {
    Watch {
        prev_kv: true,
        progress_notify: true,
        responses: vec![
            created(1),
            resp(vec![put("w/a", a1(), None), put("w/b", b1(), None)]),
            resp(vec![put("w/a", a2(), Some(a1())), put("w/c", c1(), None)]),
            resp(vec![
                del("w/b", 5, Some(b1())),
                put("w/a", a3(), Some(a2())),
            ]),
            progress(6),
            resp(vec![put("w/c", c2(), Some(c1())), put("w/b", b3(), None)]),
            WatchResponse {
                requested: true,
                ..progress(8)
            },
        ],
        ..Watch::prefix(b"w/", 1)
    }
}

fn run(watches: &[Watch], compacted: i64) -> Report {
    let report = check_watches(&history(), watches, compacted).unwrap();
    println!("{report}");
    report
}

fn rules(report: &Report) -> Vec<Rule> {
    let mut rules: Vec<Rule> = report.all_violations().map(|v| v.rule).collect();
    rules.sort();
    rules.dedup();
    rules
}

/// Fails by `rule` alone, citing watch #`watch`.
fn assert_only(report: &Report, rule: Rule, watch: usize) {
    assert_eq!(rules(report), vec![rule], "{report}");
    let v = report.all_violations().next().unwrap();
    assert!(
        v.explanation.starts_with(&format!("watch #{watch} ")),
        "{v}"
    );
}

fn events_mut(w: &mut Watch, j: usize) -> &mut Vec<WatchEvent> {
    &mut w.responses[j].events
}

#[test]
fn the_correct_stream_passes() {
    let report = run(&[full()], 0);
    assert!(report.is_ok(), "{report}");
    let summary = report.watches.unwrap();
    assert_eq!(
        (summary.events, summary.progress, summary.learned),
        (8, 2, 1)
    );
}

#[test]
fn a_write_of_unknown_outcome_may_be_missing() {
    let mut w = full();
    events_mut(&mut w, 5).remove(0); // c2 never applied
    events_mut(&mut w, 5)[0].prev_kv = None;
    assert!(run(&[w], 0).is_ok());
}

#[test]
fn a_write_of_unknown_outcome_seen_by_one_watch_binds_the_others() {
    let mut other = full();
    events_mut(&mut other, 5).remove(0);
    let report = run(&[full(), other], 0);
    assert_only(&report, Rule::WatchReliable, 1);
    let v = report.all_violations().next().unwrap();
    assert!(v.explanation.contains("seen by watch #0"), "{v}");
}

#[test]
fn reordered_events_break_ordered() {
    let mut w = full();
    events_mut(&mut w, 1).swap(0, 1); // b1 @3 before a1 @2
    let report = run(&[w], 0);
    assert_only(&report, Rule::WatchOrdered, 0);
    // Keys of one revision come in any order.
    let mut w = full();
    events_mut(&mut w, 2).swap(0, 1);
    assert!(run(&[w], 0).is_ok());
}

#[test]
fn a_created_response_not_first_and_events_after_a_cancel_break_ordered() {
    let mut w = full();
    w.responses.swap(0, 1);
    assert!(run(&[w], 0).violates(Rule::WatchOrdered));
    let mut w = full();
    let cancel = WatchResponse {
        revision: 6,
        canceled: true,
        ..WatchResponse::default()
    };
    w.responses.insert(4, cancel);
    assert_only(&run(&[w], 0), Rule::WatchOrdered, 0);
}

#[test]
fn a_duplicate_event_breaks_unique() {
    let mut w = full();
    let e = events_mut(&mut w, 3)[0].clone();
    events_mut(&mut w, 3).insert(1, e);
    assert_only(&run(&[w], 0), Rule::WatchUnique, 0);
}

#[test]
fn a_revision_split_over_responses_or_delivered_in_part_breaks_atomic() {
    let mut w = full();
    let c = events_mut(&mut w, 2).pop().unwrap();
    w.responses.insert(3, resp(vec![c]));
    assert_only(&run(&[w], 0), Rule::WatchAtomic, 0);
    let mut w = full();
    events_mut(&mut w, 2).pop(); // c1 of the MultiPut missing
    let report = run(&[w], 0);
    assert_only(&report, Rule::WatchAtomic, 0);
    assert_eq!(report.all_violations().next().unwrap().revisions, vec![4]);
}

#[test]
fn a_missing_revision_breaks_reliable() {
    let mut w = full();
    events_mut(&mut w, 3).remove(0); // Delete b @5
    let report = run(&[w], 0);
    assert_only(&report, Rule::WatchReliable, 0);
    let v = report.all_violations().next().unwrap();
    assert_eq!((v.revisions.clone(), v.ops.clone()), (vec![5], vec![3]));
    // Only up to the highest revision seen: a stream cut after 6 owes no more.
    let mut w = full();
    w.responses.truncate(5);
    assert!(run(&[w], 0).is_ok());
}

#[test]
fn events_that_are_no_write_of_the_history_break_valid() {
    let cases: Vec<(usize, usize, WatchEvent)> = vec![
        (1, 0, put("w/a", kv("zz", 1, 2, 2), None)), // nobody wrote it
        (1, 1, put("w/b", kv("a1", 1, 3, 3), None)), // written to w/a
        (5, 1, put("w/b", kv("b3", 1, 9, 9), None)), // at another revision
        (3, 1, put("w/a", kv("a3", 2, 2, 6), Some(a2()))), // wrong version
        (5, 1, put("w/b", kv("b2", 1, 8, 8), None)), // a failed write
        (3, 0, del("w/a", 5, Some(a2()))),           // no delete of w/a at 5
        (
            3,
            0,
            WatchEvent {
                kv: kv("b1", 1, 3, 5),
                ..del("w/b", 5, Some(b1()))
            },
        ), // not etcd's delete kv
    ];
    for (j, n, event) in cases {
        let mut w = full();
        events_mut(&mut w, j)[n] = event.clone();
        let report = run(&[w], 0);
        assert!(report.violates(Rule::WatchValid), "{event:?}:\n{report}");
    }
}

#[test]
fn a_delete_of_unknown_outcome_is_placed_by_its_event() {
    let mut w = full();
    let last = w.responses.pop().unwrap();
    w.responses.push(resp(vec![del("w/c", 9, Some(c2()))]));
    w.responses.push(WatchResponse {
        revision: 9,
        ..last
    });
    assert!(run(std::slice::from_ref(&w), 0).is_ok());
    // ... and then binds another watch of w/c up to 9.
    let mut other = w.clone();
    other.responses.remove(6);
    assert_only(&run(&[w, other], 0), Rule::WatchReliable, 1);
}

#[test]
fn events_after_a_progress_notification_at_their_revision_break_bookmarkable() {
    let mut w = full();
    w.responses.swap(3, 4); // progress at 6 before the events of 5 and 6
    assert_only(&run(&[w], 0), Rule::WatchBookmarkable, 0);
    let mut w = full();
    w.responses.insert(6, progress(5)); // going back
    assert_only(&run(&[w], 0), Rule::WatchBookmarkable, 0);
}

#[test]
fn a_wrong_prev_kv_breaks_prev_kv() {
    let mut w = full();
    events_mut(&mut w, 3)[1].prev_kv = Some(a1()); // a3's prev is a2
    assert_only(&run(&[w], 0), Rule::WatchPrevKv, 0);
    let mut w = full();
    events_mut(&mut w, 3)[1].prev_kv = None;
    assert_only(&run(std::slice::from_ref(&w), 0), Rule::WatchPrevKv, 0);
    // Absent is fine when the revision before the event is compacted.
    assert!(run(&[w], 6).is_ok());
    let mut w = full();
    events_mut(&mut w, 1)[0].prev_kv = Some(a1()); // a create has none
    assert_only(&run(&[w], 0), Rule::WatchPrevKv, 0);
    let mut w = full();
    w.prev_kv = false; // prev_kv not asked for, yet sent
    assert_only(&run(&[w], 0), Rule::WatchPrevKv, 0);
}

#[test]
fn events_against_the_range_or_the_filters_break_filtered() {
    let mut w = full();
    w.no_delete = true;
    assert_only(&run(std::slice::from_ref(&w), 0), Rule::WatchFiltered, 0);
    events_mut(&mut w, 3).remove(0);
    assert!(run(&[w], 0).is_ok());
    let mut w = full();
    w.range_end = b"w/c".to_vec(); // [w/a, w/c)
    assert!(run(&[w], 0).violates(Rule::WatchFiltered));
    // A no_put watch of w/b sees only its delete.
    let w = Watch {
        no_put: true,
        responses: vec![created(1), resp(vec![del("w/b", 5, None)]), progress(8)],
        ..Watch::key(b"w/b", 1)
    };
    assert!(run(&[w], 0).is_ok());
}

#[test]
fn events_below_the_start_revision_and_wrong_compaction_break_resumable() {
    let mut w = full();
    w.start_revision = 3;
    assert_only(&run(&[w], 0), Rule::WatchResumable, 0);
    let cancel = WatchResponse {
        revision: 8,
        canceled: true,
        compact_revision: 5,
        ..WatchResponse::default()
    };
    let mut ok = Watch {
        responses: vec![created(8), cancel],
        ..Watch::prefix(b"w/", 3)
    };
    assert!(run(std::slice::from_ref(&ok), 5).is_ok());
    assert_only(&run(std::slice::from_ref(&ok), 4), Rule::WatchResumable, 0);
    ok.start_revision = 5;
    assert_only(&run(&[ok], 5), Rule::WatchResumable, 0);
}

#[test]
fn a_resumed_watch_continues_its_predecessor() {
    let mut first = full();
    first.responses.truncate(3); // saw up to 4
    let mut second = full();
    second.resumed_from = Some(0);
    second.start_revision = first.resume_revision().unwrap();
    assert_eq!(second.start_revision, 5);
    second.responses.drain(1..3);
    assert!(run(&[first.clone(), second.clone()], 0).is_ok());
    // Resumed too late: the Delete at 5 was delivered by neither.
    second.start_revision = 6;
    events_mut(&mut second, 1).remove(0);
    assert_only(&run(&[first, second], 0), Rule::WatchResumable, 1);
}

#[test]
fn a_watch_from_now_owes_the_events_after_its_created_revision() {
    let w = Watch {
        prev_kv: true,
        responses: vec![
            created(5),
            resp(vec![put("w/a", a3(), Some(a2()))]),
            progress(8),
        ],
        ..Watch::prefix(b"w/", 0)
    };
    assert_eq!(w.window_start(), Some(6));
    assert_only(&run(std::slice::from_ref(&w), 0), Rule::WatchReliable, 0); // b3 @8 missing
    let mut ok = w;
    events_mut(&mut ok, 1).push(put("w/b", b3(), None));
    assert!(run(std::slice::from_ref(&ok), 0).is_ok());
    // Events at or below the created revision may come (the race etcd
    // allows), but then all of them from there on.
    let mut early = ok.clone();
    events_mut(&mut early, 1).insert(0, del("w/b", 5, Some(b1())));
    assert!(run(&[early], 0).is_ok());
    let multi_put = [put("w/a", a2(), Some(a1())), put("w/c", c1(), None)];
    events_mut(&mut ok, 1).splice(0..0, multi_put);
    assert_only(&run(&[ok], 0), Rule::WatchReliable, 0); // Delete b @5
}

#[test]
fn an_unknown_multi_put_seen_in_part_breaks_atomic() {
    let mut h = H::default();
    h.multi_put_with(
        0,
        (0, 10),
        &[("m/x", "x1"), ("m/y", "y1")],
        Outcome::Unknown("timeout".into()),
    );
    let w = Watch {
        responses: vec![
            created(1),
            resp(vec![put("m/x", kv("x1", 1, 2, 2), None)]),
            progress(2),
        ],
        ..Watch::prefix(b"m/", 1)
    };
    let report = check_watches(&h.history(), std::slice::from_ref(&w), 0).unwrap();
    assert_only(&report, Rule::WatchAtomic, 0);
    let mut whole = w;
    events_mut(&mut whole, 1).push(put("m/y", kv("y1", 1, 2, 2), None));
    assert!(check_watches(&h.history(), &[whole], 0).unwrap().is_ok());
}

#[test]
fn malformed_recordings_are_refused() {
    let mut w = full();
    w.responses[4].events.push(put("w/a", a3(), None));
    assert!(matches!(
        check_watches(&history(), &[w], 0),
        Err(HistoryError::MalformedWatch { watch: 0, .. })
    ));
    let mut w = full();
    w.resumed_from = Some(0);
    assert!(matches!(
        check_watches(&history(), &[w], 0),
        Err(HistoryError::MalformedWatch { .. })
    ));
}

#[test]
fn ranges_and_json() {
    assert_eq!(prefix_end(b"w/"), b"w0".to_vec());
    assert_eq!(prefix_end(&[0xff, 0xff]), vec![0]);
    let all = Watch {
        range_end: vec![0],
        ..Watch::key(b"w/b", 0)
    };
    assert!(all.contains(b"w/b") && all.contains(b"z") && !all.contains(b"w/a"));
    assert!(Watch::key(b"w/b", 0).contains(b"w/b") && !Watch::key(b"w/b", 0).contains(b"w/bb"));
    let watches = vec![full(), all];
    let text = watch::to_json(&watches).unwrap();
    assert_eq!(watch::from_json(&text).unwrap(), watches);
}
