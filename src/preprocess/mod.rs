//! Image decoding and normalisation, and the WordPiece tokenizer with mPLUG's conventions.

pub mod image;
pub mod tokenizer;

pub use self::image::{header_pixels, ImagePreprocessor, CLIP_MEAN, CLIP_STD};
pub use tokenizer::{pre_caption, MplugTokenizer, TokenBatch};
