//! etcd's alarms, cluster-wide: the list of active alarms (member id,
//! type) is part of PD's replicated state, so every node (and every PD
//! member) sees one list, and it survives restarts and leader changes.
//!
//! Semantics are etcd's `Maintenance.Alarm`: GET lists the alarms of one
//! type (all of them with `NONE`), read on the serving leader; ACTIVATE
//! records one (`Cmd::Alarm`; activating an active one changes nothing,
//! `NONE` does nothing at all) and answers it; DEACTIVATE removes one and
//! answers it, or nothing if it was not active.

use proto::pd_raftpb::{command::Cmd, AlarmChange};
use proto::pdpb::{alarm_request::AlarmAction, AlarmMember, AlarmType};

use crate::client::Result;
use crate::pd_core::PdCore;

impl PdCore {
    /// See [`crate::PdClient::alarm`] and the module docs.
    pub async fn alarm(
        &self,
        action: AlarmAction,
        member_id: u64,
        alarm: AlarmType,
    ) -> Result<Vec<AlarmMember>> {
        self.check_open()?;
        let member = AlarmMember {
            member_id,
            alarm: alarm as i32,
        };
        match action {
            AlarmAction::Get => self.read(|c| Ok(c.alarms_of(alarm))).await,
            AlarmAction::Activate if alarm == AlarmType::None => Ok(Vec::new()),
            AlarmAction::Activate => {
                self.propose(Cmd::Alarm(AlarmChange {
                    member: Some(member),
                    deactivate: false,
                }))
                .await?;
                Ok(vec![member])
            }
            AlarmAction::Deactivate => {
                let removed = self
                    .propose(Cmd::Alarm(AlarmChange {
                        member: Some(member),
                        deactivate: true,
                    }))
                    .await?;
                Ok(if removed { vec![member] } else { Vec::new() })
            }
        }
    }
}
