//! Unit tests of the etcd single-key model.

use std::sync::Arc;

use checker::model::{EtcdModel, EtcdOp, EtcdState, KvState, Model};
use checker::Kv;

fn kv(v: &str, ver: i64, c: i64, m: i64) -> Kv {
    Kv {
        value: v.as_bytes().to_vec(),
        create_revision: c,
        mod_revision: m,
        version: ver,
    }
}

#[test]
fn put_get_cas_delete() {
    let m = EtcdModel::default();
    let s = m.init();
    let put = EtcdOp::Put {
        value: b"a".to_vec(),
        revision: 2,
        prev: None,
    };
    let s = m.step(&s, &put).unwrap();
    let get = EtcdOp::Get {
        revision: 2,
        kv: Some(kv("a", 1, 2, 2)),
    };
    assert_eq!(m.step(&s, &get), Some(s.clone()));
    let stale_header = EtcdOp::Get {
        revision: 1,
        kv: Some(kv("a", 1, 2, 2)),
    };
    assert!(m.step(&s, &stale_header).is_none());
    let cas = EtcdOp::Cas {
        expected: 2,
        value: b"b".to_vec(),
        revision: 3,
        succeeded: true,
        kv: Some(kv("a", 1, 2, 2)),
    };
    let s2 = m.step(&s, &cas).unwrap();
    assert!(
        m.step(&s2, &cas).is_none(),
        "a second success of the same compare"
    );
    let del = EtcdOp::Delete {
        revision: 4,
        deleted: Some(kv("b", 2, 2, 3)),
    };
    let gone = m.step(&s2, &del).unwrap();
    assert_eq!(gone, EtcdState { kv: None, floor: 4 });
    // A write below the revision of the delete cannot follow it.
    let late = EtcdOp::Put {
        value: b"c".to_vec(),
        revision: 3,
        prev: None,
    };
    assert!(m.step(&gone, &late).is_none());
    let nothing = EtcdOp::Delete {
        revision: 4,
        deleted: None,
    };
    assert_eq!(m.step(&gone, &nothing), Some(gone.clone()));
}

#[test]
fn unknown_delete_keeps_the_floor() {
    let m = EtcdModel::default();
    let s = EtcdState {
        kv: Some(KvState {
            value: b"a".to_vec(),
            version: 1,
            create_revision: Some(5),
            mod_revision: Some(5),
        }),
        floor: 5,
    };
    let gone = m.step(&s, &EtcdOp::UnknownDelete).unwrap();
    assert_eq!(gone, EtcdState { kv: None, floor: 5 });
    let old = EtcdOp::Put {
        value: b"b".to_vec(),
        revision: 4,
        prev: None,
    };
    assert!(m.step(&gone, &old).is_none());
}

#[test]
fn learned_write_padding() {
    let strict = EtcdModel::default();
    let padded = EtcdModel {
        padding: 1,
        known_revisions: Arc::new(vec![2, 9]),
    };
    let crowded = EtcdModel {
        padding: 1,
        known_revisions: Arc::new((2..=9).collect()),
    };
    let s = EtcdState {
        kv: Some(KvState {
            value: b"a".to_vec(),
            version: 1,
            create_revision: Some(2),
            mod_revision: Some(2),
        }),
        floor: 2,
    };
    let op = EtcdOp::Learned {
        expected: None,
        kv: kv("c", 3, 2, 9),
    };
    assert!(strict.step(&s, &op).is_none());
    assert!(padded.step(&s, &op).is_some());
    assert!(
        crowded.step(&s, &op).is_none(),
        "no free revision for the padding write"
    );
}
