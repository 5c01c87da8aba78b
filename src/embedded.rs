//! The built-in default model: the tiny mPLUG trained on easy-VQA (`models/tiny-easyvqa/`,
//! see its model card), compiled into the binary so that the service runs on a machine
//! without any model files.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Name the built-in model's files get inside a data directory.
const DIR_NAME: &str = "builtin-model";

/// The files of the built-in model, as (file name, content).
const FILES: [(&str, &[u8]); 3] = [
    (
        "model.safetensors",
        include_bytes!("../models/tiny-easyvqa/model.safetensors"),
    ),
    (
        "mplug.json",
        include_bytes!("../models/tiny-easyvqa/mplug.json"),
    ),
    (
        "vocab.txt",
        include_bytes!("../models/tiny-easyvqa/vocab.txt"),
    ),
];

/// Paths of the built-in model's checkpoint and config once written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinModelFiles {
    /// The safetensors checkpoint.
    pub checkpoint: PathBuf,
    /// The model config, with `vocab.txt` beside it.
    pub config: PathBuf,
}

/// Writes the built-in model's files under `data_dir/builtin-model/<content hash>/` unless
/// identical files are already there, and returns their paths. Files are written to a
/// temporary name and renamed, so a concurrent or interrupted call never leaves a torn file.
///
/// Errors with [`Error::Io`] naming the file that could not be written.
pub fn materialise(data_dir: &Path) -> Result<BuiltinModelFiles> {
    let dir = data_dir.join(DIR_NAME).join(content_tag());
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;

    for (name, bytes) in FILES {
        write_if_different(&dir.join(name), bytes)?;
    }

    Ok(BuiltinModelFiles {
        checkpoint: dir.join(FILES[0].0),
        config: dir.join(FILES[1].0),
    })
}

/// A short hash of every built-in file, so that two builds with different models never share
/// a folder.
fn content_tag() -> String {
    let mut hasher = blake3::Hasher::new();
    for (name, bytes) in FILES {
        hasher.update(name.as_bytes());
        hasher.update(bytes);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

fn write_if_different(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|existing| existing == bytes) {
        return Ok(());
    }

    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&temporary, bytes).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialised_files_load_as_a_config_and_are_rewritten_when_damaged() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let files = materialise(dir.path()).expect("first write");
        let config = crate::model::MplugConfig::from_file(&files.config).expect("config parses");
        assert!(config.tokenizer.vocab_file.exists());

        std::fs::write(&files.checkpoint, b"torn").expect("damage the checkpoint");
        let again = materialise(dir.path()).expect("second write");
        assert_eq!(again, files);
        let restored = std::fs::read(&files.checkpoint).expect("read back");
        assert_eq!(restored, FILES[0].1);
    }
}
