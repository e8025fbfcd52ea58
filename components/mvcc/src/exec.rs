//! etcd request semantics over the MVCC store (etcd's `apply.go`/`txn.go`).
//!
//! A write is evaluated by the region leader against the newest state of the
//! keys it touches (the caller holds their latches) before it has a
//! revision: whether it changes anything decides whether it takes one at
//! all. Evaluation therefore writes two placeholders into the response,
//! [`WRITE_REV`] (the revision the request will commit at) and [`READ_REV`]
//! (the revision it read at), which [`fill_revisions`] replaces once the
//! revision is known. The mutations it returns are applied verbatim by every
//! replica.

use std::collections::BTreeMap;

use proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response as OpResponse,
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use proto::mvccpb::KeyValue;
use proto::raft_cmdpb::{mutation::Op, Mutation};

use crate::lease::{owner_key, LeaseView};
use crate::store::{KeyRange, RangeResult};
use crate::view::ReadView;
use crate::{Error, Result};

/// Placeholder for the revision the request commits at.
pub const WRITE_REV: i64 = i64::MAX;
/// Placeholder for the revision the request read at.
pub const READ_REV: i64 = i64::MAX - 1;

/// Revisions an evaluation checks historical reads against.
#[derive(Clone, Copy, Debug)]
pub struct ReadBounds {
    pub current: i64,
    pub compacted: i64,
}

impl ReadBounds {
    /// The revision a read of `requested` (<= 0: the newest) sees.
    pub fn resolve(&self, requested: i64) -> Result<i64> {
        if requested <= 0 {
            return Ok(self.current);
        }
        if requested > self.current {
            return Err(Error::FutureRev);
        }
        if requested < self.compacted {
            return Err(Error::Compacted);
        }
        Ok(requested)
    }
}

/// A write request of the KV service, or a lease revoke.
#[derive(Clone, Debug)]
pub enum WriteRequest {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    LeaseRevoke(LeaseRevoke),
}

/// Revokes a lease and deletes, at one revision, each of `keys` whose
/// newest version still carries it. `keys` are the keys found attached
/// (`LeaseView::attached`) before the write latched or locked them: if
/// more are attached now, the evaluation fails with `LeaseKeysChanged`.
/// With `expired`, it fails with `LeaseNotExpired` unless the lease's
/// leader clock has it expired. It fails with `LeaseNotFound` if the
/// lease does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRevoke {
    pub id: i64,
    pub keys: Vec<Vec<u8>>,
    pub expired: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    /// The revision the revoke committed at.
    LeaseRevoke {
        revision: i64,
    },
}

impl WriteResponse {
    /// The revision its header names (0 without a header).
    pub fn revision(&self) -> i64 {
        let header = match self {
            WriteResponse::Put(r) => r.header.as_ref(),
            WriteResponse::DeleteRange(r) => r.header.as_ref(),
            WriteResponse::Txn(r) => r.header.as_ref(),
            WriteResponse::LeaseRevoke { revision } => return *revision,
        };
        header.map_or(0, |h| h.revision)
    }
}

/// The outcome of evaluating a write: its response (with placeholders) and
/// the changes it makes; no changes means it takes no revision.
#[derive(Debug)]
pub struct Evaluation {
    pub response: WriteResponse,
    pub mutations: Vec<Mutation>,
}

/// Range semantics of etcd for a read at `rev` (already resolved against the
/// compaction and current revisions). The header is left to the caller.
pub fn range(store: &dyn ReadView, r: &RangeRequest, rev: i64) -> Result<RangeResponse> {
    range_with(r, |kr, limit, collect| store.range(kr, rev, limit, collect))
}

fn range_with(
    r: &RangeRequest,
    fetch: impl FnOnce(&KeyRange, usize, bool) -> Result<RangeResult>,
) -> Result<RangeResponse> {
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    let mut limit = if r.sort_order != SortOrder::None as i32 || filtered || r.limit <= 0 {
        0
    } else {
        r.limit as usize
    };
    if limit > 0 {
        // One more than asked tells whether there is more.
        limit += 1;
    }
    let found = fetch(
        &KeyRange::from_etcd(&r.key, &r.range_end),
        limit,
        !r.count_only,
    )?;
    let mut kvs = found.kvs;
    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }
    sort_kvs(&mut kvs, r.sort_order, r.sort_target);
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: None,
        kvs,
        more,
        count: found.count as i64,
    })
}

/// Whether `r` is answered from its first `limit` + 1 keys in key order,
/// sorted afterwards: etcd decides whether to fetch everything from the
/// sort *order* alone, so a non-key target without an order (which sorts
/// ascending) sorts only that prefix.
fn sorts_a_prefix(r: &RangeRequest) -> bool {
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    r.limit > 0
        && !filtered
        && r.sort_order == SortOrder::None as i32
        && r.sort_target != SortTarget::Key as i32
}

/// The request each piece of `r` is read with, when `r`'s key range is cut
/// into consecutive sub-ranges (each piece gets its own `key` and
/// `range_end`) whose answers [`merge_ranges`] puts together.
pub fn piece_request(r: &RangeRequest) -> RangeRequest {
    let mut piece = r.clone();
    if r.sort_target == SortTarget::Value as i32 {
        // Values are sorted on before `keys_only` drops them.
        piece.keys_only = false;
    }
    if sorts_a_prefix(r) {
        // The prefix is decided in key order over the whole range.
        piece.sort_target = SortTarget::Key as i32;
        piece.limit = r.limit + 1;
    }
    piece
}

/// The answer to `r` from the answers to its pieces (read with
/// [`piece_request`] at one revision, in key order): the response one read
/// of the whole range gives. Each piece holds its top keys in `r`'s order
/// (the overall top `limit` are among them) and says whether it had more;
/// `count` is the sum.
pub fn merge_ranges(r: &RangeRequest, parts: Vec<RangeResponse>) -> RangeResponse {
    let mut more = false;
    let mut count = 0;
    let mut kvs = Vec::new();
    for part in parts {
        more |= part.more;
        count += part.count;
        kvs.extend(part.kvs);
    }
    if sorts_a_prefix(r) {
        // The first `limit` + 1 keys of the range, then etcd's sort.
        kvs.truncate(r.limit as usize + 1);
        more = false;
    }
    sort_kvs(&mut kvs, r.sort_order, r.sort_target);
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse {
        header: None,
        kvs,
        more,
        count,
    }
}

/// etcd sorts ascending by default for a non-key target and not at all when
/// asked for keys ascending (they already are). Stable, so ties keep key
/// order as etcd's insertion sort does for small results.
fn sort_kvs(kvs: &mut [KeyValue], order: i32, target: i32) {
    let target = SortTarget::try_from(target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    let cmp = |a: &KeyValue, b: &KeyValue| match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.cmp(&b.version),
        SortTarget::Create => a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => a.value.cmp(&b.value),
    };
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => kvs.sort_by(cmp),
        SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
    }
}

/// Evaluates a validated write against the newest state and the leases
/// as of it. A put with a lease also yields an `Attach` of its key to the
/// lease (after every change of keys: lease changes take no
/// sub-revision); a revoke, the deletes of its keys and a `Revoke`.
pub fn evaluate(
    store: &dyn ReadView,
    req: &WriteRequest,
    bounds: ReadBounds,
    leases: &dyn LeaseView,
) -> Result<Evaluation> {
    let mut ctx = TxnContext {
        store,
        bounds,
        leases,
        overlay: BTreeMap::new(),
        mutations: Vec::new(),
        lease_changes: Vec::new(),
    };
    let response = match req {
        WriteRequest::Put(p) => {
            if p.lease != 0 && !leases.attachable(p.lease)? {
                return Err(Error::LeaseNotFound);
            }
            WriteResponse::Put(ctx.put(p)?)
        }
        WriteRequest::LeaseRevoke(r) => {
            ctx.revoke(r)?;
            WriteResponse::LeaseRevoke {
                revision: WRITE_REV,
            }
        }
        WriteRequest::DeleteRange(d) => WriteResponse::DeleteRange(ctx.delete_range(d)?),
        WriteRequest::Txn(t) => {
            let path = ctx.compare_path(t)?;
            ctx.check_path(t, &path)?;
            let (mut resp, _) = ctx.txn(t, &path)?;
            resp.header = Some(ResponseHeader {
                revision: ctx.view_rev(),
                ..Default::default()
            });
            WriteResponse::Txn(resp)
        }
    };
    let mut mutations = ctx.mutations;
    mutations.extend(ctx.lease_changes);
    Ok(Evaluation {
        response,
        mutations,
    })
}

/// Replaces the placeholders of an evaluated response: `write_rev` is the
/// revision the request committed at (unused if it changed nothing),
/// `read_rev` the revision it read at.
pub fn fill_revisions(resp: &mut WriteResponse, write_rev: i64, read_rev: i64) {
    let fix = |r: &mut i64| {
        if *r == WRITE_REV {
            *r = write_rev;
        } else if *r == READ_REV {
            *r = read_rev;
        }
    };
    match resp {
        WriteResponse::Put(p) => {
            if let Some(h) = &mut p.header {
                fix(&mut h.revision);
            }
        }
        WriteResponse::DeleteRange(d) => {
            if let Some(h) = &mut d.header {
                fix(&mut h.revision);
            }
        }
        WriteResponse::Txn(t) => fill_txn(t, &fix),
        WriteResponse::LeaseRevoke { revision } => fix(revision),
    }
}

fn fill_txn(t: &mut TxnResponse, fix: &dyn Fn(&mut i64)) {
    if let Some(h) = &mut t.header {
        fix(&mut h.revision);
    }
    for op in &mut t.responses {
        match &mut op.response {
            Some(OpResponse::ResponseRange(r)) => {
                if let Some(h) = &mut r.header {
                    fix(&mut h.revision);
                }
                for kv in &mut r.kvs {
                    fix(&mut kv.mod_revision);
                    fix(&mut kv.create_revision);
                }
            }
            Some(OpResponse::ResponsePut(p)) => {
                if let Some(h) = &mut p.header {
                    fix(&mut h.revision);
                }
                for kv in p.prev_kv.iter_mut() {
                    fix(&mut kv.mod_revision);
                    fix(&mut kv.create_revision);
                }
            }
            Some(OpResponse::ResponseDeleteRange(d)) => {
                if let Some(h) = &mut d.header {
                    fix(&mut h.revision);
                }
                // etcd lets a delete ending at "\0" remove the txn's own
                // puts (its overlap check misses that range), so deleted
                // versions may carry this revision.
                for kv in &mut d.prev_kvs {
                    fix(&mut kv.mod_revision);
                    fix(&mut kv.create_revision);
                }
            }
            Some(OpResponse::ResponseTxn(inner)) => fill_txn(inner, fix),
            None => {}
        }
    }
}

struct TxnContext<'a> {
    store: &'a dyn ReadView,
    bounds: ReadBounds,
    leases: &'a dyn LeaseView,
    /// This request's own changes: `Some` put, `None` deleted.
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    mutations: Vec<Mutation>,
    /// Its changes of leases (`Attach`, `Revoke`), after `mutations`.
    lease_changes: Vec<Mutation>,
}

impl TxnContext<'_> {
    /// The revision reads inside the request observe: its own once it has
    /// changed something, the one before otherwise.
    fn view_rev(&self) -> i64 {
        if self.mutations.is_empty() {
            READ_REV
        } else {
            WRITE_REV
        }
    }

    /// Live keys in `kr` as the request sees them now (newest state plus its
    /// own changes), in key order.
    fn live(&self, kr: &KeyRange, limit: usize, collect: bool) -> Result<RangeResult> {
        let overlapping = self.overlay.keys().any(|k| kr.contains(k));
        if !overlapping {
            return self.store.range(kr, i64::MAX, limit, collect);
        }
        let base = self.store.range(kr, i64::MAX, 0, true)?;
        let mut merged: BTreeMap<Vec<u8>, KeyValue> = base
            .kvs
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        for (k, v) in self.overlay.iter().filter(|(k, _)| kr.contains(k)) {
            match v {
                Some(kv) => merged.insert(k.clone(), kv.clone()),
                None => merged.remove(k),
            };
        }
        let count = merged.len();
        let mut kvs: Vec<KeyValue> = if collect {
            merged.into_values().collect()
        } else {
            Vec::new()
        };
        if limit > 0 {
            kvs.truncate(limit);
        }
        Ok(RangeResult { kvs, count })
    }

    fn current(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.store.get(key, i64::MAX)
    }

    fn put(&mut self, p: &PutRequest) -> Result<PutResponse> {
        let prev = self.current(&p.key)?;
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(Error::KeyNotFound);
        }
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let (create_revision, version) = match &prev {
            Some(prev) => (prev.create_revision, prev.version + 1),
            None => (0, 1),
        };
        self.mutations.push(Mutation {
            op: Op::Put as i32,
            key: p.key.clone(),
            sub: self.mutations.len() as u32,
            create_revision,
            version,
            lease,
            value: value.clone(),
        });
        if p.lease != 0 {
            // A key kept on its lease (`ignore_lease`) is attached already.
            self.lease_changes.push(Mutation {
                op: Op::Attach as i32,
                key: owner_key(p.lease),
                lease: p.lease,
                value: p.key.clone(),
                ..Default::default()
            });
        }
        self.overlay.insert(
            p.key.clone(),
            Some(KeyValue {
                key: p.key.clone(),
                create_revision: if create_revision == 0 {
                    WRITE_REV
                } else {
                    create_revision
                },
                mod_revision: WRITE_REV,
                version,
                value,
                lease,
            }),
        );
        Ok(PutResponse {
            header: Some(ResponseHeader {
                revision: WRITE_REV,
                ..Default::default()
            }),
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    /// A lease revoke (see [`LeaseRevoke`]).
    fn revoke(&mut self, r: &LeaseRevoke) -> Result<()> {
        if !self.leases.exists(r.id)? {
            return Err(Error::LeaseNotFound);
        }
        if r.expired && !self.leases.expired(r.id) {
            return Err(Error::LeaseNotExpired);
        }
        let mut keys = r.keys.clone();
        keys.sort_unstable();
        keys.dedup();
        let attached = self.leases.attached(r.id)?;
        if attached.iter().any(|k| keys.binary_search(k).is_err()) {
            return Err(Error::LeaseKeysChanged);
        }
        for key in keys {
            if self.current(&key)?.is_some_and(|kv| kv.lease == r.id) {
                self.mutations.push(Mutation {
                    op: Op::Delete as i32,
                    key: key.clone(),
                    sub: self.mutations.len() as u32,
                    ..Default::default()
                });
                self.overlay.insert(key, None);
            }
        }
        self.lease_changes.push(Mutation {
            op: Op::Revoke as i32,
            key: owner_key(r.id),
            lease: r.id,
            ..Default::default()
        });
        Ok(())
    }

    fn delete_range(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let kr = KeyRange::from_etcd(&d.key, &d.range_end);
        let found = self.live(&kr, 0, true)?;
        for kv in &found.kvs {
            self.mutations.push(Mutation {
                op: Op::Delete as i32,
                key: kv.key.clone(),
                sub: self.mutations.len() as u32,
                ..Default::default()
            });
            self.overlay.insert(kv.key.clone(), None);
        }
        Ok(DeleteRangeResponse {
            header: Some(ResponseHeader {
                revision: self.view_rev(),
                ..Default::default()
            }),
            deleted: found.kvs.len() as i64,
            prev_kvs: if d.prev_kv { found.kvs } else { Vec::new() },
        })
    }

    fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        let mut resp = if r.revision > 0 {
            let rev = self.bounds.resolve(r.revision)?;
            range(self.store, r, rev)?
        } else {
            range_with(r, |kr, limit, collect| self.live(kr, limit, collect))?
        };
        resp.header = Some(ResponseHeader {
            revision: self.view_rev(),
            ..Default::default()
        });
        Ok(resp)
    }

    /// Which branch every txn on the executed path takes, all decided
    /// against the state before the request (etcd's `compareToPath`).
    fn compare_path(&self, t: &TxnRequest) -> Result<Vec<bool>> {
        let mut path = vec![true];
        for c in &t.compare {
            if !self.compare(c)? {
                path[0] = false;
                break;
            }
        }
        let ops = if path[0] { &t.success } else { &t.failure };
        for op in ops {
            if let Some(Request::RequestTxn(inner)) = &op.request {
                path.extend(self.compare_path(inner)?);
            }
        }
        Ok(path)
    }

    fn compare(&self, c: &Compare) -> Result<bool> {
        let kr = KeyRange::from_etcd(&c.key, &c.range_end);
        let found = self.store.range(&kr, i64::MAX, 0, true)?;
        let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
        if found.kvs.is_empty() {
            // A missing key has no value to compare; other targets compare 0.
            return Ok(
                target != CompareTarget::Value && compare_kv(c, target, &KeyValue::default())
            );
        }
        Ok(found.kvs.iter().all(|kv| compare_kv(c, target, kv)))
    }

    /// etcd's pre-apply checks of the executed path, in etcd's order: first
    /// every put (ignore_value/lease need an existing key, leases must
    /// exist), then every historical range (in bounds).
    fn check_path(&self, t: &TxnRequest, path: &[bool]) -> Result<()> {
        self.check_ops(t, path, &|op| match op {
            Request::RequestPut(p) => {
                if (p.ignore_value || p.ignore_lease) && self.store.get(&p.key, i64::MAX)?.is_none()
                {
                    return Err(Error::KeyNotFound);
                }
                if p.lease != 0 && !self.leases.attachable(p.lease)? {
                    return Err(Error::LeaseNotFound);
                }
                Ok(())
            }
            _ => Ok(()),
        })?;
        self.check_ops(t, path, &|op| match op {
            Request::RequestRange(r) if r.revision > 0 => {
                self.bounds.resolve(r.revision).map(|_| ())
            }
            _ => Ok(()),
        })?;
        Ok(())
    }

    /// Runs `check` on every non-txn op of the executed path; returns how
    /// many path entries this txn and its nested txns used.
    fn check_ops(
        &self,
        t: &TxnRequest,
        path: &[bool],
        check: &dyn Fn(&Request) -> Result<()>,
    ) -> Result<usize> {
        let ops = if path[0] { &t.success } else { &t.failure };
        let mut used = 1;
        for op in ops {
            match &op.request {
                Some(Request::RequestTxn(inner)) => {
                    used += self.check_ops(inner, &path[used..], check)?
                }
                Some(other) => check(other)?,
                None => {}
            }
        }
        Ok(used)
    }

    /// Executes the branch `path[0]` chose; returns the response and how many
    /// path entries this txn and its nested txns used.
    fn txn(&mut self, t: &TxnRequest, path: &[bool]) -> Result<(TxnResponse, usize)> {
        let succeeded = path[0];
        let ops: &[RequestOp] = if succeeded { &t.success } else { &t.failure };
        let mut used = 1;
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(Request::RequestRange(r)) => Some(OpResponse::ResponseRange(self.range(r)?)),
                Some(Request::RequestPut(p)) => Some(OpResponse::ResponsePut(self.put(p)?)),
                Some(Request::RequestDeleteRange(d)) => {
                    Some(OpResponse::ResponseDeleteRange(self.delete_range(d)?))
                }
                Some(Request::RequestTxn(inner)) => {
                    let (mut resp, n) = self.txn(inner, &path[used..])?;
                    used += n;
                    // etcd leaves nested txn headers empty.
                    resp.header = Some(ResponseHeader::default());
                    Some(OpResponse::ResponseTxn(resp))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok((
            TxnResponse {
                header: None,
                succeeded,
                responses,
            },
            used,
        ))
    }
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let ordering = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        CompareTarget::Create => kv.create_revision.cmp(&int_target(c, |t| match t {
            TargetUnion::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Mod => kv.mod_revision.cmp(&int_target(c, |t| match t {
            TargetUnion::ModRevision(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Version => kv.version.cmp(&int_target(c, |t| match t {
            TargetUnion::Version(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Lease => kv.lease.cmp(&int_target(c, |t| match t {
            TargetUnion::Lease(v) => Some(*v),
            _ => None,
        })),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ordering.is_eq(),
        Ok(CompareResult::NotEqual) => ordering.is_ne(),
        Ok(CompareResult::Greater) => ordering.is_gt(),
        Ok(CompareResult::Less) => ordering.is_lt(),
        Err(_) => true,
    }
}

fn int_target(c: &Compare, pick: impl Fn(&TargetUnion) -> Option<i64>) -> i64 {
    c.target_union.as_ref().and_then(pick).unwrap_or(0)
}
