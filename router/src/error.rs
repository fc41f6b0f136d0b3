//! The router's errors.

use crate::dispatch::WorkerId;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("worker {worker} ({addr}) failed layer {layer}: {code:?}: {message}")]
    Worker {
        worker: WorkerId,
        addr: String,
        layer: usize,
        code: tonic::Code,
        message: String,
    },
    #[error("cannot connect to worker {worker} at {addr}: {reason}")]
    Connect {
        worker: WorkerId,
        addr: String,
        reason: String,
    },
    #[error("placement: {0}")]
    Placement(String),
    #[error(transparent)]
    Codec(#[from] switchyard_proto::CodecError),
    #[error(transparent)]
    Engine(#[from] switchyard_engine::EngineError),
    #[error("{0}")]
    Runtime(String),
}

impl RouterError {
    /// gRPC code for clients of the router.
    pub fn code(&self) -> tonic::Code {
        match self {
            RouterError::Worker { code, .. } => match code {
                tonic::Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
                _ => tonic::Code::Unavailable,
            },
            RouterError::Connect { .. } => tonic::Code::Unavailable,
            RouterError::Placement(_) => tonic::Code::FailedPrecondition,
            RouterError::Engine(switchyard_engine::EngineError::InvalidInput { .. }) => {
                tonic::Code::InvalidArgument
            }
            // A failed worker call surfaces as Runtime: retryable by the client.
            RouterError::Runtime(_) => tonic::Code::Unavailable,
            RouterError::Codec(_) | RouterError::Engine(_) => tonic::Code::Internal,
        }
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
