//! `Model`: what `load` returns and every generation shares (behind an `Arc`): the GPT-2
//! weights, the tokenizer (if the directory has one), the generation defaults, and facts
//! about the model (`ModelInfo`).

use crate::model::config::{GenerationConfig, Gpt2Config};
use crate::error::{Error, Result};
use crate::hub::{self, HubSettings};
use crate::model::gpt2::Gpt2;
use crate::tokenizer::Tokenizer;
use crate::model::weights::{self, WeightsSource};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    /// CUDA when this build has it and a GPU is present, else CPU.
    Auto,
}

impl DeviceKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            other => Err(Error::range("device", format!("must be 'cpu', 'cuda' or 'auto', got {other:?}"))),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // dtype matters on CUDA only
    fn open(self, dtype: WeightDType) -> Result<Device> {
        let device = match self {
            Self::Cpu => return Ok(Device::Cpu),
            Self::Auto => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
            Self::Cuda if !candle_core::utils::cuda_is_available() => {
                return Err(Error::Device(
                    "this build of kvgpt has no CUDA support; use device 'cpu' or 'auto', or install the CUDA build".into(),
                ))
            }
            Self::Cuda => Device::new_cuda(0).map_err(|e| Error::Device(format!("cannot open CUDA device 0: {e}")))?,
        };
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &device {
            // A model runs all its work on its device's one stream (the engine thread launches
            // every step; loading happens before), so cudarc's cross-stream events (created with
            // every allocation and recorded at every kernel argument) only cost host time.
            // SAFETY: no tensor of this device is used on another stream.
            unsafe { d.disable_event_tracking() };
            // q8_0's products are machine code for the build's GPU (see cuda::compute_capability);
            // candle's portable fallback gave wrong ids on an H200 with a build for 8.0 too
            // (bench/gpu/NOTES.md, run 14), so on any other GPU q8_0 is refused, not wrong.
            if dtype == WeightDType::Q8_0 {
                let (major, minor) = crate::cuda::compute_capability(d)?;
                if !machine_code_fits(crate::cuda::BUILD_COMPUTE_CAP, major, minor)? {
                    if self == Self::Auto {
                        return Ok(Device::Cpu);
                    }
                    return Err(Error::Device(format!(
                        "dtype 'q8_0' on this GPU (compute capability {major}.{minor}) needs a CUDA build for it, and this one's q8_0 kernels are for {}: use dtype 'f16' or 'bf16' on it, 'q8_0' on the CPU, or build with CUDA_COMPUTE_CAP={major}{minor} (scripts/build-cuda.sh)",
                        crate::cuda::BUILD_COMPUTE_CAP
                    )));
                }
            }
        }
        Ok(device)
    }
}

/// Whether machine code built for compute capability `build` ("80", "86", "90", as
/// CUDA_COMPUTE_CAP) runs on a GPU of capability major.minor: sm_XY runs on XZ for Z >= Y; from
/// 9.0 on candle builds it arch-specific (sm_90a), which runs on that capability alone.
pub fn machine_code_fits(build: &str, major: i32, minor: i32) -> Result<bool> {
    let digits: String = build.chars().take_while(|c| c.is_ascii_digit()).collect();
    let cap: i32 = digits.parse().map_err(|_| Error::internal(format!("CUDA_COMPUTE_CAP {build:?} at build time")))?;
    let (b_major, b_minor) = (cap / 10, cap % 10);
    Ok(if cap >= 90 { (major, minor) == (b_major, b_minor) } else { major == b_major && minor >= b_minor })
}

/// The dtype the weights are held in. Checkpoints load as f32 and are converted once, at load.
/// `F16`/`Bf16`: weights, activations and the KV cache in that dtype; logits come back as f32.
/// `Q8_0`: the linear layers' weights quantized to ggml's q8_0 (blocks of 32 int8 with an f16
/// scale, 8.5 bits a weight) through candle's quantized matmul; layer norms, biases,
/// activations and the KV cache stay f32, and embeddings too but on the CPU, where every
/// packed dtype looks them up from an f16 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDType {
    #[default]
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl WeightDType {
    pub const NAMES: &'static str = "'f32', 'f16', 'bf16' or 'q8_0'";

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(Error::range("dtype", format!("must be {}, got {other:?}", Self::NAMES))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The dtype of activations and of the KV cache: f32 on the CPU for every weight dtype
    /// (`packed` widens the weights in its kernels); elsewhere f16/bf16 models compute in
    /// their dtype.
    pub fn activations(self, device: &Device) -> DType {
        match self {
            _ if device.is_cpu() => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::F32 | Self::Q8_0 => DType::F32,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: DeviceKind,
    pub dtype: WeightDType,
    /// Hub cache and offline mode; None reads them from the environment.
    pub hub: Option<HubSettings>,
}

/// Facts about a loaded model, for `model.info`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub config: Gpt2Config,
    pub dir: PathBuf,
    pub weights_file: PathBuf,
    pub parameter_count: usize,
    /// KV-cache bytes for one position of one sequence: 2 x n_layer x n_embd x bytes per element
    /// of the cache's dtype (4 for f32 and q8_0 models, 2 for f16/bf16).
    pub cache_bytes_per_token: usize,
    /// Bytes of weights one decode step reads (`Gpt2::step_weight_bytes`): what sets its
    /// memory-bandwidth floor.
    pub step_weight_bytes: usize,
    pub device: String,
    pub dtype: String,
    pub load_ms: f64,
}

pub struct Model {
    pub(crate) gpt2: Gpt2,
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) generation: GenerationConfig,
    info: ModelInfo,
}

impl Model {
    /// Loads a model directory or hub id (see `hub::resolve`).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let device = opts.device.open(opts.dtype)?;
        let settings = opts.hub.clone().unwrap_or_else(HubSettings::from_env);
        let dir = hub::resolve(model, &settings)?;
        Self::load_dir(&dir, &device, opts.dtype, start)
    }

    /// A model of `config`'s shapes with seeded random weights (uniform, std 0.02; layer norms
    /// 1 and 0) and no tokenizer: for benchmarks, whose timings do not depend on the weights.
    /// `opts.hub` is not used.
    pub fn random(config: Gpt2Config, seed: u64, opts: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let device = opts.device.open(opts.dtype)?;
        let tensors = random_tensors(&config, seed, &device)?;
        let gpt2 = Gpt2::from_tensors(config, tensors, &device, opts.dtype)?;
        let info = ModelInfo::new(&gpt2, PathBuf::new(), PathBuf::new(), start);
        Ok(Self { gpt2, tokenizer: None, generation: GenerationConfig::default(), info })
    }

    fn load_dir(dir: &Path, device: &Device, dtype: WeightDType, start: Instant) -> Result<Self> {
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let generation = GenerationConfig::from_dir(dir)?;
        let source = WeightsSource::find(dir)?;
        let mut tensors = weights::open_tensors(&source, device)?;
        let gpt2 = Gpt2::from_source(config.clone(), tensors.as_mut(), device, dtype)?;
        let tokenizer = match Tokenizer::from_dir(dir) {
            Ok(t) => Some(t),
            Err(Error::FileNotFound { .. }) => None, // ids-only use stays possible
            Err(e) => return Err(e),
        };
        if let Some(t) = &tokenizer {
            if t.vocab_size() > config.vocab_size {
                return Err(Error::WeightsMismatch(format!(
                    "the tokenizer has {} tokens but the model's vocab_size is {}",
                    t.vocab_size(),
                    config.vocab_size
                )));
            }
        }
        let info = ModelInfo::new(&gpt2, dir.to_path_buf(), source.path().to_path_buf(), start);
        Ok(Self { gpt2, tokenizer, generation, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn config(&self) -> &Gpt2Config {
        self.gpt2.config()
    }

    pub fn gpt2(&self) -> &Gpt2 {
        &self.gpt2
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer files (tokenizer.json, vocab.json + merges.txt, or vocab.txt); pass token ids instead of text",
                self.info.dir.display()
            ))
        })
    }

    /// Ids of `text` as generation feeds them (no special tokens added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer()?.encode(text, false)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        self.tokenizer()?.decode(ids, false)
    }

    /// Every id must index the embedding table.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.config().vocab_size;
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(Error::InvalidInput(format!(
                "token id {id} at index {i} is outside the vocabulary (ids are 0..{v})"
            )));
        }
        Ok(())
    }
}

impl ModelInfo {
    fn new(gpt2: &Gpt2, dir: PathBuf, weights_file: PathBuf, start: Instant) -> Self {
        let config = gpt2.config().clone();
        Self {
            parameter_count: config.parameter_count(),
            cache_bytes_per_token: config.kv_cache_bytes(1, 1, gpt2.cache_dtype().size_in_bytes()),
            step_weight_bytes: gpt2.step_weight_bytes(),
            config,
            dir,
            weights_file,
            device: if gpt2.device().is_cuda() { "cuda".into() } else { "cpu".into() },
            dtype: gpt2.weight_dtype().as_str().into(),
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// Checkpoint-named tensors in HF's layout (Conv1D weights as (in, out)) with random values.
fn random_tensors(cfg: &Gpt2Config, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let half_width = 0.02 * 3f32.sqrt(); // uniform(-a, a) has std a / sqrt(3)
    let mut random = |shape: &[usize]| -> Result<Tensor> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * half_width).collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    };
    let (c, i, v) = (cfg.n_embd, cfg.n_inner, cfg.vocab_size);
    let mut map = HashMap::new();
    map.insert("wte.weight".to_string(), random(&[v, c])?);
    map.insert("wpe.weight".to_string(), random(&[cfg.n_positions, c])?);
    let mut norms = vec!["ln_f".to_string()];
    for l in 0..cfg.n_layer {
        for (name, n_in, n_out) in
            [("attn.c_attn", c, 3 * c), ("attn.c_proj", c, c), ("mlp.c_fc", c, i), ("mlp.c_proj", i, c)]
        {
            map.insert(format!("h.{l}.{name}.weight"), random(&[n_in, n_out])?);
            map.insert(format!("h.{l}.{name}.bias"), random(&[n_out])?);
        }
        norms.push(format!("h.{l}.ln_1"));
        norms.push(format!("h.{l}.ln_2"));
    }
    for norm in norms {
        map.insert(format!("{norm}.weight"), Tensor::ones(c, DType::F32, device)?);
        map.insert(format!("{norm}.bias"), Tensor::zeros(c, DType::F32, device)?);
    }
    if !cfg.tie_word_embeddings {
        map.insert("lm_head.weight".to_string(), random(&[v, c])?);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::machine_code_fits;

    #[test]
    fn machine_code_runs_on_its_major_version_from_its_minor_up_and_sm_90a_on_9_0_alone() {
        let fits = |build, major, minor| machine_code_fits(build, major, minor).unwrap();
        // A build for 8.0: A100 (8.0), A10/RTX 30 (8.6), L4/RTX 40 (8.9); not Hopper or Volta.
        assert!(fits("80", 8, 0) && fits("80", 8, 6) && fits("80", 8, 9));
        assert!(!fits("80", 9, 0) && !fits("80", 7, 5) && !fits("80", 10, 0));
        assert!(fits("86", 8, 9) && !fits("86", 8, 0));
        // 9.0 and later are arch-specific (sm_90a): H100/H200 only.
        assert!(fits("90", 9, 0) && fits("90a", 9, 0));
        assert!(!fits("90", 8, 9) && !fits("90", 10, 0) && !fits("90", 9, 1));
        assert!(machine_code_fits("", 8, 0).is_err());
    }
}
