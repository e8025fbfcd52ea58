//! etcd's alarms on a node: the cluster's alarm list lives in PD's
//! replicated state (`PdClient::alarm`); every node keeps a copy
//! ([`Alarms`]) to decide, without a PD call per request, which writes
//! etcd would refuse, and raises CORRUPT when the consistency check of
//! one of its replicas finds a difference ([`run`]).
//!
//! Contract:
//! * the copy is refreshed from PD every [`REFRESH`], and at once after an
//!   alarm change made through this node (`Maintenance.Alarm`); so a
//!   node learns of an alarm raised or disarmed elsewhere within about
//!   [`REFRESH`] (etcd members learn it when they apply the raft entry);
//! * while CORRUPT is active, Put, DeleteRange, Compact and every Txn
//!   with a write operation (in either branch) fail with etcd's
//!   "etcdserver: corrupt cluster" (`DataLoss`); reads and read-only
//!   txns are served, as in etcd 3.5 (its corrupt applier refuses what
//!   goes through raft, and reads do not);
//! * while NOSPACE is active, Put and every Txn with a Put fail with
//!   "etcdserver: mvcc: database space exceeded" (`ResourceExhausted`),
//!   as etcd's capped applier does; MetaStore enforces no space quota, so
//!   NOSPACE is only ever activated through the API;
//! * every inconsistency the node's store reports (`Store::
//!   inconsistencies`: a replica here, leading its region, found a
//!   replica that differs from the region's majority) raises CORRUPT with
//!   that replica's node id as member id (as etcd 3.6 names the
//!   corrupted member), retried until PD took it.

use std::sync::Arc;
use std::time::Duration;

use mvcc::exec::WriteRequest;
use parking_lot::RwLock;
use pd::PdClient;
use proto::etcdserverpb::{request_op::Request as Op, RequestOp, TxnRequest};
use proto::pdpb::{alarm_request::AlarmAction, AlarmMember, AlarmType};
use raftstore::{Inconsistency, Store};
use tokio::sync::watch;
use tonic::Status;
use tracing::{error, warn};

/// How often a node refreshes its copy of the alarm list.
pub const REFRESH: Duration = Duration::from_secs(1);

pub const CORRUPT: &str = "etcdserver: corrupt cluster";
pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

/// This node's copy of the cluster's alarm list.
#[derive(Default)]
pub struct Alarms {
    list: RwLock<Vec<AlarmMember>>,
}

impl Alarms {
    pub fn set(&self, list: Vec<AlarmMember>) {
        *self.list.write() = list;
    }

    pub fn list(&self) -> Vec<AlarmMember> {
        self.list.read().clone()
    }

    fn active(&self, alarm: AlarmType) -> bool {
        self.list.read().iter().any(|a| a.alarm == alarm as i32)
    }

    /// Re-reads the list from PD.
    pub async fn refresh(&self, pd: &dyn PdClient) -> Result<(), pd::PdError> {
        let list = pd.alarm(AlarmAction::Get, 0, AlarmType::None).await?;
        self.set(list);
        Ok(())
    }

    /// The error etcd answers `req` with under the active alarms, if any.
    pub fn check_write(&self, req: &WriteRequest) -> Result<(), Status> {
        let writes = match req {
            WriteRequest::Txn(t) => txn_writes(t),
            _ => true,
        };
        if writes && self.active(AlarmType::Corrupt) {
            return Err(Status::data_loss(CORRUPT));
        }
        let puts = match req {
            WriteRequest::Put(_) => true,
            WriteRequest::DeleteRange(_) | WriteRequest::LeaseRevoke(_) => false,
            WriteRequest::Txn(t) => txn_puts(t),
        };
        if puts && self.active(AlarmType::Nospace) {
            return Err(Status::resource_exhausted(NO_SPACE));
        }
        Ok(())
    }

    /// The error etcd answers a Compact with under the active alarms.
    pub fn check_compact(&self) -> Result<(), Status> {
        if self.active(AlarmType::Corrupt) {
            return Err(Status::data_loss(CORRUPT));
        }
        Ok(())
    }
}

/// Whether a txn is not read-only: some operation of either branch,
/// nested txns included, is a Put or DeleteRange (etcd's
/// `!isTxnReadonly`).
fn txn_writes(t: &TxnRequest) -> bool {
    ops(t).any(|op| match &op.request {
        Some(Op::RequestPut(_) | Op::RequestDeleteRange(_)) => true,
        Some(Op::RequestTxn(inner)) => txn_writes(inner),
        Some(Op::RequestRange(_)) | None => false,
    })
}

/// Whether some operation of either branch is a Put (etcd's capped
/// applier refuses a txn whose cost is above zero).
fn txn_puts(t: &TxnRequest) -> bool {
    ops(t).any(|op| match &op.request {
        Some(Op::RequestPut(_)) => true,
        Some(Op::RequestTxn(inner)) => txn_puts(inner),
        _ => false,
    })
}

fn ops(t: &TxnRequest) -> impl Iterator<Item = &RequestOp> {
    t.success.iter().chain(&t.failure)
}

/// Keeps `alarms` fresh and raises CORRUPT for the member each
/// inconsistency `store` reports names (see the module docs), until
/// `stopped`.
pub async fn run(
    pd: Arc<dyn PdClient>,
    store: Arc<Store>,
    alarms: Arc<Alarms>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut found = store.inconsistencies();
    let mut raised = 0;
    loop {
        let pending: Vec<Inconsistency> = found.borrow_and_update()[raised..].to_vec();
        for inc in pending {
            let member = inc.node_id;
            match pd
                .alarm(AlarmAction::Activate, member, AlarmType::Corrupt)
                .await
            {
                Ok(_) => {
                    error!(
                        member,
                        region_id = inc.region_id,
                        "raised the CORRUPT alarm: a replica on that member differs from its region's majority"
                    );
                    raised += 1;
                }
                Err(e) => {
                    warn!("cannot raise the CORRUPT alarm yet: {e}");
                    break;
                }
            }
        }
        if let Err(e) = alarms.refresh(pd.as_ref()).await {
            warn!("cannot refresh the alarm list: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = found.changed() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};

    fn op(r: Op) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn corrupt_refuses_writes_and_nospace_puts() {
        let alarms = Alarms::default();
        let put = WriteRequest::Put(PutRequest::default());
        let del = WriteRequest::DeleteRange(DeleteRangeRequest::default());
        let read_only = WriteRequest::Txn(TxnRequest {
            success: vec![op(Op::RequestRange(RangeRequest::default()))],
            ..Default::default()
        });
        let nested_put = WriteRequest::Txn(TxnRequest {
            failure: vec![op(Op::RequestTxn(TxnRequest {
                success: vec![op(Op::RequestPut(PutRequest::default()))],
                ..Default::default()
            }))],
            ..Default::default()
        });
        let txn_delete = WriteRequest::Txn(TxnRequest {
            success: vec![op(Op::RequestDeleteRange(DeleteRangeRequest::default()))],
            ..Default::default()
        });
        for r in [&put, &del, &read_only, &nested_put, &txn_delete] {
            assert!(alarms.check_write(r).is_ok());
        }
        alarms.set(vec![AlarmMember {
            member_id: 1,
            alarm: AlarmType::Nospace as i32,
        }]);
        for (r, refused) in [
            (&put, true),
            (&del, false),
            (&read_only, false),
            (&nested_put, true),
            (&txn_delete, false),
        ] {
            let res = alarms.check_write(r);
            assert_eq!(res.is_err(), refused, "{r:?}");
            if let Err(s) = res {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                assert_eq!(s.message(), NO_SPACE);
            }
        }
        assert!(alarms.check_compact().is_ok());
        alarms.set(vec![AlarmMember {
            member_id: 1,
            alarm: AlarmType::Corrupt as i32,
        }]);
        for (r, refused) in [
            (&put, true),
            (&del, true),
            (&read_only, false),
            (&nested_put, true),
            (&txn_delete, true),
        ] {
            let res = alarms.check_write(r);
            assert_eq!(res.is_err(), refused, "{r:?}");
            if let Err(s) = res {
                assert_eq!(s.code(), tonic::Code::DataLoss);
                assert_eq!(s.message(), CORRUPT);
            }
        }
        assert_eq!(
            alarms.check_compact().unwrap_err().code(),
            tonic::Code::DataLoss
        );
    }
}
