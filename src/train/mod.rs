//! Fine-tuning with ITC, ITM and language-modelling losses, and evaluation.
//!
//! [`data`] loads easy-VQA or a user's JSONL manifest into one in-memory form, [`vocab`]
//! builds a small WordPiece vocabulary from its texts, [`loss`] holds the objectives and
//! [`metrics`] the evaluation measures.

pub mod data;
pub mod loss;
pub mod metrics;
pub mod vocab;
