//! Request validation done before a request touches any state, with etcd's
//! rules and in etcd's order (etcd's v3rpc `key.go`), so that the same bad
//! request fails with the same error on both.

use std::collections::HashSet;

use proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::Error;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

pub fn check_range(r: &RangeRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// Structure checks of a txn, then etcd's put/delete overlap check of both
/// branches (done last, as etcd does, to avoid its cost on malformed input).
pub fn check_txn(r: &TxnRequest) -> Result<(), Error> {
    check_txn_structure(r, MAX_TXN_OPS)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_structure(r: &TxnRequest, max_ops: usize) -> Result<(), Error> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_op(op, max_ops - ops)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: usize) -> Result<(), Error> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn_structure(r, max_ops),
        // etcd answers an empty union with this error.
        None => Err(Error::KeyNotFound),
    }
}

/// A delete's interval as etcd's overlap check sees it: a point for an
/// empty range_end, else `[key, range_end)` taken literally (etcd does not
/// widen `"\0"` here, so a put after `"\0"`-ended deletes is not flagged).
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.start.as_slice(),
            Some(end) => key >= self.start.as_slice() && key < end.as_slice(),
        }
    }
}

/// Returns the puts and deletes of `ops` (recursively) or DuplicateKey if a
/// key is put twice or put inside a deleted range on one execution path.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), Error> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Interval {
                start: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.iter().any(|d| d.contains(k)) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // then and else exclude each other, so a key in both is fine.
            if (puts.contains(k) && !puts_then.contains(k)) || dels.iter().any(|d| d.contains(k)) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || dels.iter().any(|d| d.contains(&p.key)) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::etcdserverpb::Compare;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }

    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    #[test]
    fn duplicate_puts_and_put_in_delete_range() {
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")], vec![])),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![put("b"), del("a", "c")], vec![])),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![put("c"), del("a", "c")], vec![])),
            Ok(())
        );
        // Same key in then and else of a nested txn is fine...
        let nested = RequestOp {
            request: Some(Request::RequestTxn(txn(vec![put("x")], vec![put("x")]))),
        };
        assert_eq!(check_txn(&txn(vec![nested.clone()], vec![])), Ok(()));
        // ...but not together with a put of the outer level.
        assert_eq!(
            check_txn(&txn(vec![nested, put("x")], vec![])),
            Err(Error::DuplicateKey)
        );
        // Deletes may overlap each other.
        assert_eq!(
            check_txn(&txn(vec![del("a", "z"), del("b", "")], vec![])),
            Ok(())
        );
    }

    #[test]
    fn too_many_ops_and_empty_keys() {
        let many: Vec<RequestOp> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(many, vec![])), Err(Error::TooManyOps));
        let ok: Vec<RequestOp> = (0..128).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(ok, vec![])), Ok(()));
        let mut t = txn(vec![], vec![]);
        t.compare.push(Compare::default());
        assert_eq!(check_txn(&t), Err(Error::EmptyKey));
        assert_eq!(
            check_txn(&txn(vec![RequestOp { request: None }], vec![])),
            Err(Error::KeyNotFound)
        );
    }

    #[test]
    fn put_flags() {
        let mut p = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&p), Err(Error::ValueProvided));
        p.value.clear();
        p.lease = 3;
        p.ignore_lease = true;
        assert_eq!(check_put(&p), Err(Error::LeaseProvided));
        p.key.clear();
        assert_eq!(check_put(&p), Err(Error::EmptyKey));
    }
}
