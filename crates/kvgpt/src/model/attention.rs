//! GPT-2's causal self-attention for a step of many sequences: one c_attn product over every
//! row of the step, each sequence's new K/V written into its own cache, each sequence's
//! queries attending to its cache only, one c_proj product. The attention is one fused kernel
//! over all sequences on the CPU (`cpu::attention`) and two launches a layer on CUDA
//! (`cuda::attend`), whatever the number of sequences; other devices take candle's ops, one
//! sequence at a time.

use crate::cpu::matvec::RowPlan;
use crate::error::Result;
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;
use candle_core::{DType, Device, Tensor};

/// One sequence's rows in a step: `t` queries, rows `row0..row0 + t` of the step, at positions
/// `pos..pos + t` of `cache` (which holds the `pos` before them). A step's sequences cover its
/// rows in order.
pub struct SeqRows<'a> {
    pub row0: usize,
    pub t: usize,
    pub pos: usize,
    pub cache: &'a KvCache,
}

pub struct Attention {
    pub(crate) c_attn: Linear,
    pub(crate) c_proj: Linear,
    pub(crate) n_head: usize,
    pub(crate) scale: f64,
}

/// What a step's attention needs besides the rows, made once per forward pass.
pub enum StepAttention {
    /// The CPU's fused kernel.
    Cpu,
    /// kvgpt's CUDA kernels and the step's layout on the device.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::StepMeta),
    /// Candle's ops, with each sequence's causal mask (None where t = 1).
    Ops(Vec<Option<Tensor>>),
}

impl StepAttention {
    pub fn new(seqs: &[SeqRows<'_>], n_layer: usize, device: &Device, dtype: DType) -> Result<Self> {
        if device.is_cpu() && dtype == DType::F32 {
            return Ok(Self::Cpu);
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return Ok(Self::Cuda(crate::cuda::StepMeta::new(seqs, n_layer, dev)?));
        }
        let _ = n_layer;
        Ok(Self::Ops(causal_masks(seqs, device, dtype)?))
    }
}

impl Attention {
    /// x (N, C), the step's rows after ln_1 -> (N, C).
    pub fn forward(&self, x: &Tensor, plan: &RowPlan, seqs: &[SeqRows<'_>], layer: usize, step: &StepAttention) -> Result<Tensor> {
        let qkv = self.c_attn.forward(x, plan)?; // (N, 3C)
        let y = match step {
            StepAttention::Cpu => {
                for s in seqs {
                    s.cache.write_rows(layer, &qkv, s.row0, s.t)?;
                }
                crate::cpu::attention::attend_batch(&qkv, seqs, layer, self.n_head, self.scale as f32)?
            }
            #[cfg(feature = "cuda")]
            StepAttention::Cuda(meta) => crate::cuda::attend(&qkv, meta, layer, self.n_head, self.scale as f32)?,
            StepAttention::Ops(masks) => self.attend_each(&qkv, seqs, layer, masks)?,
        };
        self.c_proj.forward(&y, plan) // (N, C)
    }

    /// Candle's ops, one sequence at a time: the cache written with slice_set, then
    /// softmax(q k^T) v over its filled part.
    fn attend_each(&self, qkv: &Tensor, seqs: &[SeqRows<'_>], layer: usize, masks: &[Option<Tensor>]) -> Result<Tensor> {
        let c = qkv.dim(1)? / 3;
        let (nh, hs) = (self.n_head, c / self.n_head);
        let mut ys = Vec::with_capacity(seqs.len());
        for (s, mask) in seqs.iter().zip(masks) {
            s.cache.write_rows(layer, qkv, s.row0, s.t)?;
            // (t, C) -> (1, t, nh, hs) -> (1, nh, t, hs)
            let q = qkv.narrow(0, s.row0, s.t)?.narrow(1, 0, c)?.reshape((1, s.t, nh, hs))?.transpose(1, 2)?.contiguous()?;
            let (kb, vb) = s.cache.layer_buffers(layer);
            let (k, v) = (kb.narrow(2, 0, s.pos + s.t)?, vb.narrow(2, 0, s.pos + s.t)?); // (1, nh, L, hs)
            let att = q.matmul(&k.t()?)?; // (1, nh, t, L)
            let att = causal_softmax(&att, self.scale, s.pos, mask.as_ref())?;
            let y = att.matmul(&v)?; // (1, nh, t, hs)
            ys.push(y.transpose(1, 2)?.reshape((s.t, c))?); // (t, C)
        }
        Ok(Tensor::cat(&ys, 0)?) // (N, C)
    }
}

/// Each sequence's additive causal mask for `attend_each` (None where t = 1), made once per
/// forward pass rather than once per layer (at T = 910 without a cache that was 12 host-built
/// 3.3 MB uploads a step).
fn causal_masks(seqs: &[SeqRows<'_>], device: &Device, dtype: DType) -> Result<Vec<Option<Tensor>>> {
    seqs.iter()
        .map(|s| {
            if s.t > 1 {
                Ok(Some(causal_mask(s.t, s.pos, device)?.to_dtype(dtype)?))
            } else {
                Ok(None)
            }
        })
        .collect()
}

/// softmax(scale * att + causal mask) over the last dim of att (B, nh, T, pos + T), in candle's
/// ops (the path of devices without batched attention kernels). The mask is `mask`
/// (`causal_mask(T, pos)` in att's dtype on its device, made once per forward pass rather than
/// once per layer), built here when None.
pub fn causal_softmax(att: &Tensor, scale: f64, pos: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let t = att.dim(2)?;
    let att = (att * scale)?;
    let att = match (t > 1, mask) {
        (false, _) => att,
        (true, Some(mask)) => att.broadcast_add(mask)?,
        (true, None) => att.broadcast_add(&causal_mask(t, pos, att.device())?.to_dtype(att.dtype())?)?,
    };
    Ok(candle_nn::ops::softmax_last_dim(&att)?)
}

/// (T, pos + T) additive mask: query i (absolute position pos + i) sees keys 0..=pos + i.
pub fn causal_mask(t: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let l = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..l).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, l), device)?)
}

