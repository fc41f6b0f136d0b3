//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid config: `{field}` {reason}")]
    Config { field: String, reason: String },

    /// The cause is in the message and not also the error's `source()`, which `{:#}` chains
    /// would print a second time.
    #[error("i/o error on {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },

    #[error("tensor `{name}`: expected {expected}, found {found}")]
    TensorMismatch {
        name: String,
        expected: String,
        found: String,
    },

    #[error("shape error: {0}")]
    Shape(String),

    #[error("invalid input: `{field}` {reason}")]
    InvalidInput { field: String, reason: String },

    #[error("{0}")]
    Synth(String),

    /// An [`ExpertExecutor`](crate::model::ExpertExecutor) outside this crate failed (e.g. a
    /// remote expert worker). The executor's own error travels inside, typed, so its caller
    /// can take it back out (`downcast`) and keep its meaning — a worker's deadline stays a
    /// deadline.
    #[error("expert execution failed: {0}")]
    Executor(Box<dyn std::error::Error + Send + Sync + 'static>),

    /// A compute device that cannot be used (no driver, no such device, a CUDA call failed).
    #[error("device: {0}")]
    Device(String),
}

impl EngineError {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn input(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            cause,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
