//! Builders for hand-made histories and their re-reads.
#![allow(dead_code)]

use checker::{
    reread_plan, Consistency, History, Key, KeyKv, Kv, Operation, Outcome, Request, RereadResult,
    Rereads, Response,
};

pub fn kv(value: &str, version: i64, create: i64, modr: i64) -> Kv {
    Kv {
        value: value.as_bytes().to_vec(),
        create_revision: create,
        mod_revision: modr,
        version,
    }
}

pub fn k(key: &str) -> Key {
    key.as_bytes().to_vec()
}

#[derive(Default)]
pub struct H {
    pub ops: Vec<Operation>,
}

impl H {
    pub fn op(
        &mut self,
        client: usize,
        t: (u64, u64),
        request: Request,
        outcome: Outcome,
    ) -> usize {
        let id = self.ops.len();
        self.ops.push(Operation {
            id,
            client,
            invoke_ns: t.0,
            complete_ns: t.1,
            request,
            outcome,
            endpoint: format!("n{}", client % 3 + 1),
        });
        id
    }

    pub fn put(
        &mut self,
        c: usize,
        t: (u64, u64),
        key: &str,
        value: &str,
        revision: i64,
        prev: Option<Kv>,
    ) -> usize {
        let req = Request::Put {
            key: k(key),
            value: value.as_bytes().to_vec(),
        };
        self.op(c, t, req, Outcome::Ok(Response::Put { revision, prev }))
    }

    pub fn put_with(
        &mut self,
        c: usize,
        t: (u64, u64),
        key: &str,
        value: &str,
        outcome: Outcome,
    ) -> usize {
        let req = Request::Put {
            key: k(key),
            value: value.as_bytes().to_vec(),
        };
        self.op(c, t, req, outcome)
    }

    pub fn get(
        &mut self,
        c: usize,
        t: (u64, u64),
        key: &str,
        revision: i64,
        kv: Option<Kv>,
    ) -> usize {
        self.get_with(c, t, key, Consistency::Linearizable, false, revision, kv)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn get_with(
        &mut self,
        c: usize,
        t: (u64, u64),
        key: &str,
        consistency: Consistency,
        txn: bool,
        revision: i64,
        kv: Option<Kv>,
    ) -> usize {
        let req = Request::Get {
            key: k(key),
            consistency,
            txn,
        };
        self.op(c, t, req, Outcome::Ok(Response::Get { revision, kv }))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn cas(
        &mut self,
        c: usize,
        t: (u64, u64),
        key: &str,
        expected: i64,
        value: &str,
        revision: i64,
        succeeded: bool,
        kv: Option<Kv>,
    ) -> usize {
        let req = Request::Cas {
            key: k(key),
            expected_mod_revision: expected,
            value: value.as_bytes().to_vec(),
        };
        self.op(
            c,
            t,
            req,
            Outcome::Ok(Response::Cas {
                revision,
                succeeded,
                kv,
            }),
        )
    }

    pub fn delete(
        &mut self,
        c: usize,
        t: (u64, u64),
        key: &str,
        revision: i64,
        deleted: Option<Kv>,
    ) -> usize {
        let req = Request::Delete { key: k(key) };
        self.op(
            c,
            t,
            req,
            Outcome::Ok(Response::Delete { revision, deleted }),
        )
    }

    /// A MultiPut of `puts` (key, value) acknowledged at `revision` with
    /// prev_kvs `prevs`.
    pub fn multi_put(
        &mut self,
        c: usize,
        t: (u64, u64),
        puts: &[(&str, &str)],
        revision: i64,
        prevs: Vec<Option<Kv>>,
    ) -> usize {
        self.multi_put_with(
            c,
            t,
            puts,
            Outcome::Ok(Response::MultiPut { revision, prevs }),
        )
    }

    pub fn multi_put_with(
        &mut self,
        c: usize,
        t: (u64, u64),
        puts: &[(&str, &str)],
        outcome: Outcome,
    ) -> usize {
        let req = Request::MultiPut {
            keys: puts.iter().map(|(key, _)| k(key)).collect(),
            values: puts.iter().map(|(_, v)| v.as_bytes().to_vec()).collect(),
        };
        self.op(c, t, req, outcome)
    }

    /// A linearizable RangeAll over `prefix` at header `revision` that
    /// returned `kvs`.
    pub fn range_all(
        &mut self,
        c: usize,
        t: (u64, u64),
        prefix: &str,
        revision: i64,
        kvs: Vec<(&str, Kv)>,
    ) -> usize {
        self.range_all_with(c, t, prefix, Consistency::Linearizable, revision, kvs)
    }

    pub fn range_all_with(
        &mut self,
        c: usize,
        t: (u64, u64),
        prefix: &str,
        consistency: Consistency,
        revision: i64,
        kvs: Vec<(&str, Kv)>,
    ) -> usize {
        let req = Request::RangeAll {
            prefix: k(prefix),
            consistency,
            txn: false,
        };
        let kvs = kvs
            .into_iter()
            .map(|(key, kv)| KeyKv { key: k(key), kv })
            .collect();
        self.op(c, t, req, Outcome::Ok(Response::RangeAll { revision, kvs }))
    }

    pub fn history(&self) -> History {
        History {
            ops: self.ops.clone(),
        }
    }
}

/// The true store contents: per key, the state from each revision on.
pub struct Truth(pub Vec<(&'static str, i64, Option<Kv>)>);

impl Truth {
    pub fn read_at(&self, key: &[u8], rev: i64) -> Option<Kv> {
        self.0
            .iter()
            .filter(|(kk, r, _)| kk.as_bytes() == key && *r <= rev)
            .max_by_key(|(_, r, _)| *r)
            .and_then(|(_, _, kv)| kv.clone())
    }

    /// Answers the history's re-read plan.
    pub fn rereads(&self, h: &History) -> Rereads {
        reread_plan(h)
            .into_iter()
            .map(|(key, rev)| {
                let v = self.read_at(&key, rev);
                ((key, rev), RereadResult::Kv(v))
            })
            .collect()
    }
}
