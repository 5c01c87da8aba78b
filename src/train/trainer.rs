//! The `train` command: fits an mPLUG on a dataset, from scratch or from an existing
//! checkpoint, and writes a checkpoint the loader reads (`model.safetensors`, `mplug.json`,
//! `vocab.txt`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::config::{tiny_config, ModelShape};
use super::data::{Dataset, Sample};
use super::images::load_pixels;
use super::step::{forward_losses, StepInput};
use super::vocab::Vocabulary;
use crate::model::{Mplug, MplugConfig, Tasks};
use crate::preprocess::{ImagePreprocessor, MplugTokenizer};
use crate::{Error, Result};

/// File names of a written checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The model config next to the weights.
pub const CONFIG_FILE: &str = "mplug.json";
/// The WordPiece vocabulary next to the config.
pub const VOCAB_FILE: &str = "vocab.txt";

/// Name of the learnable ITC temperature in the checkpoint (as upstream).
const TEMP_NAME: &str = "temp";
/// Initial ITC temperature (upstream: 0.07).
const TEMP_INIT: f64 = 0.07;
/// Standard deviation of the normal initialisation of weight matrices and embeddings.
const INIT_STD: f32 = 0.02;

/// Options of the `train` command.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// easy-VQA package folder (holding `data/train`), as printed by
    /// `scripts/fetch-easy-vqa.sh`. Used when no --manifest is given.
    #[arg(
        long,
        env = "MPLUG_TRAIN_EASY_VQA",
        default_value = ".data/pydeps/easy_vqa"
    )]
    pub easy_vqa: PathBuf,

    /// Your own dataset: a JSONL file of `{"image", "caption"}` and/or
    /// `{"image", "question", "answer"}` lines; image paths are relative to --images.
    #[arg(long, env = "MPLUG_TRAIN_MANIFEST", requires = "images")]
    pub manifest: Option<PathBuf>,

    /// Folder the manifest's image paths are relative to.
    #[arg(long, env = "MPLUG_TRAIN_IMAGES")]
    pub images: Option<PathBuf>,

    /// Output folder for `model.safetensors`, `mplug.json` and `vocab.txt`.
    #[arg(long, env = "MPLUG_TRAIN_OUT", default_value = "models/tiny-easyvqa")]
    pub out: PathBuf,

    /// Passes over the training images.
    #[arg(long, env = "MPLUG_TRAIN_EPOCHS", default_value_t = 12)]
    pub epochs: usize,

    /// Stop after this many optimiser steps even if epochs remain (0: no limit).
    #[arg(long, env = "MPLUG_TRAIN_MAX_STEPS", default_value_t = 0)]
    pub max_steps: usize,

    /// Images per step (each brings its caption and one of its questions).
    #[arg(long, env = "MPLUG_TRAIN_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,

    /// Peak AdamW learning rate, reached after the warm-up and decayed by a cosine to 10%.
    #[arg(long, env = "MPLUG_TRAIN_LR", default_value_t = 1e-3)]
    pub lr: f64,

    /// Linear learning-rate warm-up steps.
    #[arg(long, env = "MPLUG_TRAIN_WARMUP", default_value_t = 100)]
    pub warmup_steps: usize,

    /// AdamW weight decay on weight matrices and embeddings (not on biases, norms or temp).
    #[arg(long, env = "MPLUG_TRAIN_WEIGHT_DECAY", default_value_t = 0.01)]
    pub weight_decay: f64,

    /// Seed of initialisation, shuffling, question choice and negative mining.
    #[arg(long, env = "MPLUG_TRAIN_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Write a checkpoint every this many steps (0: only at the end).
    #[arg(long, env = "MPLUG_TRAIN_CHECKPOINT_EVERY", default_value_t = 250)]
    pub checkpoint_every: usize,

    /// Store weights as f16 (half the size) instead of f32. Takes the usual spellings of a
    /// boolean (`1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`).
    #[arg(
        long,
        env = "MPLUG_TRAIN_F16",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub f16: bool,

    /// Start from this checkpoint (`model.safetensors`) instead of the seeded random
    /// initialisation: every variable is loaded by name and converted to f32. The model shape
    /// flags must describe the checkpoint, and when a `vocab.txt` lies next to it, the
    /// vocabulary built from the training data must equal it. Unset: train from scratch.
    ///
    /// Errors: a tensor absent from the file or with another shape, a file tensor the model
    /// does not have, or a different vocabulary.
    #[arg(long, env = "MPLUG_TRAIN_INIT_CHECKPOINT")]
    pub init_checkpoint: Option<PathBuf>,

    /// Model shape.
    #[command(flatten)]
    pub shape: ModelShape,
}

/// What a finished training run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimiser steps taken.
    pub steps: usize,
    /// Wall-clock seconds of the optimisation loop (data loading excluded).
    pub seconds: f64,
    /// Each loss (itc, itm, caption, vqa) at the first step.
    pub initial_losses: [f32; 4],
    /// Mean of each loss over the last 50 steps (or the last fifth of a shorter run).
    pub final_losses: [f32; 4],
    /// Trainable parameters.
    pub parameters: usize,
    /// Folder holding the written checkpoint.
    pub out: PathBuf,
}

/// Trains a model on the dataset the arguments name and writes it to `args.out`.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty dataset or zero batch size, data loading errors,
/// [`Error::Candle`] from the model, [`Error::Io`] when the output cannot be written, and the
/// errors of [`load_checkpoint`] (or [`Error::Checkpoint`] for another vocabulary) when
/// `args.init_checkpoint` does not match the configured model.
pub fn run_train(args: &TrainArgs) -> Result<TrainSummary> {
    let prepared = prepare_run(args)?;
    let mut trainer = prepared.trainer;
    trainer.fit(&prepared.dataset, &prepared.pixels)
}

/// A training run ready to start: the initialised trainer, the data and its pixels.
pub struct PreparedRun {
    /// Model, optimisers and randomness.
    pub trainer: Trainer,
    /// The training samples.
    pub dataset: Dataset,
    /// Preprocessed pixels of every sample (N, 3, R, R), in sample order.
    pub pixels: Tensor,
}

/// Loads the data, writes `vocab.txt` and `mplug.json` to `args.out`, decodes every image and
/// builds the initialised model: everything [`run_train`] does before the first step.
///
/// # Errors
/// As [`run_train`].
pub fn prepare_run(args: &TrainArgs) -> Result<PreparedRun> {
    if args.batch_size == 0 {
        return Err(Error::InvalidArgument {
            field: "batch_size".into(),
            reason: "expected at least 1".into(),
        });
    }
    let dataset = load_training_data(args)?;
    let cfg = prepare_output(args, &dataset)?;
    let device = Device::Cpu;
    let paths: Vec<PathBuf> = dataset.samples.iter().map(|s| s.image.clone()).collect();
    let preprocessor = ImagePreprocessor::new(cfg.vision.image_size as u32);
    let pixels = load_pixels(&preprocessor, &paths, &device)?;
    Ok(PreparedRun {
        trainer: Trainer::new(&cfg, args, &device)?,
        dataset,
        pixels,
    })
}

/// The user's manifest when given, else the easy-VQA train split.
fn load_training_data(args: &TrainArgs) -> Result<Dataset> {
    let dataset = match (&args.manifest, &args.images) {
        (Some(manifest), Some(images)) => Dataset::from_jsonl(manifest, images)?,
        _ => Dataset::from_easy_vqa(&args.easy_vqa, "train")?,
    };
    if dataset.samples.is_empty() {
        return Err(Error::InvalidArgument {
            field: "dataset".into(),
            reason: "expected at least one image with a caption or a question".into(),
        });
    }
    Ok(dataset)
}

/// Creates the output folder, writes the vocabulary and config, and reads the config back
/// exactly as the loader will.
fn prepare_output(args: &TrainArgs, dataset: &Dataset) -> Result<MplugConfig> {
    std::fs::create_dir_all(&args.out).map_err(|source| Error::Io {
        path: args.out.clone(),
        source,
    })?;
    let vocab = Vocabulary::build(dataset.texts());
    let init_vocab = args
        .init_checkpoint
        .as_ref()
        .map(|p| p.with_file_name(VOCAB_FILE));
    let stored = match init_vocab.filter(|p| p.is_file()) {
        Some(path) => Some(read_text(&path)?),
        None => None,
    };
    vocab.write(&args.out.join(VOCAB_FILE))?;
    if let Some(init) = &args.init_checkpoint {
        check_init_vocabulary(init, stored, &args.out.join(VOCAB_FILE))?;
    }

    let cfg = tiny_config(&args.shape, &vocab, VOCAB_FILE);
    let config_path = args.out.join(CONFIG_FILE);
    write_json(&config_path, &cfg)?;
    let mut cfg = MplugConfig::from_file(&config_path)?;
    cfg.differentiable = true;
    Ok(cfg)
}

/// Fails when `stored` (the vocabulary text next to the initial checkpoint, if any) differs
/// from the freshly written `written`: token ids would then mean other words than the
/// checkpoint learned.
fn check_init_vocabulary(init: &Path, stored: Option<String>, written: &Path) -> Result<()> {
    let Some(stored) = stored else {
        return Ok(());
    };
    let built = read_text(written)?;
    if built != stored {
        return Err(Error::Checkpoint {
            path: init.to_path_buf(),
            reason: format!(
                "the vocabulary built from the training data differs from the {VOCAB_FILE} \
                 next to it; expected the same training texts as the initial checkpoint"
            ),
        });
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_json(path: &Path, cfg: &MplugConfig) -> Result<()> {
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The model, its parameters, the optimisers and the run's randomness.
pub struct Trainer {
    model: Mplug,
    tokenizer: MplugTokenizer,
    varmap: VarMap,
    temp: Var,
    decay: AdamW,
    no_decay: AdamW,
    rng: StdRng,
    args: TrainArgs,
}

impl Trainer {
    /// Builds the model on a fresh [`VarMap`] and initialises it deterministically from
    /// `args.seed`, then, when `args.init_checkpoint` is set, overwrites every variable with
    /// the checkpoint's weights.
    ///
    /// # Errors
    /// [`Error::Candle`], tokenizer errors, and those of [`load_checkpoint`].
    pub fn new(cfg: &MplugConfig, args: &TrainArgs, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Mplug::new(cfg, Tasks::ALL, vb.clone())?;
        vb.get_with_hints((), TEMP_NAME, candle_nn::Init::Const(TEMP_INIT))?;
        let mut rng = StdRng::seed_from_u64(args.seed);
        initialise(&varmap, &mut rng)?;
        if let Some(init) = &args.init_checkpoint {
            load_checkpoint(&varmap, init, device)?;
        }

        let (decayed, plain) = split_for_decay(&varmap);
        let params = |weight_decay: f64| ParamsAdamW {
            lr: args.lr,
            weight_decay,
            ..ParamsAdamW::default()
        };
        let temp = varmap
            .data()
            .lock()
            .expect("var map lock is never poisoned")
            .get(TEMP_NAME)
            .cloned()
            .expect("temp was registered above");
        Ok(Self {
            model,
            tokenizer: MplugTokenizer::from_config(&cfg.tokenizer)?,
            decay: AdamW::new(decayed, params(args.weight_decay))?,
            no_decay: AdamW::new(plain, params(0.0))?,
            varmap,
            temp,
            rng,
            args: args.clone(),
        })
    }

    /// Runs the optimisation loop over `dataset` (pixels in sample order), writing checkpoints
    /// as configured and at the end.
    ///
    /// # Errors
    /// [`Error::Candle`], tokenizer errors, [`Error::Io`] when a checkpoint cannot be written.
    pub fn fit(&mut self, dataset: &Dataset, pixels: &Tensor) -> Result<TrainSummary> {
        let n = dataset.samples.len();
        let per_epoch = n.div_ceil(self.args.batch_size);
        let mut total = per_epoch * self.args.epochs.max(1);
        if self.args.max_steps > 0 {
            total = total.min(self.args.max_steps);
        }
        let progress = progress_bar(total as u64);
        let started = Instant::now();
        let mut history: Vec<[f32; 4]> = Vec::new();
        let mut order: Vec<usize> = (0..n).collect();

        'epochs: for _ in 0..self.args.epochs.max(1) {
            order.shuffle(&mut self.rng);
            for chunk in order.chunks(self.args.batch_size) {
                let step = history.len();
                if step >= total {
                    break 'epochs;
                }
                self.set_learning_rate(step, total);
                let values = self.step(dataset, pixels, chunk)?;
                history.push(values);
                report_progress(&progress, step, &history);
                if self.args.checkpoint_every > 0
                    && (step + 1).is_multiple_of(self.args.checkpoint_every)
                {
                    self.save(&self.args.out)?;
                }
            }
        }
        progress.finish();
        self.save(&self.args.out)?;
        Ok(TrainSummary {
            steps: history.len(),
            seconds: started.elapsed().as_secs_f64(),
            initial_losses: history.first().copied().unwrap_or([f32::NAN; 4]),
            final_losses: recent_mean(&history, 50.min(history.len().div_ceil(5))),
            parameters: self.parameter_count(),
            out: self.args.out.clone(),
        })
    }

    /// One optimiser step on the samples at `indices`; returns the loss terms.
    fn step(&mut self, dataset: &Dataset, pixels: &Tensor, indices: &[usize]) -> Result<[f32; 4]> {
        let index: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let batch_pixels =
            pixels.index_select(&Tensor::new(index.as_slice(), pixels.device())?, 0)?;
        let samples: Vec<&Sample> = indices.iter().map(|&i| &dataset.samples[i]).collect();
        let temp = self.temp.as_tensor().clamp(0.001f32, 0.5f32)?;
        let input = StepInput {
            model: &self.model,
            tokenizer: &self.tokenizer,
            temp: &temp,
            pixels: &batch_pixels,
            samples: &samples,
        };
        let losses = forward_losses(&input, &mut self.rng)?;

        let grads = losses.total()?.backward()?;
        self.decay.step(&grads)?;
        self.no_decay.step(&grads)?;
        losses.values()
    }

    /// Linear warm-up to `args.lr`, then a cosine decay to 10% of it at `total`.
    fn set_learning_rate(&mut self, step: usize, total: usize) {
        let peak = self.args.lr;
        let warmup = self.args.warmup_steps.max(1);
        let lr = if step < warmup {
            peak * (step + 1) as f64 / warmup as f64
        } else {
            let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
            peak * (0.1 + 0.9 * cosine)
        };
        self.decay.set_learning_rate(lr);
        self.no_decay.set_learning_rate(lr);
    }

    /// Writes `model.safetensors` into `out` (atomically: a temporary file, then a rename).
    ///
    /// # Errors
    /// [`Error::Candle`] when serialising fails, [`Error::Io`] when the rename fails.
    pub fn save(&self, out: &Path) -> Result<()> {
        let dtype = if self.args.f16 {
            DType::F16
        } else {
            DType::F32
        };
        let tensors: HashMap<String, Tensor> = self
            .varmap
            .data()
            .lock()
            .expect("var map lock is never poisoned")
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        let final_path = out.join(WEIGHTS_FILE);
        let partial = out.join(format!("{WEIGHTS_FILE}.partial"));
        candle_core::safetensors::save(&tensors, &partial)?;
        std::fs::rename(&partial, &final_path).map_err(|source| Error::Io {
            path: final_path,
            source,
        })
    }

    /// The model under training.
    pub fn model(&self) -> &Mplug {
        &self.model
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}

/// Overwrites every variable from `rng`: norms' weights 1, biases 0, the temperature 0.07,
/// everything else N(0, 0.02²). Variables are visited in name order, so the result depends
/// only on the seed.
fn initialise(varmap: &VarMap, rng: &mut StdRng) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .expect("var map lock is never poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let value = if name == TEMP_NAME {
            Tensor::full(TEMP_INIT as f32, shape, var.device())?
        } else if is_norm(name) && name.ends_with("weight") {
            Tensor::ones(shape, DType::F32, var.device())?
        } else if name.ends_with("bias") {
            Tensor::zeros(shape, DType::F32, var.device())?
        } else {
            let values: Vec<f32> = (0..shape.elem_count())
                .map(|_| normal(rng) * INIT_STD)
                .collect();
            Tensor::from_vec(values, shape, var.device())?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// Overwrites every variable with the tensor of the same name in the safetensors file at
/// `path` (any float dtype, converted to f32).
///
/// # Errors
/// [`Error::Checkpoint`] when the file cannot be read or holds tensors the model lacks,
/// [`Error::TensorShape`] when a shape differs (the model shape flags do not describe the
/// checkpoint), else [`Error::MissingTensor`] when a variable has no tensor; both name the
/// first offending tensor in name order. Nothing is overwritten unless every check passes.
pub fn load_checkpoint(varmap: &VarMap, path: &Path, device: &Device) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let data = varmap
        .data()
        .lock()
        .expect("var map lock is never poisoned");
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !data.contains_key(*k)).collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "tensors {extra:?} do not exist in the configured model; expected the model \
                 shape flags the checkpoint was trained with"
            ),
        });
    }
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mismatch = names.iter().find_map(|name| {
        let expected = data[*name].dims();
        let got = tensors.get(*name)?.dims();
        (got != expected).then(|| Error::TensorShape {
            path: path.to_path_buf(),
            name: (*name).clone(),
            got: got.to_vec(),
            expected: expected.to_vec(),
        })
    });
    if let Some(error) = mismatch {
        return Err(error);
    }

    if let Some(name) = names.iter().find(|name| !tensors.contains_key(**name)) {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            name: (*name).clone(),
            expected: data[*name].dims().to_vec(),
        });
    }

    for name in names {
        data[name].set(&tensors[name].to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Whether a variable belongs to a layer norm (BERT `LayerNorm`, CLIP `ln_*`, the adapter's).
fn is_norm(name: &str) -> bool {
    name.contains("LayerNorm") || name.contains("layer_norm") || name.contains(".ln_")
}

/// Variables that get weight decay (matrices, embeddings) and those that do not.
fn split_for_decay(varmap: &VarMap) -> (Vec<Var>, Vec<Var>) {
    let data = varmap
        .data()
        .lock()
        .expect("var map lock is never poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let (mut decayed, mut plain) = (Vec::new(), Vec::new());
    for name in names {
        let exempt = name == TEMP_NAME || name.ends_with("bias") || is_norm(name);
        if exempt { &mut plain } else { &mut decayed }.push(data[name].clone());
    }
    (decayed, plain)
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta}) {msg}",
    )
    .expect("the progress template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Updates the bar's message with the recent mean losses; prints a line every 50 steps when
/// the bar is hidden (output is not a terminal).
fn report_progress(bar: &ProgressBar, step: usize, history: &[[f32; 4]]) {
    let [itc, itm, cap, vqa] = recent_mean(history, 20);
    let message = format!("itc {itc:.3} itm {itm:.3} cap {cap:.3} vqa {vqa:.3}");
    if bar.is_hidden() && (step + 1).is_multiple_of(50) {
        eprintln!("step {} {message}", step + 1);
    }
    bar.set_message(message);
    bar.inc(1);
}

/// Mean of each term over the last `window` entries, ignoring NaN (absent) values.
fn recent_mean(history: &[[f32; 4]], window: usize) -> [f32; 4] {
    let recent = &history[history.len().saturating_sub(window)..];
    std::array::from_fn(|i| {
        let present: Vec<f32> = recent
            .iter()
            .map(|v| v[i])
            .filter(|v| !v.is_nan())
            .collect();
        if present.is_empty() {
            f32::NAN
        } else {
            present.iter().sum::<f32>() / present.len() as f32
        }
    })
}
