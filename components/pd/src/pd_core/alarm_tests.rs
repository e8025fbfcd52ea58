use proto::pdpb::{alarm_request::AlarmAction, AlarmMember, AlarmType};

use super::tests::open;

fn member(member_id: u64, alarm: AlarmType) -> AlarmMember {
    AlarmMember {
        member_id,
        alarm: alarm as i32,
    }
}

/// etcd's semantics: activation is idempotent and answers the alarm,
/// NONE activates nothing, GET filters by type (NONE: all), deactivation
/// answers what it removed; the list survives a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_activate_list_deactivate_and_survive_restarts() {
    use AlarmAction::{Activate, Deactivate, Get};
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 8);
    assert!(pd.alarm(Get, 0, AlarmType::None).await.unwrap().is_empty());
    assert!(pd
        .alarm(Activate, 3, AlarmType::None)
        .await
        .unwrap()
        .is_empty());
    for _ in 0..2 {
        assert_eq!(
            pd.alarm(Activate, 3, AlarmType::Corrupt).await.unwrap(),
            vec![member(3, AlarmType::Corrupt)]
        );
    }
    pd.alarm(Activate, 1, AlarmType::Nospace).await.unwrap();
    assert_eq!(
        pd.alarm(Get, 0, AlarmType::None).await.unwrap(),
        vec![member(1, AlarmType::Nospace), member(3, AlarmType::Corrupt)]
    );
    assert_eq!(
        pd.alarm(Get, 0, AlarmType::Corrupt).await.unwrap(),
        vec![member(3, AlarmType::Corrupt)]
    );
    drop(pd);
    let pd = open(dir.path(), 10, 8);
    assert_eq!(pd.alarm(Get, 0, AlarmType::None).await.unwrap().len(), 2);
    assert_eq!(
        pd.alarm(Deactivate, 1, AlarmType::Nospace).await.unwrap(),
        vec![member(1, AlarmType::Nospace)]
    );
    assert!(pd
        .alarm(Deactivate, 1, AlarmType::Nospace)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        pd.alarm(Get, 0, AlarmType::None).await.unwrap(),
        vec![member(3, AlarmType::Corrupt)]
    );
}
