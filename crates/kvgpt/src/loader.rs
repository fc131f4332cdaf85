//! `Model`: what `load` returns and every generation shares (behind an `Arc`): the GPT-2
//! weights, the tokenizer (if the directory has one), the generation defaults, and facts
//! about the model (`ModelInfo`).

use crate::config::{GenerationConfig, Gpt2Config};
use crate::error::{Error, Result};
use crate::hub::{self, HubSettings};
use crate::model::Gpt2;
use crate::tokenizer::Tokenizer;
use crate::weights::{self, WeightsSource};
use candle_core::Device;
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

    fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
            Self::Cuda if !candle_core::utils::cuda_is_available() => Err(Error::Device(
                "this build of kvgpt has no CUDA support; use device 'cpu' or 'auto', or install the CUDA build".into(),
            )),
            Self::Cuda => Device::new_cuda(0).map_err(|e| Error::Device(format!("cannot open CUDA device 0: {e}"))),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: DeviceKind,
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
    /// KV-cache bytes for one position of one sequence: 2 x n_layer x n_embd x 4 (f32).
    pub cache_bytes_per_token: usize,
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
        let device = opts.device.open()?;
        let settings = opts.hub.clone().unwrap_or_else(HubSettings::from_env);
        let dir = hub::resolve(model, &settings)?;
        Self::load_dir(&dir, &device, start)
    }

    fn load_dir(dir: &Path, device: &Device, start: Instant) -> Result<Self> {
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let generation = GenerationConfig::from_dir(dir)?;
        let source = WeightsSource::find(dir)?;
        let tensors = weights::load_tensors(&source, device)?;
        let gpt2 = Gpt2::from_tensors(config.clone(), tensors, device)?;
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
        let info = ModelInfo {
            parameter_count: config.parameter_count(),
            cache_bytes_per_token: config.kv_cache_bytes(1, 1, gpt2.dtype().size_in_bytes()),
            config,
            dir: dir.to_path_buf(),
            weights_file: source.path().to_path_buf(),
            device: if device.is_cuda() { "cuda".into() } else { "cpu".into() },
            dtype: format!("{:?}", gpt2.dtype()).to_lowercase(),
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        };
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
