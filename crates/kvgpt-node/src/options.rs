//! Options as JavaScript passes them, and their conversion to the core's option types. Ranges
//! are checked by the core (`GenerateOptions::validate`), before any work starts.

use kvgpt::{Error, GenerateOptions, Model};
use napi_derive::napi;

/// Options of `generate` and `stream`. Omitted fields take the model's defaults
/// (its generation_config.json, else greedy).
#[napi(object)]
#[derive(Default)]
pub struct NativeGenerateOptions {
    /// New tokens to generate at most; integer in [0, 1048576]; default 50 (or the checkpoint's
    /// max_new_tokens). Generation also stops when the sequence fills n_positions.
    pub max_new_tokens: Option<f64>,
    /// 0 = greedy; > 0 samples at that temperature; range [0, 100]; default: the checkpoint's.
    pub temperature: Option<f64>,
    /// With sampling, keep the k most likely tokens; integer >= 0, 0 = off; default 50 (HF's).
    pub top_k: Option<f64>,
    /// With sampling, nucleus mass to keep; (0, 1], 1 = off; default 1.
    pub top_p: Option<f64>,
    /// HF's repetition penalty; (0, 100], 1 = off; default 1.
    pub repetition_penalty: Option<f64>,
    /// Seed of the sampler; integer in [0, 2^53 - 1]; default: random.
    pub seed: Option<f64>,
    /// Stop when the new text contains one of these; the text ends before it.
    pub stop: Option<Vec<String>>,
    /// Keep generating past the EOS token; default false.
    pub ignore_eos: Option<bool>,
    /// false recomputes the whole sequence each step (HF use_cache=False); default true.
    pub use_cache: Option<bool>,
    /// Each new token's log-probability and the k most likely alternatives, integer k in
    /// [0, 20]; from the model's logits before the repetition penalty, temperature, top-k and
    /// top-p. Default: none computed.
    pub logprobs: Option<f64>,
}

/// Options of `score`.
#[napi(object)]
#[derive(Default)]
pub struct NativeScoreOptions {
    /// Tokens one window holds; integer in [2, n_positions]; default n_positions.
    pub max_length: Option<f64>,
    /// Tokens between window starts; integer in [1, maxLength]; default maxLength.
    pub stride: Option<f64>,
    /// The k most likely tokens at each scored position; integer in [0, 20]; default 0.
    pub logprobs: Option<f64>,
    /// Put the BOS token before the text, so its first token is scored too; default false.
    pub add_bos: Option<bool>,
}

impl NativeScoreOptions {
    pub fn resolve(&self) -> kvgpt::Result<kvgpt::ScoreOptions> {
        let int = |name, v: Option<f64>| v.map(|v| whole(name, v, u32::MAX as f64).map(|v| v as usize)).transpose();
        Ok(kvgpt::ScoreOptions {
            max_length: int("maxLength", self.max_length)?,
            stride: int("stride", self.stride)?,
            logprobs: int("logprobs", self.logprobs)?.unwrap_or(0),
            add_bos: self.add_bos.unwrap_or(false),
        })
    }
}

/// A JS number that must be a whole number in `0..=max`.
pub(crate) fn whole(name: &'static str, v: f64, max: f64) -> kvgpt::Result<u64> {
    if v.is_finite() && v.fract() == 0.0 && (0.0..=max).contains(&v) {
        Ok(v as u64)
    } else {
        Err(Error::OptionOutOfRange { name, reason: format!("must be an integer in [0, {max}], got {v}") })
    }
}

impl NativeGenerateOptions {
    pub fn resolve(&self, model: &Model) -> kvgpt::Result<GenerateOptions> {
        let mut o = GenerateOptions::defaults_for(model);
        if let Some(v) = self.max_new_tokens {
            o.max_new_tokens = whole("maxNewTokens", v, kvgpt::engine::generate::MAX_NEW_TOKENS_LIMIT as f64)? as usize;
        }
        if let Some(v) = self.temperature {
            o.sampling.temperature = v;
        }
        if let Some(v) = self.top_k {
            o.sampling.top_k = whole("topK", v, u32::MAX as f64)? as usize;
        }
        if let Some(v) = self.top_p {
            o.sampling.top_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            o.sampling.repetition_penalty = v;
        }
        if let Some(v) = self.seed {
            o.sampling.seed = Some(whole("seed", v, 9007199254740991.0)?);
        }
        if let Some(v) = &self.stop {
            o.stop = v.clone();
        }
        if let Some(v) = self.ignore_eos {
            o.ignore_eos = v;
        }
        if let Some(v) = self.use_cache {
            o.use_cache = v;
        }
        if let Some(v) = self.logprobs {
            o.logprobs = Some(whole("logprobs", v, u32::MAX as f64)? as usize);
        }
        o.validate()?;
        Ok(o)
    }
}

/// Options of `load`.
#[napi(object)]
#[derive(Default)]
pub struct NativeLoadOptions {
    /// 'cpu' (default), 'cuda', or 'auto' (CUDA when this build and the machine have it).
    pub device: Option<String>,
    /// Weights dtype: 'f32' (default), 'f16', 'bf16' or 'q8_0'.
    pub dtype: Option<String>,
    /// Sequences the engine runs at once (generations and session feeds); more wait their turn,
    /// in order. Integer in [1, 65536]; default 32 on the CPU, 256 on CUDA.
    pub max_sequences: Option<f64>,
    /// Tokens one forward pass carries: one per decoding sequence, then prompt chunks while
    /// they fit. Integer in [maxSequences, 65536]; default 512 on the CPU, 8192 on CUDA.
    pub max_step_tokens: Option<f64>,
    /// Prompt tokens one sequence reads per step (longer prompts are read in chunks, so they do
    /// not stall the others). Integer in [1, maxStepTokens]; default 256 on the CPU, 512 on CUDA.
    pub prefill_chunk: Option<f64>,
}

/// Load options as the core takes them: the model's, and the engine's limits where given.
pub struct ParsedLoadOptions {
    pub load: kvgpt::LoadOptions,
    pub max_sequences: Option<usize>,
    pub max_step_tokens: Option<usize>,
    pub prefill_chunk: Option<usize>,
}

impl ParsedLoadOptions {
    /// The engine's limits on `device` (see `EngineOptions::resolve`).
    pub fn engine(&self, device: &kvgpt::candle_core::Device) -> kvgpt::Result<kvgpt::EngineOptions> {
        kvgpt::EngineOptions::resolve(device, self.max_sequences, self.max_step_tokens, self.prefill_chunk)
    }
}

impl NativeLoadOptions {
    /// The core's load options (CPU and f32 where omitted), checked before any work.
    pub fn parse(options: Option<Self>) -> napi::Result<ParsedLoadOptions> {
        use crate::error::IntoNapi;
        let o = options.unwrap_or_default();
        let limit = kvgpt::EngineOptions::LIMIT as f64;
        let int = |name, v: Option<f64>| v.map(|v| whole(name, v, limit).map(|v| v as usize)).transpose();
        let parsed = ParsedLoadOptions {
            load: kvgpt::LoadOptions {
                device: o.device.as_deref().map(kvgpt::DeviceKind::parse).transpose().napi()?.unwrap_or_default(),
                dtype: o.dtype.as_deref().map(kvgpt::WeightDType::parse).transpose().napi()?.unwrap_or_default(),
                hub: None,
            },
            max_sequences: int("maxSequences", o.max_sequences).napi()?,
            max_step_tokens: int("maxStepTokens", o.max_step_tokens).napi()?,
            prefill_chunk: int("prefillChunk", o.prefill_chunk).napi()?,
        };
        // The limits' ranges and the given ones against each other, before any work.
        parsed.engine(&kvgpt::candle_core::Device::Cpu).napi()?;
        Ok(parsed)
    }
}
