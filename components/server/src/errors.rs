//! etcd's gRPC status codes and texts for every error a request can meet
//! (etcd's `rpctypes`), so clients that match on them keep working.

use tonic::{Code, Status};

pub const REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
pub const NOT_LEADER: &str = "etcdserver: not leader";
pub const BAD_LEADER_TRANSFEREE: &str = "etcdserver: bad leader transferee";
pub const LEADER_TRANSFER_TIMEOUT: &str =
    "etcdserver: request timed out, leader transfer took too long";
pub const MEMBER_NOT_FOUND: &str = "etcdserver: member not found";
pub const PEER_URL_EXISTS: &str = "etcdserver: Peer URLs already exists";
pub const MEMBER_BAD_URLS: &str = "etcdserver: given member URLs are invalid";
pub const MEMBER_NOT_LEARNER: &str = "etcdserver: can only promote a learner member";

/// etcd's "request timed out": also what a write whose outcome is unknown
/// answers, as etcd does.
pub const REQUEST_TIMED_OUT: &str = "etcdserver: request timed out";

/// The one mapping from a node's errors to etcd's gRPC statuses.
pub fn status(err: router::Error) -> Status {
    use mvcc::Error as M;
    use raftstore::Error as R;
    match err {
        router::Error::Mvcc(m) => match m {
            M::EmptyKey => Status::invalid_argument("etcdserver: key is not provided"),
            M::KeyNotFound => Status::invalid_argument("etcdserver: key not found"),
            M::ValueProvided => Status::invalid_argument("etcdserver: value is provided"),
            M::LeaseProvided => Status::invalid_argument("etcdserver: lease is provided"),
            M::InvalidSortOption => Status::invalid_argument("etcdserver: invalid sort option"),
            M::TooManyOps => {
                Status::invalid_argument("etcdserver: too many operations in txn request")
            }
            M::DuplicateKey => {
                Status::invalid_argument("etcdserver: duplicate key given in txn request")
            }
            M::LeaseNotFound => Status::not_found("etcdserver: requested lease not found"),
            M::LeaseExists => Status::failed_precondition("etcdserver: lease already exists"),
            // A revoke that kept meeting new attachments until its retries
            // ran out: nothing applied, a client may try again.
            M::LeaseKeysChanged | M::LeaseRevoking => {
                Status::unavailable("etcdserver: leader changed")
            }
            // Only the revokes of expired leases ask for it.
            M::LeaseNotExpired => Status::internal("etcdserver: the lease has not expired"),
            M::Compacted => {
                Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
            }
            M::FutureRev => {
                Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
            }
            M::Corrupted(e) | M::Storage(e) => Status::internal(format!("etcdserver: {e}")),
        },
        router::Error::Region(r) => match r {
            R::NotLeader { .. } | R::RegionNotFound(_) => {
                Status::unavailable("etcdserver: no leader")
            }
            R::EpochNotMatch { .. } | R::StaleCommand(_) => {
                Status::unavailable("etcdserver: leader changed")
            }
            R::Stopped(_) => Status::unavailable("etcdserver: server stopped"),
            R::Installing(_) => Status::unavailable(format!("etcdserver: {r}")),
            R::OutcomeUnknown(_) => Status::unavailable(REQUEST_TIMED_OUT),
            R::Mvcc(m) => status(router::Error::Mvcc(m)),
            other => Status::internal(format!("etcdserver: {other}")),
        },
        router::Error::Pd(e) => Status::unavailable(format!("etcdserver: placement driver: {e}")),
        router::Error::NoRegion(_) | router::Error::Unreachable { .. } => {
            Status::unavailable("etcdserver: no leader")
        }
        router::Error::OutcomeUnknown(_) => Status::unavailable(REQUEST_TIMED_OUT),
        router::Error::Internal(e) => Status::internal(format!("etcdserver: {e}")),
        e @ router::Error::CrossRegion => Status::new(Code::Unimplemented, e.to_string()),
    }
}
