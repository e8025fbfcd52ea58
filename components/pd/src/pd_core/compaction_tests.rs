use super::tests::open;
use crate::client::{CompactOutcome, CompactStatus, PdError};

fn outcome(status: CompactStatus, compaction_revision: i64) -> CompactOutcome {
    CompactOutcome {
        status,
        compaction_revision,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_revision_is_checked_raised_only_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 8);
    assert_eq!(pd.compaction_revision().await.unwrap(), 0);
    // Revision 1 is current on a fresh cluster; 2 is in the future.
    assert_eq!(
        pd.compact(2).await.unwrap(),
        outcome(CompactStatus::Future, 0)
    );
    pd.alloc_revisions(20).await.unwrap();
    assert_eq!(
        pd.compact(5).await.unwrap(),
        outcome(CompactStatus::Recorded, 5)
    );
    for at_or_below in [5, 3] {
        assert_eq!(
            pd.compact(at_or_below).await.unwrap(),
            outcome(CompactStatus::Compacted, 5)
        );
    }
    assert_eq!(
        pd.compact(22).await.unwrap(),
        outcome(CompactStatus::Future, 5)
    );
    assert_eq!(
        pd.compact(21).await.unwrap(),
        outcome(CompactStatus::Recorded, 21)
    );
    // A crash (no clean close) keeps it: it is in the replicated state.
    drop(pd);
    let pd = open(dir.path(), 10, 8);
    assert_eq!(pd.compaction_revision().await.unwrap(), 21);
    assert_eq!(
        pd.compact(21).await.unwrap(),
        outcome(CompactStatus::Compacted, 21)
    );
    pd.close().await.unwrap();
    assert_eq!(pd.compact(30).await, Err(PdError::Closed));
    drop(pd);
    let pd = open(dir.path(), 10, 8);
    assert_eq!(pd.compaction_revision().await.unwrap(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compactions_end_at_the_highest() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 1000);
    pd.alloc_revisions(100).await.unwrap();
    let calls: Vec<_> = (1..=20)
        .map(|i| {
            let pd = pd.clone();
            tokio::spawn(async move { (i * 5, pd.compact(i * 5).await.unwrap()) })
        })
        .collect();
    let mut recorded = Vec::new();
    for c in calls {
        let (rev, out) = c.await.unwrap();
        assert!(out.compaction_revision >= rev);
        match out.status {
            CompactStatus::Recorded => recorded.push(rev),
            CompactStatus::Compacted => {}
            CompactStatus::Future => panic!("{rev} is not in the future"),
        }
    }
    assert!(recorded.contains(&100));
    assert_eq!(pd.compaction_revision().await.unwrap(), 100);
}
