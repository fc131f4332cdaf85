//! Continuous batching. Each `step` drops aborted requests, admits waiting ones while there is
//! room (`max_sequences`), then runs ONE forward pass that carries the next token of every
//! decoding sequence plus prompt chunks (and cache-less sequences' whole passes), in arrival
//! order, while the step's token budget lasts; then each sequence samples, streams and stops on
//! its own. Requests join and leave between steps; a finished, aborted or failed one frees its
//! place at once. Nothing about batching shows in a result: a sequence's prompt chunks start at
//! fixed offsets (multiples of `prefill_chunk`) and on the CPU a row's numbers do not depend on
//! the rest of the step (`RowPlan`), so its tokens are the ones it gets alone. A text being
//! scored (`engine::score`) rides the same way, one window after another, as prompt chunks that
//! ask logits only for the rows that predict a target.

use crate::engine::generate::{GenerateOptions, Generation, StopReason, Timings, TokenEvent};
use crate::engine::sampling::{argmax, Sampler};
use crate::engine::score::{gather_logprobs, token_logprob, Score, ScoreOptions, Scoring, TokenLogprob};
use crate::engine::session::{Pass, Session};
use crate::engine::stream::TextStream;
use crate::error::{Error, Result};
use crate::model::gpt2::{Logits, Segment, StepLogits};
use crate::model::loader::Model;
use candle_core::{CpuStorage, Device, Storage, Tensor, D};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The engine's limits, set at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences in flight at once (reading their prompt or decoding); more wait, in order.
    pub max_sequences: usize,
    /// Tokens one forward pass carries: one per decoding sequence, then prompt chunks while
    /// they fit (the oldest waiting chunk always goes, so a step can exceed this by one chunk).
    pub max_step_tokens: usize,
    /// Prompt tokens of one sequence per step: a longer prompt is read in chunks of this many.
    pub prefill_chunk: usize,
}

impl EngineOptions {
    /// Upper bound of every limit.
    pub const LIMIT: usize = 1 << 16;

    /// CPU: 32 sequences, 512 tokens a step, chunks of 256 (two chunks add one more read of
    /// the weights to a 512-token prompt). Elsewhere (a GPU): 256 sequences, 8192 tokens a
    /// step, chunks of 512.
    pub fn defaults_for(device: &Device) -> Self {
        if device.is_cpu() {
            Self { max_sequences: 32, max_step_tokens: 512, prefill_chunk: 256 }
        } else {
            Self { max_sequences: 256, max_step_tokens: 8192, prefill_chunk: 512 }
        }
    }

    /// The limits on `device`: the given ones, and its defaults for the rest, bent to fit the
    /// given ones (a given maxSequences raises the default step budget, a given step budget
    /// lowers the default maxSequences and chunk). Errors only where given values conflict.
    pub fn resolve(device: &Device, max_sequences: Option<usize>, max_step_tokens: Option<usize>, prefill_chunk: Option<usize>) -> Result<Self> {
        let d = Self::defaults_for(device);
        let seqs = max_sequences.unwrap_or(match max_step_tokens {
            Some(step) => d.max_sequences.min(step),
            None => d.max_sequences,
        });
        let step = max_step_tokens.unwrap_or(d.max_step_tokens.max(seqs).max(prefill_chunk.unwrap_or(0)));
        let chunk = prefill_chunk.unwrap_or(d.prefill_chunk.min(step));
        let opts = Self { max_sequences: seqs, max_step_tokens: step, prefill_chunk: chunk };
        opts.validate()?;
        Ok(opts)
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("maxSequences", self.max_sequences), ("maxStepTokens", self.max_step_tokens), ("prefillChunk", self.prefill_chunk)] {
            if v == 0 || v > Self::LIMIT {
                return Err(Error::range(name, format!("must be an integer in [1, {}], got {v}", Self::LIMIT)));
            }
        }
        if self.max_step_tokens < self.max_sequences {
            return Err(Error::range(
                "maxStepTokens",
                format!("must be at least maxSequences ({}) so every decoding sequence fits in a step, got {}", self.max_sequences, self.max_step_tokens),
            ));
        }
        if self.prefill_chunk > self.max_step_tokens {
            return Err(Error::range(
                "prefillChunk",
                format!("must be at most maxStepTokens ({}), got {}", self.max_step_tokens, self.prefill_chunk),
            ));
        }
        Ok(())
    }
}

/// What the engine did so far (counts since load) and holds now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Forward passes run.
    pub steps: u64,
    /// Tokens those passes carried (prompt chunks, decode tokens, cache-less passes).
    pub rows: u64,
    /// Sequences summed over the passes (over `steps`: the mean batch size).
    pub sequences: u64,
    /// The most sequences one pass carried.
    pub max_batch: usize,
    /// Tokens generated (sampled) by all requests.
    pub generated_tokens: u64,
    /// Milliseconds spent in forward passes (launching them and waiting for the device).
    pub busy_ms: f64,
    /// Of those, waiting for the device to finish (0 on the CPU, where a pass runs as it is called).
    pub sync_ms: f64,
    /// Milliseconds after the passes: logits to ids (argmax or sampling), stop checks, events.
    pub sample_ms: f64,
    /// Requests admitted (given a place), and their summed and longest wait for it.
    pub admitted: u64,
    pub queue_ms: f64,
    pub max_queue_ms: f64,
    /// Requests ended (done, stopped, aborted or failed).
    pub completed: u64,
    /// Sequences in flight and requests waiting, now.
    pub active: usize,
    pub waiting: usize,
}

/// An abort flag: the token loop checks it between steps.
pub enum Abort<'c> {
    Borrowed(&'c AtomicBool),
    Shared(Arc<AtomicBool>),
}

impl Abort<'_> {
    pub(crate) fn is_set(&self) -> bool {
        match self {
            Abort::Borrowed(f) => f.load(Ordering::Relaxed),
            Abort::Shared(f) => f.load(Ordering::Relaxed),
        }
    }
}

pub enum Prompt {
    /// Encoded with the model's tokenizer when the request is admitted.
    Text(String),
    Ids(Vec<u32>),
}

pub type OnToken<'c> = Box<dyn FnMut(TokenEvent<'_>) + 'c>;
pub type OnDone<'c, T> = Box<dyn FnOnce(Result<T>) + 'c>;

/// A generation: its prompt, options, abort flag, and where its tokens and result go.
pub struct GenerateRequest<'c> {
    pub prompt: Prompt,
    pub options: GenerateOptions,
    pub abort: Abort<'c>,
    pub on_token: Option<OnToken<'c>>,
    pub on_done: OnDone<'c, Generation>,
}

/// New ids for a session held across calls; done with the greedy next id.
pub struct FeedRequest<'c> {
    pub session: Arc<Mutex<Session>>,
    pub ids: Vec<u32>,
    pub on_done: OnDone<'c, u32>,
}

/// A text to score: the log-probability of each token, the mean NLL and the perplexity.
/// `on_progress` sees (tokens scored, tokens to score) after each pass that scored some.
pub struct ScoreRequest<'c> {
    pub text: Prompt,
    pub options: ScoreOptions,
    pub abort: Abort<'c>,
    pub on_progress: Option<Box<dyn FnMut(usize, usize) + 'c>>,
    pub on_done: OnDone<'c, Score>,
}

pub enum Request<'c> {
    Generate(GenerateRequest<'c>),
    Feed(FeedRequest<'c>),
    Score(ScoreRequest<'c>),
}

impl<'c> Request<'c> {
    fn fail(self, e: Error) {
        match self {
            Request::Generate(r) => (r.on_done)(Err(e)),
            Request::Feed(r) => (r.on_done)(Err(e)),
            Request::Score(r) => (r.on_done)(Err(e)),
        }
    }

    fn aborted(&self) -> bool {
        match self {
            Request::Generate(r) => r.abort.is_set(),
            Request::Score(r) => r.abort.is_set(),
            Request::Feed(_) => false,
        }
    }
}

fn score_aborted() -> Error {
    Error::Aborted("the scoring was aborted (its signal fired) before it ended".into())
}

struct Waiting<'c> {
    request: Request<'c>,
    submitted: Instant,
}

enum Seq {
    Owned(Session),
    Shared(Arc<Mutex<Session>>),
}

/// A session borrowed for a step: owned by its generation, or locked for a feed.
enum SessionAccess<'a> {
    Owned(&'a mut Session),
    Locked(MutexGuard<'a, Session>),
}

impl Deref for SessionAccess<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        match self {
            SessionAccess::Owned(s) => s,
            SessionAccess::Locked(s) => s,
        }
    }
}

impl DerefMut for SessionAccess<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        match self {
            SessionAccess::Owned(s) => s,
            SessionAccess::Locked(s) => s,
        }
    }
}

fn poisoned() -> Error {
    Error::InvalidInput("the session is poisoned by an earlier failure; start a new one".into())
}

impl Seq {
    fn access(&mut self) -> Result<SessionAccess<'_>> {
        Ok(match self {
            Seq::Owned(s) => SessionAccess::Owned(s),
            Seq::Shared(s) => SessionAccess::Locked(s.lock().map_err(|_| poisoned())?),
        })
    }
}

/// A generation in flight.
struct Gen<'m, 'c> {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    plain_greedy: bool,
    sampler: Sampler,
    text: Option<TextStream<'m>>,
    tokens: Vec<u32>,
    timings: Timings,
    abort: Abort<'c>,
    on_token: Option<OnToken<'c>>,
    on_done: Option<OnDone<'c, Generation>>,
    cache_bytes: usize,
    /// Each token's log-probability and alternatives, with the `logprobs` option.
    logprobs: Vec<TokenLogprob>,
}

enum Work<'m, 'c> {
    Generate(Box<Gen<'m, 'c>>),
    Feed(Option<OnDone<'c, u32>>),
    Score(Box<Scoring<'c>>),
}

/// A sequence in flight: its session, the ids it still has to run (the prompt's rest, or the
/// token it sampled last), and its request.
struct Active<'m, 'c> {
    seq: Seq,
    cached: bool,
    pending: Vec<u32>,
    done: usize,
    /// Has sampled a token: its passes are decode steps now.
    decoding: bool,
    work: Work<'m, 'c>,
    submitted: Instant,
    /// Passes that carried it, and the sequences in them summed (its mean batch size).
    passes: usize,
    batch_sum: usize,
    finished: bool,
}

impl Active<'_, '_> {
    fn remaining(&self) -> usize {
        self.pending.len() - self.done
    }
}

/// One sequence's share of a step: `n` of its pending ids.
struct Run {
    idx: usize,
    n: usize,
    logits: Logits,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

pub struct Scheduler<'m, 'c> {
    model: &'m Model,
    opts: EngineOptions,
    waiting: VecDeque<Waiting<'c>>,
    active: Vec<Active<'m, 'c>>,
    /// Kept current as requests end, before their callbacks run, so a caller that sees a result
    /// also sees it counted.
    stats: Arc<Mutex<EngineStats>>,
}

impl<'m, 'c> Scheduler<'m, 'c> {
    pub fn new(model: &'m Model, opts: EngineOptions) -> Result<Self> {
        Self::with_stats(model, opts, Arc::default())
    }

    /// A scheduler that keeps its figures in `stats` (shared with whoever reads them).
    pub fn with_stats(model: &'m Model, opts: EngineOptions, stats: Arc<Mutex<EngineStats>>) -> Result<Self> {
        opts.validate()?;
        Ok(Self { model, opts, waiting: VecDeque::new(), active: Vec::new(), stats })
    }

    /// Queues a request; it joins at a later step, in arrival order.
    pub fn submit(&mut self, request: Request<'c>) {
        self.submit_at(request, Instant::now());
    }

    /// Queues a request that arrived at `submitted` (its queue wait and TTFT count from then).
    pub fn submit_at(&mut self, request: Request<'c>, submitted: Instant) {
        self.waiting.push_back(Waiting { request, submitted });
        self.st().waiting = self.waiting.len();
    }

    /// Nothing in flight and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    /// What the scheduler did and holds.
    pub fn stats(&self) -> EngineStats {
        self.st().clone()
    }

    fn st(&self) -> MutexGuard<'_, EngineStats> {
        lock_stats(&self.stats)
    }

    /// Runs steps until every request has ended.
    pub fn run_to_completion(&mut self) {
        while !self.is_idle() {
            if !self.step() && !self.is_idle() {
                // Work in flight but nothing to run would spin forever: end it instead.
                self.fail_all(&Error::internal("the engine found nothing to run for its requests"));
            }
        }
    }

    /// One round: drop aborted requests, admit waiting ones, run one forward pass, sample.
    /// Returns whether a forward pass ran.
    pub fn step(&mut self) -> bool {
        self.reap_aborted();
        self.admit();
        let runs = self.plan();
        let ran = !runs.is_empty();
        if ran {
            let start = Instant::now();
            match self.run(&runs) {
                Ok((step, host, rows, sync_ms)) => {
                    self.record(&runs, rows, ms(start));
                    self.st().sync_ms += sync_ms;
                    let t0 = Instant::now();
                    let vocab = self.model.config().vocab_size;
                    let copied = host.as_ref().map(|(data, slots)| (data.as_slice(), slots.as_slice()));
                    let sampled = with_host_rows(step.logits.as_ref(), copied, vocab, |h| self.sample(&runs, &step, h));
                    if let Err(e) = sampled {
                        for r in &runs {
                            self.fail(r.idx, e.duplicate());
                        }
                    }
                    self.st().sample_ms += ms(t0);
                }
                Err(e) => {
                    for r in &runs {
                        self.fail(r.idx, e.duplicate());
                    }
                }
            }
        }
        self.active.retain(|a| !a.finished);
        let mut st = self.st();
        st.active = self.active.len();
        st.waiting = self.waiting.len();
        ran
    }

    /// Ends every request with `e` (the engine is stopping, or a step panicked).
    pub fn fail_all(&mut self, e: &Error) {
        for i in 0..self.active.len() {
            self.fail(i, e.duplicate());
        }
        self.active.clear();
        while let Some(w) = self.waiting.pop_front() {
            self.st().waiting = self.waiting.len();
            self.ended();
            w.request.fail(e.duplicate());
        }
    }

    /// Counts a request that ends without ever being in flight; before its callback runs.
    fn ended(&self) {
        self.st().completed += 1;
    }

    fn reap_aborted(&mut self) {
        for i in 0..self.active.len() {
            match &self.active[i].work {
                Work::Generate(g) if g.abort.is_set() => finish_active(&mut self.active[i], StopReason::Aborted, &self.stats),
                Work::Score(s) if s.abort.is_set() => self.fail(i, score_aborted()),
                _ => {}
            }
        }
        self.active.retain(|a| !a.finished);
        // An aborted request still waiting ends now, without waiting for a place.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].request.aborted() {
                let w = self.waiting.remove(i).expect("index in range");
                self.st().waiting = self.waiting.len();
                let ended = self.start(w); // an aborted request ends in `start`
                debug_assert!(ended.is_none());
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.opts.max_sequences {
            let Some(w) = self.waiting.pop_front() else { break };
            let waited = ms(w.submitted);
            {
                let mut st = self.st();
                st.admitted += 1;
                st.queue_ms += waited;
                st.max_queue_ms = st.max_queue_ms.max(waited);
                st.waiting = self.waiting.len();
            }
            if let Some(a) = self.start(w) {
                self.active.push(a);
                self.st().active = self.active.len();
            }
        }
    }

    /// Turns a request into a sequence in flight, or ends it at once (bad input, nothing to
    /// generate, already aborted).
    fn start(&mut self, w: Waiting<'c>) -> Option<Active<'m, 'c>> {
        let submitted = w.submitted;
        match w.request {
            Request::Generate(r) => self.start_generation(r, submitted),
            Request::Score(r) => self.start_score(r, submitted),
            Request::Feed(r) => {
                let busy = self.active.iter().any(|a| matches!(&a.seq, Seq::Shared(s) if Arc::ptr_eq(s, &r.session)));
                // Whether the session has a cache, once its ids are known to fit.
                let checked = if busy {
                    Err(Error::InvalidInput("a feed is already running on this session; wait for it before feeding more".into()))
                } else {
                    self.model.check_ids(&r.ids).and_then(|_| {
                        let session = r.session.lock().map_err(|_| poisoned())?;
                        session.check_room(r.ids.len())?;
                        Ok(session.cache().is_some())
                    })
                };
                let cached = match checked {
                    Ok(cached) => cached,
                    Err(e) => {
                        self.ended();
                        (r.on_done)(Err(e));
                        return None;
                    }
                };
                Some(Active {
                    seq: Seq::Shared(r.session),
                    cached,
                    pending: r.ids,
                    done: 0,
                    decoding: false,
                    work: Work::Feed(Some(r.on_done)),
                    submitted,
                    passes: 0,
                    batch_sum: 0,
                    finished: false,
                })
            }
        }
    }

    fn start_score(&mut self, r: ScoreRequest<'c>, submitted: Instant) -> Option<Active<'m, 'c>> {
        let started = match r.abort.is_set() {
            true => Err((score_aborted(), r.on_done)),
            false => Scoring::new(self.model, r, ms(submitted)),
        };
        // One KV cache for the longest window, emptied for each next one.
        let started = started.and_then(|(scoring, capacity)| match Session::new(self.model.gpt2(), capacity, true) {
            Ok(session) => Ok((scoring, session)),
            Err(e) => Err((e, scoring.on_done.expect("not yet handed over"))),
        });
        match started {
            Ok((scoring, session)) => Some(Active {
                seq: Seq::Owned(session),
                cached: true,
                pending: scoring.window_ids(),
                done: 0,
                decoding: false,
                work: Work::Score(Box::new(scoring)),
                submitted,
                passes: 0,
                batch_sum: 0,
                finished: false,
            }),
            Err((e, on_done)) => {
                self.ended();
                on_done(Err(e));
                None
            }
        }
    }

    fn start_generation(&mut self, r: GenerateRequest<'c>, submitted: Instant) -> Option<Active<'m, 'c>> {
        let model = self.model;
        let GenerateRequest { prompt, options: opts, abort, on_token, on_done } = r;
        let prepared = (|| {
            let prompt = model.check_generation(prompt, &opts)?;
            let sampler = Sampler::new(opts.sampling.clone(), model.config().vocab_size)?;
            let session = if opts.max_new_tokens > 0 && !abort.is_set() {
                Some(Session::new(model.gpt2(), prompt.len() + opts.max_new_tokens, opts.use_cache)?)
            } else {
                None
            };
            Ok((prompt, sampler, session))
        })();
        let (prompt, sampler, session) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.ended();
                on_done(Err(e));
                return None;
            }
        };
        let text = model.tokenizer.as_ref().map(|t| TextStream::new(t.decode_stream(), &opts.stop));
        let plain_greedy = opts.sampling.is_greedy() && opts.sampling.repetition_penalty == 1.0;
        let timings = Timings { prompt_tokens: prompt.len(), queue_ms: ms(submitted), ..Default::default() };
        let cache_bytes = session.as_ref().and_then(|s| s.cache()).map_or(0, |c| c.bytes());
        let gen = Box::new(Gen {
            prompt: prompt.clone(),
            opts,
            plain_greedy,
            sampler,
            text,
            tokens: Vec::new(),
            timings,
            abort,
            on_token,
            on_done: Some(on_done),
            cache_bytes,
            logprobs: Vec::new(),
        });
        let Some(session) = session else {
            // Nothing to run: no new tokens wanted, or aborted before it began.
            let reason = if gen.abort.is_set() { StopReason::Aborted } else { StopReason::MaxNewTokens };
            self.ended();
            end_generation(gen, reason, submitted, 0, 0);
            return None;
        };
        Some(Active {
            cached: session.cache().is_some(),
            seq: Seq::Owned(session),
            pending: prompt,
            done: 0,
            decoding: false,
            work: Work::Generate(gen),
            submitted,
            passes: 0,
            batch_sum: 0,
            finished: false,
        })
    }

    /// Which sequences ride in this step, and how many of their ids.
    fn plan(&self) -> Vec<Run> {
        let mut budget = self.opts.max_step_tokens;
        let mut runs = Vec::new();
        let mut taken = vec![false; self.active.len()];
        // The next token of every decoding sequence with a cache.
        for (i, a) in self.active.iter().enumerate() {
            if a.decoding && a.cached && a.remaining() == 1 && budget > 0 {
                runs.push(Run { idx: i, n: 1, logits: Logits::Last });
                budget -= 1;
                taken[i] = true;
            }
        }
        // Prompt chunks and cache-less passes, oldest first; the oldest always goes.
        let mut first = true;
        for (i, a) in self.active.iter().enumerate() {
            let left = a.remaining();
            if taken[i] || left == 0 {
                continue;
            }
            let (n, cost) = if a.cached {
                let n = left.min(self.opts.prefill_chunk);
                (n, n)
            } else {
                // The whole sequence again: its length so far plus what it adds.
                let len = match &a.seq {
                    Seq::Owned(s) => s.tokens().len(),
                    Seq::Shared(s) => s.lock().map(|s| s.tokens().len()).unwrap_or(0),
                };
                (left, len + left)
            };
            if cost > budget && !first {
                continue;
            }
            first = false;
            budget = budget.saturating_sub(cost);
            let logits = match &a.work {
                Work::Score(s) => s.logits_for(a.done, n),
                _ if n == left => Logits::Last,
                _ => Logits::Skip,
            };
            runs.push(Run { idx: i, n, logits });
        }
        runs
    }

    /// The forward pass of a step: each run's session borrowed (feeds' locked), its ids run,
    /// and on success committed. Returns the logits and, off the CPU, the rows that sequences
    /// sample from or report log-probabilities of, copied to the host with each step row's
    /// place among them (`u32::MAX`: not copied); the rows run; the wait for the device.
    #[allow(clippy::type_complexity)]
    fn run(&mut self, runs: &[Run]) -> Result<(StepLogits, Option<(Vec<f32>, Vec<u32>)>, usize, f64)> {
        let gpt2 = self.model.gpt2();
        let mut slots: Vec<Option<&mut Active<'m, 'c>>> = self.active.iter_mut().map(Some).collect();
        let mut parts: Vec<(SessionAccess<'_>, Pass, Vec<u32>, Logits)> = Vec::with_capacity(runs.len());
        for r in runs {
            let a = slots[r.idx].take().expect("a sequence runs once a step");
            let new = a.pending[a.done..a.done + r.n].to_vec();
            let Active { seq, .. } = a;
            let session = seq.access()?;
            let pass = session.pass(gpt2, &new)?;
            parts.push((session, pass, new, r.logits));
        }
        let rows = parts.iter().map(|(_, pass, _, _)| pass.ids.len()).sum();
        let step = {
            let segs: Vec<Segment<'_>> = parts.iter().map(|(s, pass, _, logits)| s.segment(pass, *logits)).collect();
            gpt2.forward_batch(&segs)?
        };
        // A GPU runs the pass asynchronously: time its end, not its launch.
        let t0 = Instant::now();
        gpt2.device().synchronize()?;
        let sync_ms = ms(t0);
        for (session, _, new, _) in parts.iter_mut() {
            session.commit(new);
        }
        drop(parts);
        let host = match &step.logits {
            Some(l) if !l.device().is_cpu() => {
                let wanted: Vec<u32> = runs
                    .iter()
                    .zip(&step.rows)
                    .filter(|(r, _)| r.logits != Logits::Skip && self.samples(r.idx))
                    .flat_map(|(_, rows)| rows.clone().map(|r| r as u32))
                    .collect();
                if wanted.is_empty() {
                    None
                } else {
                    let mut slots = vec![u32::MAX; l.dim(0)?];
                    for (i, &r) in wanted.iter().enumerate() {
                        slots[r as usize] = i as u32;
                    }
                    let data = l.index_select(&Tensor::new(wanted.as_slice(), l.device())?, 0)?.flatten_all()?.to_vec1::<f32>()?;
                    Some((data, slots))
                }
            }
            _ => None,
        };
        Ok((step, host, rows, sync_ms))
    }

    /// Whether the sequence needs its row on the host: it draws from its logits (not a plain
    /// argmax) or reports log-probabilities.
    fn samples(&self, idx: usize) -> bool {
        matches!(&self.active[idx].work, Work::Generate(g) if !g.plain_greedy || g.opts.logprobs.is_some())
    }

    fn record(&mut self, runs: &[Run], rows: usize, step_ms: f64) {
        let mut s = lock_stats(&self.stats);
        s.steps += 1;
        s.rows += rows as u64;
        s.sequences += runs.len() as u64;
        s.max_batch = s.max_batch.max(runs.len());
        s.busy_ms += step_ms;
        for r in runs {
            let a = &mut self.active[r.idx];
            a.passes += 1;
            a.batch_sum += runs.len();
            match &mut a.work {
                Work::Generate(g) if a.decoding => {
                    g.timings.decode_ms += step_ms;
                    g.timings.step_ms.push(step_ms);
                }
                Work::Generate(g) => g.timings.prefill_ms += step_ms,
                Work::Score(s) => {
                    s.timings.forward_ms += step_ms;
                    s.timings.forward_tokens += r.n;
                }
                Work::Feed(_) => {}
            }
            a.done += r.n;
        }
    }

    /// Each sequence whose pending ids all ran takes its next token (a feed ends with it); a
    /// text being scored takes its targets' log-probabilities.
    fn sample(&mut self, runs: &[Run], step: &StepLogits, host: Option<HostRows<'_>>) -> Result<()> {
        self.take_scores(runs, step, host.and_then(|h| h.all()))?;
        let rows: Vec<(usize, usize)> = runs
            .iter()
            .zip(&step.rows)
            .filter(|(r, _)| r.logits != Logits::Skip && !matches!(self.active[r.idx].work, Work::Score(_)))
            .map(|(r, rows)| (r.idx, rows.start))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let logits = step.logits.as_ref().ok_or_else(|| Error::InvalidInput("the step returned no logits".into()))?;
        // Off the CPU the argmax of rows left on the device runs there (kvgpt's CUDA decode step
        // took it with the logits) and only the ids cross.
        let device_argmax: Option<Vec<u32>> = match rows.iter().any(|&(_, row)| host.and_then(|h| h.row(row)).is_none()) {
            true => Some(match &step.greedy {
                Some(ids) => ids.to_vec1::<u32>()?,
                None => logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
            }),
            false => None,
        };
        let model = self.model;
        for (idx, row) in rows {
            let row_logits = host.and_then(|h| h.row(row));
            let greedy = match (row_logits, &device_argmax) {
                (Some(l), _) => argmax(l),
                (None, Some(ids)) => ids[row],
                (None, None) => unreachable!("computed for every row without host logits"),
            };
            let a = &mut self.active[idx];
            let outcome = match &mut a.work {
                Work::Feed(on_done) => Ok(Outcome::Fed(on_done.take(), greedy)),
                Work::Score(_) => continue, // scored in take_scores
                Work::Generate(g) => {
                    let Seq::Owned(session) = &a.seq else { unreachable!("a generation owns its session") };
                    let t0 = Instant::now();
                    let token = match (row_logits, g.plain_greedy) {
                        (Some(l), false) => g.sampler.sample(&mut l.to_vec(), session.tokens()),
                        _ => greedy,
                    };
                    // From the model's logits, before any of the sampler's processing.
                    let logprob = match (g.opts.logprobs, row_logits) {
                        (Some(k), Some(l)) => Some(token_logprob(l, token, k)),
                        (Some(_), None) => return Err(Error::internal("log-probabilities asked for but the logits stayed on the device")),
                        (None, _) => None,
                    };
                    g.timings.sample_ms += ms(t0);
                    lock_stats(&self.stats).generated_tokens += 1;
                    take_token(g, token, logprob, session.tokens().len(), model, a.submitted).map(|stop| match stop {
                        Some(reason) => Outcome::Stop(reason),
                        None => Outcome::Continue(token),
                    })
                }
            };
            match outcome {
                Ok(Outcome::Fed(cb, id)) => {
                    a.finished = true;
                    count_end(&self.stats);
                    if let Some(cb) = cb {
                        cb(Ok(id));
                    }
                }
                Ok(Outcome::Stop(reason)) => finish_active(a, reason, &self.stats),
                Ok(Outcome::Continue(token)) => {
                    a.pending.clear();
                    a.pending.push(token);
                    a.done = 0;
                    a.decoding = true;
                }
                Err(e) => self.fail(idx, e),
            }
        }
        Ok(())
    }

    /// Ends a sequence with an error.
    fn fail(&mut self, idx: usize, e: Error) {
        let a = &mut self.active[idx];
        if a.finished {
            return;
        }
        a.finished = true;
        count_end(&self.stats);
        match &mut a.work {
            Work::Generate(g) => {
                if let Some(cb) = g.on_done.take() {
                    cb(Err(e));
                }
            }
            Work::Feed(on_done) => {
                if let Some(cb) = on_done.take() {
                    cb(Err(e));
                }
            }
            Work::Score(s) => {
                if let Some(cb) = s.on_done.take() {
                    cb(Err(e));
                }
            }
        }
    }

    /// The log-probabilities of the targets that this step's rows predict, for every text being
    /// scored; then each whose window ran moves to its next window or ends. On the CPU the rows
    /// are read where they are; off it, one gather on the device brings back a float a row
    /// (rows whose alternatives are wanted are copied).
    fn take_scores(&mut self, runs: &[Run], step: &StepLogits, host: Option<&[f32]>) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        let t0 = Instant::now();
        // Each text's rows in the step, and their (position, target id).
        let mut wanted: Vec<(usize, usize, usize, Vec<(usize, u32)>)> = Vec::new();
        for (r, rows) in runs.iter().zip(&step.rows) {
            let a = &self.active[r.idx];
            if let (Work::Score(s), Logits::Span { start, len }) = (&a.work, r.logits) {
                wanted.push((r.idx, rows.start, s.k, s.targets(a.done - r.n, start, len)));
            }
        }
        if !wanted.is_empty() {
            let logits = step.logits.as_ref().ok_or_else(|| Error::internal("the step returned no logits"))?;
            let gathered = match host {
                Some(_) => Vec::new(),
                None => {
                    let (rows, ids): (Vec<u32>, Vec<u32>) = wanted
                        .iter()
                        .filter(|w| w.2 == 0)
                        .flat_map(|(_, row0, _, t)| t.iter().enumerate().map(move |(j, &(_, id))| ((row0 + j) as u32, id)))
                        .unzip();
                    if rows.is_empty() {
                        Vec::new()
                    } else {
                        gather_logprobs(logits, &rows, &ids)?
                    }
                }
            };
            let mut gathered = gathered.into_iter();
            let mut scored = Vec::with_capacity(wanted.len());
            for (idx, row0, k, targets) in wanted {
                let copied;
                let rows: &[f32] = match host {
                    Some(h) => &h[row0 * vocab..(row0 + targets.len()) * vocab],
                    None if k > 0 => {
                        copied = logits.narrow(0, row0, targets.len())?.flatten_all()?.to_vec1::<f32>()?;
                        &copied
                    }
                    None => &[],
                };
                let lps: Vec<TokenLogprob> = if rows.is_empty() {
                    targets.iter().map(|&(_, id)| TokenLogprob { id, logprob: gathered.next().unwrap_or(f32::NAN), top: Vec::new() }).collect()
                } else {
                    targets.par_iter().enumerate().map(|(j, &(_, id))| token_logprob(&rows[j * vocab..(j + 1) * vocab], id, k)).collect()
                };
                let Work::Score(s) = &mut self.active[idx].work else { unreachable!("collected above") };
                for (&(position, _), lp) in targets.iter().zip(lps) {
                    s.take(position, lp);
                }
                scored.push(idx);
            }
            // Like a forward pass, the step's log-probability work counts whole for each text.
            let logprob_ms = ms(t0);
            for idx in scored {
                if let Work::Score(s) = &mut self.active[idx].work {
                    s.timings.logprob_ms += logprob_ms;
                    s.progress();
                }
            }
        }
        // Windows that ran to their end.
        for r in runs {
            let a = &mut self.active[r.idx];
            if a.remaining() > 0 || a.finished {
                continue;
            }
            let Work::Score(s) = &mut a.work else { continue };
            if s.next_window() {
                a.pending = s.window_ids();
                a.done = 0;
                let Seq::Owned(session) = &mut a.seq else { unreachable!("a scoring owns its session") };
                session.truncate(0);
            } else {
                a.finished = true;
                count_end(&self.stats);
                if let Work::Score(s) = std::mem::replace(&mut a.work, Work::Feed(None)) {
                    s.finish(self.model, a.submitted, a.passes, a.batch_sum);
                }
            }
        }
        Ok(())
    }
}

/// Rows of a step's logits on the host: on the CPU all of them, read in place; off it, the rows
/// that `run` copied (`slots[row]`: the row's place in `data`, `u32::MAX` if it stayed on the
/// device).
#[derive(Clone, Copy)]
struct HostRows<'a> {
    data: &'a [f32],
    vocab: usize,
    slots: Option<&'a [u32]>,
}

impl<'a> HostRows<'a> {
    fn row(&self, r: usize) -> Option<&'a [f32]> {
        let i = match self.slots {
            None => r,
            Some(slots) => match slots.get(r) {
                Some(&i) if i != u32::MAX => i as usize,
                _ => return None,
            },
        };
        self.data.get(i * self.vocab..(i + 1) * self.vocab)
    }

    /// Every row, when all are here (the CPU).
    fn all(&self) -> Option<&'a [f32]> {
        self.slots.is_none().then_some(self.data)
    }
}

/// Calls `f` with the step's host rows: the CPU tensor's own storage, or the copy `run` made.
fn with_host_rows<R>(logits: Option<&Tensor>, copied: Option<(&[f32], &[u32])>, vocab: usize, f: impl FnOnce(Option<HostRows<'_>>) -> Result<R>) -> Result<R> {
    let Some(l) = logits.filter(|l| l.device().is_cpu()) else {
        return f(copied.map(|(data, slots)| HostRows { data, vocab, slots: Some(slots) }));
    };
    let (storage, layout) = l.storage_and_layout();
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::internal("the step's logits are not contiguous"))?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => f(Some(HostRows { data: &v[start..end], vocab, slots: None })),
        _ => Err(Error::internal("the step's logits are not f32")),
    }
}

/// Runs one request per item (made by `make`, given where its result goes) through a scheduler
/// on this thread with `engine`'s limits (the device's defaults when None); the results in item
/// order. `Model::generate_batch` and `Model::score_batch` are this.
pub(crate) fn run_each<'c, I, T: 'c>(
    model: &Model,
    items: impl IntoIterator<Item = I>,
    engine: Option<EngineOptions>,
    make: impl Fn(I, OnDone<'c, T>) -> Request<'c>,
) -> Result<Vec<Result<T>>> {
    let engine = engine.unwrap_or_else(|| EngineOptions::defaults_for(model.gpt2().device()));
    let mut scheduler = Scheduler::new(model, engine)?;
    let slots: Vec<Rc<RefCell<Option<Result<T>>>>> = items
        .into_iter()
        .map(|item| {
            let slot = Rc::new(RefCell::new(None));
            let to = slot.clone();
            scheduler.submit(make(item, Box::new(move |r| *to.borrow_mut() = Some(r))));
            slot
        })
        .collect();
    scheduler.run_to_completion();
    drop(scheduler);
    Ok(slots.into_iter().map(|s| s.take().expect("every request ends with a result")).collect())
}

/// Every request ends once: whatever is still here when the scheduler goes is failed.
impl Drop for Scheduler<'_, '_> {
    fn drop(&mut self) {
        if !self.is_idle() {
            self.fail_all(&Error::InvalidInput("the engine stopped before this request ended".into()));
        }
    }
}

enum Outcome<'c> {
    /// A feed's ids all ran: its callback and the greedy next id.
    Fed(Option<OnDone<'c, u32>>, u32),
    Stop(StopReason),
    Continue(u32),
}

fn lock_stats(stats: &Mutex<EngineStats>) -> MutexGuard<'_, EngineStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a sequence in flight that ends; before its callback runs.
fn count_end(stats: &Mutex<EngineStats>) {
    let mut s = lock_stats(stats);
    s.completed += 1;
    s.active = s.active.saturating_sub(1);
}

/// Records a sampled token, streams it, and says whether the generation stops here.
fn take_token(g: &mut Gen<'_, '_>, token: u32, logprob: Option<TokenLogprob>, seq_len: usize, model: &Model, submitted: Instant) -> Result<Option<StopReason>> {
    let cfg = model.config();
    if g.tokens.is_empty() {
        g.timings.ttft_ms = ms(submitted);
    }
    g.tokens.push(token);
    if let Some(lp) = logprob {
        g.logprobs.push(lp);
    }
    let is_eos = !g.opts.ignore_eos && cfg.eos_token_ids.contains(&token);
    let mut chunk = String::new();
    let mut hit_stop = false;
    if let (Some(ts), false) = (g.text.as_mut(), is_eos) {
        hit_stop = ts.push(token, &mut chunk)?;
    }
    let last = if is_eos {
        Some(StopReason::Eos)
    } else if hit_stop {
        Some(StopReason::StopString)
    } else if g.tokens.len() >= g.opts.max_new_tokens {
        Some(StopReason::MaxNewTokens)
    } else if seq_len >= cfg.n_positions {
        Some(StopReason::ContextFull) // the new token has no position left to be fed at
    } else if g.abort.is_set() {
        Some(StopReason::Aborted)
    } else {
        None
    };
    if let (Some(ts), Some(_)) = (g.text.as_mut(), last) {
        ts.flush(&mut chunk); // release text held back for a possible stop string
    }
    if let Some(cb) = g.on_token.as_mut() {
        cb(TokenEvent { token, text: &chunk, logprob: g.opts.logprobs.and(g.logprobs.last()) });
    }
    Ok(last)
}

/// Ends a sequence with its result (a generation) or as stopped (a feed); its place is freed
/// when the step ends.
fn finish_active(a: &mut Active<'_, '_>, reason: StopReason, stats: &Mutex<EngineStats>) {
    if a.finished {
        return;
    }
    a.finished = true;
    count_end(stats);
    match std::mem::replace(&mut a.work, Work::Feed(None)) {
        Work::Generate(g) => end_generation(g, reason, a.submitted, a.passes, a.batch_sum),
        Work::Feed(Some(cb)) => cb(Err(Error::InvalidInput("the feed was stopped before it ran".into()))),
        Work::Feed(None) => {}
        Work::Score(mut s) => {
            if let Some(cb) = s.on_done.take() {
                cb(Err(score_aborted()));
            }
        }
    }
}

/// Hands a generation its result.
fn end_generation(mut g: Box<Gen<'_, '_>>, reason: StopReason, submitted: Instant, passes: usize, batch_sum: usize) {
    let Some(on_done) = g.on_done.take() else { return };
    let mut timings = std::mem::take(&mut g.timings);
    timings.generated_tokens = g.tokens.len();
    timings.total_ms = ms(submitted);
    timings.mean_batch_size = if passes > 0 { batch_sum as f64 / passes as f64 } else { 0.0 };
    on_done(Ok(Generation {
        prompt: std::mem::take(&mut g.prompt),
        tokens: std::mem::take(&mut g.tokens),
        text: g.text.take().map(TextStream::into_text),
        stop_reason: reason,
        timings,
        cache_bytes: g.cache_bytes,
        logprobs: g.opts.logprobs.map(|_| std::mem::take(&mut g.logprobs)),
    }));
}
