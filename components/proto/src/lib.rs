//! Wire contract of MetaStore.
//!
//! Generated (tonic + prost) Rust code for:
//! - the etcd v3 gRPC API, byte-compatible with etcd 3.5/3.6 clients:
//!   [`mvccpb`], [`authpb`], [`etcdserverpb`] (KV, Watch, Lease, Cluster,
//!   Maintenance, Auth), [`v3lockpb`] (Lock) and [`v3electionpb`] (Election);
//! - MetaStore's own protos under `proto/metastore/` ([`metapb`], ...).
//!
//! Each proto package is one top-level module, so cross-package references
//! generated as `super::mvccpb::...` resolve. Every `.proto` file under the
//! workspace `proto/` directory is compiled by `build.rs`; to expose a new
//! package add a line `pub mod <package> { tonic::include_proto!("<package>"); }`.

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod metapb {
    tonic::include_proto!("metapb");
}
pub mod pdpb {
    tonic::include_proto!("pdpb");
}
pub mod pd_raftpb {
    tonic::include_proto!("pd_raftpb");
}
pub mod raft_cmdpb {
    tonic::include_proto!("raft_cmdpb");
}
pub mod raft_serverpb {
    tonic::include_proto!("raft_serverpb");
}
pub mod forwardpb {
    tonic::include_proto!("forwardpb");
}

#[cfg(test)]
mod tests {
    use super::etcdserverpb::{compare, Compare, PutRequest, RangeRequest, WatchResponse};
    use super::mvccpb::{event::EventType, Event, KeyValue};
    use prost::Message;

    #[test]
    fn put_request_wire_bytes() {
        let req = PutRequest {
            key: b"a".to_vec(),
            value: b"b".to_vec(),
            lease: 5,
            ..Default::default()
        };
        let buf = req.encode_to_vec();
        assert_eq!(buf, [0x0a, 0x01, b'a', 0x12, 0x01, b'b', 0x18, 0x05]);
        assert_eq!(PutRequest::decode(buf.as_slice()).unwrap(), req);
    }

    #[test]
    fn range_request_wire_bytes() {
        let req = RangeRequest {
            key: b"foo".to_vec(),
            range_end: b"fop".to_vec(),
            limit: 10,
            sort_order: 2,  // DESCEND
            sort_target: 4, // VALUE
            count_only: true,
            max_create_revision: 1,
            ..Default::default()
        };
        #[rustfmt::skip]
        let expected = [
            0x0a, 0x03, b'f', b'o', b'o', // key = 1
            0x12, 0x03, b'f', b'o', b'p', // range_end = 2
            0x18, 0x0a, // limit = 3
            0x28, 0x02, // sort_order = 5
            0x30, 0x04, // sort_target = 6
            0x48, 0x01, // count_only = 9
            0x68, 0x01, // max_create_revision = 13
        ];
        assert_eq!(req.encode_to_vec(), expected);
    }

    #[test]
    fn compare_value_and_range_end_wire_bytes() {
        let cmp = Compare {
            result: compare::CompareResult::NotEqual as i32,
            target: compare::CompareTarget::Value as i32,
            key: b"k".to_vec(),
            range_end: b"z".to_vec(),
            target_union: Some(compare::TargetUnion::Value(b"v".to_vec())),
        };
        #[rustfmt::skip]
        let expected = [
            0x08, 0x03, // result = 1 (NOT_EQUAL)
            0x10, 0x03, // target = 2 (VALUE)
            0x1a, 0x01, b'k', // key = 3
            0x3a, 0x01, b'v', // target_union.value = 7
            0x82, 0x04, 0x01, b'z', // range_end = 64
        ];
        let buf = cmp.encode_to_vec();
        assert_eq!(buf, expected);
        assert_eq!(Compare::decode(buf.as_slice()).unwrap(), cmp);
    }

    #[test]
    fn watch_response_events_at_field_11() {
        let resp = WatchResponse {
            events: vec![Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: b"x".to_vec(),
                    ..Default::default()
                }),
                prev_kv: None,
            }],
            ..Default::default()
        };
        // events = 11 (0x5a), Event{type = 1: 0x08 0x01, kv = 2: 0x12 ...}
        assert_eq!(
            resp.encode_to_vec(),
            [0x5a, 0x07, 0x08, 0x01, 0x12, 0x03, 0x0a, 0x01, b'x']
        );
    }

    /// Compile-time check that every service has server and client code.
    #[allow(dead_code)]
    fn services_exist() {
        use super::etcdserverpb::*;
        use super::{v3electionpb, v3lockpb};
        let _ = std::mem::size_of::<kv_client::KvClient<tonic::transport::Channel>>;
        let _ = std::mem::size_of::<watch_client::WatchClient<tonic::transport::Channel>>;
        let _ = std::mem::size_of::<lease_client::LeaseClient<tonic::transport::Channel>>;
        let _ = std::mem::size_of::<cluster_client::ClusterClient<tonic::transport::Channel>>;
        let _ =
            std::mem::size_of::<maintenance_client::MaintenanceClient<tonic::transport::Channel>>;
        let _ = std::mem::size_of::<auth_client::AuthClient<tonic::transport::Channel>>;
        let _ = std::mem::size_of::<v3lockpb::lock_client::LockClient<tonic::transport::Channel>>;
        let _ = std::mem::size_of::<
            v3electionpb::election_client::ElectionClient<tonic::transport::Channel>,
        >;
        fn servers<
            A: kv_server::Kv,
            B: watch_server::Watch,
            C: lease_server::Lease,
            D: cluster_server::Cluster,
            E: maintenance_server::Maintenance,
            F: auth_server::Auth,
            G: v3lockpb::lock_server::Lock,
            H: v3electionpb::election_server::Election,
        >() {
            let _ = std::mem::size_of::<kv_server::KvServer<A>>;
            let _ = std::mem::size_of::<watch_server::WatchServer<B>>;
            let _ = std::mem::size_of::<lease_server::LeaseServer<C>>;
            let _ = std::mem::size_of::<cluster_server::ClusterServer<D>>;
            let _ = std::mem::size_of::<maintenance_server::MaintenanceServer<E>>;
            let _ = std::mem::size_of::<auth_server::AuthServer<F>>;
            let _ = std::mem::size_of::<v3lockpb::lock_server::LockServer<G>>;
            let _ = std::mem::size_of::<v3electionpb::election_server::ElectionServer<H>>;
        }
    }
}
