//! Reads a checkpoint's tensors: `model.safetensors`, a sharded `model.safetensors.index.json`,
//! or a legacy `pytorch_model.bin`. Names come back without the `transformer.` prefix (both key
//! styles load), and the causal-mask buffers `attn.bias` / `attn.masked_bias` are dropped.
//! Hostile or corrupt files are refused before anything large is allocated: safetensors checks
//! its header against the file; a `.bin`'s pickle must name only tensor-rebuild globals, and each
//! tensor must fit in the bytes its storage entry holds.

mod pickle_scan;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which weights file a directory has, in the order they are looked for.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSource {
    Safetensors(PathBuf),
    ShardedSafetensors { index: PathBuf, shards: Vec<PathBuf> },
    PytorchBin(PathBuf),
}

pub const WEIGHT_FILES: [&str; 3] =
    ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"];

impl WeightsSource {
    pub fn find(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHT_FILES[0]);
        if single.is_file() {
            return Ok(Self::Safetensors(single));
        }
        let index = dir.join(WEIGHT_FILES[1]);
        if index.is_file() {
            let shards = shard_files(&index)?;
            return Ok(Self::ShardedSafetensors { index, shards });
        }
        let bin = dir.join(WEIGHT_FILES[2]);
        if bin.is_file() {
            return Ok(Self::PytorchBin(bin));
        }
        Err(Error::FileNotFound {
            what: "weights",
            path: dir.to_path_buf(),
            hint: format!("expected one of {}", WEIGHT_FILES.join(", ")),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(p) | Self::PytorchBin(p) => p,
            Self::ShardedSafetensors { index, .. } => index,
        }
    }
}

/// The shard file names of a `model.safetensors.index.json`, each checked to be a plain file
/// name inside the same directory (no `..`, no absolute paths).
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::invalid_file(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::invalid_file(index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::invalid_file(index, "no \"weight_map\" object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for value in map.values() {
        let name = value
            .as_str()
            .ok_or_else(|| Error::invalid_file(index, "weight_map values must be file names"))?;
        let plain = Path::new(name).file_name().map(|f| f == name).unwrap_or(false);
        if !plain {
            return Err(Error::invalid_file(index, format!("shard {name:?} is not a file name in this directory")));
        }
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    for f in &files {
        if !f.is_file() {
            return Err(Error::FileNotFound {
                what: "weights shard",
                path: f.clone(),
                hint: format!("listed in {}", index.display()),
            });
        }
    }
    Ok(files)
}

/// Normalizes a checkpoint key to the `h.0.attn.c_attn.weight` style, or None for buffers
/// and heads that are not part of the language model.
fn normalize_key(key: &str) -> Option<String> {
    let key = key.strip_prefix("transformer.").unwrap_or(key);
    if key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias") {
        return None; // causal-mask buffers, recomputed on the fly
    }
    Some(key.to_string())
}

/// Loads every tensor of the checkpoint as f32 on `device`.
pub fn load_tensors(source: &WeightsSource, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut put = |name: &str, t: Tensor, path: &Path| -> Result<()> {
        if let Some(key) = normalize_key(name) {
            let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(device));
            out.insert(key, t.map_err(|e| Error::invalid_file(path, e))?);
        }
        Ok(())
    };
    match source {
        WeightsSource::Safetensors(path) => read_safetensors(path, &mut put)?,
        WeightsSource::ShardedSafetensors { shards, .. } => {
            for path in shards {
                read_safetensors(path, &mut put)?
            }
        }
        WeightsSource::PytorchBin(path) => {
            let entries = check_pytorch_zip(path)?;
            let pth = candle_core::pickle::PthTensors::new(path, None)
                .map_err(|e| Error::invalid_file(path, format!("not a readable PyTorch checkpoint: {e}")))?;
            check_extents(path, &pth, &entries)?;
            let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
            names.sort();
            for name in names {
                let t = pth
                    .get(&name)
                    .map_err(|e| Error::invalid_file(path, format!("tensor {name}: {e}")))?
                    .ok_or_else(|| Error::invalid_file(path, format!("tensor {name} vanished")))?;
                put(&name, t, path)?;
            }
        }
    }
    Ok(out)
}

fn read_safetensors(
    path: &Path,
    put: &mut impl FnMut(&str, Tensor, &Path) -> Result<()>,
) -> Result<()> {
    // SAFETY: the map is read-only and dropped before this function returns; the tensors are
    // copied out. safetensors checks the header against the file length before any read.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| Error::invalid_file(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| Error::invalid_file(path, format!("tensor {name}: {e}")))?;
        put(&name, t, path)?;
    }
    Ok(())
}

/// A `data.pkl` larger than this is not a state dict's (GPT-2 XL's is well under 1 MiB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Opens a PyTorch zip checkpoint (`torch.save` since 1.6), scans every `*data.pkl` that candle
/// would read for globals outside the tensor-rebuild allow-list, and returns the size of each
/// entry (what a tensor's storage can hold).
fn check_pytorch_zip(path: &Path) -> Result<HashMap<String, u64>> {
    let unreadable = |e: &dyn std::fmt::Display| Error::invalid_file(path, format!("not a readable PyTorch checkpoint: {e}"));
    let file = std::fs::File::open(path).map_err(|e| unreadable(&e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| unreadable(&e))?;
    let mut entries = HashMap::new();
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| unreadable(&e))?;
        let name = entry.name().map_err(|e| unreadable(&e))?.into_owned();
        entries.insert(name, entry.size());
    }
    for (name, &size) in &entries {
        if !name.ends_with("data.pkl") {
            continue;
        }
        if size > MAX_PICKLE_BYTES {
            return Err(Error::invalid_file(path, format!("{name} is {size} bytes, too large for a state dict's pickle")));
        }
        let mut data = Vec::new();
        let entry = zip.by_name(name).map_err(|e| unreadable(&e))?;
        std::io::Read::read_to_end(&mut std::io::Read::take(entry, MAX_PICKLE_BYTES + 1), &mut data)
            .map_err(|e| unreadable(&e))?;
        pickle_scan::scan(&data).map_err(|r| Error::invalid_file(path, format!("{name}: {r}")))?;
    }
    Ok(entries)
}

/// Each tensor must fit in its storage entry (and in the file), so a shape claiming gigabytes
/// is an error here rather than an allocation in candle's reader.
fn check_extents(path: &Path, pth: &candle_core::pickle::PthTensors, entries: &HashMap<String, u64>) -> Result<()> {
    let file_len = std::fs::metadata(path).map_err(|e| Error::invalid_file(path, e))?.len();
    for (name, info) in pth.tensor_infos() {
        let layout = &info.layout;
        let needed = layout
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes() as u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|bytes| bytes.checked_add(layout.start_offset() as u64));
        let held = entries.get(&info.path).map(|&size| size.min(file_len));
        match (needed, held) {
            (Some(needed), Some(held)) if needed <= held => {}
            (_, None) => {
                return Err(Error::invalid_file(path, format!("tensor {name}: its storage {} is not in the archive", info.path)))
            }
            (needed, Some(held)) => {
                let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
                return Err(Error::invalid_file(
                    path,
                    format!("tensor {name} of shape {:?} needs {needed} bytes but its storage holds {held} (corrupt checkpoint)", layout.dims()),
                ));
            }
        }
    }
    Ok(())
}
