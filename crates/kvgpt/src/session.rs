//! One sequence's state: its token history and, with the cache on, its KV cache. `feed` runs
//! the forward pass for new ids: over the new ids only with the cache, over the whole sequence
//! again without it (HF `use_cache=False`).

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::{Gpt2, Logits};
use candle_core::Tensor;

pub struct Session {
    cache: Option<KvCache>,
    tokens: Vec<u32>,
    capacity: usize,
}

impl Session {
    /// A session for at most `capacity` positions (at most n_positions); with `use_cache` its
    /// KV cache is allocated here, once.
    pub fn new(gpt2: &Gpt2, capacity: usize, use_cache: bool) -> Result<Self> {
        let cfg = gpt2.config();
        let capacity = capacity.min(cfg.n_positions);
        let cache = if use_cache {
            Some(KvCache::new(cfg, 1, capacity.max(1), gpt2.dtype(), gpt2.device())?)
        } else {
            None
        };
        Ok(Self { cache, tokens: Vec::with_capacity(capacity), capacity })
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn cache(&self) -> Option<&KvCache> {
        self.cache.as_ref()
    }

    /// Appends `ids` and returns the logits (1, vocab) at the last position.
    pub fn feed(&mut self, gpt2: &Gpt2, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::InvalidInput("feed needs at least one token id".into()));
        }
        if self.tokens.len() + ids.len() > self.capacity {
            return Err(Error::InvalidInput(format!(
                "the session holds {} positions and has room for {} more, {} given",
                self.tokens.len(),
                self.capacity - self.tokens.len(),
                ids.len()
            )));
        }
        let device = gpt2.device();
        let pos = self.tokens.len();
        self.tokens.extend_from_slice(ids);
        let logits = match self.cache.as_mut() {
            Some(cache) => {
                let x = Tensor::new(ids, device)?.unsqueeze(0)?; // (1, T)
                gpt2.forward(&x, pos, Some(cache), Logits::Last)
            }
            None => {
                let x = Tensor::new(self.tokens.as_slice(), device)?.unsqueeze(0)?; // (1, S)
                gpt2.forward(&x, 0, None, Logits::Last)
            }
        };
        if logits.is_err() {
            self.tokens.truncate(pos);
        }
        logits
    }

    /// Keeps the first `len` tokens and forgets the rest; the cache stays allocated.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        if let Some(cache) = self.cache.as_mut() {
            cache.truncate(len);
        }
    }
}
