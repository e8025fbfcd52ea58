//! etcd request operations the router tests build their Txns from.

use proto::etcdserverpb::{request_op::Request, DeleteRangeRequest, PutRequest, RequestOp};

/// A Txn operation putting `value` at `key`.
pub fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

/// A Txn operation deleting `key`.
pub fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}
