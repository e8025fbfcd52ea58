//! The wire form of router errors (`forwardpb.Error`), used by both sides of
//! forwarding. Every class of `crate::error` survives the trip: region
//! errors and stale commands come back retryable, an unknown outcome stays
//! unknown, etcd request errors keep their kind (and so etcd's code and
//! text), placement-driver errors keep their kind (and so whether they are
//! transient).

use proto::forwardpb::{self, error::Kind, etcd_error};

use crate::Error;

/// The wire form of an error of a request served for another node.
pub fn error_to_wire(err: &Error) -> forwardpb::Error {
    use raftstore::Error as R;
    let kind = match err {
        Error::Mvcc(m) | Error::Region(R::Mvcc(m)) => Kind::Etcd(etcd_to_wire(m)),
        Error::Region(R::NotLeader { region_id, leader }) => {
            Kind::NotLeader(forwardpb::NotLeader {
                region_id: *region_id,
                leader: *leader,
            })
        }
        Error::Region(R::EpochNotMatch { region_id, current }) => {
            Kind::EpochNotMatch(forwardpb::EpochNotMatch {
                region_id: *region_id,
                current: Some(current.clone()),
            })
        }
        // A replica shutting down, gone or installing a snapshot, before it
        // took the request: the sender looks elsewhere.
        Error::Region(R::RegionNotFound(id) | R::Stopped(id) | R::Installing(id)) => {
            Kind::RegionNotFound(forwardpb::RegionNotFound { region_id: *id })
        }
        Error::NoRegion(_) => Kind::RegionNotFound(forwardpb::RegionNotFound { region_id: 0 }),
        Error::Region(R::StaleCommand(s)) => Kind::StaleCommand(s.clone()),
        Error::Region(R::OutcomeUnknown(s)) | Error::OutcomeUnknown(s) => {
            Kind::OutcomeUnknown(s.clone())
        }
        Error::Pd(e) => Kind::PlacementDriver(e.to_proto()),
        other => Kind::Other(other.to_string()),
    };
    forwardpb::Error { kind: Some(kind) }
}

/// The router error a forwarded request's error stands for.
pub fn error_from_wire(err: forwardpb::Error) -> Error {
    use raftstore::Error as R;
    match err.kind {
        Some(Kind::NotLeader(n)) => Error::Region(R::NotLeader {
            region_id: n.region_id,
            leader: n.leader,
        }),
        Some(Kind::EpochNotMatch(e)) => Error::Region(R::EpochNotMatch {
            region_id: e.region_id,
            current: e.current.unwrap_or_default(),
        }),
        Some(Kind::RegionNotFound(r)) => Error::Region(R::RegionNotFound(r.region_id)),
        Some(Kind::StaleCommand(s)) => Error::Region(R::StaleCommand(s)),
        Some(Kind::OutcomeUnknown(s)) => Error::OutcomeUnknown(s),
        Some(Kind::Etcd(e)) => Error::Mvcc(etcd_from_wire(e)),
        Some(Kind::PlacementDriver(e)) => Error::Pd(pd::PdError::from_proto(&e)),
        Some(Kind::Other(s)) => Error::Internal(s),
        // A kind this node does not know (a newer sender): nothing says the
        // request did not run.
        None => Error::OutcomeUnknown("forwarded request failed without an error".into()),
    }
}

fn etcd_to_wire(e: &mvcc::Error) -> forwardpb::EtcdError {
    use etcd_error::Kind as K;
    use mvcc::Error as M;
    let (kind, detail) = match e {
        M::EmptyKey => (K::EmptyKey, String::new()),
        M::KeyNotFound => (K::KeyNotFound, String::new()),
        M::ValueProvided => (K::ValueProvided, String::new()),
        M::LeaseProvided => (K::LeaseProvided, String::new()),
        M::InvalidSortOption => (K::InvalidSortOption, String::new()),
        M::TooManyOps => (K::TooManyOps, String::new()),
        M::DuplicateKey => (K::DuplicateKey, String::new()),
        M::LeaseNotFound => (K::LeaseNotFound, String::new()),
        M::LeaseExists => (K::LeaseExists, String::new()),
        M::LeaseKeysChanged => (K::LeaseKeysChanged, String::new()),
        M::LeaseNotExpired => (K::LeaseNotExpired, String::new()),
        M::LeaseRevoking => (K::LeaseRevoking, String::new()),
        M::Compacted => (K::Compacted, String::new()),
        M::FutureRev => (K::FutureRev, String::new()),
        M::Corrupted(s) => (K::Corrupted, s.clone()),
        M::Storage(s) => (K::Storage, s.clone()),
    };
    forwardpb::EtcdError {
        kind: kind as i32,
        detail,
    }
}

fn etcd_from_wire(e: forwardpb::EtcdError) -> mvcc::Error {
    use etcd_error::Kind as K;
    use mvcc::Error as M;
    match K::try_from(e.kind).unwrap_or(K::Unknown) {
        K::EmptyKey => M::EmptyKey,
        K::KeyNotFound => M::KeyNotFound,
        K::ValueProvided => M::ValueProvided,
        K::LeaseProvided => M::LeaseProvided,
        K::InvalidSortOption => M::InvalidSortOption,
        K::TooManyOps => M::TooManyOps,
        K::DuplicateKey => M::DuplicateKey,
        K::LeaseNotFound => M::LeaseNotFound,
        K::LeaseExists => M::LeaseExists,
        K::LeaseKeysChanged => M::LeaseKeysChanged,
        K::LeaseNotExpired => M::LeaseNotExpired,
        K::LeaseRevoking => M::LeaseRevoking,
        K::Compacted => M::Compacted,
        K::FutureRev => M::FutureRev,
        K::Corrupted => M::Corrupted(e.detail),
        // A kind this node does not know (a newer sender) is still a
        // failure of the request, reported with what detail there is.
        K::Storage | K::Unknown => M::Storage(e.detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::metapb;

    #[test]
    fn etcd_errors_round_trip() {
        use mvcc::Error as M;
        let all = || {
            [
                M::EmptyKey,
                M::KeyNotFound,
                M::ValueProvided,
                M::LeaseProvided,
                M::InvalidSortOption,
                M::TooManyOps,
                M::LeaseKeysChanged,
                M::LeaseNotExpired,
                M::LeaseRevoking,
                M::DuplicateKey,
                M::LeaseNotFound,
                M::LeaseExists,
                M::Compacted,
                M::FutureRev,
                M::Corrupted("x".into()),
                M::Storage("y".into()),
            ]
        };
        for (e, copy) in all().into_iter().zip(all()) {
            match error_from_wire(error_to_wire(&Error::Mvcc(copy))) {
                Error::Mvcc(back) => assert_eq!(back, e),
                other => panic!("{e:?} came back as {other:?}"),
            }
        }
    }

    #[test]
    fn region_errors_stay_retryable() {
        let leader = metapb::Peer {
            id: 3,
            node_id: 7,
            role: 0,
        };
        let errs = [
            Error::Region(raftstore::Error::NotLeader {
                region_id: 1,
                leader: Some(leader),
            }),
            Error::Region(raftstore::Error::EpochNotMatch {
                region_id: 1,
                current: metapb::Region::default(),
            }),
            Error::Region(raftstore::Error::RegionNotFound(1)),
            Error::Region(raftstore::Error::Stopped(1)),
            Error::Region(raftstore::Error::StaleCommand("x".into())),
            Error::Pd(pd::PdError::NotLeader("pd2".into())),
            Error::Pd(pd::PdError::Unavailable("down".into())),
        ];
        for e in errs {
            let back = error_from_wire(error_to_wire(&e));
            assert!(back.is_retryable(), "{e:?} came back as {back:?}");
        }
        match error_from_wire(error_to_wire(&Error::Region(raftstore::Error::NotLeader {
            region_id: 1,
            leader: Some(leader),
        }))) {
            Error::Region(raftstore::Error::NotLeader { leader: l, .. }) => {
                assert_eq!(l, Some(leader))
            }
            other => panic!("{other:?}"),
        }
    }

    /// The hole this guards: a replica that stopped with the write pending
    /// used to travel as "region not found", which the sender retried — a
    /// second application of a write that may have applied.
    #[test]
    fn unknown_outcomes_stay_unknown() {
        let errs = [
            Error::OutcomeUnknown("write timed out".into()),
            Error::Region(raftstore::Error::OutcomeUnknown("stopped".into())),
        ];
        for e in errs {
            let back = error_from_wire(error_to_wire(&e));
            assert!(
                matches!(back, Error::OutcomeUnknown(_)) && !back.is_retryable(),
                "{e:?} came back as {back:?}"
            );
        }
        let closed = error_from_wire(error_to_wire(&Error::Pd(pd::PdError::Closed)));
        assert!(
            matches!(closed, Error::Pd(pd::PdError::Closed)),
            "{closed:?}"
        );
        assert!(!closed.is_retryable());
    }
}
