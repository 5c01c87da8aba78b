//! The training losses: image-text contrastive (ITC), image-text matching (ITM) with hard
//! negatives mined from the ITC similarities, and teacher-forced language modelling (LM).
//!
//! Everything here is built from differentiable candle ops so gradients reach every
//! parameter through `Tensor::backward`.

use candle_core::{DType, Tensor, D};
use rand::Rng;

use crate::Result;

/// In-batch contrastive loss, symmetric over image→text and text→image.
///
/// `image_embeds` and `text_embeds` are (B, E) and L2-normalised; `temp` is a scalar tensor
/// (the learnable temperature); `same` is a (B, B) f32 matrix with 1 where image i and text j
/// describe the same thing (so duplicate captions in a batch are positives, not negatives).
/// Each row of `same` is normalised into a target distribution and compared with the softmax
/// of `similarity / temp` by cross-entropy; the result is the mean of both directions.
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatches.
pub fn itc_loss(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    temp: &Tensor,
    same: &Tensor,
) -> Result<Tensor> {
    let sim = image_embeds
        .matmul(&text_embeds.t()?)?
        .broadcast_div(temp)?;
    let targets = same.broadcast_div(&same.sum_keepdim(1)?)?;
    let i2t = soft_cross_entropy(&sim, &targets)?;

    let sim_t = sim.t()?;
    let same_t = same.t()?;
    let targets_t = same_t.broadcast_div(&same_t.sum_keepdim(1)?)?;
    let t2i = soft_cross_entropy(&sim_t, &targets_t)?;
    Ok(((i2t + t2i)? / 2.0)?)
}

/// Mean over rows of `-(targets · log_softmax(logits))`.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((log_probs * targets)?.sum(1)?.mean_all()?.neg()?)
}

/// Picks one hard negative per row: column j with probability proportional to
/// `exp(similarity[i][j] / temp)` among the columns where `same[i][j]` is false.
///
/// Rows whose every column is a positive get `None` (no valid negative in the batch).
pub fn sample_hard_negatives(
    similarity: &[Vec<f32>],
    same: &[Vec<bool>],
    temp: f32,
    rng: &mut impl Rng,
) -> Vec<Option<usize>> {
    similarity
        .iter()
        .zip(same)
        .map(|(row, positives)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = row
                .iter()
                .zip(positives)
                .map(|(s, p)| if *p { 0.0 } else { ((s - max) / temp).exp() })
                .collect();
            sample_index(&weights, rng)
        })
        .collect()
}

/// Draws an index with probability proportional to `weights`; `None` when they sum to zero.
fn sample_index(weights: &[f32], rng: &mut impl Rng) -> Option<usize> {
    let total: f32 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mut remaining = rng.gen::<f32>() * total;
    let mut last_positive = None;
    for (index, weight) in weights.iter().enumerate() {
        if *weight <= 0.0 {
            continue;
        }
        last_positive = Some(index);
        remaining -= weight;
        if remaining <= 0.0 {
            return Some(index);
        }
    }
    last_positive
}

/// Two-way cross-entropy of ITM logits (N, 2) against labels (N) (1 = match).
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatches.
pub fn itm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(logits, labels)?)
}

/// Teacher-forced next-token loss.
///
/// `logits` (B, L, V) are the decoder outputs for input `ids` (B, L); position t predicts
/// `ids[:, t + 1]`. Only targets whose `mask` entry is 1 count (padding is ignored); the result
/// is the mean over counted targets.
///
/// # Errors
/// [`crate::Error::Candle`] on shape mismatches or when no target is counted.
pub fn lm_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, l, v) = logits.dims3()?;
    let predictions = logits.narrow(1, 0, l - 1)?.reshape((b * (l - 1), v))?;
    let targets = ids.narrow(1, 1, l - 1)?.reshape(b * (l - 1))?;
    let weights = mask
        .narrow(1, 1, l - 1)?
        .reshape(b * (l - 1))?
        .to_dtype(DType::F32)?;

    let log_probs = candle_nn::ops::log_softmax(&predictions, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let total = (picked * &weights)?.sum_all()?.neg()?;
    Ok(total.broadcast_div(&weights.sum_all()?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn itc_loss_is_low_for_aligned_embeddings_and_treats_duplicates_as_positives() {
        let device = Device::Cpu;
        let e = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.0, 1.0]], &device).unwrap();
        let temp = Tensor::new(0.1f32, &device).unwrap();
        let same = Tensor::new(
            &[[1f32, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]],
            &device,
        )
        .unwrap();
        let aligned = itc_loss(&e, &e, &temp, &same)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let swapped = Tensor::new(&[[0f32, 1.0], [1.0, 0.0], [1.0, 0.0]], &device).unwrap();
        let wrong = itc_loss(&e, &swapped, &temp, &same)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Rows 1 and 2 split their target mass over two equal logits: the minimum is ln 2 each.
        let floor = 2.0 * 2f32.ln() / 3.0;
        assert!((aligned - floor).abs() < 1e-3, "{aligned} vs {floor}");
        assert!(wrong > aligned + 5.0, "{wrong}");
    }

    #[test]
    fn hard_negatives_never_pick_positives_and_prefer_similar_columns() {
        let similarity = vec![vec![0.9, 0.8, -0.9], vec![0.1, 0.2, 0.3]];
        let same = vec![vec![true, false, false], vec![true, true, true]];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut hits = [0usize; 3];
        for _ in 0..200 {
            let picks = sample_hard_negatives(&similarity, &same, 0.1, &mut rng);
            assert_eq!(picks[1], None);
            hits[picks[0].expect("row 0 has negatives")] += 1;
        }
        assert_eq!(hits[0], 0);
        assert!(hits[1] > 190, "{hits:?}");
    }

    #[test]
    fn lm_loss_ignores_padding_and_has_gradients() {
        let device = Device::Cpu;
        let logits =
            Var::from_tensor(&Tensor::zeros((1, 3, 4), DType::F32, &device).unwrap()).unwrap();
        let ids = Tensor::new(&[[2u32, 1, 0]], &device).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 0]], &device).unwrap();
        let loss = lm_loss(logits.as_tensor(), &ids, &mask).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-5);

        let grads = loss.backward().unwrap();
        let grad = grads
            .get(logits.as_tensor())
            .expect("logits get a gradient");
        let grad: Vec<Vec<Vec<f32>>> = grad.to_vec3().unwrap();
        assert!(grad[0][0][1] < 0.0, "the target logit is pushed up");
        assert!(
            grad[0][1].iter().all(|g| *g == 0.0),
            "the padded target gets no gradient"
        );
    }
}
