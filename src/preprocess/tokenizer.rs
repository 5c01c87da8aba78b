//! The WordPiece tokenizer with mPLUG's conventions.
//!
//! Upstream: `alibaba/AliceMind` mPLUG/models/tokenization_bert.py (ALBEF-derived
//! `BertTokenizer`) and `pre_caption` in mPLUG/dataset/utils.py at commit
//! a6d5afe5c272960ce61dc73adb0877bc94b5d664. Tokenisation runs on the `tokenizers` crate
//! (BERT normaliser, BERT pre-tokeniser, WordPiece); the quirks are ours to keep: encoder-side
//! texts get `[CLS]` and no trailing `[SEP]` (unless the config says otherwise), a literal
//! `[SEP]`/`[CLS]` in raw text stays a special token, and retrieval texts are cleaned with
//! `pre_caption` first.

use candle_core::{Device, Tensor};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::model::config::TokenizerConfig;
use crate::{Error, Result};

/// Characters `pre_caption` deletes.
const CAPTION_DELETED: &[char] = &[
    ',', '.', '\'', '!', '?', '"', '(', ')', '*', '#', ':', ';', '~',
];

/// Longest word WordPiece splits; longer words become one `[UNK]`.
const MAX_WORD_CHARS: usize = 100;

/// Special token strings, in the order of their ids in [`TokenizerConfig`].
const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Token ids and 0/1 attention masks of a batch, rows padded to the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Ids per row.
    pub ids: Vec<Vec<u32>>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<Vec<u32>>,
}

impl TokenBatch {
    /// The batch as (B, L) U32 tensors `(ids, mask)`.
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let rows = self.ids.len();
        let len = self.ids.first().map_or(0, Vec::len);
        let flat = |v: &[Vec<u32>]| v.iter().flatten().copied().collect::<Vec<u32>>();
        let ids = Tensor::from_vec(flat(&self.ids), (rows, len), device)?;
        let mask = Tensor::from_vec(flat(&self.mask), (rows, len), device)?;
        Ok((ids, mask))
    }
}

/// The tokenizer for one checkpoint: retrieval texts, VQA questions, decoder targets, and
/// decoding of generated ids.
#[derive(Debug, Clone)]
pub struct MplugTokenizer {
    /// Encoder template, fixed padding and truncation at `retrieval_max_len`.
    retrieval: Tokenizer,
    /// Encoder template, padding to the longest, truncation at `question_max_len`.
    question_truncated: Tokenizer,
    /// Encoder template, padding to the longest, no truncation.
    question: Tokenizer,
    /// Target template, padding to the longest, no truncation.
    target: Tokenizer,
    vocab: Vec<String>,
    cfg: TokenizerConfig,
}

impl MplugTokenizer {
    /// Builds the tokenizer from `cfg.vocab_file`. Errors with [`Error::Tokenizer`] when the
    /// vocabulary cannot be read or its special tokens do not sit at the configured ids.
    pub fn from_config(cfg: &TokenizerConfig) -> Result<Self> {
        let fail = |reason: String| Error::Tokenizer { reason };
        let text = std::fs::read_to_string(&cfg.vocab_file).map_err(|source| Error::Io {
            path: cfg.vocab_file.clone(),
            source,
        })?;
        let vocab: Vec<String> = text.lines().map(str::to_string).collect();
        let ids = [cfg.pad_id, cfg.unk_id, cfg.cls_id, cfg.sep_id, cfg.mask_id];
        for (token, id) in SPECIALS.iter().zip(ids) {
            if vocab.get(id as usize).map(String::as_str) != Some(*token) {
                return Err(fail(format!("vocabulary line {id} should be {token}")));
            }
        }
        let encoder_template = if cfg.sep_on_encoder_text {
            "[CLS] $A [SEP]"
        } else {
            "[CLS] $A"
        };
        let encoder = build(cfg, encoder_template).map_err(fail)?;
        let target = build(cfg, "[CLS] $A [SEP]").map_err(fail)?;
        let longest = PaddingStrategy::BatchLongest;
        let fixed = PaddingStrategy::Fixed(cfg.retrieval_max_len);
        Ok(Self {
            retrieval: configure(&encoder, cfg, fixed, Some(cfg.retrieval_max_len))?,
            question_truncated: configure(
                &encoder,
                cfg,
                longest.clone(),
                Some(cfg.question_max_len),
            )?,
            question: configure(&encoder, cfg, longest.clone(), None)?,
            target: configure(&target, cfg, longest, None)?,
            vocab,
            cfg: cfg.clone(),
        })
    }

    /// Retrieval texts: `pre_caption` cleaning (lower-case, punctuation removed, at most
    /// `retrieval_max_words` words), then ids padded and truncated to `retrieval_max_len`.
    pub fn encode_retrieval(&self, texts: &[&str]) -> Result<TokenBatch> {
        let cleaned: Vec<String> = texts
            .iter()
            .map(|t| pre_caption(t, self.cfg.retrieval_max_words))
            .collect();
        run(&self.retrieval, cleaned)
    }

    /// VQA questions, uncleaned, padded to the longest; truncated to `question_max_len` when
    /// `truncate` is set (the reference evaluation does not truncate).
    pub fn encode_question(&self, texts: &[&str], truncate: bool) -> Result<TokenBatch> {
        let owned = texts.iter().map(|t| t.to_string()).collect();
        let tokenizer = if truncate {
            &self.question_truncated
        } else {
            &self.question
        };
        run(tokenizer, owned)
    }

    /// Decoder targets `[CLS] text [SEP]`, padded to the longest, truncated to `max_len`.
    pub fn encode_target(&self, texts: &[&str], max_len: Option<usize>) -> Result<TokenBatch> {
        let owned = texts.iter().map(|t| t.to_string()).collect();
        match max_len {
            None => run(&self.target, owned),
            Some(max) => {
                let longest = PaddingStrategy::BatchLongest;
                run(
                    &configure(&self.target, &self.cfg, longest, Some(max))?,
                    owned,
                )
            }
        }
    }

    /// The reference `decode` (tokens joined, `##` merged, spaces before punctuation and
    /// contractions removed), then `[SEP]`, `[CLS]` and `[PAD]` deleted and the ends
    /// trimmed, as the caption/VQA evaluation loops do. Unknown ids decode as `[UNK]`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = self.decode_raw(ids);
        for special in ["[SEP]", "[CLS]", "[PAD]"] {
            text = text.replace(special, "");
        }
        text.trim_matches(py_isspace).to_string()
    }

    /// The reference `decode` alone: special tokens kept.
    pub fn decode_raw(&self, ids: &[u32]) -> String {
        let unk = &self.vocab[self.cfg.unk_id as usize];
        let tokens: Vec<&str> = ids
            .iter()
            .map(|&i| self.vocab.get(i as usize).unwrap_or(unk).as_str())
            .collect();
        let joined = tokens.join(" ").replace(" ##", "");
        clean_up_tokenization(joined.trim_matches(py_isspace))
    }
}

/// A copy of `base` that pads with `padding` and truncates to `max_len` tokens when given.
fn configure(
    base: &Tokenizer,
    cfg: &TokenizerConfig,
    padding: PaddingStrategy,
    max_len: Option<usize>,
) -> Result<Tokenizer> {
    let mut tok = base.clone();
    tok.with_padding(Some(PaddingParams {
        strategy: padding,
        pad_id: cfg.pad_id,
        pad_token: SPECIALS[0].to_string(),
        ..PaddingParams::default()
    }));
    let trunc = max_len.map(|max_length| TruncationParams {
        max_length,
        ..TruncationParams::default()
    });
    tok.with_truncation(trunc).map_err(|e| Error::Tokenizer {
        reason: e.to_string(),
    })?;
    Ok(tok)
}

/// Ids and attention masks of `texts` under a configured tokenizer.
fn run(tokenizer: &Tokenizer, texts: Vec<String>) -> Result<TokenBatch> {
    let encodings = tokenizer
        .encode_batch(texts, true)
        .map_err(|e| Error::Tokenizer {
            reason: e.to_string(),
        })?;
    Ok(TokenBatch {
        ids: encodings.iter().map(|e| e.get_ids().to_vec()).collect(),
        mask: encodings
            .iter()
            .map(|e| e.get_attention_mask().to_vec())
            .collect(),
    })
}

fn build(cfg: &TokenizerConfig, template: &str) -> std::result::Result<Tokenizer, String> {
    let file = cfg.vocab_file.to_string_lossy();
    let wordpiece = WordPiece::from_file(&file)
        .unk_token(SPECIALS[1].to_string())
        .max_input_chars_per_word(MAX_WORD_CHARS)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(wordpiece);
    let lower = cfg.lower_case;
    tok.with_normalizer(Some(BertNormalizer::new(true, true, Some(lower), lower)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    let post = TemplateProcessing::builder()
        .try_single(template)
        .map_err(|e| e.to_string())?
        .special_tokens(vec![("[CLS]", cfg.cls_id), ("[SEP]", cfg.sep_id)])
        .build()
        .map_err(|e| e.to_string())?;
    tok.with_post_processor(Some(post));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

/// Python's `str.isspace`, which `\s` in the reference regexes follows.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The reference `pre_caption`: lower-case; delete `, . ' ! ? " ( ) * # : ; ~`; `-` and `/`
/// become spaces; `<person>` becomes `person`; runs of two or more whitespace characters
/// become one space; trailing newlines, then surrounding spaces, are stripped; at most
/// `max_words` words (split on `' '` only) are kept.
pub fn pre_caption(text: &str, max_words: usize) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !CAPTION_DELETED.contains(c))
        .map(|c| if c == '-' || c == '/' { ' ' } else { c })
        .collect();
    let replaced = lowered.replace("<person>", "person");
    let collapsed = collapse_whitespace_runs(&replaced);
    let stripped = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = stripped.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        stripped.to_string()
    }
}

/// `re.sub(r"\s{2,}", " ", text)`: runs of two or more whitespace characters become one
/// space; a single whitespace character is kept as it is.
fn collapse_whitespace_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.chars() {
        if py_isspace(c) {
            run.push(c);
            continue;
        }
        flush_run(&mut out, &mut run);
        out.push(c);
    }
    flush_run(&mut out, &mut run);
    out
}

fn flush_run(out: &mut String, run: &mut String) {
    if run.chars().count() >= 2 {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// The reference `clean_up_tokenization`: no space before `. ? ! ,` and in contractions.
fn clean_up_tokenization(text: &str) -> String {
    let pairs = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    pairs
        .iter()
        .fold(text.to_string(), |acc, (from, to)| acc.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_caption_keeps_single_tabs_and_collapses_runs() {
        assert_eq!(
            pre_caption("tabs\tand\nnewlines\r\nhere", 30),
            "tabs\tand\nnewlines here"
        );
        assert_eq!(pre_caption("a\tb", 30), "a\tb");
        assert_eq!(pre_caption("<person> is Here!", 30), "person is here");
    }

    #[test]
    fn pre_caption_truncates_words_on_spaces() {
        assert_eq!(pre_caption("one two three four", 2), "one two");
    }

    #[test]
    fn clean_up_removes_space_before_punctuation() {
        assert_eq!(clean_up_tokenization("i don ' t know ?"), "i don't know?");
    }
}
