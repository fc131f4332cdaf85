//! The `NativeModel` class (a loaded model and its engine, shared by its generations and
//! sessions), `loadModel`, and `CancelToken`, the flag an AbortSignal sets.

use crate::error::{to_napi, IntoNapi};
use crate::options::{NativeGenerateOptions, NativeLoadOptions, NativeScoreOptions};
use crate::session::NativeSession;
use crate::tasks::{
    generation_to_js, logprob_to_js, score_to_js, BandwidthTask, LoadTask, NativeGeneration, NativeScore, NativeScoreProgress, NativeTokenChunk, ProgressCallback,
    RandomTask, TokenCallback,
};
use kvgpt::{Engine, Error, Job, Model, Prompt};
use napi::bindgen_prelude::{AsyncTask, Either, Object};
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use napi::Env;
use napi_derive::napi;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// Loads a model directory or hub id off the JS thread.
#[napi(ts_return_type = "Promise<NativeModel>")]
pub fn load_model(model: String, options: Option<NativeLoadOptions>) -> napi::Result<AsyncTask<LoadTask>> {
    Ok(AsyncTask::new(LoadTask { model, options: NativeLoadOptions::parse(options)? }))
}

/// Memory bandwidth in bytes per second: STREAM's triad over three arrays of `mib` MiB (1..=4096),
/// best of `repeats` (1..=100), on the kernels' thread pool, off the JS thread.
#[napi(ts_return_type = "Promise<number>")]
pub fn measure_bandwidth(mib: u32, repeats: u32) -> napi::Result<AsyncTask<BandwidthTask>> {
    let mib = crate::options::whole("mib", mib as f64, 4096.0).napi()?.max(1) as usize;
    let repeats = crate::options::whole("repeats", repeats as f64, 100.0).napi()?.max(1) as usize;
    Ok(AsyncTask::new(BandwidthTask { mib, repeats }))
}

/// Builds a model of a config's shapes (HF config.json text; GPT-2 small when omitted) with
/// seeded random weights, for benchmarks.
#[napi(ts_return_type = "Promise<NativeModel>")]
pub fn load_random(config_json: Option<String>, seed: f64, options: Option<NativeLoadOptions>) -> napi::Result<AsyncTask<RandomTask>> {
    let config = match config_json {
        Some(text) => kvgpt::Gpt2Config::from_json(&text).napi()?,
        None => kvgpt::Gpt2Config::gpt2_small(),
    };
    let seed = crate::options::whole("seed", seed, 9007199254740991.0).napi()?;
    Ok(AsyncTask::new(RandomTask { config, seed, options: NativeLoadOptions::parse(options)? }))
}

/// Set by an AbortSignal; the token loop checks it between steps.
#[napi]
pub struct CancelToken {
    pub(crate) flag: Arc<AtomicBool>,
}

#[napi]
impl CancelToken {
    #[napi(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self { flag: Arc::new(AtomicBool::new(false)) }
    }

    #[napi]
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    #[napi(getter)]
    pub fn cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

#[napi(object)]
pub struct NativeModelInfo {
    pub n_layer: u32,
    pub n_head: u32,
    pub n_embd: u32,
    pub n_inner: u32,
    pub n_positions: u32,
    pub vocab_size: u32,
    pub activation_function: String,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub parameter_count: f64,
    /// KV-cache bytes for one position of one sequence.
    pub cache_bytes_per_token: f64,
    /// Bytes of weights one decode step reads (sets its memory-bandwidth floor).
    pub step_weight_bytes: f64,
    pub device: String,
    pub dtype: String,
    pub load_ms: f64,
    pub dir: String,
    pub weights_file: String,
    pub has_tokenizer: bool,
}

/// A loaded model and the engine that runs every request on it; None once disposed.
#[derive(Clone)]
pub(crate) struct Loaded {
    pub model: Arc<Model>,
    pub engine: Arc<Engine>,
}

pub(crate) type Shared = Arc<RwLock<Option<Loaded>>>;

pub(crate) fn loaded(shared: &Shared) -> napi::Result<Loaded> {
    let guard = shared.read().map_err(|_| to_napi(Error::Disposed))?;
    guard.clone().ok_or_else(|| to_napi(Error::Disposed))
}

#[napi]
pub struct NativeModel {
    inner: Shared,
}

impl NativeModel {
    pub(crate) fn new(model: Arc<Model>, engine: Engine) -> Self {
        Self { inner: Arc::new(RwLock::new(Some(Loaded { model, engine: Arc::new(engine) }))) }
    }

    fn get(&self) -> napi::Result<Arc<Model>> {
        Ok(loaded(&self.inner)?.model)
    }
}

/// What the engine did and holds (`model.engineStats()`).
#[napi(object)]
pub struct NativeEngineStats {
    /// The limits it runs under.
    pub max_sequences: u32,
    pub max_step_tokens: u32,
    pub prefill_chunk: u32,
    /// Forward passes run, the tokens they carried, and sequences summed over them.
    pub steps: f64,
    pub rows: f64,
    pub sequences: f64,
    /// The most sequences one pass carried.
    pub max_batch: u32,
    pub generated_tokens: f64,
    /// Milliseconds in forward passes, of them waiting for the device, and after them (argmax or
    /// sampling, stops, events).
    pub busy_ms: f64,
    pub sync_ms: f64,
    pub sample_ms: f64,
    /// Requests given a place, and their summed and longest wait for it (ms).
    pub admitted: f64,
    pub queue_ms: f64,
    pub max_queue_ms: f64,
    /// Requests ended.
    pub completed: f64,
    /// Sequences in flight and requests waiting, now.
    pub active: u32,
    pub waiting: u32,
}

/// JS numbers to token ids: each must be an integer in [0, 2^32).
pub(crate) fn to_ids(ids: &[f64]) -> kvgpt::Result<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.is_finite() && v.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&v) {
                Ok(v as u32)
            } else {
                Err(Error::InvalidInput(format!("token id at index {i} must be a non-negative integer, got {v}")))
            }
        })
        .collect()
}

/// A prompt as JS passes it, a string or token ids, as the engine takes it.
fn to_prompt(prompt: Either<String, Vec<f64>>) -> napi::Result<Prompt> {
    Ok(match prompt {
        Either::A(text) => Prompt::Text(text),
        Either::B(ids) => Prompt::Ids(to_ids(&ids).napi()?),
    })
}

#[napi]
impl NativeModel {
    #[napi]
    pub fn info(&self) -> napi::Result<NativeModelInfo> {
        let model = self.get()?;
        let info = model.info();
        let c = &info.config;
        Ok(NativeModelInfo {
            n_layer: c.n_layer as u32,
            n_head: c.n_head as u32,
            n_embd: c.n_embd as u32,
            n_inner: c.n_inner as u32,
            n_positions: c.n_positions as u32,
            vocab_size: c.vocab_size as u32,
            activation_function: c.activation_function.clone(),
            layer_norm_epsilon: c.layer_norm_epsilon,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids: c.eos_token_ids.clone(),
            parameter_count: info.parameter_count as f64,
            cache_bytes_per_token: info.cache_bytes_per_token as f64,
            step_weight_bytes: info.step_weight_bytes as f64,
            device: info.device.clone(),
            dtype: info.dtype.clone(),
            load_ms: info.load_ms,
            dir: info.dir.display().to_string(),
            weights_file: info.weights_file.display().to_string(),
            has_tokenizer: model.tokenizer().is_ok(),
        })
    }

    /// KV-cache bytes for `positions` x `batch` in this model's dtype (the seed's formula).
    #[napi]
    pub fn cache_bytes(&self, positions: u32, batch: u32) -> napi::Result<f64> {
        let model = self.get()?;
        let bytes = model.info().cache_bytes_per_token;
        Ok(bytes as f64 * positions as f64 * batch as f64)
    }

    #[napi]
    pub fn tokenize(&self, text: String) -> napi::Result<Vec<u32>> {
        self.get()?.tokenize(&text).napi()
    }

    #[napi]
    pub fn decode(&self, ids: Vec<f64>) -> napi::Result<String> {
        let model = self.get()?;
        model.decode(&to_ids(&ids).napi()?).napi()
    }

    /// Checks a generation's prompt and options as the engine will admit them, on this thread
    /// and without queueing: the prompt's ids as the model will see them, or the error the
    /// generation would end with.
    #[napi]
    pub fn check_generation(&self, prompt: Either<String, Vec<f64>>, options: Option<NativeGenerateOptions>) -> napi::Result<Vec<u32>> {
        let model = self.get()?;
        let opts = options.unwrap_or_default().resolve(&model).napi()?;
        let prompt = to_prompt(prompt)?;
        model.check_generation(prompt, &opts).napi()
    }

    /// Queues a generation on the model's engine, which batches it with every other request in
    /// flight. Options are checked here, before any work; the prompt when it is admitted.
    #[napi(ts_return_type = "Promise<NativeGeneration>")]
    pub fn generate<'env>(
        &self,
        env: &'env Env,
        prompt: Either<String, Vec<f64>>,
        options: Option<NativeGenerateOptions>,
        cancel: &CancelToken,
        #[napi(ts_arg_type = "((chunk: NativeTokenChunk) => void) | undefined | null")] on_token: Option<TokenCallback>,
    ) -> napi::Result<Object<'env>> {
        let Loaded { model, engine } = loaded(&self.inner)?;
        let opts = options.unwrap_or_default().resolve(&model).napi()?;
        let prompt = to_prompt(prompt)?;
        let (deferred, promise) = env.create_deferred::<NativeGeneration, Box<dyn FnOnce(Env) -> napi::Result<NativeGeneration>>>()?;
        let on_token = on_token.map(|cb| {
            Box::new(move |e: kvgpt::TokenEvent<'_>| {
                let logprob = e.logprob.map(logprob_to_js);
                cb.call(NativeTokenChunk { token: e.token, text: e.text.to_string(), logprob }, ThreadsafeFunctionCallMode::NonBlocking);
            }) as Box<dyn FnMut(kvgpt::TokenEvent<'_>) + Send>
        });
        let on_done = Box::new(move |r: kvgpt::Result<kvgpt::Generation>| match r {
            Ok(g) => deferred.resolve(Box::new(move |_| Ok(generation_to_js(g)))),
            Err(e) => deferred.reject(to_napi(e)),
        });
        engine.submit(Job::Generate { prompt, options: opts, abort: cancel.flag.clone(), on_token, on_done }).napi()?;
        Ok(promise)
    }

    /// Queues a text (or ids) to score on the model's engine: each token's log-probability,
    /// the mean NLL and the perplexity. Options are checked here; the text when it is admitted.
    #[napi(ts_return_type = "Promise<NativeScore>")]
    pub fn score<'env>(
        &self,
        env: &'env Env,
        text: Either<String, Vec<f64>>,
        options: Option<NativeScoreOptions>,
        cancel: &CancelToken,
        #[napi(ts_arg_type = "((progress: NativeScoreProgress) => void) | undefined | null")] on_progress: Option<ProgressCallback>,
    ) -> napi::Result<Object<'env>> {
        let Loaded { model, engine } = loaded(&self.inner)?;
        let options = options.unwrap_or_default().resolve().napi()?;
        options.resolve(model.config().n_positions).napi()?;
        let text = to_prompt(text)?;
        let (deferred, promise) = env.create_deferred::<NativeScore, Box<dyn FnOnce(Env) -> napi::Result<NativeScore>>>()?;
        let on_progress = on_progress.map(|cb| {
            Box::new(move |scored: usize, total: usize| {
                cb.call(NativeScoreProgress { scored: scored as u32, total: total as u32 }, ThreadsafeFunctionCallMode::NonBlocking);
            }) as Box<dyn FnMut(usize, usize) + Send>
        });
        let on_done = Box::new(move |r: kvgpt::Result<kvgpt::Score>| match r {
            Ok(s) => deferred.resolve(Box::new(move |_| Ok(score_to_js(s)))),
            Err(e) => deferred.reject(to_napi(e)),
        });
        engine.submit(Job::Score { text, options, abort: cancel.flag.clone(), on_progress, on_done }).napi()?;
        Ok(promise)
    }

    /// What the engine did and holds.
    #[napi]
    pub fn engine_stats(&self) -> napi::Result<NativeEngineStats> {
        let engine = loaded(&self.inner)?.engine;
        let (o, s) = (engine.options(), engine.stats());
        Ok(NativeEngineStats {
            max_sequences: o.max_sequences as u32,
            max_step_tokens: o.max_step_tokens as u32,
            prefill_chunk: o.prefill_chunk as u32,
            steps: s.steps as f64,
            rows: s.rows as f64,
            sequences: s.sequences as f64,
            max_batch: s.max_batch as u32,
            generated_tokens: s.generated_tokens as f64,
            busy_ms: s.busy_ms,
            sync_ms: s.sync_ms,
            sample_ms: s.sample_ms,
            admitted: s.admitted as f64,
            queue_ms: s.queue_ms,
            max_queue_ms: s.max_queue_ms,
            completed: s.completed as f64,
            active: s.active as u32,
            waiting: s.waiting as u32,
        })
    }

    /// A session of at most `capacity` positions, its KV cache allocated now (with `use_cache`).
    #[napi]
    pub fn session(&self, capacity: u32, use_cache: bool) -> napi::Result<NativeSession> {
        NativeSession::new(loaded(&self.inner)?, capacity as usize, use_cache)
    }

    /// Releases the weights once running generations finish; later calls fail with KVGPT_DISPOSED.
    #[napi]
    pub fn dispose(&self) {
        if let Ok(mut guard) = self.inner.write() {
            guard.take();
        }
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.read().map(|g| g.is_none()).unwrap_or(true)
    }
}
