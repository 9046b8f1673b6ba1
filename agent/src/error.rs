//! The agent's RPC error: each variant is one ttrpc status code, so every
//! handler decides the code where it knows why it failed.

use husk_proto::ttrpc::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// An internal error with the whole anyhow context chain in the message.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        AgentError::Internal(format!("{:#}", err.into()))
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let code = match &e {
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::AlreadyExists(_) => Code::AlreadyExists,
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
            AgentError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
