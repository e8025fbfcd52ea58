//! put, range, txn-put and txn-mixed: plain request/response workloads.

use crate::cli::{Consistency, PutArgs, RangeArgs, TxnMixedArgs, TxnPutArgs};
use crate::keys;
use crate::runner::Worker;
use crate::stats::BenchError;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::request_op::Request;
use proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use tonic::transport::Channel;

pub struct PutWorker {
    kv: KvClient<Channel>,
    rng: StdRng,
    value: Arc<Vec<u8>>,
    args: PutArgs,
    /// The lease every put carries (0: none).
    lease: i64,
}

impl PutWorker {
    pub fn new(ch: Channel, value: Arc<Vec<u8>>, args: &PutArgs, lease: i64) -> Self {
        PutWorker {
            kv: KvClient::new(ch),
            rng: StdRng::from_entropy(),
            value,
            args: args.clone(),
            lease,
        }
    }
}

impl Worker for PutWorker {
    type Req = PutRequest;

    fn prepare(&mut self, i: u64) -> (usize, PutRequest) {
        let n = if self.args.sequential_keys {
            i % self.args.key_space_size
        } else {
            self.rng.gen_range(0..self.args.key_space_size)
        };
        let mut key = self.args.key_prefix.as_bytes().to_vec();
        key.extend(keys::key(n, self.args.key_size));
        let req = PutRequest {
            key,
            value: self.value.as_ref().clone(),
            lease: self.lease,
            ..Default::default()
        };
        (0, req)
    }

    async fn send(&mut self, req: PutRequest) -> Result<(), BenchError> {
        self.kv.put(req).await.map(|_| ()).map_err(Into::into)
    }
}

pub struct RangeWorker {
    kv: KvClient<Channel>,
    template: RangeRequest,
}

pub fn range_request(
    key: &[u8],
    end: Option<&[u8]>,
    consistency: Consistency,
    limit: i64,
) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        range_end: end.map(<[u8]>::to_vec).unwrap_or_default(),
        limit,
        serializable: consistency == Consistency::S,
        ..Default::default()
    }
}

impl RangeWorker {
    pub fn new(ch: Channel, args: &RangeArgs) -> Self {
        let mut template = range_request(
            args.key.as_bytes(),
            args.end.as_deref().map(str::as_bytes),
            args.consistency,
            args.limit,
        );
        template.count_only = args.count_only;
        RangeWorker {
            kv: KvClient::new(ch),
            template,
        }
    }
}

impl Worker for RangeWorker {
    type Req = RangeRequest;

    fn prepare(&mut self, _i: u64) -> (usize, RangeRequest) {
        (0, self.template.clone())
    }

    async fn send(&mut self, req: RangeRequest) -> Result<(), BenchError> {
        self.kv.range(req).await.map(|_| ()).map_err(Into::into)
    }
}

pub struct TxnPutWorker {
    kv: KvClient<Channel>,
    value: Arc<Vec<u8>>,
    args: TxnPutArgs,
}

impl TxnPutWorker {
    pub fn new(ch: Channel, value: Arc<Vec<u8>>, args: &TxnPutArgs) -> Self {
        TxnPutWorker {
            kv: KvClient::new(ch),
            value,
            args: args.clone(),
        }
    }
}

fn put_op(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

/// Rejects etcd's invalid combination up front: a txn may not put the same
/// key twice, so it cannot have more puts than there are keys.
pub fn check_txn_put(args: &TxnPutArgs) -> Result<(), String> {
    if args.txn_ops > args.key_space_size {
        return Err(format!(
            "expected --txn-ops no larger than --key-space-size, got txn-ops({}) key-space-size({})",
            args.txn_ops, args.key_space_size
        ));
    }
    keys::check_key_size(args.key_size, args.key_space_size)
}

impl Worker for TxnPutWorker {
    type Req = TxnRequest;

    fn prepare(&mut self, i: u64) -> (usize, TxnRequest) {
        // Same key choice as etcd's txn-put: consecutive key numbers, so the
        // puts of one txn never repeat a key.
        let ops = (0..self.args.txn_ops)
            .map(|j| {
                let n = (i * self.args.txn_ops + j) % self.args.key_space_size;
                put_op(
                    keys::key(n, self.args.key_size),
                    self.value.as_ref().clone(),
                )
            })
            .collect();
        (
            0,
            TxnRequest {
                success: ops,
                ..Default::default()
            },
        )
    }

    async fn send(&mut self, req: TxnRequest) -> Result<(), BenchError> {
        self.kv.txn(req).await.map(|_| ()).map_err(Into::into)
    }
}

pub const READ: usize = 0;
pub const WRITE: usize = 1;

pub struct TxnMixedWorker {
    kv: KvClient<Channel>,
    rng: StdRng,
    value: Arc<Vec<u8>>,
    read: RangeRequest,
    read_fraction: f64,
    args: TxnMixedArgs,
}

impl TxnMixedWorker {
    pub fn new(ch: Channel, value: Arc<Vec<u8>>, args: &TxnMixedArgs) -> Self {
        let read = match &args.key {
            Some(k) => range_request(
                k.as_bytes(),
                args.end.as_deref().map(str::as_bytes),
                args.consistency,
                args.limit,
            ),
            // Whole key space: key "\0" with range_end "\0" means "every key
            // >= \0", i.e. all keys, as etcd's `WithFromKey` does.
            None => range_request(b"\0", Some(&b"\0"[..]), args.consistency, args.limit),
        };
        let r = args.rw_ratio.max(0.0);
        TxnMixedWorker {
            kv: KvClient::new(ch),
            rng: StdRng::from_entropy(),
            value,
            read,
            read_fraction: r / (1.0 + r),
            args: args.clone(),
        }
    }
}

impl Worker for TxnMixedWorker {
    type Req = TxnRequest;

    fn prepare(&mut self, i: u64) -> (usize, TxnRequest) {
        if self.rng.gen::<f64>() < self.read_fraction {
            let op = RequestOp {
                request: Some(Request::RequestRange(self.read.clone())),
            };
            (
                READ,
                TxnRequest {
                    success: vec![op],
                    ..Default::default()
                },
            )
        } else {
            let n = i % self.args.key_space_size;
            let op = put_op(
                keys::key(n, self.args.key_size),
                self.value.as_ref().clone(),
            );
            (
                WRITE,
                TxnRequest {
                    success: vec![op],
                    ..Default::default()
                },
            )
        }
    }

    async fn send(&mut self, req: TxnRequest) -> Result<(), BenchError> {
        self.kv.txn(req).await.map(|_| ()).map_err(Into::into)
    }
}
