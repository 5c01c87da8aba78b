//! The one mapping from the crate's errors to gRPC statuses.
//!
//! Caller faults become `INVALID_ARGUMENT`, `NOT_FOUND` or `RESOURCE_EXHAUSTED`; the
//! service's own faults become `INTERNAL`, `FAILED_PRECONDITION` or `UNAVAILABLE`. The
//! message is the error's own lowercase sentence, cut at [`MAX_MESSAGE_CHARS`].

use tonic::{Code, Status};

use crate::Error;

/// Most characters of a status message. The message travels in an HTTP/2 header, which
/// clients refuse beyond a few KiB; a message that quotes client input must stay under that.
pub const MAX_MESSAGE_CHARS: usize = 1024;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = code_of(&error);
        // Some sources append a captured backtrace on later lines; clients get the sentence.
        let message = error.to_string();
        let first_line = message.lines().next().unwrap_or_default();
        Status::new(code, shortened(first_line))
    }
}

/// `message` cut after [`MAX_MESSAGE_CHARS`] characters, the cut marked with `…`.
fn shortened(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message.to_string(),
    }
}

/// The gRPC code of an error.
pub fn code_of(error: &Error) -> Code {
    match error {
        Error::InvalidArgument { .. } | Error::ImageDecode { .. } => Code::InvalidArgument,
        Error::ImageTooLarge { .. } => Code::InvalidArgument,
        Error::NotFound { .. } => Code::NotFound,
        Error::QueueFull { .. } | Error::ResponseTooLarge { .. } => Code::ResourceExhausted,
        Error::MissingTensor { .. }
        | Error::TensorShape { .. }
        | Error::Checkpoint { .. }
        | Error::Config { .. }
        | Error::UnsupportedDtype { .. } => Code::FailedPrecondition,
        Error::ModuleNotLoaded { .. } => Code::FailedPrecondition,
        Error::Tokenizer { .. } | Error::Candle(_) | Error::Io { .. } => Code::Internal,
        Error::Index(inner) => index_code(inner),
        Error::ShuttingDown | Error::NotReady | Error::Stopping => Code::Unavailable,
        Error::TaskFailed { .. } => Code::Internal,
    }
}

/// Clients never send raw vectors, so a vector the index refuses came from the model: the
/// service's fault.
fn index_code(error: &mplug_index::Error) -> Code {
    use mplug_index::Error as E;
    match error {
        E::UnknownId { .. } => Code::NotFound,
        E::InvalidArgument { .. } => Code::InvalidArgument,
        E::SettingsMismatch { .. } => Code::FailedPrecondition,
        E::WrongDimension { .. }
        | E::NonFinite { .. }
        | E::ZeroVector { .. }
        | E::NormTooLarge { .. }
        | E::Storage { .. } => Code::Internal,
    }
}

/// Short label of an error's kind, for metrics.
pub fn kind_label(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unavailable => "unavailable",
        Code::Unauthenticated => "unauthenticated",
        Code::OutOfRange => "out_of_range",
        Code::Cancelled => "cancelled",
        Code::DeadlineExceeded => "deadline_exceeded",
        _ => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_faults_map_to_caller_codes() {
        let invalid = Error::InvalidArgument {
            field: "k".into(),
            reason: "must be at least 1".into(),
        };
        assert_eq!(Status::from(invalid).code(), Code::InvalidArgument);

        let full = Error::QueueFull {
            queue: "heavy",
            capacity: 3,
        };
        let status = Status::from(full);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "heavy queue is full (3 requests waiting)");

        let missing = Error::NotFound { id: "x".into() };
        assert_eq!(Status::from(missing).code(), Code::NotFound);
    }

    #[test]
    fn long_messages_are_cut_to_fit_a_header() {
        let invalid = Error::InvalidArgument {
            field: "filter".into(),
            reason: "é".repeat(20_000),
        };
        let status = Status::from(invalid);
        assert_eq!(status.message().chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(status.message().ends_with('…'));
        assert_eq!(shortened("short"), "short");
    }

    #[test]
    fn service_faults_map_to_service_codes() {
        let module = Error::ModuleNotLoaded { module: "decoder" };
        assert_eq!(Status::from(module).code(), Code::FailedPrecondition);
        assert_eq!(Status::from(Error::ShuttingDown).code(), Code::Unavailable);
    }
}
