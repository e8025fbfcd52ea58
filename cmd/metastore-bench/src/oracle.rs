//! `oracle`: the revision oracle's ceiling. Each client asks the placement
//! driver's leader for revisions (`AllocRevisions`, `--batch` at a time) in
//! a closed loop, as a node's sequencer does; the report counts requests,
//! and revisions per second are requests per second times `--batch`.
//! `--endpoints` are PD client URLs (a dev node serves its embedded PD on
//! its client URL); the leader is found through `GetMembers`.

use proto::pdpb::pd_client::PdClient;
use proto::pdpb::{AllocRevisionsRequest, GetMembersRequest};
use tonic::transport::Channel;

use crate::runner::Worker;
use crate::stats::BenchError;

pub struct OracleWorker {
    pd: PdClient<Channel>,
    batch: u32,
}

impl OracleWorker {
    pub fn new(channel: Channel, batch: u32) -> OracleWorker {
        OracleWorker {
            pd: PdClient::new(channel),
            batch,
        }
    }
}

impl Worker for OracleWorker {
    type Req = AllocRevisionsRequest;

    fn prepare(&mut self, _: u64) -> (usize, AllocRevisionsRequest) {
        let req = AllocRevisionsRequest {
            header: None,
            count: self.batch,
        };
        (0, req)
    }

    async fn send(&mut self, req: AllocRevisionsRequest) -> Result<(), BenchError> {
        let resp = self.pd.alloc_revisions(req).await?.into_inner();
        match resp.header.and_then(|h| h.error) {
            Some(e) => Err(BenchError::new("PdError", e.message)),
            None => Ok(()),
        }
    }
}

/// The client URL of the PD leader, asked of the first PD that answers.
pub async fn leader_url(endpoints: &[String]) -> Result<String, String> {
    for ep in endpoints {
        let Ok(channel) = Channel::from_shared(ep.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
        else {
            continue;
        };
        let Ok(resp) = PdClient::new(channel)
            .get_members(GetMembersRequest { header: None })
            .await
        else {
            continue;
        };
        if let Some(url) = resp
            .into_inner()
            .leader
            .and_then(|l| l.client_urls.into_iter().next())
        {
            return Ok(url);
        }
    }
    Err(format!("no PD leader found at {endpoints:?}"))
}
