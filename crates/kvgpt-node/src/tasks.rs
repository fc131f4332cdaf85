//! The work that runs on the libuv pool (loading a model, measuring the bandwidth) and the
//! objects a generation and a scoring hand to JavaScript.

use crate::error::IntoNapi;
use crate::model::NativeModel;
use crate::options::ParsedLoadOptions;
use kvgpt::{Engine, Generation, Model, Score, TokenLogprob};
use napi::threadsafe_function::ThreadsafeFunction;
use napi::{Env, Status, Task};
use napi_derive::napi;
use std::sync::Arc;

/// One streamed token, the text it completes (possibly empty), and with the logprobs option
/// its log-probability and alternatives.
#[napi(object)]
pub struct NativeTokenChunk {
    pub token: u32,
    pub text: String,
    pub logprob: Option<NativeTokenLogprob>,
}

pub type TokenCallback = ThreadsafeFunction<NativeTokenChunk, (), NativeTokenChunk, Status, false>;

/// An id and its log-probability (natural log).
#[napi(object)]
pub struct NativeLogprob {
    pub token: u32,
    pub logprob: f64,
}

/// A token's log-probability and the most likely tokens at its position (most likely first).
#[napi(object)]
pub struct NativeTokenLogprob {
    pub token: u32,
    pub logprob: f64,
    pub top: Vec<NativeLogprob>,
}

pub(crate) fn logprob_to_js(t: &TokenLogprob) -> NativeTokenLogprob {
    NativeTokenLogprob {
        token: t.id,
        logprob: t.logprob as f64,
        top: t.top.iter().map(|&(token, logprob)| NativeLogprob { token, logprob: logprob as f64 }).collect(),
    }
}

/// Tokens scored so far, of how many.
#[napi(object)]
pub struct NativeScoreProgress {
    pub scored: u32,
    pub total: u32,
}

pub type ProgressCallback = ThreadsafeFunction<NativeScoreProgress, (), NativeScoreProgress, Status, false>;

#[napi(object)]
pub struct NativeScoreTimings {
    pub queue_ms: f64,
    pub forward_ms: f64,
    pub logprob_ms: f64,
    pub total_ms: f64,
    pub forward_tokens: f64,
    pub mean_batch_size: f64,
}

/// A scored text. Scored token i is `ids[positions[i]]`, with `logprobs[i]` and its `topK`
/// alternatives at `topIds/topLogprobs[i * topK ..]`.
#[napi(object)]
pub struct NativeScore {
    pub ids: Vec<u32>,
    pub pieces: Option<Vec<String>>,
    pub positions: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub top_k: u32,
    pub top_ids: Vec<u32>,
    pub top_logprobs: Vec<f64>,
    pub nll: f64,
    pub perplexity: f64,
    pub windows: u32,
    pub timings: NativeScoreTimings,
}

pub(crate) fn score_to_js(s: Score) -> NativeScore {
    let top_k = s.tokens.first().map_or(0, |t| t.logprob.top.len());
    let t = s.timings;
    NativeScore {
        positions: s.tokens.iter().map(|t| t.position as u32).collect(),
        logprobs: s.tokens.iter().map(|t| t.logprob.logprob as f64).collect(),
        top_k: top_k as u32,
        top_ids: s.tokens.iter().flat_map(|t| t.logprob.top.iter().map(|x| x.0)).collect(),
        top_logprobs: s.tokens.iter().flat_map(|t| t.logprob.top.iter().map(|x| x.1 as f64)).collect(),
        ids: s.ids,
        pieces: s.pieces,
        nll: s.nll,
        perplexity: s.perplexity,
        windows: s.windows as u32,
        timings: NativeScoreTimings {
            queue_ms: t.queue_ms,
            forward_ms: t.forward_ms,
            logprob_ms: t.logprob_ms,
            total_ms: t.total_ms,
            forward_tokens: t.forward_tokens as f64,
            mean_batch_size: t.mean_batch_size,
        },
    }
}

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
    /// With the logprobs option: one per new token.
    pub logprobs: Option<Vec<NativeTokenLogprob>>,
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
        logprobs: g.logprobs.map(|l| l.iter().map(logprob_to_js).collect()),
    }
}
