//! Checkpoint reading: AliceMind `.pth` (`{'model': …}` or `{'module': …}`), ModelScope
//! `pytorch_model.bin` (keys prefixed `model.`), and `.safetensors`, told apart by content.
//!
//! Keys the model never uses (momentum copies, queues, buffers, the CLIP text tower and
//! projection, dead fusion layers, tied duplicates) are dropped by [`is_ignored`]. The tensors
//! that remain are served to the model through a [`VarBuilder`] backend that records which
//! names were consumed and turns a missing or misshapen tensor into an error naming the tensor,
//! the expected shape and the file.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::config::MplugConfig;
use crate::{Error, Result};

/// On-disk checkpoint layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A torch zip archive (`torch.save` since torch 1.6): `.pth` or `pytorch_model.bin`.
    TorchZip,
    /// A safetensors file.
    Safetensors,
}

/// Detects the layout from the first bytes of the file. Errors with [`Error::Checkpoint`] for
/// anything else (including the pre-1.6 torch pickle format).
pub fn sniff_format(path: &Path) -> Result<CheckpointFormat> {
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let n = file.read(&mut head).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if n >= 4 && head[..4] == *b"PK\x03\x04" {
        return Ok(CheckpointFormat::TorchZip);
    }
    if n == 9 && head[8] == b'{' {
        return Ok(CheckpointFormat::Safetensors);
    }
    Err(Error::Checkpoint {
        path: path.to_path_buf(),
        reason: "not a torch zip archive or safetensors file (legacy torch pickles must be \
                 re-saved with torch >= 1.6)"
            .into(),
    })
}

/// Whether a (prefix-stripped) checkpoint key is never used by any task for this config.
pub fn is_ignored(name: &str, cfg: &MplugConfig) -> bool {
    is_ignored_always(name) || is_dead_fusion(name, cfg)
}

/// Keys no configuration uses: momentum copies, queues, buffers, `temp`, the CLIP text tower
/// and projection, and the LM head's tied duplicates.
pub fn is_ignored_always(name: &str) -> bool {
    let momentum = name.split('.').next().is_some_and(|m| m.ends_with("_m"));
    let buffers = name.ends_with("position_ids")
        || matches!(
            name,
            "temp" | "image_queue" | "text_queue" | "idx_queue" | "queue_ptr"
        );
    let clip_unused = (name.starts_with("visual_encoder.")
        && !name.starts_with("visual_encoder.visual."))
        || name == "visual_encoder.visual.proj";
    let tied = name.starts_with("text_decoder.cls.predictions.decoder.");
    momentum || buffers || clip_unused || tied
}

/// Fusion weights that exist in checkpoints but never run: the embeddings, layers below the
/// start layer, and the cross-attention of connected layers.
fn is_dead_fusion(name: &str, cfg: &MplugConfig) -> bool {
    if name.starts_with("fusion_encoder.embeddings.") {
        return true;
    }
    let Some(rest) = name.strip_prefix("fusion_encoder.encoder.layer.") else {
        return false;
    };
    let mut parts = rest.splitn(2, '.');
    let Some(i) = parts.next().and_then(|s| s.parse::<usize>().ok()) else {
        return false;
    };
    let start = cfg.fusion.start_layer();
    if i < start {
        return true;
    }
    let cross = parts
        .next()
        .is_some_and(|p| p.starts_with("crossattention."));
    cross && cfg.fusion.is_connected(i - start)
}

/// Strips the wrapper prefixes ModelScope and DDP add (`model.`, `module.`).
fn normalise_key(name: &str) -> &str {
    name.strip_prefix("model.")
        .or_else(|| name.strip_prefix("module."))
        .unwrap_or(name)
}

/// Tensors read from a checkpoint, by normalised name, and the names skipped.
pub type ReadTensors = (HashMap<String, Tensor>, Vec<String>);

/// Reads every float tensor of a checkpoint whose normalised name passes `keep`, in its stored
/// type; returns them with the names that were skipped (rejected by `keep`, or integer
/// buffers).
pub fn read_tensors(path: &Path, keep: impl Fn(&str) -> bool) -> Result<ReadTensors> {
    let fail = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = HashMap::new();
    let mut skipped = Vec::new();
    match sniff_format(path)? {
        CheckpointFormat::Safetensors => {
            let all = candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| fail(e.to_string()))?;
            for (name, t) in all {
                let key = normalise_key(&name).to_string();
                if t.dtype().is_float() && keep(&key) {
                    out.insert(key, t);
                } else {
                    skipped.push(key);
                }
            }
        }
        CheckpointFormat::TorchZip => {
            let pth = open_pth(path)?;
            for (name, info) in pth.tensor_infos() {
                let key = normalise_key(name).to_string();
                if !info.dtype.is_float() || !keep(&key) {
                    skipped.push(key);
                    continue;
                }
                let t = pth
                    .get(name)
                    .map_err(|e| fail(format!("tensor {name}: {e}")))?;
                if let Some(t) = t {
                    out.insert(key, t);
                }
            }
        }
    }
    Ok((out, skipped))
}

/// Opens a torch zip, looking for the state dict under `model`, then `module`, then the root.
fn open_pth(path: &Path) -> Result<candle_core::pickle::PthTensors> {
    let mut last = None;
    for key in [Some("model"), Some("module"), None] {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(p) if !p.tensor_infos().is_empty() => return Ok(p),
            Ok(_) => last = Some("no tensors found".to_string()),
            Err(e) => last = Some(e.to_string()),
        }
    }
    Err(Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!(
            "no state dict under 'model', 'module' or the root: {}",
            last.unwrap_or_default()
        ),
    })
}

/// What a load did with the checkpoint's names.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Names the model read.
    pub consumed: BTreeSet<String>,
    /// Names dropped on purpose ([`is_ignored`]).
    pub ignored: BTreeSet<String>,
    /// Names neither read nor ignored: modules of tasks that were not requested, or keys
    /// this port does not know.
    pub unused: BTreeSet<String>,
}

#[derive(Default)]
struct Tracker {
    consumed: BTreeSet<String>,
    problem: Option<Error>,
}

/// A [`SimpleBackend`] over named tensors (loaded or lazily produced) that records consumed
/// names and keeps the first missing/misshapen tensor as a structured error.
#[derive(Clone)]
pub struct TrackingBackend {
    source: Arc<dyn TensorSource>,
    path: PathBuf,
    tracker: Arc<Mutex<Tracker>>,
}

/// Where a [`TrackingBackend`] gets tensors from.
pub trait TensorSource: Send + Sync {
    /// The tensor's shape, if the name exists.
    fn shape(&self, name: &str) -> Option<Shape>;
    /// The tensor itself; called only for names whose shape matched.
    fn tensor(&self, name: &str) -> candle_core::Result<Tensor>;
}

impl TensorSource for HashMap<String, Tensor> {
    fn shape(&self, name: &str) -> Option<Shape> {
        self.get(name).map(|t| t.shape().clone())
    }

    fn tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })
    }
}

impl TrackingBackend {
    /// Wraps `source`, attributing errors to the file `path`.
    pub fn new(source: Arc<dyn TensorSource>, path: &Path) -> Self {
        Self {
            source,
            path: path.to_path_buf(),
            tracker: Arc::new(Mutex::new(Tracker::default())),
        }
    }

    /// A [`VarBuilder`] reading from this backend.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The structured error of the first failed lookup, if any.
    pub fn take_problem(&self) -> Option<Error> {
        self.tracker.lock().ok()?.problem.take()
    }

    /// Names consumed so far.
    pub fn consumed(&self) -> BTreeSet<String> {
        self.tracker
            .lock()
            .map(|t| t.consumed.clone())
            .unwrap_or_default()
    }

    fn record(&self, problem: Error) -> candle_core::Error {
        let msg = problem.to_string();
        if let Ok(mut t) = self.tracker.lock() {
            t.problem.get_or_insert(problem);
        }
        candle_core::Error::Msg(msg)
    }
}

impl SimpleBackend for TrackingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(shape) = self.source.shape(name) else {
            return Err(self.record(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
                expected: s.dims().to_vec(),
            }));
        };
        if shape != s {
            return Err(self.record(Error::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                got: shape.dims().to_vec(),
                expected: s.dims().to_vec(),
            }));
        }
        if let Ok(mut t) = self.tracker.lock() {
            t.consumed.insert(name.to_string());
        }
        self.source.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Ok(mut t) = self.tracker.lock() {
            t.consumed.insert(name.to_string());
        }
        self.source.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.shape(name).is_some()
    }
}
