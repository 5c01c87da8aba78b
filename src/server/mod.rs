//! gRPC services, authentication, health, reflection and metrics.

pub mod api;
pub mod auth;
pub mod codec;
pub mod convert;
pub mod drain;
pub mod ingest;
pub mod settings;
pub mod status;
pub mod writer;

/// Code generated from `proto/mplug_search/v1/search.proto`.
pub mod proto {
    #![allow(
        missing_docs,
        reason = "generated code documents what the proto documents"
    )]
    #![allow(clippy::all, reason = "generated code")]
    tonic::include_proto!("mplug_search.v1");

    /// Encoded file descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("mplug_search_v1_descriptor");
}

pub mod run;

pub use run::{start, RunningServer};
pub use settings::{Limits, ServerSettings, TlsFiles, DEFAULT_SHUTDOWN_GRACE};

/// Histogram buckets of every `_seconds` metric.
pub const METRIC_BUCKETS_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
