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
            o.max_new_tokens = whole("maxNewTokens", v, kvgpt::generate::MAX_NEW_TOKENS_LIMIT as f64)? as usize;
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
}

impl NativeLoadOptions {
    /// The core's load options (CPU and f32 where omitted), checked before any work.
    pub fn parse(options: Option<Self>) -> napi::Result<kvgpt::LoadOptions> {
        use crate::error::IntoNapi;
        let o = options.unwrap_or_default();
        Ok(kvgpt::LoadOptions {
            device: o.device.as_deref().map(kvgpt::DeviceKind::parse).transpose().napi()?.unwrap_or_default(),
            dtype: o.dtype.as_deref().map(kvgpt::WeightDType::parse).transpose().napi()?.unwrap_or_default(),
            hub: None,
        })
    }
}
