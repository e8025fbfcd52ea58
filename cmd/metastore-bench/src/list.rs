//! list: paged lists as Kubernetes' API server makes them (its etcd3
//! store's `GetList`): the first page at the newest revision, every next
//! page from the last key + "\0" at the first page's revision, until a
//! page says there is no more. One request is one whole list.
//!
//! Every page carries `count`, the number of keys from the page's start to
//! the end of the range at that revision; the worker checks it against the
//! first page's count minus the keys already listed, so a server that
//! counts wrong fails the run (`WrongCount`) instead of looking fast.

use crate::cli::{Consistency, ListArgs};
use crate::runner::Worker;
use crate::stats::BenchError;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::RangeRequest;
use tonic::transport::Channel;

pub struct ListWorker {
    kv: KvClient<Channel>,
    prefix: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
    serializable: bool,
}

/// etcd's `GetPrefixRangeEnd`: the first key after every key starting with
/// `prefix` ("\0", i.e. the end of the key space, if there is none).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl ListWorker {
    pub fn new(ch: Channel, args: &ListArgs) -> Self {
        let prefix = args.prefix.as_bytes().to_vec();
        ListWorker {
            kv: KvClient::new(ch),
            end: prefix_end(&prefix),
            prefix,
            limit: args.limit.max(0),
            serializable: args.consistency == Consistency::S,
        }
    }
}

impl Worker for ListWorker {
    type Req = ();

    fn prepare(&mut self, _i: u64) -> (usize, ()) {
        (0, ())
    }

    async fn send(&mut self, _req: ()) -> Result<(), BenchError> {
        let mut key = self.prefix.clone();
        let mut revision = 0;
        let mut listed: i64 = 0;
        let mut total = None;
        loop {
            let resp = self
                .kv
                .range(RangeRequest {
                    key: key.clone(),
                    range_end: self.end.clone(),
                    limit: self.limit,
                    revision,
                    serializable: self.serializable && revision == 0,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let first = *total.get_or_insert(resp.count);
            if resp.count != first - listed {
                return Err(BenchError::new(
                    "WrongCount",
                    format!(
                        "page after {listed} keys counted {} keys to go, expected {}",
                        resp.count,
                        first - listed
                    ),
                ));
            }
            if revision == 0 {
                revision = resp.header.map(|h| h.revision).unwrap_or_default();
            }
            listed += resp.kvs.len() as i64;
            let Some(last) = resp.kvs.last() else {
                break;
            };
            if !resp.more {
                break;
            }
            key = last.key.clone();
            key.push(0);
        }
        if listed != total.unwrap_or_default() {
            return Err(BenchError::new(
                "WrongCount",
                format!("listed {listed} keys, the first page counted {total:?}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
