//! mplug-search: image-text retrieval on mPLUG.
//!
//! The crate is layered so that dependencies point one way:
//! [`server`] → [`engine`] → [`model`] / [`preprocess`], and [`server`] → `mplug_index`.
//! The model never sees gRPC and the index never sees the model.

pub mod cli;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod model;
pub mod preprocess;
pub mod server;
pub mod train;

pub use error::{Error, Result};
