//! etcd's leases, sharded: where a lease's record lives, and the clock a
//! region's leader keeps for the leases it owns.
//!
//! Contract:
//! * A lease belongs to the region owning its *owner key*
//!   ([`owner_key`], `mvcc::lease`), a position in the keyspace used for
//!   ownership only: its record is not a key of the MVCC store (no read,
//!   watch or hash of keys sees it), it lives in the META column family
//!   keyed by the memcomparable owner key (`keys::lease_record_key`), and
//!   so does each *attachment* of a key to it (`keys::lease_key_key`:
//!   the owner key, then the key). So a split hands them to the side
//!   owning the owner key, a merge to the merged region, and region
//!   snapshots carry them.
//! * Records change only through raft. `Cmd::Lease` (applied by
//!   `apply::lease`) takes no revision, as etcd's grant, checkpoint and
//!   key-less revoke take none: a grant of an id the region holds fails
//!   with `LeaseExists` ("lease already exists"), a revoke of an id it
//!   does not hold with `LeaseNotFound`, a revoke of a lease with keys
//!   attached with `LeaseKeysChanged` (its keys must go at a revision,
//!   by a write), a revoke while a transaction locks the owner key with
//!   `StaleCommand`; a checkpoint skips ids it does not hold; an id whose
//!   owner key is outside the region fails with `StaleCommand`. Writes
//!   carry `Attach` and `Revoke` mutations (their contract is in
//!   `raft_cmdpb.Mutation`), which fail the write with `LeaseNotFound`
//!   unless the region holds the record as of the entry.
//! * [`LeaseClock`]: only the region's ready leader runs one (in memory;
//!   keep-alives never write raft). Taking the lead (and every change of
//!   the region's range while leading) loads the records it owns: each
//!   lease gets its checkpointed remaining TTL, or its whole TTL (etcd's
//!   promote), so a leader change neither expires a lease early nor, with
//!   checkpoints, extends it forever. A grant applied while leading
//!   starts a lease at its TTL; a revoke forgets it. An expired lease
//!   without keys is revoked through raft by the leader (term-bound: an
//!   entry of another term is refused at apply); one with keys is handed
//!   over to the router (`RegionHandle::take_expired_leases`), whose
//!   revoke deletes them at one revision and checks, on the leader
//!   holding the lease then, that its clock still has it expired. Either
//!   is retried every [`REVOKE_RETRY`] until applied. Losing the lead
//!   forgets the clock.
//! * Renewal ([`LeaseClock::renew`]) restarts a lease's TTL; a lease
//!   whose last checkpoint recorded a remaining TTL must have that
//!   checkpoint reset through raft before the renewal is acknowledged
//!   (a new leader would otherwise promote it with the stale remainder).
//!   A lease already expired (its revoke in flight) is not renewed.
//! * A revoke marks its lease on the leader's clock first
//!   ([`LeaseClock::begin_revoke`]): until the revoke applies (or for
//!   [`REVOKING_HOLD`]), a put with the lease evaluated on this leader, or
//!   locking its owner key, waits (`LeaseRevoking`, retried), so a stream
//!   of puts cannot keep adding keys the revoke has not listed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use engine::{cf, KvSnapshot};
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::LeaseRemaining;
use proto::raft_serverpb::LeaseRecord;

use crate::keys;
use crate::{Error, Result};

pub use mvcc::lease::{owner_id, owner_key, OWNER_PREFIX};

/// etcd's default lease checkpoint interval.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);

/// How long an expired lease's revoke may be in flight before the leader
/// proposes it again.
pub const REVOKE_RETRY: Duration = Duration::from_secs(1);

/// How long a started revoke keeps puts with its lease waiting at most
/// (a revoke that failed, or whose router went away, lets them go on).
pub const REVOKING_HOLD: Duration = Duration::from_secs(10);

/// The record of lease `id` as of `snap` (`None`: not held here).
pub fn read_record(snap: &KvSnapshot<'_>, id: i64) -> Result<Option<LeaseRecord>> {
    snap.get(cf::META, &keys::lease_record_key(&owner_key(id)))?
        .map(|v| LeaseRecord::decode(v.as_slice()).map_err(Error::from))
        .transpose()
}

/// Every lease record `region` owns as of `snap`, in owner key order.
pub fn records(snap: &KvSnapshot<'_>, region: &metapb::Region) -> Result<Vec<LeaseRecord>> {
    let (lower, upper) = keys::lease_record_bounds(&region.start_key, &region.end_key);
    let mut out = Vec::new();
    let mut it = snap.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let Some(v) = it.value() {
        out.push(LeaseRecord::decode(v)?);
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(out)
}

/// The keys attached to lease `id` as of `snap`, in key order (see
/// `mvcc::lease::LeaseView::attached`).
pub fn attached_keys(snap: &KvSnapshot<'_>, id: i64) -> Result<Vec<Vec<u8>>> {
    let prefix = keys::lease_key_prefix(&owner_key(id));
    let upper = keys::prefix_end(&prefix);
    let mut out = Vec::new();
    let mut it = snap.iter(cf::META, &prefix, &upper);
    it.seek(&prefix);
    while let Some(k) = it.key() {
        out.push(k[prefix.len()..].to_vec());
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(out)
}

/// Whether any key is attached to lease `id` as of `snap`.
pub fn has_attached(snap: &KvSnapshot<'_>, id: i64) -> Result<bool> {
    let prefix = keys::lease_key_prefix(&owner_key(id));
    let upper = keys::prefix_end(&prefix);
    let mut it = snap.iter(cf::META, &prefix, &upper);
    it.seek(&prefix);
    let found = it.key().is_some();
    it.status().map_err(engine::Error::from)?;
    Ok(found)
}

/// Every attachment (lease id, key) of the leases `region` owns as of
/// `snap`, in owner key order.
pub fn attachments(snap: &KvSnapshot<'_>, region: &metapb::Region) -> Result<Vec<(i64, Vec<u8>)>> {
    let (lower, upper) = keys::lease_key_bounds(&region.start_key, &region.end_key);
    let mut out = Vec::new();
    let mut it = snap.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let Some(k) = it.key() {
        let (owner, key) = keys::decode_lease_key_key(k)
            .ok_or_else(|| Error::Corrupted("malformed lease attachment key".into()))?;
        let id = owner_id(&owner)
            .ok_or_else(|| Error::Corrupted("lease attachment without a lease".into()))?;
        out.push((id, key));
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(out)
}

/// The leases a replica holds as of one snapshot, for evaluating a write
/// on its region's leader (`expired` asks the leader's clock).
pub struct ReplicaLeases<'a> {
    pub(crate) kv: &'a KvSnapshot<'a>,
    pub(crate) clock: &'a parking_lot::Mutex<LeaseClock>,
}

impl mvcc::lease::LeaseView for ReplicaLeases<'_> {
    fn exists(&self, id: i64) -> mvcc::Result<bool> {
        read_record(self.kv, id)
            .map(|r| r.is_some())
            .map_err(|e| mvcc::Error::Storage(e.to_string()))
    }

    fn attachable(&self, id: i64) -> mvcc::Result<bool> {
        if !self.exists(id)? {
            return Ok(false);
        }
        if self.revoking(id) {
            return Err(mvcc::Error::LeaseRevoking);
        }
        Ok(true)
    }

    fn attached(&self, id: i64) -> mvcc::Result<Vec<Vec<u8>>> {
        attached_keys(self.kv, id).map_err(|e| mvcc::Error::Storage(e.to_string()))
    }

    fn expired(&self, id: i64) -> bool {
        self.clock.lock().is_expired(id, Instant::now())
    }
}

impl ReplicaLeases<'_> {
    /// Whether this leader's clock has a revoke of lease `id` under way.
    pub fn revoking(&self, id: i64) -> bool {
        self.clock.lock().is_revoking(id, Instant::now())
    }
}

/// A lease the leader's clock runs.
#[derive(Debug, Clone, Copy)]
struct Running {
    ttl: i64,
    deadline: Instant,
    /// Its last checkpoint recorded a remaining TTL.
    checkpointed: bool,
    /// When its revoke was last proposed (expired).
    revoking: Option<Instant>,
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// The lease's TTL, in seconds: its new remaining TTL.
    pub ttl: i64,
    /// Its checkpoint must be reset (a `LeaseRemaining` of 0) before the
    /// renewal is acknowledged.
    pub reset_checkpoint: bool,
}

/// The leader's clock of the leases its region owns (see the module docs).
#[derive(Debug, Default)]
pub struct LeaseClock {
    /// The region epoch version the clock was loaded at; `None`: not
    /// leading.
    loaded_at: Option<u64>,
    leases: HashMap<i64, Running>,
    /// When the leader took the lead or last checkpointed.
    last_checkpoint: Option<Instant>,
    /// Expired leases with keys attached, for the router to revoke (a
    /// revoke with keys needs a revision, and maybe other regions).
    keyed_expired: Vec<i64>,
    /// Leases whose revoke started (see [`LeaseClock::begin_revoke`]), and
    /// when.
    revoking: HashMap<i64, Instant>,
}

fn seconds(d: Duration) -> i64 {
    // Whole seconds, rounded up: a lease with 0.2 s left has 1 s left.
    let s = d.as_secs() as i64;
    if d.subsec_nanos() > 0 {
        s + 1
    } else {
        s
    }
}

impl LeaseClock {
    /// Whether the clock runs for the region at epoch `version`.
    pub(crate) fn loaded_at(&self, version: u64) -> bool {
        self.loaded_at == Some(version)
    }

    /// Takes the lead, or follows a change of the region's range: runs
    /// exactly `records`; those already running keep their deadlines, the
    /// others start at their checkpointed remaining TTL or whole TTL.
    pub(crate) fn load(&mut self, records: &[LeaseRecord], version: u64, now: Instant) {
        let mut leases = HashMap::with_capacity(records.len());
        for r in records {
            let running = self.leases.get(&r.id).copied().unwrap_or_else(|| {
                let left = if r.remaining_ttl > 0 {
                    r.remaining_ttl
                } else {
                    r.ttl
                };
                Running {
                    ttl: r.ttl,
                    deadline: now + Duration::from_secs(left.max(0) as u64),
                    checkpointed: r.remaining_ttl > 0,
                    revoking: None,
                }
            });
            leases.insert(r.id, running);
        }
        self.leases = leases;
        self.loaded_at = Some(version);
        self.last_checkpoint.get_or_insert(now);
    }

    /// Whether a checkpoint is due (every `interval`, zero: never);
    /// restarts the interval if so.
    pub(crate) fn checkpoint_due(&mut self, interval: Duration, now: Instant) -> bool {
        let Some(last) = self.last_checkpoint else {
            return false;
        };
        if interval.is_zero() || now.saturating_duration_since(last) < interval {
            return false;
        }
        self.last_checkpoint = Some(now);
        true
    }

    /// Lost the lead: forgets everything.
    pub(crate) fn stop(&mut self) {
        self.loaded_at = None;
        self.leases.clear();
        self.last_checkpoint = None;
        self.keyed_expired.clear();
        self.revoking.clear();
    }

    /// A revoke of lease `id` starts: until it is applied, or for
    /// [`REVOKING_HOLD`] at most, keys are not attached to it here (the
    /// puts wait), so the keys it lists stay all there are. `NotRunning`:
    /// not the ready leader; `NotFound`: with `expired`, the lease is not
    /// expired on this clock.
    pub fn begin_revoke(
        &mut self,
        id: i64,
        expired: bool,
        now: Instant,
    ) -> std::result::Result<(), ClockError> {
        if !self.is_running() {
            return Err(ClockError::NotRunning);
        }
        if expired && !self.is_expired(id, now) {
            return Err(ClockError::NotFound);
        }
        self.revoking
            .retain(|_, at| now.saturating_duration_since(*at) < REVOKING_HOLD);
        self.revoking.insert(id, now);
        Ok(())
    }

    /// Whether a revoke of lease `id` started less than [`REVOKING_HOLD`]
    /// ago and is not applied yet.
    pub(crate) fn is_revoking(&self, id: i64, now: Instant) -> bool {
        self.revoking
            .get(&id)
            .is_some_and(|at| now.saturating_duration_since(*at) < REVOKING_HOLD)
    }

    /// Expired lease `id` has keys attached: the router revokes it.
    pub(crate) fn hand_over(&mut self, id: i64) {
        if !self.keyed_expired.contains(&id) {
            self.keyed_expired.push(id);
        }
    }

    /// The expired leases with keys handed over since the last call.
    pub(crate) fn take_handed_over(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.keyed_expired)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.loaded_at.is_some()
    }

    /// A grant applied.
    pub(crate) fn granted(&mut self, id: i64, ttl: i64, now: Instant) {
        if self.is_running() {
            self.leases.insert(
                id,
                Running {
                    ttl,
                    deadline: now + Duration::from_secs(ttl.max(0) as u64),
                    checkpointed: false,
                    revoking: None,
                },
            );
        }
    }

    /// A revoke applied.
    pub(crate) fn revoked(&mut self, id: i64) {
        self.leases.remove(&id);
        self.keyed_expired.retain(|i| *i != id);
        self.revoking.remove(&id);
    }

    /// A checkpoint applied.
    pub(crate) fn checkpointed(&mut self, remaining: &[LeaseRemaining]) {
        for r in remaining {
            if let Some(l) = self.leases.get_mut(&r.id) {
                l.checkpointed = r.remaining_ttl > 0;
            }
        }
    }

    /// Restarts lease `id`'s TTL (see the module docs). `NotRunning`: this
    /// replica does not run the clock (not the ready leader).
    pub fn renew(&mut self, id: i64, now: Instant) -> std::result::Result<Renewal, ClockError> {
        if !self.is_running() {
            return Err(ClockError::NotRunning);
        }
        let l = self.leases.get_mut(&id).ok_or(ClockError::NotFound)?;
        if l.revoking.is_some() || l.deadline <= now {
            return Err(ClockError::NotFound);
        }
        l.deadline = now + Duration::from_secs(l.ttl.max(0) as u64);
        Ok(Renewal {
            ttl: l.ttl,
            reset_checkpoint: l.checkpointed,
        })
    }

    /// Lease `id`'s (granted TTL, remaining TTL) in seconds; the
    /// remaining TTL is -1 once expired, as etcd answers.
    pub fn time_to_live(
        &self,
        id: i64,
        now: Instant,
    ) -> std::result::Result<(i64, i64), ClockError> {
        if !self.is_running() {
            return Err(ClockError::NotRunning);
        }
        let l = self.leases.get(&id).ok_or(ClockError::NotFound)?;
        let left = if l.deadline <= now {
            -1
        } else {
            seconds(l.deadline - now)
        };
        Ok((l.ttl, left))
    }

    /// The leases past their deadline whose revoke is to be proposed now
    /// (first time, or the last proposal is [`REVOKE_RETRY`] old).
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<i64> {
        let mut out = Vec::new();
        for (id, l) in self.leases.iter_mut() {
            let due = l.deadline <= now
                && l.revoking
                    .is_none_or(|at| now.saturating_duration_since(at) >= REVOKE_RETRY);
            if due {
                l.revoking = Some(now);
                out.push(*id);
            }
        }
        out.sort_unstable();
        out
    }

    /// Whether the clock runs lease `id` and has it past its deadline.
    pub(crate) fn is_expired(&self, id: i64, now: Instant) -> bool {
        self.is_running() && self.leases.get(&id).is_some_and(|l| l.deadline <= now)
    }

    /// Every running lease's remaining TTL, for a checkpoint (expired ones
    /// left out: their revoke is coming).
    pub(crate) fn remaining(&self, now: Instant) -> Vec<LeaseRemaining> {
        let mut out: Vec<_> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline > now)
            .map(|(id, l)| LeaseRemaining {
                id: *id,
                remaining_ttl: seconds(l.deadline - now),
            })
            .collect();
        out.sort_unstable_by_key(|r| r.id);
        out
    }
}

/// Why the clock could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockError {
    /// This replica is not the region's ready leader.
    NotRunning,
    /// No such lease, or it expired.
    NotFound,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: i64, ttl: i64, remaining_ttl: i64) -> LeaseRecord {
        LeaseRecord {
            id,
            ttl,
            remaining_ttl,
        }
    }

    #[test]
    fn promote_uses_the_checkpoint_or_the_whole_ttl() {
        let now = Instant::now();
        let mut c = LeaseClock::default();
        assert_eq!(c.renew(1, now), Err(ClockError::NotRunning));
        c.load(&[record(1, 60, 0), record(2, 60, 5)], 3, now);
        assert!(c.loaded_at(3) && !c.loaded_at(4));
        assert_eq!(c.time_to_live(1, now), Ok((60, 60)));
        assert_eq!(c.time_to_live(2, now), Ok((60, 5)));
        // A checkpointed lease asks for its checkpoint to be reset.
        assert_eq!(
            c.renew(2, now),
            Ok(Renewal {
                ttl: 60,
                reset_checkpoint: true
            })
        );
        c.checkpointed(&[LeaseRemaining {
            id: 2,
            remaining_ttl: 0,
        }]);
        assert!(!c.renew(2, now).expect("renew").reset_checkpoint);
        assert_eq!(c.renew(3, now), Err(ClockError::NotFound));
        // A range change keeps the deadlines of the leases still owned.
        let later = now + Duration::from_secs(10);
        c.load(&[record(1, 60, 0), record(4, 30, 0)], 4, later);
        assert_eq!(c.time_to_live(1, later), Ok((60, 50)));
        assert_eq!(c.time_to_live(4, later), Ok((30, 30)));
        assert_eq!(c.time_to_live(2, later), Err(ClockError::NotFound));
        c.stop();
        assert_eq!(c.time_to_live(1, later), Err(ClockError::NotRunning));
    }

    #[test]
    fn expired_leases_are_revoked_once_per_retry() {
        let now = Instant::now();
        let mut c = LeaseClock::default();
        c.granted(1, 5, now);
        assert!(
            c.expired(now + Duration::from_secs(9)).is_empty(),
            "not running"
        );
        c.load(&[], 1, now);
        c.granted(1, 5, now);
        c.granted(2, 10, now);
        let t = now + Duration::from_secs(5);
        assert_eq!(c.expired(t), vec![1]);
        assert_eq!(c.time_to_live(1, t), Ok((5, -1)));
        assert_eq!(c.renew(1, t), Err(ClockError::NotFound), "expired");
        assert!(c.expired(t + Duration::from_millis(500)).is_empty());
        assert_eq!(c.expired(t + REVOKE_RETRY), vec![1]);
        assert_eq!(
            c.remaining(t),
            vec![LeaseRemaining {
                id: 2,
                remaining_ttl: 5
            }]
        );
        c.revoked(1);
        assert_eq!(c.time_to_live(1, t), Err(ClockError::NotFound));
        // Renewing restarts the TTL.
        let r = c.renew(2, t).expect("renew");
        assert_eq!(r.ttl, 10);
        assert_eq!(
            c.time_to_live(2, t + Duration::from_millis(200)),
            Ok((10, 10))
        );
    }

    #[test]
    fn leases_handed_over_go_once_taken_or_revoked() {
        let now = Instant::now();
        let mut c = LeaseClock::default();
        c.load(&[], 1, now);
        c.hand_over(1);
        c.hand_over(1);
        c.hand_over(2);
        assert_eq!(c.take_handed_over(), vec![1, 2]);
        assert!(c.take_handed_over().is_empty());
        c.hand_over(3);
        c.revoked(3);
        assert!(c.take_handed_over().is_empty(), "revoked meanwhile");
        c.hand_over(4);
        c.stop();
        assert!(c.take_handed_over().is_empty(), "the lead lost");
    }

    #[test]
    fn a_revoke_begun_holds_attachments_until_applied() {
        let now = Instant::now();
        let mut c = LeaseClock::default();
        assert_eq!(c.begin_revoke(1, false, now), Err(ClockError::NotRunning));
        c.load(&[], 1, now);
        c.granted(1, 5, now);
        assert_eq!(
            c.begin_revoke(1, true, now),
            Err(ClockError::NotFound),
            "not expired"
        );
        assert!(!c.is_revoking(1, now));
        c.begin_revoke(1, false, now).expect("begin");
        assert!(c.is_revoking(1, now));
        assert!(
            !c.is_revoking(1, now + REVOKING_HOLD),
            "held for a while only"
        );
        c.revoked(1);
        assert!(!c.is_revoking(1, now));
    }
}
