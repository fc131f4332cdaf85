//! Scoring: the log-probability of each token of a text under the model, the mean negative
//! log-likelihood (HF's `loss` with `labels=input_ids`) and the perplexity, exp(mean NLL).
//! A text longer than `max_length` tokens is read in windows as HF's perplexity guide does:
//! windows of `max_length` tokens starting every `stride` tokens, each scoring only the targets
//! that no earlier window scored (the first token of a window has no context in it and is never
//! a target). A window is a prompt like a generation's: the engine reads it in chunks, batched
//! with everything else in flight, and asks only the rows that predict a target for logits.
//! Also here: a row's log-probabilities (for these and for `generate`'s `logprobs`).

use crate::engine::scheduler::{run_each, Abort, EngineOptions, OnDone, Prompt, Request, ScoreRequest};
use crate::error::{Error, Result};
use crate::model::gpt2::Logits;
use crate::model::loader::Model;
use candle_core::Tensor;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Most alternatives a token can carry (OpenAI's limit for `logprobs`).
pub const MAX_LOGPROBS: usize = 20;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreOptions {
    /// Tokens a window holds; None = the model's context (n_positions). In [2, n_positions].
    pub max_length: Option<usize>,
    /// Tokens between window starts; None = `max_length` (windows side by side). In [1, max_length].
    pub stride: Option<usize>,
    /// The k most likely tokens to report at each scored position, 0..=20.
    pub logprobs: usize,
    /// Put the BOS token before the text, so its first token is scored too.
    pub add_bos: bool,
}

impl ScoreOptions {
    /// `(max_length, stride)` for a model of `n_positions`, after checking every option.
    pub fn resolve(&self, n_positions: usize) -> Result<(usize, usize)> {
        let max_length = self.max_length.unwrap_or(n_positions);
        if !(2..=n_positions).contains(&max_length) {
            return Err(Error::range(
                "maxLength",
                format!("must be an integer in [2, {n_positions}] (the model's context, n_positions), got {max_length}"),
            ));
        }
        let stride = self.stride.unwrap_or(max_length);
        if !(1..=max_length).contains(&stride) {
            return Err(Error::range("stride", format!("must be an integer in [1, maxLength = {max_length}], got {stride}")));
        }
        check_logprobs(self.logprobs)?;
        Ok((max_length, stride))
    }
}

pub(crate) fn check_logprobs(k: usize) -> Result<()> {
    if k > MAX_LOGPROBS {
        return Err(Error::range("logprobs", format!("must be an integer in [0, {MAX_LOGPROBS}], got {k}")));
    }
    Ok(())
}

/// One window: ids `begin..end` of the text; it scores the targets `first_target..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub first_target: usize,
}

/// HF's perplexity-guide loop over `n` ids: windows start at 0, stride, 2 stride, ... until one
/// reaches the end; a window's targets are the ids after the previous window's end (and never
/// its own first id). A window that would score nothing (a last window of one id, when stride =
/// max_length) is left out: HF's loop gives NaN there.
pub fn windows(n: usize, max_length: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let (mut begin, mut prev_end) = (0, 0);
    while begin < n {
        let end = (begin + max_length).min(n);
        let first_target = prev_end.max(begin + 1);
        if first_target < end {
            out.push(Window { begin, end, first_target });
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// A token's log-probability and the `top` alternatives at its position (most likely first,
/// the lower id first on ties), each as (id, log-probability).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A scored token: its position in the ids and its log-probability given the ids before it
/// (within its window).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredToken {
    pub position: usize,
    pub logprob: TokenLogprob,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreTimings {
    /// From arrival to admission (a place among the engine's sequences).
    pub queue_ms: f64,
    /// The forward passes that carried this text (a pass shared with others counts whole).
    pub forward_ms: f64,
    /// Log-softmax of the scored rows and the alternatives.
    pub logprob_ms: f64,
    pub total_ms: f64,
    /// Positions run through the model (more than the ids where windows overlap).
    pub forward_tokens: usize,
    /// Mean number of sequences in the forward passes that carried it.
    pub mean_batch_size: f64,
}

#[derive(Debug, Clone)]
pub struct Score {
    /// The ids scored (the text's, after the BOS with `add_bos`).
    pub ids: Vec<u32>,
    /// The text each id completes, in order (None without a tokenizer); they add up to the text.
    pub pieces: Option<Vec<String>>,
    /// Every scored token in order: all ids but the first when the text fits one window.
    pub tokens: Vec<ScoredToken>,
    /// Mean negative log-likelihood of the scored tokens (nats), and exp of it.
    pub nll: f64,
    pub perplexity: f64,
    pub windows: usize,
    pub timings: ScoreTimings,
}

/// A text being scored in the engine: its windows, the current one, and what was scored.
pub(crate) struct Scoring<'c> {
    ids: Vec<u32>,
    windows: Vec<Window>,
    window: usize,
    pub(crate) k: usize,
    tokens: Vec<ScoredToken>,
    nll_sum: f64,
    targets: usize,
    pub(crate) timings: ScoreTimings,
    pub(crate) abort: Abort<'c>,
    on_progress: Option<Box<dyn FnMut(usize, usize) + 'c>>,
    pub(crate) on_done: Option<OnDone<'c, Score>>,
}

impl<'c> Scoring<'c> {
    /// Checks the request and lays out its windows; returns it with the longest window's length
    /// (its KV cache's capacity).
    pub(crate) fn new(model: &Model, r: ScoreRequest<'c>, queue_ms: f64) -> std::result::Result<(Self, usize), (Error, OnDone<'c, Score>)> {
        let ScoreRequest { text, options, abort, on_progress, on_done } = r;
        let prepared = (|| {
            let cfg = model.config();
            let (max_length, stride) = options.resolve(cfg.n_positions)?;
            let mut ids = match text {
                Prompt::Text(text) => model.tokenize(&text)?,
                Prompt::Ids(ids) => ids,
            };
            if options.add_bos {
                let bos = cfg.bos_token_id.ok_or_else(|| Error::InvalidInput("addBos: config.json has no bos_token_id".into()))?;
                ids.insert(0, bos);
            }
            if ids.len() < 2 {
                let what = if ids.is_empty() { "the text is empty".to_string() } else { format!("the text is one token ({})", ids[0]) };
                return Err(Error::InvalidInput(format!(
                    "nothing to score: {what}, and a token is scored given the ones before it (give at least 2 tokens, or set addBos to score the first one after BOS)"
                )));
            }
            model.check_ids(&ids)?;
            let windows = windows(ids.len(), max_length, stride);
            Ok((ids, windows))
        })();
        let (ids, windows) = match prepared {
            Ok(p) => p,
            Err(e) => return Err((e, on_done)),
        };
        let capacity = windows.iter().map(|w| w.end - w.begin).max().unwrap_or(1);
        let targets = windows.iter().map(|w| w.end - w.first_target).sum();
        let scoring = Self {
            ids,
            windows,
            window: 0,
            k: options.logprobs,
            tokens: Vec::with_capacity(targets),
            nll_sum: 0.0,
            targets,
            timings: ScoreTimings { queue_ms, ..Default::default() },
            abort,
            on_progress,
            on_done: Some(on_done),
        };
        Ok((scoring, capacity))
    }

    /// The ids of the current window.
    pub(crate) fn window_ids(&self) -> Vec<u32> {
        let w = self.windows[self.window];
        self.ids[w.begin..w.end].to_vec()
    }

    /// The logits a chunk of the current window needs, its positions `from..from + n` (in the
    /// window): the rows whose next id is a target.
    pub(crate) fn logits_for(&self, from: usize, n: usize) -> Logits {
        let w = self.windows[self.window];
        // Row p (window position) predicts id begin + p + 1.
        let first = (w.first_target - w.begin - 1).max(from);
        let last = (w.end - w.begin - 1).min(from + n); // exclusive
        if first >= last {
            Logits::Skip
        } else {
            Logits::Span { start: first - from, len: last - first }
        }
    }

    /// The targets of a span of a chunk starting at window position `from`: for each row,
    /// (position in the text, target id).
    pub(crate) fn targets(&self, from: usize, start: usize, len: usize) -> Vec<(usize, u32)> {
        let w = self.windows[self.window];
        (0..len).map(|j| w.begin + from + start + j + 1).map(|p| (p, self.ids[p])).collect()
    }

    pub(crate) fn take(&mut self, position: usize, logprob: TokenLogprob) {
        self.nll_sum -= logprob.logprob as f64;
        self.tokens.push(ScoredToken { position, logprob });
    }

    /// Tells the progress callback how many targets are scored, of how many.
    pub(crate) fn progress(&mut self) {
        let (done, total) = (self.tokens.len(), self.targets);
        if let Some(f) = self.on_progress.as_mut() {
            f(done, total);
        }
    }

    /// Moves to the next window; false when this was the last.
    pub(crate) fn next_window(&mut self) -> bool {
        self.window += 1;
        self.window < self.windows.len()
    }

    /// Hands the result over.
    pub(crate) fn finish(mut self, model: &Model, submitted: Instant, passes: usize, batch_sum: usize) {
        let Some(on_done) = self.on_done.take() else { return };
        let result = (|| {
            let pieces = match model.tokenizer.as_ref() {
                Some(t) => {
                    let mut decoder = t.decode_stream();
                    let mut pieces = Vec::with_capacity(self.ids.len());
                    for &id in &self.ids {
                        pieces.push(decoder.step(id)?.unwrap_or_default());
                    }
                    Some(pieces)
                }
                None => None,
            };
            let n = self.tokens.len().max(1) as f64;
            let nll = self.nll_sum / n;
            let mut timings = std::mem::take(&mut self.timings);
            timings.total_ms = submitted.elapsed().as_secs_f64() * 1e3;
            timings.mean_batch_size = if passes > 0 { batch_sum as f64 / passes as f64 } else { 0.0 };
            Ok(Score {
                ids: std::mem::take(&mut self.ids),
                pieces,
                tokens: std::mem::take(&mut self.tokens),
                nll,
                perplexity: nll.exp(),
                windows: self.windows.len(),
                timings,
            })
        })();
        on_done(result);
    }
}

/// log(sum(exp(row))), with the largest value taken out first; the sum runs in eight f64 lanes.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    #[inline(always)]
    fn body(row: &[f32]) -> f32 {
        let max = crate::cpu::ops::lanes(row, f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return max;
        }
        let mut acc = [0f64; 8];
        let chunks = row.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&x| crate::cpu::ops::exp(x - max) as f64).sum();
        for c in chunks {
            for k in 0..8 {
                acc[k] += crate::cpu::ops::exp(c[k] - max) as f64;
            }
        }
        max + (acc.iter().sum::<f64>() + tail).ln() as f32
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(row: &[f32]) -> f32 {
            body(row)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(row) };
        }
    }
    body(row)
}

/// The log-probability of `id` in a row of logits, and the `k` most likely ids.
pub fn token_logprob(row: &[f32], id: u32, k: usize) -> TokenLogprob {
    let lse = log_sum_exp(row);
    TokenLogprob { id, logprob: row[id as usize] - lse, top: top_k(row, k, lse) }
}

/// The k largest entries of a row as (id, value - lse), largest first, the lower id first on
/// ties: one pass keeping a sorted list of k.
fn top_k(row: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() == k && x <= best[k - 1].1 {
            continue;
        }
        // After every entry not smaller: equal values keep the earlier (lower) id first.
        let at = best.partition_point(|&(_, y)| y >= x);
        best.insert(at, (i as u32, x));
        best.truncate(k);
    }
    best.into_iter().map(|(i, x)| (i, x - lse)).collect()
}

/// Log-probabilities of `targets[j]` in row `rows[j]` of (R, vocab) f32 logits on any device,
/// computed there: only one float a row comes back.
pub fn gather_logprobs(logits: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Vec<f32>> {
    let dev = logits.device();
    let sel = logits.index_select(&Tensor::new(rows, dev)?, 0)?; // (n, vocab)
    let max = sel.max_keepdim(1)?; // (n, 1)
    let lse = (sel.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?; // (n, 1)
    let picked = sel.gather(&Tensor::new(targets, dev)?.unsqueeze(1)?, 1)?; // (n, 1)
    Ok((picked - lse)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Model {
    /// Scores a text (or ids) on this thread: see `Score`.
    pub fn score(&self, text: Prompt, opts: &ScoreOptions, abort: &AtomicBool) -> Result<Score> {
        let mut out = self.score_batch(vec![text], opts, None, abort)?;
        out.pop().expect("one result per text")
    }

    /// Scores several texts at once, batched (with `engine`'s limits, the device's defaults when
    /// None). One result per text, in order; a text's bad input fails that text alone.
    pub fn score_batch(&self, texts: Vec<Prompt>, opts: &ScoreOptions, engine: Option<EngineOptions>, abort: &AtomicBool) -> Result<Vec<Result<Score>>> {
        opts.resolve(self.config().n_positions)?;
        run_each(self, texts, engine, |text, on_done| {
            Request::Score(ScoreRequest { text, options: opts.clone(), abort: Abort::Borrowed(abort), on_progress: None, on_done })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_hf_guide() {
        // Disjoint windows: each window's first id is context only.
        let w = windows(10, 4, 4);
        assert_eq!(w, vec![Window { begin: 0, end: 4, first_target: 1 }, Window { begin: 4, end: 8, first_target: 5 }, Window { begin: 8, end: 10, first_target: 9 }]);
        // Overlapping: later windows score what the previous one did not reach.
        let w = windows(10, 4, 2);
        assert_eq!(w, vec![Window { begin: 0, end: 4, first_target: 1 }, Window { begin: 2, end: 6, first_target: 4 }, Window { begin: 4, end: 8, first_target: 6 }, Window { begin: 6, end: 10, first_target: 8 }]);
        // A last window of one id scores nothing and is left out.
        assert_eq!(windows(9, 4, 4).len(), 2);
        // Every id but the first is scored once with overlapping windows.
        for (n, m, s) in [(100, 16, 5), (37, 37, 1), (50, 8, 7), (2, 2, 1)] {
            let targets: Vec<usize> = windows(n, m, s).iter().flat_map(|w| w.first_target..w.end).collect();
            assert_eq!(targets, (1..n).collect::<Vec<_>>(), "n {n} max {m} stride {s}");
            assert!(windows(n, m, s).iter().all(|w| w.end - w.begin <= m));
        }
    }

    #[test]
    fn logprobs_of_a_row() {
        let row = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() as f32;
        assert!((log_sum_exp(&row) - lse).abs() < 1e-6);
        let t = token_logprob(&row, 4, 3);
        assert!((t.logprob - (0.5 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        assert!((t.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(token_logprob(&row, 0, 9).top.len(), 5);
        assert!(token_logprob(&row, 0, 0).top.is_empty());
        // A long row: the f64 lanes keep the sum exact to f32 precision.
        let long: Vec<f32> = (0..50257).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let want = long.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&long) as f64 - want).abs() < 2e-5);
    }

    #[test]
    fn device_path_equals_host_path() {
        let dev = candle_core::Device::Cpu;
        let data: Vec<f32> = (0..3 * 50).map(|i| ((i * 37) % 23) as f32 / 3.0 - 2.0).collect();
        let logits = Tensor::from_vec(data.clone(), (3, 50), &dev).unwrap();
        let got = gather_logprobs(&logits, &[2, 0], &[7, 49]).unwrap();
        assert!((got[0] - token_logprob(&data[100..150], 7, 0).logprob).abs() < 1e-5);
        assert!((got[1] - token_logprob(&data[0..50], 49, 0).logprob).abs() < 1e-5);
    }

    #[test]
    fn options_are_checked() {
        let ok = ScoreOptions::default().resolve(128).unwrap();
        assert_eq!(ok, (128, 128));
        for o in [
            ScoreOptions { max_length: Some(129), ..Default::default() },
            ScoreOptions { max_length: Some(1), ..Default::default() },
            ScoreOptions { stride: Some(0), ..Default::default() },
            ScoreOptions { max_length: Some(64), stride: Some(65), ..Default::default() },
            ScoreOptions { logprobs: 21, ..Default::default() },
        ] {
            assert_eq!(o.resolve(128).unwrap_err().code(), "KVGPT_OPTION_RANGE", "{o:?}");
        }
    }
}
