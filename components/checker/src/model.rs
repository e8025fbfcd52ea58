//! Sequential specifications for the linearizability search: the generic
//! [`Model`] trait and the etcd single-key model [`EtcdModel`].
//!
//! Contract of [`Model`]: `step` is a deterministic partial function — the
//! new state if the operation (input and output together) is legal in
//! `state`, `None` if not. The engine may also ask whether an operation is
//! `optional` (it may be left out: "never took effect") and which ops are
//! interchangeable (`class`), see [`crate::wgl`].
//!
//! The etcd model's state is one key: absent or a [`KvState`], plus the
//! revision at which the key last changed (its "floor", which survives
//! deletes: writes must take revisions above it, reads observe at least
//! it). Revisions in a `KvState` are `Option`s: `None` means "produced by a
//! write whose revision is unknown" (an unobserved write of unknown
//! outcome, exact mode only). Every known field of an observed `Kv` must
//! equal the state; unknown fields are refined by observations.
//!
//! Writes of unknown outcome come in three shapes here:
//! - [`EtcdOp::Learned`]: the write's value was observed, so it applied,
//!   producing exactly the observed `Kv`. It must be linearized. With
//!   `padding > 0` (the number of unobserved unknown Put/Cas ops on the key,
//!   which the checker then leaves out of the search) it may raise the
//!   version by up to `padding` more than one step, since those unobserved
//!   writes could have applied just before it — the only way an unobserved
//!   write can influence anything a client saw — provided enough revisions
//!   between the key's last write and it were taken by no known write
//!   ([`EtcdModel::known_revisions`]).
//! - [`EtcdOp::UnknownPut`] / [`EtcdOp::UnknownCas`]: unobserved writes kept
//!   in the search (exact mode); optional.
//! - [`EtcdOp::UnknownDelete`]: optional; all are interchangeable.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use crate::history::{show, Kv};

/// A sequential specification.
pub trait Model {
    /// The state; cached by the search, so keep it small.
    type State: Clone + Eq + Hash + fmt::Debug;
    /// An operation: input and output together.
    type Op: fmt::Debug;

    /// The initial state.
    fn init(&self) -> Self::State;

    /// The state after `op`, or `None` if `op` is not legal in `state`.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;

    /// Whether `op` (only asked for ops without a return event) may be left
    /// out of the linearization entirely. Optional ops must be legal as the
    /// last op in every state; leaving them out is then the same as
    /// linearizing them after everything.
    fn optional(&self, _op: &Self::Op) -> bool {
        false
    }

    /// Ops (without return events) of the same class are interchangeable:
    /// same effect from every state. The search then tries only one of the
    /// class at each point.
    fn class(&self, _op: &Self::Op) -> Option<u64> {
        None
    }

    /// Ops with an order must be linearized in increasing order (the
    /// search skips the others early). Only a shortcut: the model must
    /// itself reject out-of-order sequences.
    fn order(&self, _op: &Self::Op) -> Option<i64> {
        None
    }

    /// Why `op` is not legal in `state` (for reports).
    fn why_not(&self, _state: &Self::State, _op: &Self::Op) -> String {
        "not legal in this state".to_string()
    }

    /// The state, for reports.
    fn describe_state(&self, state: &Self::State) -> String {
        format!("{state:?}")
    }
}

/// One key's value in the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvState {
    /// The value.
    pub value: Vec<u8>,
    /// etcd's version.
    pub version: i64,
    /// None: created by a write whose revision is unknown.
    pub create_revision: Option<i64>,
    /// None: written by a write whose revision is unknown.
    pub mod_revision: Option<i64>,
}

/// The state of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EtcdState {
    /// The key's value; None when absent.
    pub kv: Option<KvState>,
    /// The highest revision known to have changed the key (its last write
    /// or known delete; 0 at first). It survives deletes, so a write at a
    /// lower revision cannot be linearized after the key was deleted.
    pub floor: i64,
}

/// An operation on one key as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtcdOp {
    /// Put ok at `revision` with prev_kv `prev`.
    Put {
        /// The value written.
        value: Vec<u8>,
        /// The write's revision.
        revision: i64,
        /// prev_kv.
        prev: Option<Kv>,
    },
    /// Linearizable read ok at header `revision`.
    Get {
        /// header.revision.
        revision: i64,
        /// What the read returned.
        kv: Option<Kv>,
    },
    /// Cas ok.
    Cas {
        /// The compared mod_revision (0 = absent).
        expected: i64,
        /// The value put on success.
        value: Vec<u8>,
        /// header.revision.
        revision: i64,
        /// Whether the compare held.
        succeeded: bool,
        /// prev_kv on success, the Range result on failure.
        kv: Option<Kv>,
    },
    /// Delete ok.
    Delete {
        /// header.revision.
        revision: i64,
        /// prev_kv of the deleted key; None if nothing was deleted.
        deleted: Option<Kv>,
    },
    /// A Put (`expected` None) or Cas of unknown outcome that is known to
    /// have applied, producing `kv`.
    Learned {
        /// The Cas's compared mod_revision; None for a Put.
        expected: Option<i64>,
        /// What the write produced (as observed).
        kv: Kv,
    },
    /// An unobserved Put of unknown outcome (exact mode only).
    UnknownPut {
        /// The value it would write.
        value: Vec<u8>,
    },
    /// An unobserved Cas of unknown outcome (exact mode only).
    UnknownCas {
        /// The compared mod_revision.
        expected: i64,
        /// The value it would write.
        value: Vec<u8>,
    },
    /// A Delete of unknown outcome.
    UnknownDelete,
}

/// etcd's semantics for one key.
#[derive(Clone, Debug, Default)]
pub struct EtcdModel {
    /// How many unobserved writes of unknown outcome were left out of the
    /// search; a learned write may raise the version by up to this many
    /// extra steps.
    pub padding: usize,
    /// Sorted revisions of every write known to have applied (on any key).
    /// The writes that padding stands for need revisions not among them,
    /// above the key's floor and below the learned write's: a learned write
    /// raises the version by `n` extra steps only if there are `n` such
    /// free revisions.
    pub known_revisions: Arc<Vec<i64>>,
}

impl EtcdModel {
    /// Like [`Model::step`], with the reason when the op is not legal.
    pub fn try_step(&self, state: &EtcdState, op: &EtcdOp) -> Result<EtcdState, String> {
        match op {
            EtcdOp::Put {
                value,
                revision,
                prev,
            } => {
                let refined = matches(state, prev.as_ref()).map_err(|e| format!("prev_kv {e}"))?;
                write(&refined, value, Some(*revision))
            }
            EtcdOp::Get { revision, kv } => {
                let refined = matches(state, kv.as_ref())?;
                read_at(&refined, *revision)?;
                Ok(refined)
            }
            EtcdOp::Cas {
                expected,
                value,
                revision,
                succeeded,
                kv,
            } => {
                let holds = compare_holds(state, *expected);
                if *succeeded && !holds {
                    return Err(format!(
                        "the Cas succeeded but mod_revision is {}, not {expected}",
                        show_mod(state)
                    ));
                }
                if !*succeeded && holds {
                    return Err(format!(
                        "the Cas failed but mod_revision is {expected}, as compared"
                    ));
                }
                let refined = matches(state, kv.as_ref())?;
                if *succeeded {
                    write(&refined, value, Some(*revision))
                } else {
                    read_at(&refined, *revision)?;
                    Ok(refined)
                }
            }
            EtcdOp::Delete { revision, deleted } => match deleted {
                None => match state.kv {
                    None => {
                        read_at(state, *revision)?;
                        Ok(state.clone())
                    }
                    Some(_) => Err(format!(
                        "deleted nothing but the key holds {}",
                        show_state(state)
                    )),
                },
                Some(p) => {
                    if state.kv.is_none() {
                        return Err("deleted a key that is absent".to_string());
                    }
                    let refined = matches(state, Some(p)).map_err(|e| format!("prev_kv {e}"))?;
                    newer(&refined, *revision)?;
                    Ok(EtcdState {
                        kv: None,
                        floor: *revision,
                    })
                }
            },
            EtcdOp::Learned { expected, kv } => self.learned(state, *expected, kv),
            EtcdOp::UnknownPut { value } => write(state, value, None),
            EtcdOp::UnknownCas { expected, value } => {
                if compare_holds(state, *expected) {
                    write(state, value, None)
                } else {
                    Ok(state.clone())
                }
            }
            EtcdOp::UnknownDelete => Ok(EtcdState {
                kv: None,
                floor: state.floor,
            }),
        }
    }

    fn is_known(&self, revision: i64) -> bool {
        self.known_revisions.binary_search(&revision).is_ok()
    }

    /// Revisions strictly between `low` and `high` that no known write took.
    fn free_between(&self, low: i64, high: i64) -> i64 {
        if high <= low + 1 {
            return 0;
        }
        let revs = &self.known_revisions;
        let taken = revs.partition_point(|&r| r < high) - revs.partition_point(|&r| r <= low);
        (high - low - 1).saturating_sub(i64::try_from(taken).unwrap_or(i64::MAX))
    }

    fn learned(
        &self,
        state: &EtcdState,
        expected: Option<i64>,
        kv: &Kv,
    ) -> Result<EtcdState, String> {
        if let Some(e) = expected {
            if !compare_holds(state, e) {
                return Err(format!(
                    "this Cas is known to have applied, but mod_revision is {}, not {e}",
                    show_mod(state)
                ));
            }
        }
        newer(state, kv.mod_revision)?;
        let padding = if expected.is_some() {
            0
        } else {
            i64::try_from(self.padding).unwrap_or(i64::MAX)
        };
        let extra = kv.version - state.kv.as_ref().map_or(1, |s| s.version + 1);
        let ok = match &state.kv {
            None if extra == 0 => kv.create_revision == kv.mod_revision,
            // Padding writes created the key at create_revision and wrote
            // `extra - 1` more times before this write.
            None => {
                extra > 0
                    && extra <= padding
                    && kv.create_revision > state.floor
                    && kv.create_revision < kv.mod_revision
                    && !self.is_known(kv.create_revision)
                    && self.free_between(kv.create_revision, kv.mod_revision) >= extra - 1
            }
            Some(s) => {
                let create_ok = s.create_revision.is_none_or(|c| c == kv.create_revision);
                create_ok
                    && (extra == 0
                        || (extra > 0
                            && extra <= padding
                            && extra <= self.free_between(state.floor, kv.mod_revision)))
            }
        };
        if !ok {
            return Err(format!(
                "this write is known to have produced {kv}, which cannot follow {}",
                show_state(state)
            ));
        }
        Ok(EtcdState {
            kv: Some(KvState {
                value: kv.value.clone(),
                version: kv.version,
                create_revision: Some(kv.create_revision),
                mod_revision: Some(kv.mod_revision),
            }),
            floor: kv.mod_revision,
        })
    }
}

impl Model for EtcdModel {
    type State = EtcdState;
    type Op = EtcdOp;

    fn init(&self) -> EtcdState {
        EtcdState::default()
    }

    fn step(&self, state: &EtcdState, op: &EtcdOp) -> Option<EtcdState> {
        self.try_step(state, op).ok()
    }

    fn optional(&self, op: &EtcdOp) -> bool {
        matches!(
            op,
            EtcdOp::UnknownPut { .. } | EtcdOp::UnknownCas { .. } | EtcdOp::UnknownDelete
        )
    }

    fn class(&self, op: &EtcdOp) -> Option<u64> {
        match op {
            EtcdOp::UnknownDelete => Some(0),
            _ => None,
        }
    }

    /// Writes with a known revision: the floor makes any other order fail.
    fn order(&self, op: &EtcdOp) -> Option<i64> {
        match op {
            EtcdOp::Put { revision, .. } => Some(*revision),
            EtcdOp::Cas {
                revision,
                succeeded: true,
                ..
            } => Some(*revision),
            EtcdOp::Delete {
                revision,
                deleted: Some(_),
            } => Some(*revision),
            EtcdOp::Learned { kv, .. } => Some(kv.mod_revision),
            _ => None,
        }
    }

    fn why_not(&self, state: &EtcdState, op: &EtcdOp) -> String {
        match self.try_step(state, op) {
            Ok(_) => "legal here".to_string(),
            Err(e) => e,
        }
    }

    fn describe_state(&self, state: &EtcdState) -> String {
        show_state(state)
    }
}

/// Shows a model state.
pub fn show_state(state: &EtcdState) -> String {
    match &state.kv {
        None if state.floor == 0 => "absent".to_string(),
        None => format!("absent (last changed at revision {})", state.floor),
        Some(s) => format!(
            "{{{} ver={} create={} mod={}}}",
            show(&s.value),
            s.version,
            show_rev(s.create_revision),
            show_rev(s.mod_revision)
        ),
    }
}

fn show_rev(r: Option<i64>) -> String {
    r.map_or_else(|| "?".to_string(), |r| r.to_string())
}

fn show_mod(state: &EtcdState) -> String {
    match &state.kv {
        None => "0 (absent)".to_string(),
        Some(s) => show_rev(s.mod_revision),
    }
}

/// Whether `mod_revision == expected` holds: absent ⇔ 0; an unknown
/// mod_revision never equals a known expected value.
fn compare_holds(state: &EtcdState, expected: i64) -> bool {
    match &state.kv {
        None => expected == 0,
        Some(s) => s.mod_revision == Some(expected),
    }
}

/// A write at `revision` must be above the key's floor.
fn newer(state: &EtcdState, revision: i64) -> Result<(), String> {
    if revision <= state.floor {
        return Err(format!(
            "its revision {revision} is not above {}, where the key last changed",
            state.floor
        ));
    }
    Ok(())
}

/// A read at header `revision` must see the key's last change.
fn read_at(state: &EtcdState, revision: i64) -> Result<(), String> {
    if revision < state.floor {
        return Err(format!(
            "it read at revision {revision}, below {}, where the key last changed",
            state.floor
        ));
    }
    Ok(())
}

fn write(state: &EtcdState, value: &[u8], revision: Option<i64>) -> Result<EtcdState, String> {
    if let Some(r) = revision {
        newer(state, r)?;
    }
    let kv = match &state.kv {
        None => KvState {
            value: value.to_vec(),
            version: 1,
            create_revision: revision,
            mod_revision: revision,
        },
        Some(s) => KvState {
            value: value.to_vec(),
            version: s.version + 1,
            create_revision: s.create_revision,
            mod_revision: revision,
        },
    };
    Ok(EtcdState {
        kv: Some(kv),
        floor: revision.unwrap_or(state.floor),
    })
}

/// Whether an observed kv matches the state; returns the state refined by
/// the observation (unknown revisions filled in).
fn matches(state: &EtcdState, kv: Option<&Kv>) -> Result<EtcdState, String> {
    match (&state.kv, kv) {
        (None, None) => Ok(state.clone()),
        (None, Some(kv)) => Err(format!("shows {kv} but the key is absent")),
        (Some(_), None) => Err(format!(
            "shows the key absent but it holds {}",
            show_state(state)
        )),
        (Some(s), Some(kv)) => {
            let same = s.value == kv.value
                && s.version == kv.version
                && s.create_revision.is_none_or(|c| c == kv.create_revision)
                && s.mod_revision.is_none_or(|m| m == kv.mod_revision);
            if !same {
                return Err(format!(
                    "shows {kv} but the key holds {}",
                    show_state(state)
                ));
            }
            Ok(EtcdState {
                kv: Some(KvState {
                    value: s.value.clone(),
                    version: s.version,
                    create_revision: Some(kv.create_revision),
                    mod_revision: Some(kv.mod_revision),
                }),
                floor: state.floor.max(kv.mod_revision),
            })
        }
    }
}
