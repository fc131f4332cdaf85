//! The one error type of the core. Every variant has a stable `code()` that the Node binding
//! forwards to JavaScript; messages say what was expected, what came, and what to do.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs is not there.
    #[error("{what} not found: {path} ({hint})")]
    FileNotFound { what: &'static str, path: PathBuf, hint: String },

    /// A file is there but cannot be used (bad JSON, corrupt or truncated tensors, ...).
    #[error("{path}: {reason}")]
    InvalidFile { path: PathBuf, reason: String },

    /// config.json and the weights disagree, or a tensor is missing.
    #[error("weights do not match the config: {0}")]
    WeightsMismatch(String),

    /// The checkpoint is not a GPT-2-family model.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    /// A model id that is neither a directory nor a valid hub id.
    #[error("invalid model id {id:?}: {reason}")]
    InvalidModelId { id: String, reason: String },

    /// The hub could not be reached and the files are not in the local cache.
    #[error("{id}: {reason}. Put the model files in {dir} (config.json, model.safetensors, tokenizer.json) or go online and unset HF_HUB_OFFLINE")]
    HubUnavailable { id: String, dir: PathBuf, reason: String },

    /// The model directory has no tokenizer, so text cannot be encoded or decoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Token ids or a prompt that the model cannot take.
    #[error("{0}")]
    InvalidInput(String),

    /// An option out of its allowed range.
    #[error("{name} {reason}")]
    OptionOutOfRange { name: &'static str, reason: String },

    /// An unknown device or dtype, or a device this build cannot use.
    #[error("device: {0}")]
    Device(String),

    /// The caller aborted a request that has no partial result to give (scoring).
    #[error("{0}")]
    Aborted(String),

    /// The model was disposed; every later call gets this.
    #[error("the model was disposed; load it again to use it")]
    Disposed,

    /// A failure inside candle while running the model.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// The stable code that JavaScript sees as `err.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::FileNotFound { .. } => "KVGPT_FILE_NOT_FOUND",
            Error::InvalidFile { .. } => "KVGPT_INVALID_FILE",
            Error::WeightsMismatch(_) => "KVGPT_WEIGHTS_MISMATCH",
            Error::UnsupportedModel(_) => "KVGPT_UNSUPPORTED_MODEL",
            Error::InvalidModelId { .. } => "KVGPT_INVALID_MODEL_ID",
            Error::HubUnavailable { .. } => "KVGPT_HUB_UNAVAILABLE",
            Error::Tokenizer(_) => "KVGPT_TOKENIZER",
            Error::InvalidInput(_) => "KVGPT_INVALID_INPUT",
            Error::OptionOutOfRange { .. } => "KVGPT_OPTION_RANGE",
            Error::Device(_) => "KVGPT_DEVICE",
            Error::Aborted(_) => "KVGPT_ABORTED",
            Error::Disposed => "KVGPT_DISPOSED",
            Error::Candle(_) => "KVGPT_INTERNAL",
        }
    }

    pub(crate) fn invalid_file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::InvalidFile { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn range(name: &'static str, reason: impl Into<String>) -> Self {
        Error::OptionOutOfRange { name, reason: reason.into() }
    }

    /// A failure of kvgpt itself (`KVGPT_INTERNAL`: a bug, please report).
    pub(crate) fn internal(msg: impl Into<String>) -> Self {
        Error::Candle(candle_core::Error::Msg(msg.into()))
    }

    /// The same error for another request of a step that failed as a whole: same variant and
    /// message (a candle error keeps its message, as KVGPT_INTERNAL).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::FileNotFound { what, path, hint } => Error::FileNotFound { what, path: path.clone(), hint: hint.clone() },
            Error::InvalidFile { path, reason } => Error::InvalidFile { path: path.clone(), reason: reason.clone() },
            Error::WeightsMismatch(s) => Error::WeightsMismatch(s.clone()),
            Error::UnsupportedModel(s) => Error::UnsupportedModel(s.clone()),
            Error::InvalidModelId { id, reason } => Error::InvalidModelId { id: id.clone(), reason: reason.clone() },
            Error::HubUnavailable { id, dir, reason } => Error::HubUnavailable { id: id.clone(), dir: dir.clone(), reason: reason.clone() },
            Error::Tokenizer(s) => Error::Tokenizer(s.clone()),
            Error::InvalidInput(s) => Error::InvalidInput(s.clone()),
            Error::OptionOutOfRange { name, reason } => Error::OptionOutOfRange { name, reason: reason.clone() },
            Error::Device(s) => Error::Device(s.clone()),
            Error::Aborted(s) => Error::Aborted(s.clone()),
            Error::Disposed => Error::Disposed,
            Error::Candle(e) => Error::internal(e.to_string()),
        }
    }
}
