//! The worker's errors and the one table that maps them to gRPC status codes.

use switchyard_proto::CodecError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The request names a layer or expert this worker does not hold.
    #[error("{0}")]
    NotHeld(String),
    /// The request is malformed: names the field, the limit and the value.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("expert spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Engine(#[from] switchyard_engine::EngineError),
    #[error("serving failed: {0}")]
    Transport(String),
}

impl WorkerError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        WorkerError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC code for this error: the one place the mapping lives.
    pub fn code(&self) -> tonic::Code {
        match self {
            WorkerError::NotHeld(_) => tonic::Code::FailedPrecondition,
            WorkerError::Invalid { .. } | WorkerError::Codec(_) | WorkerError::Spec(_) => {
                tonic::Code::InvalidArgument
            }
            WorkerError::Engine(switchyard_engine::EngineError::InvalidInput { .. }) => {
                tonic::Code::InvalidArgument
            }
            WorkerError::Engine(_) | WorkerError::Transport(_) => tonic::Code::Internal,
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
