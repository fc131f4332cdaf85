//! Choosing the next token with Hugging Face `generate` semantics: the repetition penalty
//! first (it applies to greedy too), then temperature, top-k and top-p, then a multinomial draw
//! from a seeded ChaCha20 generator. Temperature 0 means greedy (argmax, first index on ties).

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise logits are divided by it before sampling. Range [0, 100].
    pub temperature: f64,
    /// Keep the k most likely tokens (ties at the k-th value kept, as HF); 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches top_p; in (0, 1], 1 = off.
    pub top_p: f64,
    /// HF's CTRL-style penalty on every id already in the sequence; > 0, 1 = off.
    pub repetition_penalty: f64,
    /// Seed of the sampling generator; None draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(Error::range("temperature", format!("must be in [0, 100] (0 = greedy), got {}", self.temperature)));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::range("topP", format!("must be in (0, 1] (1 = off), got {}", self.top_p)));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0 && self.repetition_penalty <= 100.0) {
            return Err(Error::range(
                "repetitionPenalty",
                format!("must be in (0, 100] (1 = off), got {}", self.repetition_penalty),
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    seen: Vec<bool>,
    sorted: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Ok(Self { params, rng: ChaCha20Rng::seed_from_u64(seed), seen: vec![false; vocab_size], sorted: Vec::new() })
    }

    /// Picks the next id from `logits` (modified in place); `history` is prompt + generated.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.repetition_penalty != 1.0 {
            self.apply_repetition_penalty(logits, history);
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = (1.0 / self.params.temperature) as f32;
        logits.iter_mut().for_each(|l| *l *= inv_t);
        // Candidates sorted by logit, descending; top-k and top-p cut this list.
        self.sorted.clear();
        self.sorted.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let k = self.params.top_k;
        if k > 0 && k < self.sorted.len() {
            self.sorted.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let kth = self.sorted[k - 1].0;
            // HF removes only logits strictly below the k-th value.
            self.sorted.retain(|c| c.0 >= kth);
        }
        self.sorted.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let max = self.sorted[0].0 as f64;
        let mut probs: Vec<f64> = self.sorted.iter().map(|c| (c.0 as f64 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            // HF sorts ascending and drops tokens whose cumulative probability is <= 1 - top_p,
            // always keeping the most likely one. Walking from the least likely end:
            let mut cum = 0.0;
            let drop_limit = 1.0 - self.params.top_p;
            let mut dropped = 0;
            for p in probs.iter().rev() {
                cum += p;
                if cum <= drop_limit && dropped + 1 < probs.len() {
                    dropped += 1;
                } else {
                    break;
                }
            }
            keep = probs.len() - dropped;
        }
        let kept_total: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * kept_total;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return self.sorted[i].1;
            }
            u -= p;
        }
        self.sorted[keep - 1].1
    }

    /// HF's RepetitionPenaltyLogitsProcessor: each id of the sequence once, negative logits
    /// multiplied and positive ones divided by the penalty.
    fn apply_repetition_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty as f32;
        for &id in history {
            let i = id as usize;
            if i < logits.len() && !self.seen[i] {
                self.seen[i] = true;
                let l = logits[i];
                logits[i] = if l < 0.0 { l * penalty } else { l / penalty };
            }
        }
        for &id in history {
            if let Some(s) = self.seen.get_mut(id as usize) {
                *s = false;
            }
        }
    }
}

/// Index of the largest logit, the first one on ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The greedy id of a (vocab,) logits row. Off the CPU the argmax runs on the device and only
/// the id crosses to the host, not the vocab-sized row.
pub fn greedy_id(logits: &candle_core::Tensor) -> Result<u32> {
    if logits.device().is_cpu() {
        return Ok(argmax(&logits.to_vec1::<f32>()?));
    }
    Ok(logits.argmax(0)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed: Some(seed) }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default(), 4).unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() }, 3).unwrap();
        let mut logits = [4.0, -1.0, 3.0];
        // id 0 seen twice is penalized once: 4 / 2 = 2 < 3, so greedy picks id 2.
        assert_eq!(s.sample(&mut logits, &[0, 0, 1]), 2);
        assert_eq!(logits, [2.0, -2.0, 3.0]);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(1.5, 1, 1.0, 7), 5).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.1, 0.5, 2.0, 1.9, -1.0], &[]), 2);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probs ~ [0.665, 0.245, 0.09]: top_p 0.6 keeps only the first.
        let mut s = Sampler::new(params(1.0, 0, 0.6, 3), 3).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[]), 0);
        }
        // top_p 0.8 keeps two; both must show up and the third never.
        let mut s = Sampler::new(params(1.0, 0, 0.8, 3), 3).unwrap();
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[s.sample(&mut [2.0, 1.0, 0.0], &[]) as usize] += 1;
        }
        assert!(counts[0] > 200 && counts[1] > 50 && counts[2] == 0, "{counts:?}");
    }

    #[test]
    fn same_seed_same_draws() {
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed), 6).unwrap();
            (0..30).map(|_| s.sample(&mut [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn sampling_matches_the_distribution() {
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11), 2).unwrap();
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&mut [0.0, (3.0f32).ln()], &[]) == 1).count();
        let frac = ones as f64 / n as f64; // expected 0.75
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn rejects_out_of_range() {
        for p in [
            SamplingParams { temperature: -0.1, ..Default::default() },
            SamplingParams { temperature: f64::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.01, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
        ] {
            let e = p.validate().unwrap_err();
            assert_eq!(e.code(), "KVGPT_OPTION_RANGE");
        }
    }
}
