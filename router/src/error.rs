//! The router's errors.

use switchyard_proto::WorkerId;

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
    /// No placement to dispatch with yet (or any more): retryable.
    #[error("placement: {0}")]
    NoPlacement(String),
    #[error(transparent)]
    Codec(#[from] switchyard_proto::CodecError),
    #[error(transparent)]
    Engine(#[from] switchyard_engine::EngineError),
    #[error("{0}")]
    Runtime(String),
    /// A request failed validation: which field, the limit, the value given.
    #[error("invalid request: `{field}` {reason}")]
    Invalid { field: String, reason: String },
    /// The waiting queue is full.
    #[error(
        "server overloaded: {waiting} requests are waiting (limit {limit}); retry after {retry_after_s} s"
    )]
    Overloaded {
        waiting: usize,
        limit: usize,
        retry_after_s: u64,
    },
    #[error("missing or invalid API key")]
    Unauthenticated,
    /// An HTTP path this server does not serve.
    #[error("not found: {method} {path} is not an endpoint of this server (it serves {served})")]
    NoRoute {
        method: String,
        path: String,
        served: &'static str,
    },
    /// An HTTP path served, asked with a method it does not take.
    #[error("method not allowed: {method} {path}")]
    MethodNotAllowed { method: String, path: String },
    /// An HTTP body over the size limit, refused before it is parsed.
    #[error("request body too large: the limit is {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request deadline exceeded after {0} ms")]
    DeadlineExceeded(u128),
    #[error("model `{given}` is not served here (this router serves `{served}`)")]
    UnknownModel { given: String, served: String },
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl RouterError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RouterError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// HTTP status for clients of the OpenAI-compatible API (the same table as [`Self::code`]).
    pub fn http_status(&self) -> u16 {
        match self {
            RouterError::MethodNotAllowed { .. } => return 405,
            RouterError::BodyTooLarge { .. } => return 413,
            _ => {}
        }
        match self.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => 400,
            tonic::Code::Unauthenticated => 401,
            tonic::Code::PermissionDenied => 403,
            tonic::Code::NotFound => 404,
            tonic::Code::ResourceExhausted => 429,
            tonic::Code::FailedPrecondition => 412,
            tonic::Code::Unavailable => 503,
            tonic::Code::DeadlineExceeded => 504,
            tonic::Code::Cancelled => 499,
            _ => 500,
        }
    }
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
            RouterError::NoPlacement(_) => tonic::Code::Unavailable,
            RouterError::Engine(switchyard_engine::EngineError::InvalidInput { .. }) => {
                tonic::Code::InvalidArgument
            }
            // A failed worker call surfaces as Runtime: retryable by the client.
            RouterError::Runtime(_) => tonic::Code::Unavailable,
            RouterError::Codec(_) | RouterError::Engine(_) => tonic::Code::Internal,
            RouterError::Invalid { .. } => tonic::Code::InvalidArgument,
            RouterError::UnknownModel { .. } | RouterError::NoRoute { .. } => tonic::Code::NotFound,
            RouterError::MethodNotAllowed { .. } => tonic::Code::Unimplemented,
            RouterError::Overloaded { .. } | RouterError::BodyTooLarge { .. } => {
                tonic::Code::ResourceExhausted
            }
            RouterError::Unauthenticated => tonic::Code::Unauthenticated,
            RouterError::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            RouterError::ShuttingDown => tonic::Code::Unavailable,
        }
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
