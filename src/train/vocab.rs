//! A small WordPiece vocabulary built from the training texts.
//!
//! Layout: the five special tokens first (so their ids are 0..=4), then every whole word of the
//! training texts (most frequent first), then every printable ASCII character as a single
//! token and every lowercase letter and digit as a `##` continuation. Any lowercase ASCII word
//! therefore tokenises without `[UNK]`, falling back to characters when it is not a whole word.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Result};

/// Padding token; id 0.
pub const PAD: &str = "[PAD]";
/// Unknown-token marker; id 1.
pub const UNK: &str = "[UNK]";
/// Sequence start, also the decoder's start token; id 2.
pub const CLS: &str = "[CLS]";
/// Separator, also the decoder's end token; id 3.
pub const SEP: &str = "[SEP]";
/// Mask token (kept for BERT compatibility; training does not use it); id 4.
pub const MASK: &str = "[MASK]";

/// Ids of the special tokens in a vocabulary built by [`Vocabulary::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// Id of `[PAD]`.
    pub pad: u32,
    /// Id of `[UNK]`.
    pub unk: u32,
    /// Id of `[CLS]`.
    pub cls: u32,
    /// Id of `[SEP]`.
    pub sep: u32,
    /// Id of `[MASK]`.
    pub mask: u32,
}

/// An ordered token list; a token's id is its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocabulary {
    /// The tokens in id order.
    pub tokens: Vec<String>,
}

impl Vocabulary {
    /// Builds the vocabulary from texts, lower-cased and split like BERT's basic tokenizer
    /// (whitespace, then each ASCII punctuation character on its own).
    pub fn build<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for text in texts {
            for word in basic_words(&text.to_lowercase()) {
                *counts.entry(word).or_default() += 1;
            }
        }
        let mut words: Vec<(String, usize)> = counts.into_iter().collect();
        words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

        let mut tokens: Vec<String> = [PAD, UNK, CLS, SEP, MASK]
            .iter()
            .map(|t| t.to_string())
            .collect();
        let singles = (b'!'..=b'~')
            .filter(|b| !b.is_ascii_uppercase())
            .map(|b| char::from(b).to_string());
        let continuations = ('a'..='z').chain('0'..='9').map(|c| format!("##{c}"));
        for token in words
            .into_iter()
            .map(|(w, _)| w)
            .chain(singles)
            .chain(continuations)
        {
            if !tokens.contains(&token) {
                tokens.push(token);
            }
        }
        Self { tokens }
    }

    /// Ids of the special tokens (fixed by construction).
    pub fn special_ids(&self) -> SpecialIds {
        SpecialIds {
            pad: 0,
            unk: 1,
            cls: 2,
            sep: 3,
            mask: 4,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary has no tokens (never true for a built one).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Writes one token per line, the format BERT tokenizers read.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = self.tokens.join("\n");
        text.push('\n');
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Splits on whitespace and isolates ASCII punctuation, as BERT's basic tokenizer does.
fn basic_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for chunk in text.split_whitespace() {
        let mut current = String::new();
        for c in chunk.chars() {
            if c.is_ascii_punctuation() {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                words.push(c.to_string());
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() {
            words.push(current);
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specials_come_first_and_words_are_ordered_by_frequency() {
        let vocab = Vocabulary::build(["What is the shape?", "the shape", "a Red circle"]);
        assert_eq!(&vocab.tokens[..5], [PAD, UNK, CLS, SEP, MASK]);
        assert_eq!(&vocab.tokens[5..7], ["shape", "the"]);
        assert!(vocab.tokens.contains(&"red".to_string()));
        assert!(vocab.tokens.contains(&"?".to_string()));
        assert!(!vocab.tokens.contains(&"Red".to_string()));
        assert_eq!(vocab.special_ids().sep, 3);
    }

    #[test]
    fn every_letter_has_a_single_and_a_continuation_token_without_duplicates() {
        let vocab = Vocabulary::build(["a b"]);
        for c in 'a'..='z' {
            assert!(vocab.tokens.contains(&c.to_string()), "{c}");
            assert!(vocab.tokens.contains(&format!("##{c}")), "##{c}");
        }
        let mut sorted = vocab.tokens.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), vocab.len());
    }

    #[test]
    fn basic_words_isolate_punctuation() {
        assert_eq!(basic_words("is it red?no"), ["is", "it", "red", "?", "no"]);
    }
}
