//! One training step's forward pass: the four losses for a batch of samples.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use super::data::Sample;
use super::loss::{itc_loss, itm_loss, lm_loss, sample_hard_negatives};
use crate::model::Mplug;
use crate::preprocess::MplugTokenizer;
use crate::Result;

/// The losses of one batch; absent terms (no captions or no questions in the batch) are
/// `None`.
#[derive(Debug)]
pub struct StepLosses {
    /// Image-text contrastive loss.
    pub itc: Option<Tensor>,
    /// Image-text matching loss over positives and mined hard negatives.
    pub itm: Option<Tensor>,
    /// Caption language-modelling loss (memory = image tokens).
    pub caption: Option<Tensor>,
    /// Answer language-modelling loss (memory = fused image and question).
    pub vqa: Option<Tensor>,
}

impl StepLosses {
    /// Sum of the present terms.
    ///
    /// # Errors
    /// [`crate::Error::Candle`]; [`crate::Error::InvalidArgument`] when every term is absent.
    pub fn total(&self) -> Result<Tensor> {
        let terms: Vec<&Tensor> = [&self.itc, &self.itm, &self.caption, &self.vqa]
            .into_iter()
            .flatten()
            .collect();
        let mut total =
            terms
                .first()
                .map(|t| (*t).clone())
                .ok_or_else(|| crate::Error::InvalidArgument {
                    field: "batch".into(),
                    reason: "expected samples with a caption or a question".into(),
                })?;
        for term in &terms[1..] {
            total = (total + *term)?;
        }
        Ok(total)
    }

    /// The present terms as scalars, in the order itc, itm, caption, vqa (NaN when absent).
    ///
    /// # Errors
    /// [`crate::Error::Candle`] when a term is not a scalar.
    pub fn values(&self) -> Result<[f32; 4]> {
        let value = |t: &Option<Tensor>| -> Result<f32> {
            match t {
                Some(t) => Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?),
                None => Ok(f32::NAN),
            }
        };
        Ok([
            value(&self.itc)?,
            value(&self.itm)?,
            value(&self.caption)?,
            value(&self.vqa)?,
        ])
    }
}

/// What a training step reads.
pub struct StepInput<'a> {
    /// The model under training (built with `differentiable` set).
    pub model: &'a Mplug,
    /// Tokenisation with the model's conventions.
    pub tokenizer: &'a MplugTokenizer,
    /// The learnable ITC temperature (a scalar).
    pub temp: &'a Tensor,
    /// Preprocessed pixels of the batch (B, 3, R, R), in `samples` order.
    pub pixels: &'a Tensor,
    /// The batch's samples.
    pub samples: &'a [&'a Sample],
}

/// Runs the forward pass of one batch and returns its losses.
///
/// Images are encoded once. Samples with a caption give ITC, ITM and the caption loss;
/// samples with questions each contribute one question chosen by `rng` to the VQA loss.
///
/// # Errors
/// [`crate::Error::Candle`] and tokenizer errors.
pub fn forward_losses(input: &StepInput, rng: &mut StdRng) -> Result<StepLosses> {
    let v = input.model.encode_image(input.pixels)?;
    let device = v.device().clone();

    let captioned: Vec<usize> = (0..input.samples.len())
        .filter(|&i| input.samples[i].caption.is_some())
        .collect();
    let (itc, itm, caption) = if captioned.is_empty() {
        (None, None, None)
    } else {
        let v_cap = select_rows(&v, &captioned, &device)?;
        let captions: Vec<&str> = captioned
            .iter()
            .filter_map(|&i| input.samples[i].caption.as_deref())
            .collect();
        let (itc, itm) = retrieval_losses(input, &v_cap, &captions, rng)?;
        let caption = caption_loss(input, &v_cap, &captions)?;
        (Some(itc), itm, Some(caption))
    };

    let asked: Vec<usize> = (0..input.samples.len())
        .filter(|&i| !input.samples[i].questions.is_empty())
        .collect();
    let vqa = if asked.is_empty() {
        None
    } else {
        let v_qa = select_rows(&v, &asked, &device)?;
        Some(vqa_loss(input, &v_qa, &asked, rng)?)
    };
    Ok(StepLosses {
        itc,
        itm,
        caption,
        vqa,
    })
}

/// Rows `index` of `xs` along dimension 0.
fn select_rows(xs: &Tensor, index: &[usize], device: &Device) -> Result<Tensor> {
    let index: Vec<u32> = index.iter().map(|&i| i as u32).collect();
    Ok(xs.index_select(&Tensor::new(index.as_slice(), device)?, 0)?)
}

/// ITC over the batch, and ITM over each positive pair plus one hard negative text per image
/// and one hard negative image per text (`None` when no pair has a negative).
fn retrieval_losses(
    input: &StepInput,
    v: &Tensor,
    captions: &[&str],
    rng: &mut StdRng,
) -> Result<(Tensor, Option<Tensor>)> {
    let device = v.device().clone();
    let (ids, mask) = input
        .tokenizer
        .encode_retrieval(captions)?
        .tensors(&device)?;
    let t = input.model.encode_text(&ids, &mask)?;
    let image_embeds = input.model.image_embeds(v)?;
    let text_embeds = input.model.text_embeds(&t)?;

    let same_rows: Vec<Vec<bool>> = captions
        .iter()
        .map(|a| captions.iter().map(|b| a == b).collect())
        .collect();
    let same_values: Vec<f32> = same_rows
        .iter()
        .flatten()
        .map(|&s| f32::from(u8::from(s)))
        .collect();
    let n = captions.len();
    let same = Tensor::from_vec(same_values, (n, n), &device)?;
    let itc = itc_loss(&image_embeds, &text_embeds, input.temp, &same)?;

    let pairs = mine_pairs(input, &image_embeds, &text_embeds, &same_rows, rng)?;
    if pairs.labels.iter().all(|&l| l == 1) {
        return Ok((itc, None));
    }
    let t_pairs = select_rows(&t, &pairs.texts, &device)?;
    let m_pairs = select_rows(&mask, &pairs.texts, &device)?;
    let v_pairs = select_rows(v, &pairs.images, &device)?;
    let (_, fused) = input.model.fuse(&t_pairs, &m_pairs, &v_pairs)?;
    let logits = input.model.itm_logits(&fused)?;
    let labels = Tensor::new(pairs.labels.as_slice(), &device)?;
    Ok((itc, Some(itm_loss(&logits, &labels)?)))
}

/// ITM training pairs: (text row, image row, label).
struct ItmPairs {
    texts: Vec<usize>,
    images: Vec<usize>,
    labels: Vec<u32>,
}

/// Positives on the diagonal, then negatives sampled from the detached ITC similarities.
fn mine_pairs(
    input: &StepInput,
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    same: &[Vec<bool>],
    rng: &mut StdRng,
) -> Result<ItmPairs> {
    let temp = input.temp.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let sim = image_embeds.detach().matmul(&text_embeds.detach().t()?)?;
    let i2t: Vec<Vec<f32>> = sim.to_dtype(DType::F32)?.to_vec2()?;
    let t2i: Vec<Vec<f32>> = sim.t()?.to_dtype(DType::F32)?.to_vec2()?;

    let n = same.len();
    let mut pairs = ItmPairs {
        texts: (0..n).collect(),
        images: (0..n).collect(),
        labels: vec![1; n],
    };
    let negative_texts = sample_hard_negatives(&i2t, same, temp, rng);
    for (image, text) in negative_texts.into_iter().enumerate() {
        if let Some(text) = text {
            pairs.push_negative(text, image);
        }
    }
    let negative_images = sample_hard_negatives(&t2i, same, temp, rng);
    for (text, image) in negative_images.into_iter().enumerate() {
        if let Some(image) = image {
            pairs.push_negative(text, image);
        }
    }
    Ok(pairs)
}

impl ItmPairs {
    fn push_negative(&mut self, text: usize, image: usize) {
        self.texts.push(text);
        self.images.push(image);
        self.labels.push(0);
    }
}

/// Caption LM loss with the image tokens as decoder memory.
fn caption_loss(input: &StepInput, v: &Tensor, captions: &[&str]) -> Result<Tensor> {
    let device = v.device();
    let (ids, mask) = input
        .tokenizer
        .encode_target(captions, None)?
        .tensors(device)?;
    let memory_mask = Tensor::ones((v.dim(0)?, v.dim(1)?), DType::U32, device)?;
    let logits = input.model.decoder_logits(&ids, &mask, v, &memory_mask)?;
    lm_loss(&logits, &ids, &mask)
}

/// Answer LM loss with the fused image and question as decoder memory; one random question
/// per sample.
fn vqa_loss(input: &StepInput, v: &Tensor, asked: &[usize], rng: &mut StdRng) -> Result<Tensor> {
    let device = v.device();
    let chosen: Vec<_> = asked
        .iter()
        .map(|&i| {
            let questions = &input.samples[i].questions;
            &questions[rng.gen_range(0..questions.len())]
        })
        .collect();
    let questions: Vec<&str> = chosen.iter().map(|qa| qa.question.as_str()).collect();
    let answers: Vec<&str> = chosen.iter().map(|qa| qa.answer.as_str()).collect();

    let (q_ids, q_mask) = input
        .tokenizer
        .encode_question(&questions, true)?
        .tensors(device)?;
    let (memory, memory_mask) = input.model.vqa_memory(v, &q_ids, &q_mask)?;
    let (ids, mask) = input
        .tokenizer
        .encode_target(&answers, None)?
        .tensors(device)?;
    let logits = input
        .model
        .decoder_logits(&ids, &mask, &memory, &memory_mask)?;
    lm_loss(&logits, &ids, &mask)
}
