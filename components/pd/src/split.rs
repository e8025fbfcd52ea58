//! Splits asked for by an operator (`metastore-ctl region split`, the
//! `SplitRegion` RPC): kept in memory on the PD leader by region id and
//! handed to the region's leader with its heartbeat responses until the
//! region no longer has the key strictly inside it (the split happened, or
//! another split or a merge moved the boundary) or the request is older
//! than [`crate::schedule::ScheduleConfig::split_timeout`].
//!
//! Nothing here is replicated: a new PD leader starts without requests, and
//! whoever asked sees the split not happen. A heartbeat costs one map
//! look-up; only requesting and listing sweep, over the requests alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb;
use tracing::{debug, info};

use crate::client::RegionOperator;
use crate::operators::{PendingOperator, SOURCE_SPLIT_REQUEST};

/// Whether `key` lies strictly inside `region`: start < key < end (an empty
/// end is +inf), i.e. splitting there leaves two non-empty regions.
pub(crate) fn strictly_inside(region: &metapb::Region, key: &[u8]) -> bool {
    region.start_key.as_slice() < key && (region.end_key.is_empty() || key < &region.end_key[..])
}

struct Request {
    key: Vec<u8>,
    at: Instant,
}

pub(crate) struct SplitRequests {
    timeout: Duration,
    pending: Mutex<HashMap<u64, Request>>,
}

impl SplitRequests {
    pub fn new(timeout: Duration) -> Self {
        SplitRequests {
            timeout,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Records a request to split region `region_id` at `key`, replacing an
    /// earlier one for the region. The caller checked that the key lies
    /// strictly inside the region.
    pub fn request(&self, region_id: u64, key: Vec<u8>) {
        let mut pending = self.pending.lock();
        pending.retain(|_, r| r.at.elapsed() < self.timeout);
        info!(region_id, key = %key.escape_ascii(), "split requested");
        pending.insert(
            region_id,
            Request {
                key,
                at: Instant::now(),
            },
        );
    }

    /// The split to hand to the leader of `region`, which just reported its
    /// meta; drops the region's request once the region no longer has the
    /// key strictly inside it or the request expired.
    pub fn on_heartbeat(&self, region: &metapb::Region) -> Option<RegionOperator> {
        let mut pending = self.pending.lock();
        let r = pending.get(&region.id)?;
        if r.at.elapsed() >= self.timeout {
            info!(region_id = region.id, key = %r.key.escape_ascii(), "split request expired");
        } else if !strictly_inside(region, &r.key) {
            debug!(region_id = region.id, key = %r.key.escape_ascii(), "split request settled");
        } else {
            return Some(RegionOperator::Split { key: r.key.clone() });
        }
        pending.remove(&region.id);
        None
    }

    /// Whether region `region_id` has a request not expired yet.
    pub fn contains(&self, region_id: u64) -> bool {
        self.pending
            .lock()
            .get(&region_id)
            .is_some_and(|r| r.at.elapsed() < self.timeout)
    }

    /// The requests not expired yet, by region id.
    pub fn pending(&self) -> Vec<PendingOperator> {
        let mut pending = self.pending.lock();
        pending.retain(|_, r| r.at.elapsed() < self.timeout);
        let mut out: Vec<PendingOperator> = pending
            .iter()
            .map(|(id, r)| PendingOperator {
                region_id: *id,
                source: SOURCE_SPLIT_REQUEST.to_owned(),
                op: RegionOperator::Split { key: r.key.clone() },
                age: r.at.elapsed(),
            })
            .collect();
        out.sort_by_key(|o| o.region_id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, start: &[u8], end: &[u8]) -> metapb::Region {
        metapb::Region {
            id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn strictly_inside_excludes_both_ends() {
        let r = region(1, b"b", b"d");
        assert!(!strictly_inside(&r, b"a"));
        assert!(!strictly_inside(&r, b"b"));
        assert!(strictly_inside(&r, b"b\x00"));
        assert!(strictly_inside(&r, b"c"));
        assert!(!strictly_inside(&r, b"d"));
        let whole = region(1, b"", b"");
        assert!(!strictly_inside(&whole, b""));
        assert!(strictly_inside(&whole, b"\x00"));
        assert!(strictly_inside(&whole, b"\xff\xff"));
    }

    #[test]
    fn handed_out_until_settled_and_replaced_by_a_newer_request() {
        let s = SplitRequests::new(Duration::from_secs(60));
        s.request(1, b"m".to_vec());
        let split = |k: &[u8]| Some(RegionOperator::Split { key: k.to_vec() });
        assert_eq!(s.on_heartbeat(&region(1, b"", b"")), split(b"m"));
        assert_eq!(s.on_heartbeat(&region(2, b"", b"")), None);
        s.request(1, b"n".to_vec());
        assert_eq!(s.on_heartbeat(&region(1, b"", b"")), split(b"n"));
        assert_eq!(s.pending().len(), 1);
        assert!(s.contains(1) && !s.contains(2));
        // The split happened: region 1 now ends at the key.
        assert_eq!(s.on_heartbeat(&region(1, b"", b"n")), None);
        assert!(s.pending().is_empty());
    }

    #[test]
    fn expired_requests_are_dropped() {
        let s = SplitRequests::new(Duration::ZERO);
        s.request(1, b"m".to_vec());
        assert_eq!(s.on_heartbeat(&region(1, b"", b"")), None);
        s.request(2, b"m".to_vec());
        assert!(!s.contains(2));
        assert!(s.pending().is_empty());
    }
}
