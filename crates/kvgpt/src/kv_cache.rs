//! The KV cache: per layer one K and one V buffer of shape (B, n_head, capacity, head_dim),
//! allocated once per session. Each step writes the new entries in place at `len` (as ggml
//! writes a view at n_past and HF's StaticCache does index_copy_) and attention reads
//! `narrow(2, 0, len + T)`. Nothing is concatenated or reallocated while generating.

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
    bytes: usize,
}

impl KvCache {
    pub fn new(cfg: &Gpt2Config, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        if capacity == 0 || capacity > cfg.n_positions {
            return Err(Error::range(
                "cache capacity",
                format!("must be in 1..={} (n_positions), got {capacity}", cfg.n_positions),
            ));
        }
        let shape = (batch, cfg.n_head, capacity, cfg.head_dim()); // (B, nh, cap, hs)
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::with_capacity(cfg.n_layer);
        // Filled with ones, not zeros: a zeroed buffer comes from calloc, whose pages the OS maps
        // only when first written, so RSS would climb position by position (73.7 KB a token for
        // GPT-2 small) and each step would page-fault. Writing every element here commits the
        // whole cache once. Positions at or past `len` are never read, so the value is moot.
        for _ in 0..cfg.n_layer {
            k.push(Tensor::ones(shape, dtype, device)?);
            v.push(Tensor::ones(shape, dtype, device)?);
        }
        let bytes = cfg.kv_cache_bytes(capacity, batch, dtype.size_in_bytes());
        Ok(Self { k, v, len: 0, capacity, bytes })
    }

    /// Positions already filled (the `n_past` of the next step).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the K and V buffers: the seed article's formula at this capacity.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Checks that `t` more positions fit, before any layer writes.
    pub(crate) fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::InvalidInput(format!(
                "KV cache is full: {} positions filled, {t} more requested, capacity {}",
                self.len, self.capacity
            )));
        }
        Ok(())
    }

    /// Writes this step's k, v (B, nh, T, hs) of `layer` in place at `len` and returns views over
    /// everything filled so far, (B, nh, len + T, hs). `advance` moves `len` once all layers wrote.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        self.k[layer].slice_set(k, 2, self.len)?;
        self.v[layer].slice_set(v, 2, self.len)?;
        let k_all = self.k[layer].narrow(2, 0, self.len + t)?; // (B, nh, len + T, hs)
        let v_all = self.v[layer].narrow(2, 0, self.len + t)?;
        Ok((k_all, v_all))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps the first `len` positions and forgets the rest; the buffers stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The buffer of one layer (for tests that check nothing was reallocated).
    pub fn layer_buffers(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }
}
