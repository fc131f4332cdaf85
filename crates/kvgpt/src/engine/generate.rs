//! A generation's options, result, stop reasons and timings, and `Model::generate` /
//! `generate_batch`, which run requests through a `Scheduler` on the calling thread (prefill in
//! chunks, then one token per step; sampling, stop conditions and the text stream per request).

use crate::engine::sampling::SamplingParams;
use crate::engine::score::TokenLogprob;
use crate::engine::scheduler::{run_each, Abort, EngineOptions, GenerateRequest, Prompt, Request, Scheduler};
use crate::error::{Error, Result};
use crate::model::loader::Model;
use std::cell::RefCell;
use std::sync::atomic::AtomicBool;

/// Upper bound of `max_new_tokens`; the context (n_positions) usually stops generation first.
pub const MAX_NEW_TOKENS_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the text ends before it.
    pub stop: Vec<String>,
    /// Keep going past the EOS token.
    pub ignore_eos: bool,
    /// false recomputes the whole sequence each step (HF `use_cache=False`).
    pub use_cache: bool,
    /// Some(k): each new token's log-probability and the k (0..=20) most likely alternatives,
    /// from the model's logits before the repetition penalty, temperature, top-k and top-p.
    pub logprobs: Option<usize>,
}

impl GenerateOptions {
    /// The defaults of a checkpoint: its generation_config.json (do_sample, temperature, top_k,
    /// top_p, repetition_penalty, max_new_tokens), else greedy with 50 new tokens, as HF. Top-k
    /// and top-p keep the config's values (else HF's 50 and 1) even when it does not sample, so
    /// a caller who turns sampling on with a temperature gets HF's top-k of 50, as documented.
    pub fn defaults_for(model: &Model) -> Self {
        let g = model.generation_config();
        let sample = g.do_sample.unwrap_or(false);
        let sampling = SamplingParams {
            temperature: if sample { g.temperature.unwrap_or(1.0) } else { 0.0 },
            top_k: g.top_k.unwrap_or(50),
            top_p: g.top_p.unwrap_or(1.0),
            repetition_penalty: g.repetition_penalty.unwrap_or(1.0),
            seed: None,
        };
        Self {
            max_new_tokens: g.max_new_tokens.unwrap_or(50),
            sampling,
            stop: vec![],
            ignore_eos: false,
            use_cache: true,
            logprobs: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(Error::range(
                "maxNewTokens",
                format!("must be in [0, {MAX_NEW_TOKENS_LIMIT}], got {}", self.max_new_tokens),
            ));
        }
        if let Some(k) = self.logprobs {
            crate::engine::score::check_logprobs(k)?;
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(Error::range("stop", format!("strings must be non-empty; stop[{i}] is empty")));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxNewTokens,
    Eos,
    StopString,
    Aborted,
    /// The sequence reached the model's n_positions.
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxNewTokens => "max_new_tokens",
            Self::Eos => "eos",
            Self::StopString => "stop_string",
            Self::Aborted => "aborted",
            Self::ContextFull => "context_full",
        }
    }
}

/// Milliseconds of each region, taken around the exact code (vocabulary of llama.cpp). A
/// forward pass that carried this request and others counts whole for each of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the request's arrival to its admission (a place among the engine's sequences).
    pub queue_ms: f64,
    /// The forward passes that read the prompt (one per chunk).
    pub prefill_ms: f64,
    /// All later forward passes.
    pub decode_ms: f64,
    /// Each later forward pass, in order.
    pub step_ms: Vec<f64>,
    /// Logit processing and drawing, all steps.
    pub sample_ms: f64,
    /// From arrival to the first token (queue, prefill and the first sampling).
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// Mean number of sequences in the forward passes that carried this request.
    pub mean_batch_size: f64,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The prompt as the model saw it (an empty prompt becomes [bos]).
    pub prompt: Vec<u32>,
    /// The new ids (the prompt not included); an EOS that stopped generation is the last one.
    pub tokens: Vec<u32>,
    /// The new text, ending before a stop string and without a stopping EOS; None without a
    /// tokenizer.
    pub text: Option<String>,
    pub stop_reason: StopReason,
    pub timings: Timings,
    /// Bytes of this generation's KV cache (0 with the cache off).
    pub cache_bytes: usize,
    /// With the `logprobs` option: one entry per new token.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// One streamed event: the id, the text it completes (possibly empty), and with the `logprobs`
/// option its log-probability and alternatives.
pub struct TokenEvent<'a> {
    pub token: u32,
    pub text: &'a str,
    pub logprob: Option<&'a TokenLogprob>,
}

impl Model {
    /// Checks a prompt and turns an empty one into `[bos]`, as HF's pipeline does.
    pub fn prepare_prompt(&self, prompt: &[u32]) -> Result<Vec<u32>> {
        let cfg = self.config();
        let prompt = if prompt.is_empty() {
            let bos = cfg.bos_token_id.ok_or_else(|| {
                Error::InvalidInput("the prompt is empty and config.json has no bos_token_id to start from".into())
            })?;
            vec![bos]
        } else {
            prompt.to_vec()
        };
        self.check_ids(&prompt)?;
        if prompt.len() > cfg.n_positions {
            return Err(Error::InvalidInput(format!(
                "prompt is {} tokens but the model's context is {} (shorten the prompt)",
                prompt.len(),
                cfg.n_positions
            )));
        }
        Ok(prompt)
    }

    /// Checks a generation as the engine does when it admits it (options, tokenizing a text,
    /// the prompt's ids and length), without queueing anything; the prompt's ids as the model
    /// will see them. A server calls it to answer bad input before it starts a response.
    pub fn check_generation(&self, prompt: Prompt, opts: &GenerateOptions) -> Result<Vec<u32>> {
        opts.validate()?;
        let ids = match prompt {
            Prompt::Text(text) => self.tokenize(&text)?,
            Prompt::Ids(ids) => ids,
        };
        self.prepare_prompt(&ids)
    }

    /// Generates from token ids on this thread. `abort` is checked between steps: a set flag
    /// ends the generation within one step with `StopReason::Aborted` and what was generated so
    /// far. `on_token` sees each new id with the text it completes.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        abort: &AtomicBool,
        on_token: &mut dyn FnMut(TokenEvent<'_>),
    ) -> Result<Generation> {
        opts.validate()?;
        let out = RefCell::new(None);
        {
            let mut scheduler = Scheduler::new(self, EngineOptions::defaults_for(self.gpt2.device()))?;
            scheduler.submit(Request::Generate(GenerateRequest {
                prompt: Prompt::Ids(prompt.to_vec()),
                options: opts.clone(),
                abort: Abort::Borrowed(abort),
                on_token: Some(Box::new(|e| on_token(e))),
                on_done: Box::new(|r| *out.borrow_mut() = Some(r)),
            }));
            scheduler.run_to_completion();
        }
        out.into_inner().expect("every request ends with a result")
    }

    /// Generates from several prompts at once, batched (continuous batching on this thread,
    /// with `engine`'s limits, the defaults for the device when None). One result per prompt,
    /// in order; a prompt's bad input fails that prompt alone.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        engine: Option<EngineOptions>,
        abort: &AtomicBool,
    ) -> Result<Vec<Result<Generation>>> {
        opts.validate()?;
        run_each(self, prompts, engine, |prompt, on_done| {
            Request::Generate(GenerateRequest {
                prompt: Prompt::Ids(prompt.clone()),
                options: opts.clone(),
                abort: Abort::Borrowed(abort),
                on_token: None,
                on_done,
            })
        })
    }
}
