//! The crate's single error type. Each variant says whose fault it is: the caller's (bad
//! input, unknown ids, settings that contradict the stored ones) or the index's (storage).

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the index reports. Messages are lowercase and name the offending value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Caller's fault: a vector has the wrong number of components.
    #[error("vector for {id:?} has dimension {got}, expected {expected}")]
    WrongDimension {
        /// Item id, or `<query>` for a search vector.
        id: String,
        /// Number of components received.
        got: usize,
        /// The collection's dimension.
        expected: usize,
    },

    /// Caller's fault: a vector holds NaN or an infinity.
    #[error("vector for {id:?} has a non-finite value at component {position}")]
    NonFinite {
        /// Item id, or `<query>` for a search vector.
        id: String,
        /// Index of the first non-finite component.
        position: usize,
    },

    /// Caller's fault: a vector has zero length, so it has no direction.
    #[error("vector for {id:?} is all zeros, expected a non-zero vector")]
    ZeroVector {
        /// Item id, or `<query>` for a search vector.
        id: String,
    },

    /// Caller's fault: an inner-product collection received a vector longer than one.
    #[error("vector for {id:?} has norm {norm}, expected at most 1 for inner product")]
    NormTooLarge {
        /// Item id, or `<query>` for a search vector.
        id: String,
        /// Euclidean norm of the vector received.
        norm: f32,
    },

    /// Caller's fault: no live item has this id.
    #[error("unknown item id {id:?}")]
    UnknownId {
        /// The id that was looked up.
        id: String,
    },

    /// Caller's fault: the collection was created with different settings.
    #[error("collection has {field} {stored:?}, but {requested:?} was requested")]
    SettingsMismatch {
        /// Setting that differs (`dimension`, `metric` or `model_id`).
        field: &'static str,
        /// Value recorded in the collection.
        stored: String,
        /// Value given to `open`.
        requested: String,
    },

    /// Caller's fault: an argument is outside the accepted range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending argument, as named in the API.
        field: &'static str,
        /// What was wrong and what was expected.
        reason: String,
    },

    /// Index's fault: the storage layer failed or holds data it cannot decode.
    #[error("storage failure at {path}: {reason}")]
    Storage {
        /// File or directory involved.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl Error {
    /// Builds a [`Error::Storage`] from any displayable cause.
    pub(crate) fn storage(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Storage {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    /// Builds a [`Error::InvalidArgument`].
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}
