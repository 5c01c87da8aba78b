//! Image decoding and normalisation, and the WordPiece tokenizer with mPLUG's conventions.
