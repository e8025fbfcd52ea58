//! raft-rs logs through slog; this drain forwards its records to `tracing`
//! so a process has one log stream. Shared by the node's region replicas and
//! PD's raft group.

use std::fmt::Write as _;

use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};

struct TracingDrain;

struct Fields(String);

impl Serializer for Fields {
    fn emit_arguments(&mut self, key: Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", fields.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", fields.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", fields.0),
            slog::Level::Debug | slog::Level::Trace => {
                tracing::debug!(target: "raft", "{msg}{}", fields.0)
            }
        }
        Ok(())
    }
}

/// A raft-rs logger whose records go to `tracing`, tagged `key = id` (the
/// region of a node's replica, the member of a PD group).
pub fn raft_logger(key: &'static str, id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!(key => id))
}
