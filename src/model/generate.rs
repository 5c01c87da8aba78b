//! Beam search and greedy decoding over the text decoder.
//!
//! Upstream: `TextGenerator._fast_translate_batch` in `alibaba/AliceMind`
//! mPLUG/models/predictor.py at commit a6d5afe5c272960ce61dc73adb0877bc94b5d664. We keep a
//! key/value cache instead of re-running the prefix; everything else follows the reference:
//! the item stops when its top beam emits the end token (or at the last step), finished
//! non-top beams are recorded and keep being extended, and at the stop every current beam is
//! recorded. Hypotheses are sorted stably by length-normalised score.

use candle_core::{DType, Result, Tensor};

use super::bert::TextDecoder;
use super::config::GenerationOptions;

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Token ids, starting with the start token (`[CLS]`).
    pub ids: Vec<u32>,
    /// Length-normalised log-probability, `logp / ((5 + len) / 6)^alpha`.
    pub score: f32,
}

/// Start and end tokens of the decoder.
#[derive(Debug, Clone, Copy)]
pub struct SpecialTokens {
    /// Token every sequence starts with.
    pub start: u32,
    /// Token that finishes a sequence.
    pub end: u32,
}

struct Beams {
    /// Original batch index of each live item, in row order.
    items: Vec<usize>,
    /// Sequences of every live row (items × beam).
    seqs: Vec<Vec<u32>>,
    /// Accumulated log-probability of every live row.
    logp: Vec<f32>,
}

/// Runs beam search (greedy when `beam_size` is 1) for each memory row; returns up to
/// `n_best` hypotheses per item, best first. `memory` is (B, M, W) with 0/1 mask (B, M).
pub fn beam_search(
    decoder: &TextDecoder,
    memory: &Tensor,
    memory_mask: &Tensor,
    opts: &GenerationOptions,
    tokens: SpecialTokens,
) -> Result<Vec<Vec<Hypothesis>>> {
    let batch = memory.dim(0)?;
    let k = opts.beam_size.max(1);
    let mut cache = decoder.start(memory, memory_mask)?;
    let tile: Vec<u32> = (0..batch * k).map(|r| (r / k) as u32).collect();
    cache.select(&Tensor::new(tile.as_slice(), memory.device())?)?;

    let mut beams = Beams {
        items: (0..batch).collect(),
        seqs: vec![vec![tokens.start]; batch * k],
        logp: (0..batch * k)
            .map(|r| if r % k == 0 { 0.0 } else { f32::NEG_INFINITY })
            .collect(),
    };
    let mut hypotheses: Vec<Vec<(f32, Vec<u32>)>> = vec![Vec::new(); batch];
    let mut results: Vec<Vec<Hypothesis>> = vec![Vec::new(); batch];

    for step in 0..opts.max_length {
        let last: Vec<u32> = beams.seqs.iter().map(|s| s[s.len() - 1]).collect();
        let ids = Tensor::new(last.as_slice(), memory.device())?.unsqueeze(1)?;
        let logits = decoder
            .step(&ids, &mut cache)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let ctx = StepContext {
            step,
            k,
            opts,
            tokens,
        };
        let keep = advance(&ctx, &logits, &mut beams, &mut hypotheses, &mut results);
        if beams.items.is_empty() {
            break;
        }
        cache.select(&Tensor::new(keep.as_slice(), memory.device())?)?;
    }
    Ok(results)
}

struct StepContext<'a> {
    step: usize,
    k: usize,
    opts: &'a GenerationOptions,
    tokens: SpecialTokens,
}

/// One beam step on the logits of every live row. Updates the beams, records hypotheses and
/// finished items, and returns the source rows the cache must keep, in the new row order.
fn advance(
    ctx: &StepContext,
    logits: &[Vec<f32>],
    beams: &mut Beams,
    hypotheses: &mut [Vec<(f32, Vec<u32>)>],
    results: &mut [Vec<Hypothesis>],
) -> Vec<u32> {
    let k = ctx.k;
    let penalty = ((5.0 + (ctx.step + 1) as f64) / 6.0).powf(ctx.opts.length_penalty) as f32;
    let last_step = ctx.step + 1 == ctx.opts.max_length;
    let mut next = Beams {
        items: Vec::new(),
        seqs: Vec::new(),
        logp: Vec::new(),
    };
    let mut keep = Vec::new();
    for (slot, &item) in beams.items.iter().enumerate() {
        let rows = slot * k..(slot + 1) * k;
        let top = top_candidates(ctx, &logits[rows.clone()], &beams.logp[rows], penalty);
        let seqs: Vec<Vec<u32>> = top
            .iter()
            .map(|c| {
                let mut s = beams.seqs[slot * k + c.beam].clone();
                s.push(c.token);
                s
            })
            .collect();
        let finished: Vec<bool> = top
            .iter()
            .map(|c| last_step || c.token == ctx.tokens.end)
            .collect();
        let stop = finished[0];
        for (j, c) in top.iter().enumerate() {
            if stop || finished[j] {
                hypotheses[item].push((c.score, seqs[j].clone()));
            }
        }
        if stop {
            let mut hyps = std::mem::take(&mut hypotheses[item]);
            hyps.sort_by(|a, b| b.0.total_cmp(&a.0));
            let n = ctx.opts.n_best.max(1);
            results[item] = hyps
                .into_iter()
                .take(n)
                .map(|(score, ids)| Hypothesis { ids, score })
                .collect();
            continue;
        }
        next.items.push(item);
        for (c, s) in top.iter().zip(seqs) {
            keep.push((slot * k + c.beam) as u32);
            next.seqs.push(s);
            next.logp.push(c.score * penalty);
        }
    }
    *beams = next;
    keep
}

struct Candidate {
    beam: usize,
    token: u32,
    score: f32,
}

/// The `k` best (beam, token) continuations of one item by length-normalised score.
fn top_candidates(
    ctx: &StepContext,
    logits: &[Vec<f32>],
    logp: &[f32],
    penalty: f32,
) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = Vec::with_capacity(logits.len() * logits[0].len());
    for (beam, row) in logits.iter().enumerate() {
        let mut lp = log_of_softmax(row);
        if ctx.step < ctx.opts.min_length {
            if let Some(x) = lp.get_mut(ctx.tokens.end as usize) {
                *x = -1e20;
            }
        }
        for (token, x) in lp.into_iter().enumerate() {
            all.push(Candidate {
                beam,
                token: token as u32,
                score: (x + logp[beam]) / penalty,
            });
        }
    }
    let k = ctx.k.min(all.len());
    all.select_nth_unstable_by(k - 1, |a, b| b.score.total_cmp(&a.score));
    all.truncate(k);
    all.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then((a.beam, a.token).cmp(&(b.beam, b.token)))
    });
    all
}

/// `log(softmax(x))` in f32, as the reference computes it (not `log_softmax`).
fn log_of_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| (e / sum).ln()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_of_softmax_sums_to_one() {
        let lp = log_of_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }

    #[test]
    fn min_length_forbids_end_token() {
        let opts = GenerationOptions {
            beam_size: 2,
            min_length: 1,
            max_length: 3,
            n_best: 1,
            length_penalty: 0.6,
        };
        let ctx = StepContext {
            step: 0,
            k: 2,
            opts: &opts,
            tokens: SpecialTokens { start: 0, end: 1 },
        };
        let logits = vec![vec![0.0, 10.0, 1.0, 2.0], vec![0.0; 4]];
        let top = top_candidates(&ctx, &logits, &[0.0, f32::NEG_INFINITY], 1.0);
        assert_eq!(top.iter().map(|c| c.token).collect::<Vec<_>>(), vec![3, 2]);
        assert!(top.iter().all(|c| c.beam == 0));
    }
}
