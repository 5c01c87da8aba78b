//! Fine-tuning with ITC, ITM and language-modelling losses, and evaluation.
//!
//! [`data`] loads easy-VQA or a user's JSONL manifest into one in-memory form, [`vocab`]
//! builds a small WordPiece vocabulary from its texts, [`loss`] holds the objectives and
//! [`metrics`] the evaluation measures.

pub mod config;
pub mod data;
pub mod eval;
pub mod images;
pub mod loss;
pub mod metrics;
pub mod step;
pub mod trainer;
pub mod vocab;

pub use eval::{run_eval, EvalArgs};
pub use trainer::{run_train, TrainArgs, TrainSummary};
