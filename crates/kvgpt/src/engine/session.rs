//! One sequence's state: its token history and, with the cache on, its KV cache. A forward
//! pass over new ids runs them only with the cache, the whole sequence again without it (HF
//! `use_cache=False`). The engine batches sessions' passes (`Scheduler`); `feed` runs one alone.

use crate::error::{Error, Result};
use crate::model::gpt2::{Gpt2, Logits, Segment};
use crate::model::kv_cache::KvCache;
use candle_core::Tensor;

pub struct Session {
    cache: Option<KvCache>,
    tokens: Vec<u32>,
    capacity: usize,
}

/// What one forward pass of a session runs: the ids and, without a cache of its own, the
/// scratch cache they go into (for that pass only).
pub(crate) struct Pass {
    pub ids: Vec<u32>,
    pub scratch: Option<KvCache>,
}

impl Session {
    /// A session for at most `capacity` positions (at most n_positions); with `use_cache` its
    /// KV cache is allocated here, once.
    pub fn new(gpt2: &Gpt2, capacity: usize, use_cache: bool) -> Result<Self> {
        let cfg = gpt2.config();
        let capacity = capacity.min(cfg.n_positions);
        let cache = if use_cache {
            Some(KvCache::new(cfg, capacity.max(1), gpt2.cache_dtype(), gpt2.device())?)
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

    /// Checks that `n` more ids fit, before any work.
    pub(crate) fn check_room(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidInput("feed needs at least one token id".into()));
        }
        if self.tokens.len() + n > self.capacity {
            return Err(Error::InvalidInput(format!(
                "the session holds {} positions and has room for {} more, {} given",
                self.tokens.len(),
                self.capacity - self.tokens.len(),
                n
            )));
        }
        Ok(())
    }

    /// The pass that runs `new` next: `new` into the cache, or the whole sequence with `new`
    /// appended into a scratch cache.
    pub(crate) fn pass(&self, gpt2: &Gpt2, new: &[u32]) -> Result<Pass> {
        if self.cache.is_some() {
            return Ok(Pass { ids: new.to_vec(), scratch: None });
        }
        let ids = [self.tokens.as_slice(), new].concat();
        let scratch = KvCache::scratch(gpt2.config(), ids.len(), gpt2.cache_dtype(), gpt2.device())?;
        Ok(Pass { ids, scratch: Some(scratch) })
    }

    /// The segment of `pass` in a step.
    pub(crate) fn segment<'a>(&'a self, pass: &'a Pass, logits: Logits) -> Segment<'a> {
        let cache = match (&pass.scratch, &self.cache) {
            (Some(scratch), _) => scratch,
            (None, Some(cache)) => cache,
            (None, None) => unreachable!("a pass without a scratch cache belongs to a session with a cache"),
        };
        Segment { ids: &pass.ids, cache, logits }
    }

    /// Records that `new` ran: appended to the history, the cache advanced past it.
    pub(crate) fn commit(&mut self, new: &[u32]) {
        self.tokens.extend_from_slice(new);
        if let Some(cache) = self.cache.as_mut() {
            cache.advance(new.len());
        }
    }

    /// Appends `ids`, runs them in one forward pass of this session alone, and returns the
    /// logits (1, vocab) at the last position.
    pub fn feed(&mut self, gpt2: &Gpt2, ids: &[u32]) -> Result<Tensor> {
        self.check_room(ids.len())?;
        let pass = self.pass(gpt2, ids)?;
        let step = gpt2.forward_batch(&[self.segment(&pass, Logits::Last)])?;
        self.commit(ids);
        step.logits.ok_or_else(|| Error::InvalidInput("no logits".into()))
    }

    /// Keeps the first `len` tokens and forgets the rest; the cache stays allocated.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        if let Some(cache) = self.cache.as_mut() {
            cache.truncate(len);
        }
    }
}
