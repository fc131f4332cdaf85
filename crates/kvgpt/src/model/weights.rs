//! Reads a checkpoint's tensors, one at a time as the model is built (`TensorSource`):
//! `model.safetensors`, a sharded `model.safetensors.index.json`, or a legacy
//! `pytorch_model.bin`. Names come back without the `transformer.` prefix (both key styles
//! load), and the causal-mask buffers `attn.bias` / `attn.masked_bias` are dropped.
//! Hostile or corrupt files are refused before anything large is allocated: each safetensors
//! header is checked against its file; a `.bin`'s pickle must name only tensor-rebuild globals, and each
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

/// Where a model's tensors come from as it is built: each is taken by name (the
/// `h.0.attn.c_attn.weight` style), as f32 on the load's device, and converted to the load's
/// dtype before the next is read, so a load holds the converted weights and one f32 tensor
/// rather than the whole f32 checkpoint (GPT-2 small in q8_0: 532 MB at peak when every f32
/// tensor was read first).
pub trait TensorSource {
    /// Takes tensor `name`, or None when the checkpoint has none of that name.
    fn take(&mut self, name: &str) -> Result<Option<Tensor>>;
    /// The names not taken yet.
    fn remaining(&self) -> Vec<String>;
}

impl TensorSource for HashMap<String, Tensor> {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.remove(name))
    }
    fn remaining(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// Opens the checkpoint's tensors for reading one at a time. Every header is read and checked
/// here (each tensor's bytes in its file; a `.bin`'s pickle and storage sizes), before any
/// tensor is.
pub fn open_tensors(source: &WeightsSource, device: &Device) -> Result<Box<dyn TensorSource>> {
    match source {
        WeightsSource::Safetensors(path) => SafetensorsSource::open(std::slice::from_ref(path), device),
        WeightsSource::ShardedSafetensors { shards, .. } => SafetensorsSource::open(shards, device),
        WeightsSource::PytorchBin(path) => {
            let entries = check_pytorch_zip(path)?;
            let pth = candle_core::pickle::PthTensors::new(path, None)
                .map_err(|e| Error::invalid_file(path, format!("not a readable PyTorch checkpoint: {e}")))?;
            check_extents(path, &pth, &entries)?;
            let names = pth.tensor_infos().keys().filter_map(|k| normalize_key(k).map(|n| (n, k.clone()))).collect();
            Ok(Box::new(PthSource { path: path.clone(), pth, names, device: device.clone() }))
        }
    }
}

/// As the model wants it: f32, on its device.
fn finish(t: Tensor, device: &Device, path: &Path) -> Result<Tensor> {
    t.to_dtype(DType::F32).and_then(|t| t.to_device(device)).map_err(|e| Error::invalid_file(path, e))
}

struct PthSource {
    path: PathBuf,
    pth: candle_core::pickle::PthTensors,
    /// Normalized key -> the checkpoint's own.
    names: HashMap<String, String>,
    device: Device,
}

impl TensorSource for PthSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(original) = self.names.remove(name) else { return Ok(None) };
        let t = self
            .pth
            .get(&original)
            .map_err(|e| Error::invalid_file(&self.path, format!("tensor {original}: {e}")))?
            .ok_or_else(|| Error::invalid_file(&self.path, format!("tensor {original} vanished")))?;
        finish(t, &self.device, &self.path).map(Some)
    }
    fn remaining(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }
}

/// The safetensors header's size limit (the format's own: 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(serde::Deserialize)]
struct TensorInfo {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

struct Entry {
    file: usize,
    /// The file's offset of its data section.
    data_start: u64,
    original: String,
    info: TensorInfo,
}

/// Safetensors files read with plain reads, a tensor at a time (not memory-mapped: a map's
/// pages count in the process's RSS once touched, and loading GPT-2 small through one peaked
/// at the file's size twice, 997 MB).
struct SafetensorsSource {
    files: Vec<(PathBuf, std::fs::File)>,
    entries: HashMap<String, Entry>,
    device: Device,
}

impl SafetensorsSource {
    /// Reads and checks each file's header: every tensor's bytes must lie in the file and
    /// match its dtype and shape, before anything large is allocated.
    fn open(paths: &[PathBuf], device: &Device) -> Result<Box<dyn TensorSource>> {
        use std::io::Read;
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for path in paths {
            let invalid = |what: String| Error::invalid_file(path, format!("not a valid safetensors file: {what}"));
            let mut file = std::fs::File::open(path).map_err(|e| Error::invalid_file(path, e))?;
            let file_len = file.metadata().map_err(|e| Error::invalid_file(path, e))?.len();
            if file_len < 8 {
                return Err(invalid(format!("header too small: the file has {file_len} bytes")));
            }
            let mut n = [0u8; 8];
            file.read_exact(&mut n).map_err(|e| invalid(format!("header unreadable ({e})")))?;
            let header_len = u64::from_le_bytes(n);
            if header_len > MAX_HEADER_BYTES {
                return Err(invalid(format!("header too large: {header_len} bytes, over the format's {MAX_HEADER_BYTES}")));
            }
            if header_len > file_len - 8 {
                return Err(invalid(format!("invalid header length: {header_len} bytes in a file of {file_len}")));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header).map_err(|e| invalid(format!("header unreadable ({e})")))?;
            let mut tensors: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| invalid(format!("invalid JSON in header ({e})")))?;
            tensors.remove("__metadata__");
            let data_start = 8 + header_len;
            let data_len = file_len - data_start;
            for (name, value) in tensors {
                let info: TensorInfo = serde_json::from_value(value).map_err(|e| invalid(format!("tensor {name}: {e}")))?;
                let (begin, end) = info.data_offsets;
                let numel = info.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
                let bytes = numel.and_then(|n| n.checked_mul(info.dtype.bitsize() as u64)).map(|bits| bits.div_ceil(8));
                if begin > end || end > data_len || bytes != Some(end - begin) {
                    return Err(invalid(format!(
                        "incomplete metadata: tensor {name} claims bytes {begin}..{end} for shape {:?} of {:?}, and the file has {data_len} bytes of data",
                        info.shape, info.dtype
                    )));
                }
                if let Some(key) = normalize_key(&name) {
                    entries.insert(key, Entry { file: files.len(), data_start, original: name, info });
                }
            }
            files.push((path.clone(), file));
        }
        Ok(Box::new(Self { files, entries, device: device.clone() }))
    }
}

impl TensorSource for SafetensorsSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(Entry { file, data_start, original, info }) = self.entries.remove(name) else { return Ok(None) };
        let (path, file) = &mut self.files[file];
        let path: &Path = path;
        let invalid = |what: String| Error::invalid_file(path, format!("not a valid safetensors file: tensor {original}: {what}"));
        let (begin, end) = info.data_offsets;
        file.seek(SeekFrom::Start(data_start + begin)).map_err(|e| invalid(e.to_string()))?;
        let t = if info.dtype == safetensors::Dtype::F32 {
            // Straight into the tensor's own buffer, a MiB at a time.
            let mut values = Vec::with_capacity(((end - begin) / 4) as usize);
            let mut chunk = vec![0u8; 1 << 20];
            let mut left = (end - begin) as usize;
            while left > 0 {
                let part = &mut chunk[..left.min(1 << 20)];
                file.read_exact(part).map_err(|e| invalid(e.to_string()))?;
                values.extend(part.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                left -= part.len();
            }
            Tensor::from_vec(values, info.shape, &Device::Cpu)
        } else {
            use safetensors::Dtype as S;
            let dtype = match info.dtype {
                S::F16 => DType::F16,
                S::BF16 => DType::BF16,
                S::F64 => DType::F64,
                S::U8 => DType::U8,
                S::U32 => DType::U32,
                S::I64 => DType::I64,
                other => return Err(invalid(format!("dtype {other:?} is not one kvgpt reads"))),
            };
            let mut bytes = vec![0u8; (end - begin) as usize];
            file.read_exact(&mut bytes).map_err(|e| invalid(e.to_string()))?;
            Tensor::from_raw_buffer(&bytes, dtype, &info.shape, &Device::Cpu)
        }
        .map_err(|e| invalid(e.to_string()))?;
        finish(t, &self.device, path).map(Some)
    }
    fn remaining(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
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
