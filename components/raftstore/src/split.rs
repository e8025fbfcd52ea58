//! Region split: what a `SplitRequest` turns a region into.
//!
//! A split is metadata only. Every region of a node keeps its data in the
//! node's one RocksDB keyed by user key, so the keys of `[split_key, end)`
//! stay where they are and change owner: the region keeps `[start,
//! split_key)` and a new region takes `[split_key, end)`, with the same
//! applied and compaction revisions (its history up to the split is the
//! region's). Both get the epoch `version` one higher, so every data
//! command built for the region before the split fails its epoch check
//! (at propose and at apply) and is re-routed by its sender.
//!
//! The new region starts on every node that applies the split, from the
//! same state as a bootstrapped region (log truncated at `INIT_INDEX`,
//! `INIT_TERM`; see `storage`), with the region's peers mapped to new peer
//! ids on the same nodes and in the same roles. Its replicas are voters
//! from the start; the one on the node where the region led campaigns at
//! once (see the store's `start_split_region`).
//!
//! Contract of [`derive`]: `Err(StaleCommand)` (the split did not apply;
//! the proposer may ask again) when
//! * `split_key` is not strictly inside the region (`start < key`, and
//!   `key < end` unless the region is unbounded);
//! * `new_region_id` is 0 or the region's own id, or the new peer ids are
//!   not one non-zero, distinct id per peer, unused by the region;
//! * the region is in a joint configuration (a peer is an incoming or
//!   demoting voter): the new region could not start in it.

use std::collections::HashSet;

use proto::metapb::{self, PeerRole};
use proto::raft_cmdpb::SplitRequest;

use crate::{Error, Result};

/// The region after the split and the new region, or why the split does
/// not apply (see the module docs).
pub(crate) fn derive(
    region: &metapb::Region,
    req: &SplitRequest,
) -> Result<(metapb::Region, metapb::Region)> {
    let refuse = |why: String| Err(Error::StaleCommand(format!("split refused: {why}")));
    let key = req.split_key.as_slice();
    if key <= region.start_key.as_slice()
        || (!region.end_key.is_empty() && key >= region.end_key.as_slice())
    {
        return refuse(format!(
            "key {:?} is not inside region {}",
            String::from_utf8_lossy(key),
            region.id
        ));
    }
    if req.new_region_id == 0 || req.new_region_id == region.id {
        return refuse(format!("unusable new region id {}", req.new_region_id));
    }
    let ids: HashSet<u64> = req.new_peer_ids.iter().copied().collect();
    if req.new_peer_ids.len() != region.peers.len()
        || ids.len() != region.peers.len()
        || ids.contains(&0)
        || region.peers.iter().any(|p| ids.contains(&p.id))
    {
        return refuse(format!(
            "new peer ids {:?} do not map the peers {:?}",
            req.new_peer_ids, region.peers
        ));
    }
    if region
        .peers
        .iter()
        .any(|p| matches!(p.role(), PeerRole::IncomingVoter | PeerRole::DemotingVoter))
    {
        return refuse(format!("region {} is changing membership", region.id));
    }
    let mut epoch = region.region_epoch.unwrap_or_default();
    epoch.version += 1;
    let mut left = region.clone();
    left.end_key = key.to_vec();
    left.region_epoch = Some(epoch);
    let right = metapb::Region {
        id: req.new_region_id,
        start_key: key.to_vec(),
        end_key: region.end_key.clone(),
        region_epoch: Some(epoch),
        peers: region
            .peers
            .iter()
            .zip(&req.new_peer_ids)
            .map(|(p, id)| metapb::Peer { id: *id, ..*p })
            .collect(),
    };
    Ok((left, right))
}

/// Whether `region` owns `key`.
pub(crate) fn contains(region: &metapb::Region, key: &[u8]) -> bool {
    key >= region.start_key.as_slice()
        && (region.end_key.is_empty() || key < region.end_key.as_slice())
}

/// Whether two regions' key ranges overlap (empty end = unbounded).
pub(crate) fn overlaps(a: &metapb::Region, b: &metapb::Region) -> bool {
    let below = |start: &[u8], end: &[u8]| end.is_empty() || start < end;
    below(&a.start_key, &b.end_key) && below(&b.start_key, &a.end_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: &[u8], end: &[u8]) -> metapb::Region {
        metapb::Region {
            id: 1,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 3,
                version: 2,
            }),
            peers: vec![
                metapb::Peer {
                    id: 10,
                    node_id: 1,
                    role: 0,
                },
                metapb::Peer {
                    id: 11,
                    node_id: 2,
                    role: PeerRole::Learner as i32,
                },
            ],
        }
    }

    fn req(key: &[u8], id: u64, peers: &[u64]) -> SplitRequest {
        SplitRequest {
            split_key: key.to_vec(),
            new_region_id: id,
            new_peer_ids: peers.to_vec(),
        }
    }

    #[test]
    fn splits_range_epoch_and_peers() {
        let (left, right) = derive(&region(b"a", b""), &req(b"m", 5, &[20, 21])).unwrap();
        assert_eq!(
            (left.start_key.as_slice(), left.end_key.as_slice()),
            (&b"a"[..], &b"m"[..])
        );
        assert_eq!(
            (right.start_key.as_slice(), right.end_key.as_slice()),
            (&b"m"[..], &b""[..])
        );
        let epoch = metapb::RegionEpoch {
            conf_ver: 3,
            version: 3,
        };
        assert_eq!(left.region_epoch, Some(epoch));
        assert_eq!(right.region_epoch, Some(epoch));
        assert_eq!(left.peers, region(b"a", b"").peers);
        assert_eq!(right.id, 5);
        let mapped: Vec<_> = right
            .peers
            .iter()
            .map(|p| (p.id, p.node_id, p.role()))
            .collect();
        assert_eq!(
            mapped,
            vec![(20, 1, PeerRole::Voter), (21, 2, PeerRole::Learner)]
        );
    }

    #[test]
    fn refuses_keys_outside_and_bad_ids() {
        let r = region(b"b", b"y");
        for key in [&b"a"[..], b"b", b"y", b"z", b""] {
            assert!(matches!(
                derive(&r, &req(key, 5, &[20, 21])),
                Err(Error::StaleCommand(_))
            ));
        }
        for (id, peers) in [
            (0, &[20u64, 21][..]),
            (1, &[20, 21]),
            (5, &[20]),
            (5, &[20, 20]),
            (5, &[20, 0]),
            (5, &[20, 10]),
            (5, &[20, 21, 22]),
        ] {
            assert!(derive(&r, &req(b"m", id, peers)).is_err(), "{id} {peers:?}");
        }
        let mut joint = r.clone();
        joint.peers[1].set_role(PeerRole::IncomingVoter);
        assert!(derive(&joint, &req(b"m", 5, &[20, 21])).is_err());
    }

    #[test]
    fn overlap() {
        assert!(overlaps(&region(b"a", b"m"), &region(b"l", b"")));
        assert!(!overlaps(&region(b"a", b"m"), &region(b"m", b"")));
        assert!(overlaps(&region(b"", b""), &region(b"x", b"y")));
        assert!(!overlaps(&region(b"x", b"y"), &region(b"", b"x")));
    }
}
