//! GPT-2 on candle ops: wte + wpe, n_layer blocks (ln_1, causal self-attention, ln_2, MLP),
//! ln_f, and the lm_head (tied to wte unless the config says otherwise). One forward pass
//! carries a step of many sequences (`forward_batch`): their rows go through the linear layers
//! together, so the weights are read once for the whole step, and each sequence attends to its
//! own KV cache.

use crate::cpu::matvec::RowPlan;
use crate::cpu::ops;
use crate::error::{Error, Result};
use crate::model::attention::{Attention, SeqRows, StepAttention};
use crate::model::config::{Activation, Gpt2Config};
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;
use crate::model::loader::WeightDType;
use crate::model::weights::TensorSource;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::LayerNorm;
use std::collections::HashMap;
use std::ops::Range;

/// Which positions of a sequence's rows get logits: the last one (the next token), all of them
/// (parity tests), `len` of them from row `start` of the segment (scoring: the rows that predict
/// a target), or none (a prompt chunk with more to come).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
    Span { start: usize, len: usize },
    Skip,
}

/// One sequence's part of a forward pass: `ids` at positions `cache.len()..`; their K/V are
/// written into `cache`, over which they attend.
pub struct Segment<'a> {
    pub ids: &'a [u32],
    pub cache: &'a KvCache,
    pub logits: Logits,
}

/// A step's logits: (R, vocab) in f32 (None when no segment asked for any), and for each
/// segment, in the order given, the range of its rows.
pub struct StepLogits {
    pub logits: Option<Tensor>,
    pub rows: Vec<Range<usize>>,
    /// Each row's greedy id (R,) in u32, the first largest logit, where the step took it on the
    /// device already (kvgpt's CUDA decode step); else None.
    pub greedy: Option<Tensor>,
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
    wte: Option<Tensor>, // (vocab, C); None: looked up in the tied lm_head's packed rows
    wpe: Tensor,     // (n_positions, C)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear, // (vocab, C), no bias
    act: candle_nn::Activation,
    device: Device,
    dtype: WeightDType,
    /// On CUDA, the decode step in kvgpt's kernels as a CUDA graph (`cuda::step`), for the
    /// shapes and dtypes it holds.
    #[cfg(feature = "cuda")]
    decode: Option<std::sync::Mutex<crate::cuda::step::DecodeStep>>,
}

/// Takes named tensors out of the checkpoint, checking each shape against the config.
struct Weights<'a> {
    map: &'a mut dyn TensorSource,
    dtype: WeightDType,
}

impl Weights<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .take(name)?
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
        let w = ops::transpose(&self.take(&format!("{prefix}.weight"), &[n_in, n_out])?)?;
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
        Self::from_source(cfg, &mut map, device, dtype)
    }

    /// As `from_tensors`, taking each tensor from `source` as it is needed and converting it
    /// before the next is taken.
    pub fn from_source(cfg: Gpt2Config, source: &mut dyn TensorSource, device: &Device, dtype: WeightDType) -> Result<Self> {
        let (c, v, eps) = (cfg.n_embd, cfg.vocab_size, cfg.layer_norm_epsilon);
        let act = dtype.activations(device);
        // Tied, a checkpoint's own lm_head.weight (some carry one) is not read at all.
        let lm_head_untied = if cfg.tie_word_embeddings { None } else { source.take("lm_head.weight")? };
        let mut w = Weights { map: &mut *source, dtype };
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
        if let Some(extra) = source.remaining().into_iter().find(|k| k.starts_with("h.")) {
            return Err(Error::WeightsMismatch(format!(
                "tensor {extra} is not used by a {}-layer config",
                cfg.n_layer
            )));
        }
        let wte = wte.to_dtype(act)?;
        let tied = cfg.tie_word_embeddings;
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
        // copy in that form.
        let lm_head = Linear::new(lm_head, None, dtype)?;
        // The lookup table of a packed dtype on the CPU (f32 activations). Tied f16 and q8_0:
        // the lm_head's packed rows themselves, widened to f32 for the few a step looks up (as
        // llama.cpp reads a tied q8_0 token_embd; GPT-2 small: 77 MB less than a table of its
        // own). f16 rows are the f16 table's values exactly; q8_0's put each embedding on the
        // 8-bit grid (parity: tests/parity.rs). bf16 keeps an f16 table: its 8-bit mantissa on
        // every embedding moved tiny-gpt2's greedy ids off HF's at the first step.
        let packed_cpu = device.is_cpu() && matches!(dtype, WeightDType::F16 | WeightDType::Bf16 | WeightDType::Q8_0);
        let wte = if packed_cpu && tied && matches!(dtype, WeightDType::F16 | WeightDType::Q8_0) {
            None
        } else if packed_cpu {
            Some(wte.to_dtype(DType::F16)?)
        } else {
            Some(wte)
        };
        let act = match cfg.activation {
            Activation::GeluTanh => candle_nn::Activation::NewGelu,
            Activation::GeluErf => candle_nn::Activation::Gelu,
            Activation::Relu => candle_nn::Activation::Relu,
            Activation::Silu => candle_nn::Activation::Silu,
        };
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut model = Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            act,
            device: device.clone(),
            dtype,
            #[cfg(feature = "cuda")]
            decode: None,
        };
        #[cfg(feature = "cuda")]
        {
            model.decode = model.decode_step()?.map(std::sync::Mutex::new);
        }
        Ok(model)
    }

    /// The CUDA decode step over this model's weights, where it applies: a CUDA device, f32,
    /// f16 or bf16 weights (q8_0 keeps candle's quantized products), GPT-2's tanh GELU.
    #[cfg(feature = "cuda")]
    fn decode_step(&self) -> Result<Option<crate::cuda::step::DecodeStep>> {
        use crate::cuda::step::{weight_address as at, DecodeStep, LayerWeights, StepMode, StepWeights};
        let Device::Cuda(dev) = &self.device else { return Ok(None) };
        if self.dtype == WeightDType::Q8_0 || self.act != candle_nn::Activation::NewGelu {
            return Ok(None);
        }
        let mode = StepMode::from_env()?;
        let Some(wte) = &self.wte else { return Ok(None) };
        let linear = |l: &Linear, what: &str| -> Result<Option<(u64, u64)>> {
            match l.dense() {
                Some((w, Some(b))) => Ok(Some((at(w, what)?, at(b, what)?))),
                _ => Ok(None),
            }
        };
        let ln = |l: &LayerNorm, what: &str| -> Result<Option<[u64; 2]>> {
            match l.bias() {
                Some(b) => Ok(Some([at(l.weight(), what)?, at(b, what)?])),
                None => Ok(None),
            }
        };
        let mut layers = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (Some((attn_w, attn_b)), Some((proj_w, proj_b)), Some((fc_w, fc_b)), Some((mlp_w, mlp_b)), Some(ln_1), Some(ln_2)) = (
                linear(&b.attn.c_attn, "c_attn")?,
                linear(&b.attn.c_proj, "c_proj")?,
                linear(&b.c_fc, "c_fc")?,
                linear(&b.mlp_proj, "mlp c_proj")?,
                ln(&b.ln_1, "ln_1")?,
                ln(&b.ln_2, "ln_2")?,
            ) else {
                return Ok(None);
            };
            let scale = b.attn.scale as f32;
            layers.push(LayerWeights { ln_1, attn_w, attn_b, proj_w, proj_b, ln_2, fc_w, fc_b, mlp_w, mlp_b, scale });
        }
        let (Some(ln_f), Some((lm_head, None))) = (ln(&self.ln_f, "ln_f")?, self.lm_head.dense()) else { return Ok(None) };
        let w = StepWeights {
            wte: at(wte, "wte")?,
            wpe: at(&self.wpe, "wpe")?,
            layers,
            ln_f,
            lm_head: at(lm_head, "lm_head")?,
            n_embd: self.cfg.n_embd,
            n_head: self.cfg.n_head,
            n_inner: self.cfg.n_inner,
            vocab: self.cfg.vocab_size,
            eps: self.cfg.layer_norm_epsilon as f32,
        };
        let spare = KvCache::new(&self.cfg, 1, self.cache_dtype(), &self.device)?;
        DecodeStep::new(mode, dev, w, spare, self.dtype())
    }

    /// Which decode path this CUDA model takes (None: it has only candle's, e.g. on the CPU or
    /// in q8_0).
    #[cfg(feature = "cuda")]
    pub fn cuda_step_mode(&self) -> Option<crate::cuda::step::StepMode> {
        self.decode.as_ref().map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).mode())
    }

    /// Switches the decode path of a CUDA model that has kvgpt's (tests and benchmarks compare
    /// them); false where it has only candle's.
    #[cfg(feature = "cuda")]
    pub fn set_cuda_step_mode(&self, mode: crate::cuda::step::StepMode) -> bool {
        match &self.decode {
            Some(d) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).set_mode(mode);
                true
            }
            None => false,
        }
    }

    /// Turns programmatic dependent launch of the CUDA decode step's kernels off or back on
    /// (where the build allows it: `cuda::step::pdl_allowed`); returns whether it is on now, or
    /// None where the model has only candle's path.
    #[cfg(feature = "cuda")]
    pub fn set_cuda_pdl(&self, on: bool) -> Option<bool> {
        self.decode.as_ref().map(|d| {
            let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
            d.set_pdl(on);
            d.pdl()
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of activations.
    pub fn dtype(&self) -> DType {
        self.wpe.dtype()
    }

    /// The dtype of the KV cache: the activations' but for f16, bf16 and q8_0 weights on the
    /// CPU, whose f32 activations keep an f16 cache (half the bytes a token, as llama.cpp's;
    /// the attention kernel widens it, `cpu::attention`).
    pub fn cache_dtype(&self) -> DType {
        if self.device.is_cpu() && self.dtype != WeightDType::F32 {
            DType::F16
        } else {
            self.dtype()
        }
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

    /// One forward pass over a step of sequences. Each segment's K/V are written into its cache
    /// at `cache.len()..` and its queries attend to that cache's first `len + T` positions; the
    /// caller advances the caches (`KvCache::advance`) once it succeeds. Rows are laid out with
    /// the short segments first (at most `MAX_ROWS` each) and every long one after, so that on
    /// the CPU a row's numbers do not depend on what else is in the step (see `RowPlan`).
    pub fn forward_batch(&self, segs: &[Segment<'_>]) -> Result<StepLogits> {
        let c = self.cfg.n_embd;
        if segs.is_empty() {
            return Err(Error::InvalidInput("a forward pass needs at least one sequence".into()));
        }
        let mut caches = std::collections::HashSet::with_capacity(segs.len());
        for s in segs {
            let (t, pos) = (s.ids.len(), s.cache.len());
            if !caches.insert(s.cache as *const KvCache) {
                return Err(Error::InvalidInput("two segments of one forward pass share a KV cache (a sequence runs once a pass)".into()));
            }
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
            s.cache.check_room(t)?;
            if let Logits::Span { start, len } = s.logits {
                if len == 0 || start + len > t {
                    return Err(Error::InvalidInput(format!("logits for rows {start}..{} of a {t}-token segment", start + len)));
                }
            }
            if let Some(&id) = s.ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(Error::InvalidInput(format!("token id {id} is outside the vocabulary (ids are 0..{})", self.cfg.vocab_size)));
            }
        }
        // A step of one-token rows each wanting its next token: kvgpt's CUDA decode step.
        #[cfg(feature = "cuda")]
        if let Some(decode) = &self.decode {
            if segs.iter().all(|s| s.ids.len() == 1 && s.logits == Logits::Last) {
                let mut decode = decode.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((logits, greedy)) = decode.run(segs)? {
                    let rows = (0..segs.len()).map(|i| i..i + 1).collect();
                    return Ok(StepLogits { logits: Some(logits), rows, greedy: Some(greedy) });
                }
            }
        }
        // Row order: one-row segments, then short chunks, then each long one (`RowPlan`).
        let mut order: Vec<usize> = (0..segs.len()).collect();
        order.sort_by_key(|&i| RowPlan::rank(segs[i].ids.len()));
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows = Vec::with_capacity(segs.len());
        let mut plan = RowPlan::empty();
        for &i in &order {
            let s = &segs[i];
            let (t, pos) = (s.ids.len(), s.cache.len());
            rows.push(SeqRows { row0: ids.len(), t, pos, cache: s.cache });
            ids.extend_from_slice(s.ids);
            positions.extend((pos..pos + t).map(|p| p as u32));
            plan.push(t);
        }
        let n = ids.len();
        let tokens = match &self.wte {
            Some(wte) => wte.index_select(&Tensor::new(ids.as_slice(), &self.device)?, 0)?.to_dtype(self.wpe.dtype())?,
            None => self.lm_head.rows(&ids)?,
        };
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let mut x = (tokens + self.wpe.index_select(&positions, 0)?)?; // (N, C)
        let step = StepAttention::new(&rows, self.blocks.len(), &self.device, x.dtype())?;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?;
            let h = block.attn.forward(&h, &plan, &rows, i, &step)?;
            x = (x + h)?;
            let h = block.ln_2.forward(&x)?;
            let h = block.mlp_proj.forward(&self.activation(&block.c_fc.forward(&h, &plan)?)?, &plan)?;
            x = (x + h)?;
        }
        debug_assert_eq!(x.dims(), [n, c]);
        self.logits(&x, segs, &order, &rows)
    }

    /// ln_f and the lm_head over the rows the segments asked for, in `RowPlan`'s order: every
    /// one-row request (`Last`, a one-row span) first, then the `All`/`Span` rows of short
    /// requests, then those of each long one.
    fn logits(&self, x: &Tensor, segs: &[Segment<'_>], order: &[usize], rows: &[SeqRows<'_>]) -> Result<StepLogits> {
        let mut out = vec![0..0; segs.len()];
        let mut wanted: Vec<u32> = Vec::new();
        let mut plan = RowPlan::empty();
        for rank in 0..=2 {
            for (&i, r) in order.iter().zip(rows) {
                let (first, count) = match segs[i].logits {
                    Logits::Skip => continue,
                    Logits::Last => (r.row0 + r.t - 1, 1),
                    Logits::All => (r.row0, r.t),
                    Logits::Span { start, len } => (r.row0 + start, len),
                };
                if RowPlan::rank(count) != rank {
                    continue;
                }
                out[i] = wanted.len()..wanted.len() + count;
                wanted.extend((first..first + count).map(|r| r as u32));
                plan.push(count);
            }
        }
        if wanted.is_empty() {
            return Ok(StepLogits { logits: None, rows: out, greedy: None });
        }
        let x = x.index_select(&Tensor::new(wanted.as_slice(), &self.device)?, 0)?; // (R, C)
        let x = self.ln_f.forward(&x)?;
        let logits = self.lm_head.forward(&x, &plan)?.to_dtype(DType::F32)?; // (R, vocab)
        Ok(StepLogits { logits: Some(logits), rows: out, greedy: None })
    }

    /// Runs `ids` (1, T) of one sequence, whose first position is `pos`. With a cache, the new
    /// K/V are written in place and attention covers the cache's filled part; `pos` must then
    /// equal `cache.len()`. Without one, the sequence (starting at position 0) attends to
    /// itself only. Returns logits (1, vocab) for `Logits::Last`, (1, T, vocab) for `Logits::All` (and
    /// (1, len, vocab) for a span).
    pub fn forward(&self, ids: &Tensor, pos: usize, cache: Option<&mut KvCache>, which: Logits) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b != 1 {
            return Err(Error::InvalidInput(format!("forward takes one sequence (1, T), got {b}; batch sequences with forward_batch")));
        }
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let mut scratch;
        let cache = match cache {
            Some(cache) if cache.len() != pos => {
                return Err(Error::InvalidInput(format!(
                    "position {pos} does not follow the cache's {} filled positions",
                    cache.len()
                )))
            }
            Some(cache) => cache,
            None if pos != 0 => return Err(Error::InvalidInput(format!("without a cache a sequence starts at position 0, not {pos}"))),
            None => {
                scratch = KvCache::scratch(&self.cfg, t.clamp(1, self.cfg.n_positions), self.cache_dtype(), &self.device)?;
                &mut scratch
            }
        };
        let step = self.forward_batch(&[Segment { ids: &ids, cache, logits: which }])?;
        cache.advance(t);
        let logits = step.logits.ok_or_else(|| Error::InvalidInput("Logits::Skip asks for no logits".into()))?;
        Ok(match which {
            Logits::All | Logits::Span { .. } => logits.unsqueeze(0)?, // (1, rows, vocab)
            _ => logits,                          // (1, vocab)
        })
    }
}

impl Gpt2 {
    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            candle_nn::Activation::NewGelu => ops::gelu_tanh(x),
            act => Ok(x.apply(&act)?),
        }
    }
}
