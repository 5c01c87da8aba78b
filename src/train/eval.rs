//! The `eval` command: retrieval precision (ITC, then ITM rerank), caption exact match and VQA
//! accuracy of a checkpoint on a held-out dataset.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::data::Dataset;
use super::images::load_pixels;
use super::metrics::{precision_at_k, top_k, Accuracy, EvalReport, QueryPrecision};
use crate::model::{Mplug, Tasks};
use crate::preprocess::{ImagePreprocessor, MplugTokenizer};
use crate::{Error, Result};

/// Options of the `eval` command.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate (`.safetensors`, `.pth` or `.bin`).
    #[arg(
        long,
        env = "MPLUG_EVAL_CHECKPOINT",
        default_value = "models/tiny-easyvqa/model.safetensors"
    )]
    pub checkpoint: PathBuf,

    /// The checkpoint's model config.
    #[arg(
        long,
        env = "MPLUG_EVAL_MODEL_CONFIG",
        default_value = "models/tiny-easyvqa/mplug.json"
    )]
    pub model_config: PathBuf,

    /// easy-VQA package folder (holding `data/test`); used when no --manifest is given.
    #[arg(
        long,
        env = "MPLUG_EVAL_EASY_VQA",
        default_value = ".data/pydeps/easy_vqa"
    )]
    pub easy_vqa: PathBuf,

    /// A held-out JSONL manifest (same format as for `train`) instead of the easy-VQA test
    /// split.
    #[arg(long, env = "MPLUG_EVAL_MANIFEST", requires = "images")]
    pub manifest: Option<PathBuf>,

    /// Folder the manifest's image paths are relative to.
    #[arg(long, env = "MPLUG_EVAL_IMAGES")]
    pub images: Option<PathBuf>,

    /// The k of precision@k.
    #[arg(long, env = "MPLUG_EVAL_K", default_value_t = 10)]
    pub k: usize,

    /// ITC candidates per query that the ITM head reranks.
    #[arg(long, env = "MPLUG_EVAL_RERANK_K", default_value_t = 30)]
    pub rerank_k: usize,

    /// Images or questions per forward pass.
    #[arg(long, env = "MPLUG_EVAL_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,

    /// Evaluate only the first N questions (0: all).
    #[arg(long, env = "MPLUG_EVAL_MAX_QUESTIONS", default_value_t = 0)]
    pub max_questions: usize,
}

/// Loads the checkpoint and the held-out data, measures everything and returns the report
/// (its `Display` is the printed table).
///
/// # Errors
/// [`Error::InvalidArgument`] for k or batch size 0 or an empty dataset; loading, data and
/// model errors as they come.
pub fn run_eval(args: &EvalArgs) -> Result<EvalReport> {
    for (field, value) in [("k", args.k), ("batch_size", args.batch_size)] {
        if value == 0 {
            return Err(Error::InvalidArgument {
                field: field.into(),
                reason: "expected at least 1".into(),
            });
        }
    }
    let device = Device::Cpu;
    let model = Mplug::load(
        &args.checkpoint,
        &args.model_config,
        Tasks::ALL,
        &device,
        DType::F32,
    )?;
    let dataset = match (&args.manifest, &args.images) {
        (Some(manifest), Some(images)) => Dataset::from_jsonl(manifest, images)?,
        _ => Dataset::from_easy_vqa(&args.easy_vqa, "test")?,
    };
    if dataset.samples.is_empty() {
        return Err(Error::InvalidArgument {
            field: "dataset".into(),
            reason: "expected at least one held-out image".into(),
        });
    }
    let evaluator = Evaluator::new(&model, args, &dataset)?;
    evaluator.report()
}

/// A model, its tokenizer and a held-out set with every image already encoded.
pub struct Evaluator<'a> {
    model: &'a Mplug,
    tokenizer: MplugTokenizer,
    args: &'a EvalArgs,
    dataset: &'a Dataset,
    /// Image tokens of every sample (N, Lv, H).
    v: Tensor,
    /// ITC image embeddings (N, E).
    embeds: Tensor,
}

impl<'a> Evaluator<'a> {
    /// Decodes and encodes every image of `dataset` in batches.
    ///
    /// # Errors
    /// Data, tokenizer and model errors.
    pub fn new(model: &'a Mplug, args: &'a EvalArgs, dataset: &'a Dataset) -> Result<Self> {
        let cfg = model.config();
        let preprocessor = ImagePreprocessor::new(cfg.vision.image_size as u32);
        let paths: Vec<PathBuf> = dataset.samples.iter().map(|s| s.image.clone()).collect();
        let (mut vs, mut embeds) = (Vec::new(), Vec::new());
        for chunk in paths.chunks(args.batch_size) {
            let pixels = load_pixels(&preprocessor, chunk, &Device::Cpu)?;
            let v = model.encode_image(&pixels)?;
            embeds.push(model.image_embeds(&v)?);
            vs.push(v);
        }
        Ok(Self {
            model,
            tokenizer: MplugTokenizer::from_config(&cfg.tokenizer)?,
            args,
            dataset,
            v: Tensor::cat(&vs, 0)?,
            embeds: Tensor::cat(&embeds, 0)?,
        })
    }

    /// Runs every measure.
    ///
    /// # Errors
    /// Tokenizer and model errors.
    pub fn report(&self) -> Result<EvalReport> {
        let queries = self
            .dataset
            .captions()
            .iter()
            .map(|q| self.query_precision(q))
            .collect::<Result<Vec<_>>>()?;
        Ok(EvalReport {
            k: self.args.k,
            rerank_k: self.args.rerank_k.max(self.args.k),
            images: self.dataset.samples.len(),
            queries,
            caption: self.caption_accuracy()?,
            vqa: self.vqa_accuracy()?,
        })
    }

    /// Precision@k of one caption used as a text query, by ITC and after ITM rerank.
    fn query_precision(&self, query: &str) -> Result<QueryPrecision> {
        let device = self.v.device().clone();
        let (ids, mask) = self
            .tokenizer
            .encode_retrieval(&[query])?
            .tensors(&device)?;
        let t = self.model.encode_text(&ids, &mask)?;
        let text_embed = self.model.text_embeds(&t)?;
        let scores: Vec<f32> = self
            .embeds
            .matmul(&text_embed.t()?)?
            .squeeze(1)?
            .to_vec1()?;

        let relevant = |i: usize| self.dataset.samples[i].caption.as_deref() == Some(query);
        let count = (0..self.dataset.samples.len())
            .filter(|&i| relevant(i))
            .count();
        let k = self.args.k;
        let candidates = top_k(&scores, self.args.rerank_k.max(k));
        let itc = precision_at_k(&candidates, k, relevant);

        let itm_scores = self.itm_scores(&t, &mask, &candidates)?;
        let reranked: Vec<usize> = top_k(&itm_scores, k)
            .into_iter()
            .map(|i| candidates[i])
            .collect();
        Ok(QueryPrecision {
            query: query.to_string(),
            relevant: count,
            itc,
            itm: precision_at_k(&reranked, k, relevant),
        })
    }

    /// ITM match logits of one query's text tokens against each candidate image.
    fn itm_scores(&self, t: &Tensor, mask: &Tensor, candidates: &[usize]) -> Result<Vec<f32>> {
        let device = self.v.device();
        let index: Vec<u32> = candidates.iter().map(|&i| i as u32).collect();
        let v = self
            .v
            .index_select(&Tensor::new(index.as_slice(), device)?, 0)?;
        let n = candidates.len();
        let t = t.broadcast_as((n, t.dim(1)?, t.dim(2)?))?.contiguous()?;
        let mask = mask.broadcast_as((n, mask.dim(1)?))?.contiguous()?;
        let (_, fused) = self.model.fuse(&t, &mask, &v)?;
        let logits = self.model.itm_logits(&fused)?;
        Ok(logits
            .narrow(1, 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    }

    /// Exact match of the generated caption against each captioned image's caption.
    fn caption_accuracy(&self) -> Result<Accuracy> {
        let opts = self.model.config().generation.caption;
        let captioned: Vec<usize> = (0..self.dataset.samples.len())
            .filter(|&i| self.dataset.samples[i].caption.is_some())
            .collect();
        let mut accuracy = Accuracy::default();
        for chunk in captioned.chunks(self.args.batch_size) {
            let v = self.rows(chunk)?;
            let hypotheses = self.model.caption(&v, &opts)?;
            for (&i, best) in chunk.iter().zip(hypotheses) {
                let predicted = self.best_text(&best)?;
                let expected = self.dataset.samples[i]
                    .caption
                    .as_deref()
                    .unwrap_or_default();
                accuracy.add(&predicted, expected);
            }
        }
        Ok(accuracy)
    }

    /// Exact match of the generated answer for every question (or the first
    /// `max_questions`).
    fn vqa_accuracy(&self) -> Result<Accuracy> {
        let opts = self.model.config().generation.vqa;
        let mut items: Vec<(usize, usize)> = self
            .dataset
            .samples
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.questions.len()).map(move |q| (i, q)))
            .collect();
        if self.args.max_questions > 0 {
            items.truncate(self.args.max_questions);
        }
        let mut accuracy = Accuracy::default();
        for chunk in items.chunks(self.args.batch_size) {
            let images: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
            let qas: Vec<_> = chunk
                .iter()
                .map(|&(i, q)| &self.dataset.samples[i].questions[q])
                .collect();
            let questions: Vec<&str> = qas.iter().map(|qa| qa.question.as_str()).collect();
            let (ids, mask) = self
                .tokenizer
                .encode_question(&questions, true)?
                .tensors(self.v.device())?;
            let hypotheses = self
                .model
                .answer(&self.rows(&images)?, &ids, &mask, &opts)?;
            for (qa, best) in qas.iter().zip(hypotheses) {
                accuracy.add(&self.best_text(&best)?, &qa.answer);
            }
        }
        Ok(accuracy)
    }

    fn rows(&self, index: &[usize]) -> Result<Tensor> {
        let index: Vec<u32> = index.iter().map(|&i| i as u32).collect();
        Ok(self
            .v
            .index_select(&Tensor::new(index.as_slice(), self.v.device())?, 0)?)
    }

    fn best_text(&self, hypotheses: &[crate::model::Hypothesis]) -> Result<String> {
        match hypotheses.first() {
            Some(best) => Ok(self.tokenizer.decode(&best.ids)),
            None => Ok(String::new()),
        }
    }
}
