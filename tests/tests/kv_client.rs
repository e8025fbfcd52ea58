//! The Rust `etcd-client` crate against a MetaStore dev node: every KV
//! feature and every KV error of etcd, checked by code and text.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, Error, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use test_support::{client, Node};

fn grpc_error(e: Error) -> (tonic::Code, String) {
    match e {
        Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test]
async fn revisions_and_versions() {
    let node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    // A fresh store is at revision 1; the first write gets 2.
    let r = c.get("none", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 1);
    assert_eq!(r.count(), 0);
    let p = c.put("a", "1", None).await.unwrap();
    assert_eq!(p.header().unwrap().revision(), 2);
    let p = c
        .put("a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(p.header().unwrap().revision(), 3);
    assert_eq!(p.prev_key().unwrap().value(), b"1");
    let kv = c.get("a", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (2, 3, 2)
    );
    // A delete of nothing takes no revision.
    let d = c.delete("nothing", None).await.unwrap();
    assert_eq!((d.deleted(), d.header().unwrap().revision()), (0, 3));
    let d = c
        .delete("a", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!((d.deleted(), d.header().unwrap().revision()), (1, 4));
    assert_eq!(d.prev_kvs()[0].value(), b"2");
    let p = c.put("a", "3", None).await.unwrap();
    assert_eq!(p.header().unwrap().revision(), 5);
    let kv = c.get("a", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.create_revision(), kv.version()), (5, 1));
    // Header identifies the member.
    let h = c.get("a", None).await.unwrap().header().unwrap().clone();
    assert_ne!(h.member_id(), 0);
    assert_ne!(h.cluster_id(), 0);
    assert!(h.raft_term() >= 1);
}

#[tokio::test]
async fn range_options() {
    let node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    for (k, v) in [("p/a", "3"), ("p/b", "1"), ("p/c", "2"), ("q", "0")] {
        c.put(k, v, None).await.unwrap();
    }
    let keys = |r: &etcd_client::GetResponse| -> Vec<String> {
        r.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect()
    };
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["p/a", "p/b", "p/c"]);
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await
        .unwrap();
    assert_eq!(
        (keys(&r), r.more(), r.count()),
        (vec!["p/a".into(), "p/b".into()], true, 3)
    );
    let r = c
        .get(
            "p/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Value, SortOrder::Descend),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["p/a", "p/c", "p/b"]);
    let r = c
        .get("p/b", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["p/b", "p/c", "q"]);
    let r = c
        .get("\0", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(r.count(), 4);
    let r = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count()), (0, 3));
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    let r = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(r.count(), 3);
    let r = c
        .get(
            "p/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_min_mod_revision(3)
                    .with_max_mod_revision(4),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["p/b", "p/c"]);
    let r = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_min_create_revision(4)),
        )
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["p/c"]);
    // Historical read.
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_revision(3)))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["p/a", "p/b"]);
    assert_eq!(r.header().unwrap().revision(), 5);
}

#[tokio::test]
async fn txn_nested_and_ranges() {
    let node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    c.put("x", "1", None).await.unwrap();
    c.put("y", "1", None).await.unwrap();
    let txn = Txn::new()
        .when(vec![
            Compare::value("x", CompareOp::Equal, "1"),
            Compare::version("y", CompareOp::Greater, 0),
        ])
        .and_then(vec![
            TxnOp::put("x", "2", None),
            TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::value("x", CompareOp::Equal, "1")])
                    .and_then(vec![TxnOp::put("z", "then", None)])
                    .or_else(vec![TxnOp::put("z", "else", None)]),
            ),
            TxnOp::get("x", None),
        ])
        .or_else(vec![TxnOp::put("never", "1", None)]);
    let r = c.txn(txn).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 4);
    // Nested compares see the state before the txn: x was "1".
    assert_eq!(c.get("z", None).await.unwrap().kvs()[0].value(), b"then");
    match &r.op_responses()[2] {
        TxnOpResponse::Get(g) => {
            assert_eq!(g.kvs()[0].value(), b"2");
            assert_eq!(g.kvs()[0].mod_revision(), 4);
        }
        other => panic!("unexpected {other:?}"),
    }
    // A compare over a range: every key must satisfy it.
    let r = c
        .txn(
            Txn::new()
                .when(vec![
                    Compare::version("x", CompareOp::Equal, 1).with_range("z")
                ])
                .and_then(vec![TxnOp::put("never", "1", None)])
                .or_else(vec![TxnOp::get("x", Some(GetOptions::new().with_prefix()))]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded());
    // Read-only txn takes no revision.
    assert_eq!(r.header().unwrap().revision(), 4);
}

#[tokio::test]
async fn kv_errors_have_etcd_codes_and_texts() {
    use tonic::Code;
    let node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    c.put("k", "v", None).await.unwrap();
    let e = grpc_error(c.put("", "v", None).await.unwrap_err());
    assert_eq!(
        e,
        (
            Code::InvalidArgument,
            "etcdserver: key is not provided".into()
        )
    );
    let e = grpc_error(c.get("", None).await.unwrap_err());
    assert_eq!(
        e,
        (
            Code::InvalidArgument,
            "etcdserver: key is not provided".into()
        )
    );
    let e = grpc_error(c.delete("", None).await.unwrap_err());
    assert_eq!(
        e,
        (
            Code::InvalidArgument,
            "etcdserver: key is not provided".into()
        )
    );
    let e = grpc_error(
        c.put("missing", "", Some(PutOptions::new().with_ignore_value()))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e,
        (Code::InvalidArgument, "etcdserver: key not found".into())
    );
    let e = grpc_error(
        c.put("missing", "v", Some(PutOptions::new().with_ignore_lease()))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e,
        (Code::InvalidArgument, "etcdserver: key not found".into())
    );
    let e = grpc_error(
        c.put("k", "v", Some(PutOptions::new().with_lease(99)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e,
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    let many: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("t{i}"), "v", None))
        .collect();
    let e = grpc_error(c.txn(Txn::new().and_then(many)).await.unwrap_err());
    assert_eq!(
        e,
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request".into()
        )
    );
    let ok: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::put(format!("t{i}"), "v", None))
        .collect();
    c.txn(Txn::new().and_then(ok)).await.unwrap();
    let dup = Txn::new().and_then(vec![TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]);
    let e = grpc_error(c.txn(dup).await.unwrap_err());
    assert_eq!(
        e,
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request".into()
        )
    );
    let dup = Txn::new().and_then(vec![
        TxnOp::delete("a", Some(DeleteOptions::new().with_range("z"))),
        TxnOp::put("d", "2", None),
    ]);
    let e = grpc_error(c.txn(dup).await.unwrap_err());
    assert_eq!(e.1, "etcdserver: duplicate key given in txn request");
    let big = vec![b'x'; 1536 * 1024 + 100];
    let e = grpc_error(c.put("big", big, None).await.unwrap_err());
    assert_eq!(
        e,
        (
            Code::InvalidArgument,
            "etcdserver: request is too large".into()
        )
    );
    let current = c.get("k", None).await.unwrap().header().unwrap().revision();
    let e = grpc_error(
        c.get("k", Some(GetOptions::new().with_revision(current + 1)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e,
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    c.compact(current, None).await.unwrap();
    let e = grpc_error(
        c.get("k", Some(GetOptions::new().with_revision(current - 1)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e,
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    // Reading exactly at the compaction revision works.
    c.get("k", Some(GetOptions::new().with_revision(current)))
        .await
        .unwrap();
    let e = grpc_error(c.compact(current, None).await.unwrap_err());
    assert_eq!(
        e.1,
        "etcdserver: mvcc: required revision has been compacted"
    );
    let e = grpc_error(c.compact(current + 5, None).await.unwrap_err());
    assert_eq!(
        e.1,
        "etcdserver: mvcc: required revision is a future revision"
    );
    // Nothing was lost on the way.
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v");
}

#[tokio::test]
async fn concurrent_writers_get_unique_consecutive_revisions() {
    let node = Node::start_dev();
    let c = client(&node.endpoint()).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..50 {
                let key = if i % 2 == 0 {
                    format!("w{w}-{i}")
                } else {
                    "shared".to_string()
                };
                let r = c.put(key, "v", None).await.unwrap();
                revs.push(r.header().unwrap().revision());
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let expected: Vec<i64> = (2..2 + 400).collect();
    assert_eq!(all, expected);
    let mut c = c.clone();
    let kv = c.get("shared", None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.version(), 200);
}
