//! One sequence's KV cache: per layer one K and one V buffer of shape (1, n_head, capacity,
//! head_dim), HF's layout, all of them views of one allocation made (and, for a cache that
//! lives on, filled) once when the sequence starts. Each forward pass writes
//! the new entries in place at `len` (as ggml writes a view at n_past and HF's StaticCache does
//! index_copy_) and attends over the first `len + T` positions. Nothing is concatenated or
//! reallocated while generating; a batch of sequences is many caches, one per sequence.

use crate::error::{Error, Result};
use crate::model::config::Gpt2Config;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};
use half::slice::HalfFloatSliceExt;

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// On CUDA, each layer's K and V buffer addresses, for kvgpt's kernels (found once here).
    #[cfg(feature = "cuda")]
    addresses: Vec<u64>,
    len: usize,
    capacity: usize,
    n_head: usize,
    head_dim: usize,
    bytes: usize,
}

impl KvCache {
    /// A cache for `capacity` positions (1..=n_positions), every element written once here.
    pub fn new(cfg: &Gpt2Config, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        // Filled with ones, not zeros: a zeroed buffer comes from calloc, whose pages the OS maps
        // only when first written, so RSS would climb position by position (73.7 KB a token for
        // GPT-2 small) and each step would page-fault. Writing every element here commits the
        // whole cache once. Positions at or past `len` are never read, so the value is moot.
        Self::alloc(cfg, capacity, dtype, device, true)
    }

    /// A cache for one forward pass of a sequence run without one (HF `use_cache=False`): the
    /// pass writes all of it before reading, and it is dropped afterwards, so it is not filled.
    pub fn scratch(cfg: &Gpt2Config, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        Self::alloc(cfg, capacity, dtype, device, false)
    }

    fn alloc(cfg: &Gpt2Config, capacity: usize, dtype: DType, device: &Device, fill: bool) -> Result<Self> {
        if capacity == 0 || capacity > cfg.n_positions {
            return Err(Error::range(
                "cache capacity",
                format!("must be in 1..={} (n_positions), got {capacity}", cfg.n_positions),
            ));
        }
        // One allocation (and one fill: a single launch on a GPU) for every layer's K and V:
        // (2 n_layer, nh, cap, hs), K of layer i at 2i, V at 2i + 1.
        let shape = (2 * cfg.n_layer, cfg.n_head, capacity, cfg.head_dim());
        let all = if fill { Tensor::ones(shape, dtype, device)? } else { Tensor::zeros(shape, dtype, device)? };
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            k.push(all.narrow(0, 2 * i, 1)?); // (1, nh, cap, hs)
            v.push(all.narrow(0, 2 * i + 1, 1)?);
        }
        let bytes = cfg.kv_cache_bytes(capacity, 1, dtype.size_in_bytes());
        #[cfg(feature = "cuda")]
        let addresses = if device.is_cuda() {
            k.iter().zip(&v).flat_map(|(k, v)| [crate::cuda::address(k), crate::cuda::address(v)]).collect::<Result<Vec<u64>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            k,
            v,
            #[cfg(feature = "cuda")]
            addresses,
            len: 0,
            capacity,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            bytes,
        })
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

    /// On CUDA: K and V buffer addresses, layer after layer.
    #[cfg(feature = "cuda")]
    pub(crate) fn addresses(&self) -> &[u64] {
        &self.addresses
    }

    /// The K and V buffers of `layer`, (1, nh, capacity, hs).
    pub fn layer_buffers(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Writes the K and V of `t` new positions, rows `row0..row0 + t` of a step's qkv (N, 3C),
    /// in place at `len..len + t` of `layer`. `advance` moves `len` once every layer wrote.
    pub(crate) fn write_rows(&self, layer: usize, qkv: &Tensor, row0: usize, t: usize) -> Result<()> {
        let (nh, hs) = (self.n_head, self.head_dim);
        let c = nh * hs;
        for (buf, col) in [(&self.k[layer], c), (&self.v[layer], 2 * c)] {
            if buf.device().is_cpu() {
                buf.inplace_op2(qkv, &WriteRows { row0, t, pos: self.len, col, nh, hs })?;
            } else {
                // (t, C) -> (1, t, nh, hs) -> (1, nh, t, hs)
                let x = qkv.narrow(0, row0, t)?.narrow(1, col, c)?.reshape((1, t, nh, hs))?.transpose(1, 2)?.contiguous()?;
                buf.slice_set(&x, 2, self.len)?;
            }
        }
        Ok(())
    }

    /// Moves `len` past `t` positions that a forward pass wrote (`Gpt2::forward_batch` leaves
    /// this to its caller, once the pass succeeded); at most up to the capacity.
    pub fn advance(&mut self, t: usize) {
        self.len = (self.len + t).min(self.capacity);
    }

    /// Keeps the first `len` positions and forgets the rest; the buffers stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// Copies rows of a qkv (N, 3C) block, columns `col..col + C`, into a cache buffer
/// (1, nh, cap, hs) at positions `pos..pos + t`, head by head.
struct WriteRows {
    row0: usize,
    t: usize,
    pos: usize,
    col: usize,
    nh: usize,
    hs: usize,
}

impl InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "kvgpt-kv-write"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        let (nh, hs) = (self.nh, self.hs);
        let (_, _, cap, _) = dl.shape().dims4()?;
        let (_, width) = sl.shape().dims2()?;
        let src = crate::cpu::ops::f32_slice(src, sl, "qkv")?;
        let Some((start, end)) = dl.contiguous_offsets() else {
            candle_core::bail!("the KV cache must be a contiguous buffer")
        };
        if self.pos + self.t > cap || self.col + nh * hs > width || (self.row0 + self.t) * width > src.len() || end - start < nh * cap * hs {
            candle_core::bail!("kv write of {} rows at {} does not fit", self.t, self.pos);
        }
        // Each head's rows of the step, to (h, pos + j) of the buffer, as f32 or rounded to f16.
        let rows = (0..nh).flat_map(|h| (0..self.t).map(move |j| (h, j)));
        let from = |h: usize, j: usize| (self.row0 + j) * width + self.col + h * hs;
        let to = |h: usize, j: usize| start + (h * cap + self.pos + j) * hs;
        match dst {
            CpuStorage::F32(dst) => rows.for_each(|(h, j)| dst[to(h, j)..][..hs].copy_from_slice(&src[from(h, j)..][..hs])),
            CpuStorage::F16(dst) => rows.for_each(|(h, j)| dst[to(h, j)..][..hs].convert_from_f32_slice(&src[from(h, j)..][..hs])),
            _ => candle_core::bail!("the KV cache must be f32 or f16 on the CPU"),
        }
        Ok(())
    }
}
