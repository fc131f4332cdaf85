//! The generation loop: prefill, then one token per step (a one-token forward over the KV
//! cache, or the whole sequence again with the cache off), sampling, stop conditions, the
//! text stream, and the timings of each region.

use crate::error::{Error, Result};
use crate::loader::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;
use crate::stream::TextStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

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
}

impl GenerateOptions {
    /// The defaults of a checkpoint: its generation_config.json (do_sample, temperature, top_k,
    /// top_p, repetition_penalty, max_new_tokens), else greedy with 50 new tokens, as HF.
    pub fn defaults_for(model: &Model) -> Self {
        let g = model.generation_config();
        let sample = g.do_sample.unwrap_or(false);
        let sampling = SamplingParams {
            temperature: if sample { g.temperature.unwrap_or(1.0) } else { 0.0 },
            top_k: if sample { g.top_k.unwrap_or(50) } else { 0 },
            top_p: if sample { g.top_p.unwrap_or(1.0) } else { 1.0 },
            repetition_penalty: g.repetition_penalty.unwrap_or(1.0),
            seed: None,
        };
        Self {
            max_new_tokens: g.max_new_tokens.unwrap_or(50),
            sampling,
            stop: vec![],
            ignore_eos: false,
            use_cache: true,
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

/// Milliseconds of each region, taken around the exact code (vocabulary of llama.cpp).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// The first forward pass over the prompt.
    pub prefill_ms: f64,
    /// All later forward passes.
    pub decode_ms: f64,
    /// Each later forward pass, in order.
    pub step_ms: Vec<f64>,
    /// Logit processing and drawing, all steps.
    pub sample_ms: f64,
    /// Prefill plus the first token's sampling.
    pub ttft_ms: f64,
    pub total_ms: f64,
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
}

/// One streamed event: the id and the text it completes (possibly empty).
pub struct TokenEvent<'a> {
    pub token: u32,
    pub text: &'a str,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
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

    /// Generates from token ids. `abort` is checked between steps: a set flag ends the
    /// generation within one step with `StopReason::Aborted` and what was generated so far.
    /// `on_token` sees each new id with the text it completes.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        abort: &AtomicBool,
        on_token: &mut dyn FnMut(TokenEvent<'_>),
    ) -> Result<Generation> {
        opts.validate()?;
        let start = Instant::now();
        let prompt = self.prepare_prompt(prompt)?;
        let cfg = self.config();
        let mut sampler = Sampler::new(opts.sampling.clone(), cfg.vocab_size)?;
        let mut text = match &self.tokenizer {
            Some(t) => Some(TextStream::new(t.decode_stream(), &opts.stop)),
            None => None,
        };
        let capacity = prompt.len() + opts.max_new_tokens;
        let mut session = Session::new(&self.gpt2, capacity, opts.use_cache && opts.max_new_tokens > 0)?;
        let cache_bytes = session.cache().map_or(0, |c| c.bytes());
        let mut t = Timings { prompt_tokens: prompt.len(), ..Default::default() };
        let mut new_tokens = Vec::new();
        let mut stop = StopReason::MaxNewTokens;
        let mut logits = None;
        let device = self.gpt2.device().clone();
        // Plain greedy needs no sampler: `greedy_id` takes the argmax where the logits are (on a
        // GPU only the id crosses to the host).
        let plain_greedy = opts.sampling.is_greedy() && opts.sampling.repetition_penalty == 1.0;
        if abort.load(Ordering::Relaxed) {
            stop = StopReason::Aborted;
        } else if opts.max_new_tokens > 0 {
            let t0 = Instant::now();
            logits = Some(session.feed(&self.gpt2, &prompt)?);
            device.synchronize()?; // a GPU runs the step asynchronously: time its end, not its launch
            t.prefill_ms = ms(t0);
        }
        while let Some(step_logits) = logits.take() {
            let t0 = Instant::now();
            let token = if plain_greedy {
                crate::sampling::greedy_id(&step_logits.squeeze(0)?)?
            } else {
                let mut row: Vec<f32> = step_logits.squeeze(0)?.to_vec1()?;
                sampler.sample(&mut row, session.tokens())
            };
            t.sample_ms += ms(t0);
            if new_tokens.is_empty() {
                t.ttft_ms = ms(start);
            }
            new_tokens.push(token);
            let is_eos = !opts.ignore_eos && cfg.eos_token_ids.contains(&token);
            let mut chunk = String::new();
            let mut hit_stop = false;
            if let (Some(ts), false) = (text.as_mut(), is_eos) {
                hit_stop = ts.push(token, &mut chunk)?;
            }
            let last = if is_eos {
                Some(StopReason::Eos)
            } else if hit_stop {
                Some(StopReason::StopString)
            } else if new_tokens.len() >= opts.max_new_tokens {
                Some(StopReason::MaxNewTokens)
            } else if session.tokens().len() >= cfg.n_positions {
                Some(StopReason::ContextFull) // the new token has no position left to be fed at
            } else if abort.load(Ordering::Relaxed) {
                Some(StopReason::Aborted)
            } else {
                None
            };
            if let (Some(ts), Some(_)) = (text.as_mut(), last) {
                ts.flush(&mut chunk); // release text held back for a possible stop string
            }
            on_token(TokenEvent { token, text: &chunk });
            if let Some(reason) = last {
                stop = reason;
                break;
            }
            let t0 = Instant::now();
            logits = Some(session.feed(&self.gpt2, &[token])?);
            device.synchronize()?;
            let dt = ms(t0);
            t.decode_ms += dt;
            t.step_ms.push(dt);
        }
        let text = text.map(TextStream::into_text);
        t.generated_tokens = new_tokens.len();
        t.total_ms = ms(start);
        Ok(Generation { prompt, tokens: new_tokens, text, stop_reason: stop, timings: t, cache_bytes })
    }
}
