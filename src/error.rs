//! The crate's single error type. Each variant says whose fault it is: the caller's
//! (bad input, unknown ids, full queues) or the service's (checkpoints, storage, compute).

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the service crate reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Caller's fault: a request field has a value outside what the service accepts.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field, as named in the API.
        field: String,
        /// What was wrong and what was expected.
        reason: String,
    },

    /// Caller's fault: the bytes are not a decodable image.
    #[error("image could not be decoded: {reason}")]
    ImageDecode {
        /// The decoder's explanation.
        reason: String,
    },

    /// Caller's fault: the image header announces more pixels than allowed.
    #[error("image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")]
    ImageTooLarge {
        /// Width announced by the header.
        width: u32,
        /// Height announced by the header.
        height: u32,
        /// Configured maximum pixel count.
        max_pixels: u64,
    },

    /// Caller's fault: no item has this id.
    #[error("unknown item id {id:?}")]
    NotFound {
        /// The id that was looked up.
        id: String,
    },

    /// Caller's fault (retry later): the request class's queue is full.
    #[error("{queue} queue is full ({capacity} requests waiting)")]
    QueueFull {
        /// Name of the request class.
        queue: &'static str,
        /// Capacity of that queue.
        capacity: usize,
    },

    /// Caller's fault: the answer would exceed the message size limit, so it cannot be sent;
    /// the request must ask for less.
    #[error("the response of {bytes} bytes exceeds the message limit of {limit} bytes: {hint}")]
    ResponseTooLarge {
        /// Encoded size of the answer.
        bytes: usize,
        /// The server's message size limit.
        limit: usize,
        /// What to ask for instead.
        hint: &'static str,
    },

    /// Service's fault: a tensor the model needs is absent from the checkpoint.
    #[error("checkpoint {path}: tensor {name} is missing (expected shape {expected:?})")]
    MissingTensor {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name as stored upstream.
        name: String,
        /// Shape the model expects.
        expected: Vec<usize>,
    },

    /// Service's fault: a checkpoint tensor has the wrong shape.
    #[error("checkpoint {path}: tensor {name} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name as stored upstream.
        name: String,
        /// Shape found in the file.
        got: Vec<usize>,
        /// Shape the model expects.
        expected: Vec<usize>,
    },

    /// Service's fault: the checkpoint file cannot be read or has an unknown layout.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// Checkpoint file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// Service's fault: the model configuration is invalid or inconsistent.
    #[error("model config {path}: {reason}")]
    Config {
        /// Config file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// Service's fault: the tokenizer could not be built or failed.
    #[error("tokenizer: {reason}")]
    Tokenizer {
        /// What went wrong.
        reason: String,
    },

    /// Service's fault: the loaded model lacks a module this request needs.
    #[error("the loaded model has no {module} module")]
    ModuleNotLoaded {
        /// Module name (vision, text, fusion, decoder, ...).
        module: &'static str,
    },

    /// Service's fault: a tensor computation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// Service's or caller's fault, as the index error says.
    #[error(transparent)]
    Index(#[from] mplug_index::Error),

    /// Service's fault: a file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// Service's fault: the requested compute type is not available on the device.
    #[error("dtype {dtype} is not supported on {device}: {reason}")]
    UnsupportedDtype {
        /// The requested dtype.
        dtype: String,
        /// The device it was requested on.
        device: String,
        /// What is missing and what to use instead.
        reason: String,
    },

    /// Service's fault: the engine stopped before answering.
    #[error("the inference engine is shutting down")]
    ShuttingDown,

    /// Service's fault (retry elsewhere or later): the server is shutting down and its grace
    /// period for requests in flight has ended.
    #[error("the server is shutting down; retry against a running server")]
    Stopping,

    /// Service's fault (retry later): the model is still loading.
    #[error("the model is still loading; retry when health reports SERVING")]
    NotReady,

    /// Service's fault: a worker task panicked or was cancelled.
    #[error("{task} task failed: {reason}")]
    TaskFailed {
        /// What the task was doing.
        task: &'static str,
        /// The panic or cancellation message.
        reason: String,
    },
}
