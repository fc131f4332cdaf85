//! The work that runs on the libuv pool (loading a model, measuring the bandwidth) and the
//! objects a generation hands to JavaScript.

use crate::error::IntoNapi;
use crate::model::NativeModel;
use crate::options::ParsedLoadOptions;
use kvgpt::{Engine, Generation, Model};
use napi::threadsafe_function::ThreadsafeFunction;
use napi::{Env, Status, Task};
use napi_derive::napi;
use std::sync::Arc;

/// One streamed token and the text it completes (possibly empty).
#[napi(object)]
pub struct NativeTokenChunk {
    pub token: u32,
    pub text: String,
}

pub type TokenCallback = ThreadsafeFunction<NativeTokenChunk, (), NativeTokenChunk, Status, false>;

pub struct LoadTask {
    pub model: String,
    pub options: ParsedLoadOptions,
}

/// A loaded model with its engine started.
pub struct Started(Arc<Model>, Engine);

fn start(model: Model, options: &ParsedLoadOptions) -> napi::Result<Started> {
    let engine_options = options.engine(model.gpt2().device()).napi()?;
    let model = Arc::new(model);
    let engine = Engine::start(model.clone(), engine_options).napi()?;
    Ok(Started(model, engine))
}

impl Task for LoadTask {
    type Output = Started;
    type JsValue = NativeModel;

    fn compute(&mut self) -> napi::Result<Started> {
        start(Model::load(&self.model, &self.options.load).napi()?, &self.options)
    }

    fn resolve(&mut self, _env: Env, Started(model, engine): Started) -> napi::Result<NativeModel> {
        Ok(NativeModel::new(model, engine))
    }
}

/// The STREAM triad of `kvgpt::bandwidth` (arrays of `mib` MiB, best of `repeats`).
pub struct BandwidthTask {
    pub mib: usize,
    pub repeats: usize,
}

impl Task for BandwidthTask {
    type Output = f64;
    type JsValue = f64;

    fn compute(&mut self) -> napi::Result<f64> {
        Ok(kvgpt::cpu::bandwidth::triad(self.mib, self.repeats))
    }

    fn resolve(&mut self, _env: Env, output: f64) -> napi::Result<f64> {
        Ok(output)
    }
}

pub struct RandomTask {
    pub config: kvgpt::Gpt2Config,
    pub seed: u64,
    pub options: ParsedLoadOptions,
}

impl Task for RandomTask {
    type Output = Started;
    type JsValue = NativeModel;

    fn compute(&mut self) -> napi::Result<Started> {
        start(Model::random(self.config.clone(), self.seed, &self.options.load).napi()?, &self.options)
    }

    fn resolve(&mut self, _env: Env, Started(model, engine): Started) -> napi::Result<NativeModel> {
        Ok(NativeModel::new(model, engine))
    }
}

#[napi(object)]
pub struct NativeTimings {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub step_ms: Vec<f64>,
    pub sample_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub mean_batch_size: f64,
}

#[napi(object)]
pub struct NativeGeneration {
    pub tokens: Vec<u32>,
    pub prompt_tokens: Vec<u32>,
    pub text: Option<String>,
    /// 'max_new_tokens' | 'eos' | 'stop_string' | 'aborted' | 'context_full'
    pub stop_reason: String,
    pub timings: NativeTimings,
    pub cache_bytes: f64,
}

pub(crate) fn generation_to_js(g: Generation) -> NativeGeneration {
    let t = g.timings;
    NativeGeneration {
        tokens: g.tokens,
        prompt_tokens: g.prompt,
        text: g.text,
        stop_reason: g.stop_reason.as_str().to_string(),
        timings: NativeTimings {
            prompt_tokens: t.prompt_tokens as u32,
            generated_tokens: t.generated_tokens as u32,
            queue_ms: t.queue_ms,
            prefill_ms: t.prefill_ms,
            decode_ms: t.decode_ms,
            step_ms: t.step_ms,
            sample_ms: t.sample_ms,
            ttft_ms: t.ttft_ms,
            total_ms: t.total_ms,
            mean_batch_size: t.mean_batch_size,
        },
        cache_bytes: g.cache_bytes as f64,
    }
}
