//! How `metastore-ctl` fails: one line on stderr and an exit code.

use pd::PdError;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad input: flags or arguments, a request PD rejected as invalid, a
    /// command that is not supported. Exit code 2, as for clap's own usage
    /// errors.
    #[error("{0}")]
    Usage(String),
    /// Anything else: PD unreachable or failing, nothing found, a timeout.
    /// Exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            CtlError::Failed(_) => 1,
        }
    }

    /// The message on one line, however the cause was worded.
    pub fn one_line(&self) -> String {
        self.to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl From<PdError> for CtlError {
    fn from(e: PdError) -> Self {
        match e {
            PdError::InvalidArgument(_) => CtlError::Usage(e.to_string()),
            other => CtlError::Failed(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, CtlError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_arguments_are_usage_errors_the_rest_failures() {
        let usage = CtlError::from(PdError::InvalidArgument("empty key".into()));
        assert_eq!(usage.exit_code(), 2);
        assert_eq!(usage.one_line(), "invalid argument: empty key");
        let failed = CtlError::from(PdError::Unavailable("a\n  b".into()));
        assert_eq!(failed.exit_code(), 1);
        assert_eq!(failed.one_line(), "PD unavailable: a b");
    }
}
