//! GPT-2 on candle ops: wte + wpe, n_layer blocks (ln_1, causal self-attention, ln_2, MLP),
//! ln_f, and the lm_head (tied to wte unless the config says otherwise).

use crate::config::{Activation, Gpt2Config};
use crate::error::{Error, Result};
use crate::cpu_ops;
use crate::kv_cache::KvCache;
use crate::loader::WeightDType;
use crate::packed::{PackedLinear, Packing};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::LayerNorm;
use std::collections::HashMap;

/// Which positions get logits: the last one (generation) or all (scoring, parity tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

/// A linear layer with nn.Linear's (out, in) weight. On the CPU, f32 weights go through
/// `matvec` (its kernel for a few rows, gemm with the bias fused for more) and f16/bf16/q8_0
/// through `packed` (f32 activations); elsewhere q8_0 runs candle's quantized matmul and the
/// rest candle's matmul.
struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

enum Weight {
    Dense(Tensor),
    /// q8_0 off the CPU (candle's kernels).
    Q8_0(QMatMul),
    /// q8_0, f16 or bf16 on the CPU, with f32 activations; the bias lives inside.
    Packed(PackedLinear),
}

impl Linear {
    /// `w` is (out, in) in f32; it is converted to `dtype` here, once.
    fn new(w: Tensor, b: Option<Tensor>, dtype: WeightDType) -> Result<Self> {
        let k = w.dim(1)?;
        if dtype == WeightDType::Q8_0 && k % GgmlDType::Q8_0.block_size() != 0 {
            return Err(Error::WeightsMismatch(format!(
                "q8_0 needs input sizes divisible by {}; this model has a layer with {k} inputs (use f32, f16 or bf16)",
                GgmlDType::Q8_0.block_size()
            )));
        }
        if w.device().is_cpu() {
            let packing = match dtype {
                WeightDType::F32 => None,
                WeightDType::F16 => Some(Packing::F16),
                WeightDType::Bf16 => Some(Packing::Bf16),
                WeightDType::Q8_0 => Some(Packing::Q8_0),
            };
            if let Some(packing) = packing {
                return Ok(Self { w: Weight::Packed(PackedLinear::new(&w, b.as_ref(), packing)?), b: None });
            }
        }
        let act = dtype.activations(w.device());
        let w = match dtype {
            WeightDType::Q8_0 => Weight::Q8_0(QMatMul::from_qtensor(QTensor::quantize(&w.contiguous()?, GgmlDType::Q8_0)?)?),
            _ => Weight::Dense(w.to_dtype(act)?.contiguous()?),
        };
        let b = b.map(|b| b.to_dtype(act)).transpose()?;
        Ok(Self { w, b })
    }

    /// Bytes of weights (and bias) one product reads.
    fn bytes(&self) -> usize {
        let b = self.b.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
        b + match &self.w {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Q8_0(QMatMul::QTensor(w)) => w.storage_size_in_bytes(),
            Weight::Q8_0(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Packed(w) => w.bytes(),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let y = match &self.w {
            Weight::Dense(w) if cpu_ops::is_cpu_f32(x) => {
                return Ok(crate::matvec::matvec_cpu(x, w, self.b.as_ref())?);
            }
            Weight::Dense(w) => {
                // (..., k) -> (rows, k) @ (k, out): one plain matmul, no broadcast copy of W.
                let k = x.dim(D::Minus1)?;
                let mut out_dims = x.dims().to_vec();
                *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
                x.contiguous()?.reshape((rows, k))?.matmul(&w.t()?)?.reshape(out_dims)?
            }
            Weight::Q8_0(w) => x.contiguous()?.apply(w)?,
            Weight::Packed(w) => return Ok(w.forward(x)?),
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    scale: f64,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,     // (vocab, C)
    wpe: Tensor,     // (n_positions, C)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear, // (vocab, C), no bias
    act: candle_nn::Activation,
    device: Device,
    dtype: WeightDType,
}

/// Takes named tensors out of the checkpoint map, checking each shape against the config.
struct Weights<'a> {
    map: &'a mut HashMap<String, Tensor>,
    dtype: WeightDType,
}

impl Weights<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| Error::WeightsMismatch(format!("tensor {name} is missing")))?;
        if t.dims() != shape {
            return Err(Error::WeightsMismatch(format!(
                "tensor {name} has shape {:?} but config.json implies {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    }

    /// HF's Conv1D stores its weight as (in, out); candle's Linear wants (out, in), so it is
    /// transposed once here, at load.
    fn conv1d(&mut self, prefix: &str, n_in: usize, n_out: usize) -> Result<Linear> {
        let w = self.take(&format!("{prefix}.weight"), &[n_in, n_out])?.t()?.contiguous()?;
        let b = self.take(&format!("{prefix}.bias"), &[n_out])?;
        Linear::new(w, Some(b), self.dtype)
    }

    fn layer_norm(&mut self, prefix: &str, n: usize, eps: f64) -> Result<LayerNorm> {
        let w = self.take(&format!("{prefix}.weight"), &[n])?;
        let act = self.dtype.activations(w.device());
        let w = w.to_dtype(act)?;
        let b = self.take(&format!("{prefix}.bias"), &[n])?.to_dtype(act)?;
        Ok(LayerNorm::new(w, b, eps))
    }
}

impl Gpt2 {
    /// Builds the model from f32 checkpoint tensors named in the `h.0.attn.c_attn.weight` style,
    /// converting them to `dtype`.
    pub fn from_tensors(cfg: Gpt2Config, mut map: HashMap<String, Tensor>, device: &Device, dtype: WeightDType) -> Result<Self> {
        let (c, v, eps) = (cfg.n_embd, cfg.vocab_size, cfg.layer_norm_epsilon);
        let act = dtype.activations(device);
        let lm_head_untied = map.remove("lm_head.weight");
        let mut w = Weights { map: &mut map, dtype };
        let wte = w.take("wte.weight", &[v, c])?;
        let wpe = w.take("wpe.weight", &[cfg.n_positions, c])?.to_dtype(act)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            let mut scale = 1.0;
            if cfg.scale_attn_weights {
                scale /= (cfg.head_dim() as f64).sqrt();
            }
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            blocks.push(Block {
                ln_1: w.layer_norm(&format!("{p}.ln_1"), c, eps)?,
                attn: Attention {
                    c_attn: w.conv1d(&format!("{p}.attn.c_attn"), c, 3 * c)?,
                    c_proj: w.conv1d(&format!("{p}.attn.c_proj"), c, c)?,
                    n_head: cfg.n_head,
                    scale,
                },
                ln_2: w.layer_norm(&format!("{p}.ln_2"), c, eps)?,
                c_fc: w.conv1d(&format!("{p}.mlp.c_fc"), c, cfg.n_inner)?,
                mlp_proj: w.conv1d(&format!("{p}.mlp.c_proj"), cfg.n_inner, c)?,
            });
        }
        let ln_f = w.layer_norm("ln_f", c, eps)?;
        if let Some(extra) = map.keys().find(|k| k.starts_with("h.")) {
            return Err(Error::WeightsMismatch(format!(
                "tensor {extra} is not used by a {}-layer config",
                cfg.n_layer
            )));
        }
        let wte = wte.to_dtype(act)?;
        let lm_head = match (cfg.tie_word_embeddings, lm_head_untied) {
            (false, Some(t)) if t.dims() == [v, c] => t,
            (false, Some(t)) => {
                return Err(Error::WeightsMismatch(format!(
                    "lm_head.weight has shape {:?}, expected {:?}",
                    t.dims(),
                    [v, c]
                )))
            }
            (false, None) => {
                return Err(Error::WeightsMismatch(
                    "tie_word_embeddings is false but lm_head.weight is missing".into(),
                ))
            }
            (true, _) => wte.clone(),
        };
        // Tied: with a dense dtype both are the one tensor (to_dtype of a tensor already in that
        // dtype shares its storage); packed (CPU f16/bf16/q8_0) or quantized, the lm_head is a
        // copy in that form and wte stays as the embedding table.
        let lm_head = Linear::new(lm_head, None, dtype)?;
        let act = match cfg.activation {
            Activation::GeluTanh => candle_nn::Activation::NewGelu,
            Activation::GeluErf => candle_nn::Activation::Gelu,
            Activation::Relu => candle_nn::Activation::Relu,
            Activation::Silu => candle_nn::Activation::Silu,
        };
        Ok(Self { cfg, wte, wpe, blocks, ln_f, lm_head, act, device: device.clone(), dtype })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of activations and of the KV cache.
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    pub fn weight_dtype(&self) -> WeightDType {
        self.dtype
    }

    /// Bytes of weights one decode step reads: every linear layer with its bias, the lm_head
    /// and the layer norms (of the embeddings, one row each).
    pub fn step_weight_bytes(&self) -> usize {
        let ln = |l: &LayerNorm| 2 * l.weight().elem_count() * l.weight().dtype().size_in_bytes();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.attn.c_attn.bytes() + b.attn.c_proj.bytes() + b.c_fc.bytes() + b.mlp_proj.bytes() + ln(&b.ln_1) + ln(&b.ln_2))
            .sum();
        blocks + ln(&self.ln_f) + self.lm_head.bytes()
    }

    /// Runs `ids` (B, T), whose first position is `pos`, through the model. With a cache, the
    /// new K/V are written in place and attention covers the cache's filled part; `pos` must
    /// then equal `cache.len()`. Without one, the sequence attends to itself only.
    /// Returns logits (B, vocab) for `Logits::Last`, (B, T, vocab) for `Logits::All`.
    pub fn forward(&self, ids: &Tensor, pos: usize, mut cache: Option<&mut KvCache>, which: Logits) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.cfg.n_embd;
        if t == 0 {
            return Err(Error::InvalidInput("forward needs at least one token".into()));
        }
        if pos + t > self.cfg.n_positions {
            return Err(Error::InvalidInput(format!(
                "positions {pos}..{} exceed the model's context of {} (n_positions)",
                pos + t,
                self.cfg.n_positions
            )));
        }
        if let Some(cache) = cache.as_deref() {
            if cache.len() != pos {
                return Err(Error::InvalidInput(format!(
                    "position {pos} does not follow the cache's {} filled positions",
                    cache.len()
                )));
            }
            cache.check_room(t)?;
        }
        let tok = self.wte.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?; // (B, T, C)
        let pe = self.wpe.narrow(0, pos, t)?; // (T, C)
        let mut x = tok.broadcast_add(&pe)?;
        // Off the CPU the causal mask is an additive tensor: made here once, not once per layer
        // (at T = 910 without a cache that was 12 host-built 3.3 MB uploads a step).
        let first = if cache.is_some() { pos } else { 0 }; // without a cache, keys start at this call's first token
        let mask = if t > 1 && !cpu_ops::is_cpu_f32(&x) {
            Some(cpu_ops::causal_mask(t, first, &self.device)?.to_dtype(x.dtype())?)
        } else {
            None
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?;
            let h = block.attn.forward(&h, i, first, cache.as_deref(), mask.as_ref())?;
            x = (x + h)?;
            let h = block.ln_2.forward(&x)?;
            let h = block.mlp_proj.forward(&self.activation(&block.c_fc.forward(&h)?)?)?;
            x = (x + h)?;
        }
        if let Some(cache) = cache.as_deref_mut() {
            cache.advance(t);
        }
        let x = match which {
            Logits::Last => x.narrow(1, t - 1, 1)?, // (B, 1, C)
            Logits::All => x,
        };
        let x = self.ln_f.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?; // (B, T or 1, vocab)
        Ok(match which {
            Logits::Last => logits.squeeze(1)?,
            Logits::All => logits,
        })
    }
}

impl Gpt2 {
    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            candle_nn::Activation::NewGelu => cpu_ops::gelu_tanh(x),
            act => Ok(x.apply(&act)?),
        }
    }
}

impl Attention {
    /// `first`: the absolute position of the first key (the cache's start, or this call's first
    /// token without a cache); `mask`: the causal mask off the CPU (see `Gpt2::forward`).
    fn forward(&self, x: &Tensor, layer: usize, first: usize, cache: Option<&KvCache>, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (nh, hs) = (self.n_head, c / self.n_head);
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let split = |i: usize| -> Result<Tensor> {
            // (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
            Ok(qkv.narrow(2, i * c, c)?.reshape((b, t, nh, hs))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = match cache {
            Some(cache) => cache.write(layer, &k, &v)?, // (B, nh, L, hs), L = filled + T
            None => (k, v),
        };
        if cpu_ops::is_cpu_f32(&q) {
            return self.c_proj.forward(&cpu_ops::attention(&q, &k, &v, self.scale)?); // (B, T, C) in
        }
        let att = q.matmul(&k.t()?)?; // (B, nh, T, L)
        let att = cpu_ops::causal_softmax(&att, self.scale, first, mask)?;
        let y = att.matmul(&v)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        Ok(self.c_proj.forward(&y)?)
    }
}
