//! The decode step on CUDA in kvgpt's own kernels (decode.cu), over buffers of its
//! own, captured as a CUDA graph and replayed. Candle's path spends 8-12 us of host work on each
//! of a step's ~220 launches (bench/gpu/NOTES.md), so a GPT-2 small step took about 2 ms for
//! 0.06 ms of memory traffic; here a step of up to 8 one-token rows is 5 kernels a layer and 2
//! more, 62 for GPT-2 small, all replayed from one graph: the host copies the rows' ids,
//! positions and cache addresses into device buffers and launches the graph.
//!
//! A graph freezes its kernels' arguments, so everything a step reads or writes sits at fixed
//! addresses: activations in per-bucket buffers (a step of R rows runs in the bucket of 1, 2, 4
//! or 8 rows that holds it; the rows beyond R write into a one-position cache of their own), the
//! rows' ids, positions and caches' addresses in device memory, the attention over each row's
//! whole filled cache with the length read on the device. Two graphs a bucket: one for short
//! contexts, one whose attention splits each head's keys over several blocks (`SPLIT_FROM`).
//!
//! `KVGPT_CUDA_STEP` picks the path at load: `graph` (the default), `kernels` (the same
//! launches without a graph: what the graph saves) or `candle` (candle's ops, as before).

use super::address;
use crate::error::{Error, Result};
use crate::model::gpt2::Segment;
use crate::model::kv_cache::KvCache;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Storage, Tensor};
use std::sync::Arc;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "kvgpt_decode";
/// Row counts of the buckets (the gemv kernels' NR); a step of more rows than the last takes
/// candle's path.
const BUCKETS: [usize; 4] = [1, 2, 4, 8];
/// From this many keys (the longest row's position + 1) a step takes the graph that splits the
/// keys of each (row, head) over blocks.
const SPLIT_FROM: usize = 64;
/// Blocks the split attention aims for: two per multiprocessor of an H100/H200.
const SPLIT_BLOCKS: usize = 264;
/// Warps a block of the products (GEMV_WARPS in decode.cu).
const GEMV_WARPS: u32 = 4;
/// Threads a block of the attention (DEC_THREADS in decode.cu).
const DEC_THREADS: u32 = 128;

/// Which decode path a CUDA model takes (`KVGPT_CUDA_STEP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    Graph,
    Kernels,
    Candle,
}

impl StepMode {
    pub fn from_env() -> Result<Self> {
        match std::env::var("KVGPT_CUDA_STEP").as_deref() {
            Err(_) | Ok("") | Ok("graph") => Ok(Self::Graph),
            Ok("kernels") => Ok(Self::Kernels),
            Ok("candle") => Ok(Self::Candle),
            Ok(other) => Err(Error::Device(format!("KVGPT_CUDA_STEP must be graph, kernels or candle, got {other:?}"))),
        }
    }
}

/// One layer's weights, as device addresses (nn.Linear layout (out, in), contiguous).
pub struct LayerWeights {
    pub ln_1: [u64; 2],
    pub attn_w: u64,
    pub attn_b: u64,
    pub proj_w: u64,
    pub proj_b: u64,
    pub ln_2: [u64; 2],
    pub fc_w: u64,
    pub fc_b: u64,
    pub mlp_w: u64,
    pub mlp_b: u64,
    pub scale: f32,
}

/// The model's weights and shapes, as the step's kernels take them. The tensors behind the
/// addresses belong to the `Gpt2` that owns this step, and live as long as it.
pub struct StepWeights {
    pub wte: u64,
    pub wpe: u64,
    pub layers: Vec<LayerWeights>,
    pub ln_f: [u64; 2],
    pub lm_head: u64,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub vocab: usize,
    pub eps: f32,
}

/// The device address of a weight the step's kernels read 16 bytes at a time.
pub fn weight_address(t: &Tensor, what: &str) -> Result<u64> {
    if !t.is_contiguous() {
        return Err(Error::internal(format!("the decode step's {what} is not contiguous")));
    }
    let a = address(t)?;
    if a % 16 != 0 {
        return Err(Error::internal(format!("the decode step's {what} is not 16-byte aligned")));
    }
    Ok(a)
}

struct Funcs {
    embed: CudaFunction,
    /// [epilogue: qkv, resid, gelu, logits][bucket]
    gemv: Vec<Vec<CudaFunction>>,
    attend: CudaFunction,
}

struct Bucket {
    rows: usize,
    /// ids | positions | capacities (row r is sequence r of the step)
    meta: CudaSlice<u32>,
    /// [row][layer][K, V] cache addresses
    ptrs: CudaSlice<u64>,
    x: CudaSlice<u8>,
    qkv: CudaSlice<u8>,
    att: CudaSlice<u8>,
    fc: CudaSlice<u8>,
    /// the split attention's partials: (max, sum) pairs, then sums
    part: CudaSlice<f32>,
    /// the split attention's count of finished blocks a (row, head), reset by the last
    counters: CudaSlice<u32>,
    n_split: u32,
    logits: CudaSlice<f32>,
    /// [whole, split]
    graphs: [Option<CudaGraph>; 2],
}

pub struct DecodeStep {
    mode: StepMode,
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    w: StepWeights,
    elem: usize,
    f: Funcs,
    buckets: Vec<Option<Bucket>>,
    /// The cache of the rows a bucket holds beyond the step's (one position).
    spare: KvCache,
    /// A capture failed once: steps run the same kernels without a graph.
    no_graph: bool,
}

// SAFETY: CudaGraph holds raw driver handles and is not Sync; the step is only ever used through
// the `Mutex` its `Gpt2` keeps it in, so one thread at a time, and the driver's handles may be
// used from any thread of the process (the context is bound before each call).
unsafe impl Send for DecodeStep {}

fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    s.device_ptr(stream).0
}

impl DecodeStep {
    /// A step for `dtype` (f32, f16 or bf16) activations and weights, or None where its kernels
    /// do not hold the shapes (a head dim other than 8, 16, 32, 64, 128 or 256; a width not a
    /// multiple of 16 bytes). `mode` Candle makes `run` decline every step until `set_mode` says otherwise.
    pub fn new(mode: StepMode, dev: &CudaDevice, w: StepWeights, spare: KvCache, dtype: DType) -> Result<Option<Self>> {
        let name = match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => return Ok(None),
        };
        let elem = dtype.size_in_bytes();
        let vec = 16 / elem;
        let hs = w.n_embd / w.n_head;
        if hs % 8 != 0 || !(hs / 8).is_power_of_two() || hs / 8 > 32 || w.n_embd % vec != 0 || w.n_inner % vec != 0 {
            return Ok(None);
        }
        let func = |module: &str, ptx: &'static str, fname: String| -> Result<CudaFunction> {
            Ok(dev.get_or_load_custom_func(&fname, module, ptx)?.into_cuda_function())
        };
        let gemv = ["qkv", "resid", "gelu", "logits"]
            .iter()
            .map(|epi| BUCKETS.iter().map(|nr| func(MODULE, PTX, format!("gemv_{epi}_{nr}_{name}"))).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let f = Funcs {
            embed: func(MODULE, PTX, format!("embed_{name}"))?,
            gemv,
            attend: func(MODULE, PTX, format!("attend_decode_{name}"))?,
        };
        let stream = dev.cuda_stream();
        Ok(Some(Self { mode, dev: dev.clone(), stream, w, elem, f, buckets: BUCKETS.iter().map(|_| None).collect(), spare, no_graph: false }))
    }

    pub fn mode(&self) -> StepMode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: StepMode) {
        self.mode = mode;
    }

    fn bucket(&self, rows: usize) -> Result<Bucket> {
        let s = &self.stream;
        let w = &self.w;
        let (c, e) = (w.n_embd, self.elem);
        let n_layer = w.layers.len();
        let hs = c / w.n_head;
        let n_split = (SPLIT_BLOCKS / (rows * w.n_head)).clamp(1, 16);
        let bytes = |n: usize| s.alloc_zeros::<u8>(rows * n * e).w();
        Ok(Bucket {
            rows,
            meta: s.alloc_zeros::<u32>(3 * rows).w()?,
            ptrs: s.alloc_zeros::<u64>(rows * n_layer * 2).w()?,
            x: bytes(c)?,
            qkv: bytes(3 * c)?,
            att: bytes(c)?,
            fc: bytes(w.n_inner)?,
            part: s.alloc_zeros::<f32>(rows * w.n_head * n_split * (2 + hs)).w()?,
            counters: s.alloc_zeros::<u32>(rows * w.n_head).w()?,
            n_split: n_split as u32,
            logits: s.alloc_zeros::<f32>(rows * w.vocab).w()?,
            graphs: [None, None],
        })
    }

    /// Runs a step of one-token segments (each `Logits::Last`) and returns their logits (R,
    /// vocab) in f32, in the segments' order; None when the step has more rows than this path
    /// takes or the mode is Candle (candle's path runs it).
    pub fn run(&mut self, segs: &[Segment<'_>]) -> Result<Option<Tensor>> {
        let r = segs.len();
        if self.mode == StepMode::Candle {
            return Ok(None);
        }
        let Some(bi) = BUCKETS.iter().position(|&b| b >= r) else { return Ok(None) };
        if self.buckets[bi].is_none() {
            self.buckets[bi] = Some(self.bucket(BUCKETS[bi])?);
        }
        let n_layer = self.w.layers.len();
        let rows = BUCKETS[bi];
        let mut meta = vec![0u32; 3 * rows];
        let mut ptrs = Vec::with_capacity(rows * n_layer * 2);
        let mut longest = 0;
        for i in 0..rows {
            let (id, cache) = match segs.get(i) {
                Some(s) => (s.ids[0], s.cache),
                None => (0, &self.spare),
            };
            let addresses = cache.addresses();
            if addresses.len() != 2 * n_layer {
                return Err(Error::internal("a KV cache of another device or depth"));
            }
            meta[i] = id;
            meta[rows + i] = cache.len() as u32;
            meta[2 * rows + i] = cache.capacity() as u32;
            ptrs.extend_from_slice(addresses);
            longest = longest.max(cache.len() + 1);
        }
        let split = longest >= SPLIT_FROM;
        {
            let b = self.buckets[bi].as_mut().expect("made above");
            self.stream.memcpy_htod(&meta, &mut b.meta).w()?;
            self.stream.memcpy_htod(&ptrs, &mut b.ptrs).w()?;
        }
        if self.mode == StepMode::Graph && !self.no_graph {
            if self.buckets[bi].as_ref().expect("made above").graphs[split as usize].is_none() {
                // Once eagerly (loads the kernels; this step's results), then captured.
                self.enqueue(bi, split)?;
                match self.capture(bi, split) {
                    Ok(g) => self.buckets[bi].as_mut().expect("made above").graphs[split as usize] = Some(g),
                    Err(e) => {
                        eprintln!("kvgpt: capturing the CUDA decode step as a graph failed ({e}); steps run the same kernels without a graph");
                        self.no_graph = true;
                    }
                }
            }
            if let Some(g) = &self.buckets[bi].as_ref().expect("made above").graphs[split as usize] {
                g.launch().w()?;
            }
        } else {
            self.enqueue(bi, split)?;
        }
        let b = self.buckets[bi].as_ref().expect("made above");
        let v = self.w.vocab;
        // SAFETY: every element is written by the copy below.
        let mut out = unsafe { self.stream.alloc::<f32>(r * v) }.w()?;
        self.stream.memcpy_dtod(&b.logits.slice(0..r * v), &mut out).w()?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.dev.clone()));
        Ok(Some(Tensor::from_storage(storage, (r, v), BackpropOp::none(), false)))
    }

    fn capture(&mut self, bi: usize, split: bool) -> Result<CudaGraph> {
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
        let enqueued = self.enqueue(bi, split);
        // End the capture whatever happened, so the stream leaves capture mode.
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        enqueued?;
        let graph = graph.w()?.ok_or_else(|| Error::Device("the CUDA graph capture recorded nothing".into()))?;
        graph.upload().w()?;
        Ok(graph)
    }

    /// Every launch of a step over bucket `bi`'s buffers, in order, on the model's stream.
    fn enqueue(&self, bi: usize, split: bool) -> Result<()> {
        let s = &self.stream;
        let b = self.buckets[bi].as_ref().expect("allocated before use");
        let w = &self.w;
        let (c, nh, inner, v) = (w.n_embd as u32, w.n_head as u32, w.n_inner as u32, w.vocab as u32);
        let hs = c / nh;
        let n_layer = w.layers.len() as u32;
        let rows = b.rows as u32;
        let meta = dptr(&b.meta, s);
        let (ids, pos, caps) = (meta, meta + 4 * rows as u64, meta + 8 * rows as u64);
        let ptrs = dptr(&b.ptrs, s);
        let (x, qkv, att, fc) = (dptr(&b.x, s), dptr(&b.qkv, s), dptr(&b.att, s), dptr(&b.fc, s));
        let (part, counters, logits) = (dptr(&b.part, s), dptr(&b.counters, s), dptr(&b.logits, s));
        let eps = w.eps;
        // A product over the bucket's rows; `ln` (gamma, beta): its input is the residual stream,
        // layer-normalized as the kernel reads it.
        let gemv = |epi: usize, xin: u64, wt: u64, bias: u64, y: u64, k: u32, n: u32, ln: [u64; 2], layer: u32| -> Result<()> {
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(GEMV_WARPS), 1, 1), block_dim: (32 * GEMV_WARPS, 1, 1), shared_mem_bytes: 0 };
            let mut l = s.launch_builder(&self.f.gemv[epi][bi]);
            l.arg(&xin).arg(&wt).arg(&bias).arg(&y).arg(&k).arg(&n).arg(&ln[0]).arg(&ln[1]).arg(&eps);
            l.arg(&ptrs).arg(&n_layer).arg(&layer).arg(&pos).arg(&caps).arg(&hs);
            // SAFETY: x is (rows, k) and W (n, k) with k a whole number of 16-byte vectors (as
            // gamma and beta, k long), y (rows, n); the QKV epilogue writes each row's position,
            // below its capacity.
            unsafe { l.launch(cfg) }.w()?;
            Ok(())
        };
        {
            let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let mut l = s.launch_builder(&self.f.embed);
            l.arg(&ids).arg(&pos).arg(&w.wte).arg(&w.wpe).arg(&x).arg(&c);
            // SAFETY: ids < vocab and positions < n_positions (checked by forward_batch); x is (rows, c).
            unsafe { l.launch(cfg) }.w()?;
        }
        let (qkv_e, resid_e, gelu_e, logits_e) = (0, 1, 2, 3);
        let none = [0u64; 2];
        for (i, lw) in w.layers.iter().enumerate() {
            let layer = i as u32;
            gemv(qkv_e, x, lw.attn_w, lw.attn_b, qkv, c, 3 * c, lw.ln_1, layer)?;
            let n_split = if split { b.n_split } else { 1 };
            let cfg = LaunchConfig { grid_dim: (rows, nh, n_split), block_dim: (DEC_THREADS, 1, 1), shared_mem_bytes: 0 };
            let mut l = s.launch_builder(&self.f.attend);
            l.arg(&qkv).arg(&att).arg(&c).arg(&hs).arg(&lw.scale).arg(&ptrs).arg(&n_layer).arg(&layer);
            l.arg(&pos).arg(&caps).arg(&part).arg(&counters).arg(&n_split);
            // SAFETY: reads qkv and each row's cache up to its position; writes att (rows, c)
            // and, split, part (sized for (rows, n_head, n_split)) and the (rows, n_head) counters.
            unsafe { l.launch(cfg) }.w()?;
            gemv(resid_e, att, lw.proj_w, lw.proj_b, x, c, c, none, layer)?;
            gemv(gelu_e, x, lw.fc_w, lw.fc_b, fc, c, inner, lw.ln_2, layer)?;
            gemv(resid_e, fc, lw.mlp_w, lw.mlp_b, x, inner, c, none, layer)?;
        }
        gemv(logits_e, x, w.lm_head, 0, logits, c, v, w.ln_f, 0)
    }
}
