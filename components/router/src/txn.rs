//! Writes over several regions: a DeleteRange or Txn whose keys lie in more
//! than one region commits atomically at one revision, by two-phase commit
//! with the decision durable in raft. The participant's side is in
//! `leader::txn`, the state each region keeps in `raftstore::txn`.
//!
//! The protocol, run by the node that received the request (the
//! coordinator):
//! 1. **Participants.** Every span the request reads or writes is cut at
//!    region boundaries; the regions, in key order, are the participants,
//!    and the first is the *primary*: its first key (the primary key)
//!    names where the decision is kept. A transaction id comes from PD.
//! 2. **Lock**, one participant after another in key order, the primary
//!    first: its leader latches the spans (no write of them in flight),
//!    waits for other transactions' locks on them to go, and proposes a
//!    lock through raft; once applied it sends back the spans' live keys
//!    and the region it locked in. A lock taken in another region than
//!    planned (a merge moved the spans) releases every lock and starts
//!    again: a second lock of the transaction in one region would change
//!    nothing and leave the second participant's keys unlocked.
//!    From then on no other write of those keys applies (writers wait, and
//!    apply refuses them), and readers of them wait. Locking in key order
//!    means two transactions never wait for each other in a circle.
//! 3. **Evaluate.** With every lock held, the keys cannot change: the
//!    coordinator evaluates the request against what the participants sent
//!    (`mvcc::FetchedView`), with the oracle's current revision as the
//!    newest one a historical read may ask for. A request that changes
//!    nothing releases its locks and is read again without them, as a Txn
//!    of Range operations only is from the start (`regions::read_across`):
//!    nothing tells the coordinator that its locks still hold, and a lock
//!    resolver may have rolled back the locks of a slow one, letting writes
//!    of its keys in before the revision it would answer at.
//! 4. **Revision.** R comes from the oracle *after* every lock is applied,
//!    so R is above every revision any write of these keys already has, and
//!    above the revision of every read that did not wait for the locks.
//! 5. **Decide.** A commit carrying every mutation is proposed to the
//!    primary: applying it writes the primary's own mutations at R, drops
//!    its lock and records the decision, in one raft entry. It applies only
//!    while the primary holds the lock; once it has, the transaction is
//!    committed, whatever happens next.
//! 6. **Secondaries.** Each other participant gets a commit with its own
//!    mutations (applied at R, lock dropped). Then the decision record is
//!    forgotten, in the background. The record keeps every participant's
//!    spans, so that the lock resolver can forget it too once none of them
//!    holds a lock of the transaction (see `resolver`).
//!
//! Abandoned transactions (a coordinator killed or cut off) are resolved by
//! the lock resolver (`resolver`), which also forgets the decisions no lock
//! needs any more, whoever committed the secondaries.
//!
//! Each attempt runs on a task of its own (`detached`): a client that
//! cancels its call does not leave its locks to the resolver.
//!
//! Outcomes for the client: anything failing before the decision releases
//! the locks and is "not applied" (retried here, from step 1, until
//! [`RETRY_DEADLINE`]); a primary commit whose outcome is unknown is
//! etcd's "request timed out"; once the decision is applied the request
//! succeeded, even if some secondary still has to be resolved (its readers
//! wait for it).

mod resolver;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use mvcc::exec::{self, ReadBounds, WriteRequest, WriteResponse};
use mvcc::lease::{FetchedLeases, HeldLease};
use mvcc::{FetchedView, KeyRange};
use proto::etcdserverpb::{request_op::Request, TxnRequest};
use proto::forwardpb::{
    txn_step_request::Step, txn_step_response, HistoricalRead, TxnLock, TxnLocked,
};
use proto::metapb;
use proto::raft_cmdpb::{
    Mutation, TxnCommitRequest, TxnForgetRequest, TxnLockRequest, TxnRollbackRequest,
};
use raftstore::txn::range_span;
use tracing::{debug, warn};

use crate::leader::{READ_TIMEOUT, WRITE_TIMEOUT};
use crate::locate::Location;
use crate::router::retrying;
use crate::{Error, Result, Router, MAX_BACKOFF, MIN_BACKOFF, RETRY_DEADLINE};
pub(crate) use resolver::Cleanup;

/// One region taking part in a transaction.
struct Participant {
    region: metapb::Region,
    /// The parts of the request's spans in the region.
    spans: Vec<KeyRange>,
    /// The parts of its historical reads in the region.
    reads: Vec<(KeyRange, i64)>,
}

impl Router {
    /// Serves a DeleteRange or Txn whose `spans` lie in several regions (see
    /// the module docs).
    pub(crate) async fn write_across(
        self: &Arc<Router>,
        req: &WriteRequest,
        spans: &[KeyRange],
    ) -> Result<WriteResponse> {
        let deadline = Instant::now() + RETRY_DEADLINE;
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = if only_reads(req) {
                self.read_across(req, spans).await
            } else {
                self.detached_write_across(req, spans).await
            };
            match attempt {
                Err(e)
                    if (e.is_retryable() || matches!(e, Error::CrossRegion))
                        && Instant::now() + backoff < deadline =>
                {
                    debug!("retrying a transaction over several regions: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// One attempt at the protocol on a task of its own (see `detached`):
    /// a client that cancels its call does not stop it between taking
    /// locks and committing or releasing them.
    async fn detached_write_across(
        self: &Arc<Router>,
        req: &WriteRequest,
        spans: &[KeyRange],
    ) -> Result<WriteResponse> {
        let (req, spans) = (req.clone(), spans.to_vec());
        self.run_detached(|router| async move { router.try_write_across(&req, &spans).await })
            .await
    }

    async fn try_write_across(
        &self,
        req: &WriteRequest,
        spans: &[KeyRange],
    ) -> Result<WriteResponse> {
        let participants = self.participants(spans, &historical_reads(req)).await?;
        let primary_key = participants
            .first()
            .and_then(|p| p.spans.first())
            .map(|s| s.start.clone())
            .ok_or_else(|| Error::Internal("a transaction without keys".into()))?;
        let txn_id = self.pd.alloc_id().await?;
        // Lock, in key order, primary first.
        let mut locked: Vec<TxnLocked> = Vec::with_capacity(participants.len());
        for p in &participants {
            let step = Step::Lock(TxnLock {
                lock: Some(TxnLockRequest {
                    txn_id,
                    primary_key: primary_key.clone(),
                    spans: p.spans.iter().map(range_span).collect(),
                }),
                reads: p
                    .reads
                    .iter()
                    .map(|(span, revision)| HistoricalRead {
                        span: Some(range_span(span)),
                        revision: *revision,
                    })
                    .collect(),
            });
            match self.step(&p.spans, step).await {
                Ok(Some(txn_step_response::Result::Locked(l)))
                    if l.region_id != 0 && l.region_id != p.region.id =>
                {
                    // A merge handed the spans to another region since the
                    // participants were planned: that region may be a
                    // participant too, whose one lock of this transaction
                    // would then not cover both (a second lock of the same
                    // transaction changes nothing), and the commits are
                    // cut by the planned regions. Start again.
                    locked.push(l);
                    self.release(&participants[..locked.len()], txn_id).await;
                    return Err(Error::CrossRegion);
                }
                Ok(Some(txn_step_response::Result::Locked(l))) => locked.push(l),
                Ok(_) => {
                    // Taken as "may hold the lock": released below.
                    locked.push(TxnLocked::default());
                    self.release(&participants[..locked.len()], txn_id).await;
                    return Err(Error::Internal("lock step without an answer".into()));
                }
                Err(e) => {
                    // This participant may hold the lock (outcome unknown)
                    // or not: release it too.
                    self.release(&participants[..=locked.len()], txn_id).await;
                    return Err(not_applied(e));
                }
            }
        }
        let evaluated = self.evaluate(req, &locked).await;
        let (mut response, mutations) = match evaluated {
            Ok(e) => e,
            Err(e) => {
                self.release(&participants, txn_id).await;
                return Err(e);
            }
        };
        if mutations.is_empty() {
            // What the locks sent is the state at `current` only if they
            // still hold, which nothing here confirms: read again without
            // them (see `read_across`).
            self.release(&participants, txn_id).await;
            return self.read_across(req, spans).await;
        }
        let revision = match tokio::time::timeout(WRITE_TIMEOUT, self.pd.alloc_revisions(1)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.release(&participants, txn_id).await;
                return Err(e.into());
            }
            Err(_) => {
                self.release(&participants, txn_id).await;
                return Err(Error::Region(raftstore::Error::StaleCommand(
                    "the oracle did not answer in time".into(),
                )));
            }
        };
        let decide = Step::Commit(TxnCommitRequest {
            txn_id,
            revision,
            mutations: mutations.clone(),
            primary: true,
            primary_key: primary_key.clone(),
            lock_spans: participants
                .iter()
                .flat_map(|p| p.spans.iter().map(range_span))
                .collect(),
        });
        match self.step(&participants[0].spans, decide).await {
            Ok(_) => {}
            Err(e) if e.is_retryable() => {
                // Not decided (a resolver may have rolled the primary back).
                self.release(&participants[1..], txn_id).await;
                return Err(e);
            }
            Err(e) => {
                // The decision may be recorded: resolvers finish the rest.
                return Err(match e {
                    e @ Error::OutcomeUnknown(_) => e,
                    e => Error::OutcomeUnknown(format!("transaction {txn_id} commit: {e}")),
                });
            }
        }
        let secondaries = participants[1..].iter().map(|p| {
            let step = Step::Commit(TxnCommitRequest {
                txn_id,
                revision,
                mutations: within(&mutations, |key| p.spans.iter().any(|s| s.contains(key))),
                primary: false,
                primary_key: primary_key.clone(),
                lock_spans: Vec::new(),
            });
            async move { self.step(&p.spans, step).await }
        });
        let results = futures::future::join_all(secondaries).await;
        if results.iter().all(|r| r.is_ok()) {
            self.txn_cleanup.forget_later(TxnForgetRequest {
                txn_id,
                primary_key,
            });
        } else {
            for e in results.into_iter().filter_map(|r| r.err()) {
                warn!(
                    txn_id,
                    "committing a secondary failed, left to resolution: {e}"
                );
            }
        }
        exec::fill_revisions(&mut response, revision, revision - 1);
        Ok(response)
    }

    /// The regions of `spans` and `reads`, in key order.
    async fn participants(
        &self,
        spans: &[KeyRange],
        reads: &[(KeyRange, i64)],
    ) -> Result<Vec<Participant>> {
        let mut by_start: BTreeMap<Vec<u8>, Participant> = BTreeMap::new();
        for span in spans {
            for (region, piece) in self.region_pieces(span).await? {
                by_start
                    .entry(region.start_key.clone())
                    .or_insert_with(|| Participant {
                        region,
                        spans: Vec::new(),
                        reads: Vec::new(),
                    })
                    .spans
                    .push(piece);
            }
        }
        for (span, revision) in reads {
            for (region, piece) in self.region_pieces(span).await? {
                match by_start.get_mut(&region.start_key) {
                    Some(p) => p.reads.push((piece, *revision)),
                    // The layout moved between the two lookups.
                    None => return Err(Error::CrossRegion),
                }
            }
        }
        Ok(by_start.into_values().collect())
    }

    /// Evaluates `req` against what the participants sent: the response
    /// and the mutations.
    async fn evaluate(
        &self,
        req: &WriteRequest,
        locked: &[TxnLocked],
    ) -> Result<(WriteResponse, Vec<Mutation>)> {
        let current = tokio::time::timeout(READ_TIMEOUT, self.pd.current_revision())
            .await
            .map_err(|_| {
                Error::Region(raftstore::Error::StaleCommand(
                    "the oracle did not answer in time".into(),
                ))
            })??;
        let mut view = FetchedView::default();
        let mut leases = FetchedLeases::default();
        let mut compacted = 0;
        for l in locked {
            view.insert(i64::MAX, l.latest.iter().cloned());
            for h in &l.historical {
                view.insert(h.revision, h.kvs.iter().cloned());
            }
            for held in &l.leases {
                leases.held.insert(
                    held.id,
                    HeldLease {
                        keys: held.keys.clone(),
                        expired: held.expired,
                        revoking: held.revoking,
                    },
                );
            }
            compacted = compacted.max(l.compact_revision);
        }
        let bounds = ReadBounds { current, compacted };
        let eval = exec::evaluate(&view, req, bounds, &leases)?;
        Ok((eval.response, eval.mutations))
    }

    /// Rolls back `participants`' locks of `txn_id`, where they hold one
    /// (best effort: a lock left behind is resolved later).
    async fn release(&self, participants: &[Participant], txn_id: u64) {
        let rollbacks = participants.iter().map(|p| async move {
            let step = Step::Rollback(TxnRollbackRequest { txn_id });
            match self.step(&p.spans, step).await {
                Ok(_) | Err(Error::Region(raftstore::Error::StaleCommand(_))) => {}
                Err(e) => debug!(txn_id, "releasing a lock failed, left to resolution: {e}"),
            }
        });
        futures::future::join_all(rollbacks).await;
    }

    /// Runs one step on the leader of the region holding `spans`.
    pub(crate) async fn step(
        &self,
        spans: &[KeyRange],
        step: Step,
    ) -> Result<Option<txn_step_response::Result>> {
        retrying(|| {
            let step = step.clone();
            async move {
                match self.locate(spans).await? {
                    Location::Leader(handle, leader) => leader.txn_step(&handle, step).await,
                    Location::Follower(_, target) | Location::Remote(target) => {
                        self.forwarded(&target, self.forwarder.txn_step(&target, step))
                            .await
                    }
                }
            }
        })
        .await
    }
}

/// A failure before the decision: nothing applied.
fn not_applied(e: Error) -> Error {
    match e {
        Error::OutcomeUnknown(why) => {
            Error::Region(raftstore::Error::StaleCommand(format!("lock: {why}")))
        }
        e => e,
    }
}

fn single(key: &[u8]) -> KeyRange {
    KeyRange {
        start: key.to_vec(),
        end: None,
    }
}

/// The mutations of `mutations` whose keys `part` holds: one
/// participant's share.
fn within(mutations: &[Mutation], part: impl Fn(&[u8]) -> bool) -> Vec<Mutation> {
    mutations.iter().filter(|m| part(&m.key)).cloned().collect()
}

/// Whether `req` is a Txn of Range operations only (nested Txns too): it
/// changes nothing, whatever its compares find.
fn only_reads(req: &WriteRequest) -> bool {
    fn walk(t: &TxnRequest) -> bool {
        t.success
            .iter()
            .chain(&t.failure)
            .all(|op| match &op.request {
                Some(Request::RequestRange(_)) => true,
                Some(Request::RequestTxn(inner)) => walk(inner),
                _ => false,
            })
    }
    matches!(req, WriteRequest::Txn(t) if walk(t))
}

/// The historical reads (revision > 0) of a txn's Range operations.
pub(crate) fn historical_reads(req: &WriteRequest) -> Vec<(KeyRange, i64)> {
    fn walk(t: &TxnRequest, out: &mut Vec<(KeyRange, i64)>) {
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Request::RequestRange(r)) if r.revision > 0 => {
                    out.push((KeyRange::from_etcd(&r.key, &r.range_end), r.revision))
                }
                Some(Request::RequestTxn(inner)) => walk(inner, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    if let WriteRequest::Txn(t) = req {
        walk(t, &mut out);
    }
    out
}
