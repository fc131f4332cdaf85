//! The work that runs on the libuv pool: loading a model and running one generation.

use crate::error::IntoNapi;
use crate::model::NativeModel;
use kvgpt::{GenerateOptions, Generation, LoadOptions, Model};
use napi::bindgen_prelude::Either;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status, Task};
use napi_derive::napi;
use std::sync::atomic::AtomicBool;
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
    pub options: LoadOptions,
}

impl Task for LoadTask {
    type Output = Model;
    type JsValue = NativeModel;

    fn compute(&mut self) -> napi::Result<Model> {
        Model::load(&self.model, &self.options).napi()
    }

    fn resolve(&mut self, _env: Env, output: Model) -> napi::Result<NativeModel> {
        Ok(NativeModel::new(output))
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
        Ok(kvgpt::bandwidth::triad(self.mib, self.repeats))
    }

    fn resolve(&mut self, _env: Env, output: f64) -> napi::Result<f64> {
        Ok(output)
    }
}

pub struct RandomTask {
    pub config: kvgpt::Gpt2Config,
    pub seed: u64,
    pub options: kvgpt::LoadOptions,
}

impl Task for RandomTask {
    type Output = Model;
    type JsValue = NativeModel;

    fn compute(&mut self) -> napi::Result<Model> {
        Model::random(self.config.clone(), self.seed, &self.options).napi()
    }

    fn resolve(&mut self, _env: Env, output: Model) -> napi::Result<NativeModel> {
        Ok(NativeModel::new(output))
    }
}

#[napi(object)]
pub struct NativeTimings {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub step_ms: Vec<f64>,
    pub sample_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
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

pub struct GenerateTask {
    pub model: Arc<Model>,
    pub prompt: Either<String, Vec<u32>>,
    pub opts: GenerateOptions,
    pub cancel: Arc<AtomicBool>,
    pub on_token: Option<TokenCallback>,
}

impl Task for GenerateTask {
    type Output = Generation;
    type JsValue = NativeGeneration;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let prompt = match &self.prompt {
            Either::A(text) => self.model.tokenize(text).napi()?,
            Either::B(ids) => ids.clone(),
        };
        let on_token = self.on_token.take();
        let mut emit = |e: kvgpt::TokenEvent<'_>| {
            if let Some(cb) = &on_token {
                let chunk = NativeTokenChunk { token: e.token, text: e.text.to_string() };
                cb.call(chunk, ThreadsafeFunctionCallMode::NonBlocking);
            }
        };
        self.model.generate(&prompt, &self.opts, &self.cancel, &mut emit).napi()
    }

    fn resolve(&mut self, _env: Env, g: Self::Output) -> napi::Result<NativeGeneration> {
        let t = g.timings;
        Ok(NativeGeneration {
            tokens: g.tokens,
            prompt_tokens: g.prompt,
            text: g.text,
            stop_reason: g.stop_reason.as_str().to_string(),
            timings: NativeTimings {
                prompt_tokens: t.prompt_tokens as u32,
                generated_tokens: t.generated_tokens as u32,
                prefill_ms: t.prefill_ms,
                decode_ms: t.decode_ms,
                step_ms: t.step_ms,
                sample_ms: t.sample_ms,
                ttft_ms: t.ttft_ms,
                total_ms: t.total_ms,
            },
            cache_bytes: g.cache_bytes as f64,
        })
    }
}
