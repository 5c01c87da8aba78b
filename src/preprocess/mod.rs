//! Image decoding and normalisation, and the WordPiece tokenizer with mPLUG's conventions.

pub mod tokenizer;

pub use tokenizer::{pre_caption, MplugTokenizer, TokenBatch};
