//! The decode step on CUDA in kvgpt's own kernels (decode.cu), over buffers of its
//! own, captured as a CUDA graph and replayed. Candle's path spends 8-12 us of host work on each
//! of a step's ~220 launches (bench/gpu/NOTES.md), so a GPT-2 small step took about 2 ms for
//! 0.06 ms of memory traffic; here a step of up to 8 one-token rows is 5 kernels a layer and 3
//! more, 63 for GPT-2 small, all replayed from one graph: the host copies the rows' ids,
//! positions and cache addresses into device buffers and launches the graph. The step also
//! takes each row's greedy id on the device (fused into the lm_head's product), so a greedy
//! step copies 4 bytes a row to the host and runs no argmax of candle's.
//!
//! Built for compute capability 9.0 or later, each kernel is launched with programmatic
//! dependent launch: it starts while the one before it finishes, loads its weights (and the
//! attention its cache's earlier keys) and only then waits for that kernel's results, so the
//! gap between kernels and the weights' first loads overlap the previous kernel
//! (`KVGPT_CUDA_PDL=0` turns it off).
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
use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Shape, Storage, Tensor};
use std::sync::Arc;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "kvgpt_decode";
/// Row counts of the buckets (the gemv kernels' NR); a step of more rows than the last takes
/// candle's path.
const BUCKETS: [usize; 4] = [1, 2, 4, 8];
/// From this many keys (the longest row's position + 1) a step takes the graph that splits the
/// keys of each (row, head) over blocks.
const SPLIT_FROM: usize = 64;
/// Blocks the split attention aims for, a multiprocessor.
const SPLIT_BLOCKS_PER_SM: usize = 2;
/// The most blocks a (row, head)'s keys split over.
const MAX_SPLIT: usize = 64;
/// Warps a block of the products (GEMV_WARPS in decode.cu).
const GEMV_WARPS: u32 = 8;
/// 16-byte chunks of a weight row a lane of the products holds at once (GEMV_CH in decode.cu).
const GEMV_CH: u32 = 4;
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
    /// [epilogue: qkv, resid, gelu, logits][bucket], with the most blocks of it the GPU holds
    /// at once (a product's grid is at most that: its blocks loop over the columns)
    gemv: Vec<Vec<(CudaFunction, u32)>>,
    attend: CudaFunction,
    argmax: CudaFunction,
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
    /// each row's argmax key of its logits (decode.cu's argmax_key), zero between steps
    keys: CudaSlice<u64>,
    /// each row's greedy id
    ids: CudaSlice<u32>,
    /// [without, with programmatic dependent launch][whole, split]
    graphs: [[Option<CudaGraph>; 2]; 2],
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
    /// Launch with programmatic dependent launch (`pdl_allowed`).
    pdl: bool,
    /// The GPU's multiprocessors.
    sms: u32,
}

/// Whether the step's kernels may be launched with programmatic dependent launch: built for
/// compute capability 9.0 or later (else decode.cu's kernels hold no `griddepcontrol` and must
/// not overlap) and `KVGPT_CUDA_PDL` is not `0`.
pub fn pdl_allowed() -> bool {
    let cap: u32 = super::BUILD_COMPUTE_CAP.parse().unwrap_or(0);
    cap >= 90 && std::env::var("KVGPT_CUDA_PDL").as_deref() != Ok("0")
}

/// A kernel's arguments, each in an 8-byte slot (a u32 or f32 in its low bytes, as the driver
/// reads it on a little-endian host).
#[derive(Default)]
struct Args(Vec<u64>);

impl Args {
    fn ptr(mut self, v: u64) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.push(v as u64);
        self
    }
    fn f32(self, v: f32) -> Self {
        self.u32(v.to_bits())
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the CUDA decode step passes kernel arguments as little-endian 8-byte slots");

/// The products' split: warps a column (1, 2, 4 or 8) such that a lane holds at most GEMV_CH
/// chunks of W's row, and more while the product has fewer than `min_blocks` blocks and each
/// warp keeps a chunk a lane.
fn gemv_split(k4: u32, n: u32, min_blocks: u32) -> u32 {
    let mut split = 1;
    while split < GEMV_WARPS && k4.div_ceil(split) > 32 * GEMV_CH {
        split *= 2;
    }
    while split < GEMV_WARPS && n.div_ceil(GEMV_WARPS / split) < min_blocks && k4.div_ceil(2 * split) >= 32 {
        split *= 2;
    }
    split
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
        let stream = dev.cuda_stream();
        let sms = stream.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()? as u32;
        let resident = |f: CudaFunction| -> Result<(CudaFunction, u32)> {
            let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(32 * GEMV_WARPS, 0, None).w()?;
            Ok((f, sms * per_sm.max(1)))
        };
        let gemv = ["qkv", "resid", "gelu", "logits"]
            .iter()
            .map(|epi| BUCKETS.iter().map(|nr| resident(func(MODULE, PTX, format!("gemv_{epi}_{nr}_{name}"))?)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let f = Funcs {
            embed: func(MODULE, PTX, format!("embed_{name}"))?,
            gemv,
            attend: func(MODULE, PTX, format!("attend_decode_{name}"))?,
            argmax: func(MODULE, PTX, "argmax_ids_u32".into())?,
        };
        let buckets = BUCKETS.iter().map(|_| None).collect();
        Ok(Some(Self { mode, dev: dev.clone(), stream, w, elem, f, buckets, spare, no_graph: false, pdl: pdl_allowed(), sms }))
    }

    pub fn mode(&self) -> StepMode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: StepMode) {
        self.mode = mode;
    }

    /// Whether the kernels launch with programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Turns programmatic dependent launch off, or back on where `pdl_allowed` (tests compare
    /// the two; each keeps its own graphs).
    pub fn set_pdl(&mut self, on: bool) {
        self.pdl = on && pdl_allowed();
    }

    fn bucket(&self, rows: usize) -> Result<Bucket> {
        let s = &self.stream;
        let w = &self.w;
        let (c, e) = (w.n_embd, self.elem);
        let n_layer = w.layers.len();
        let hs = c / w.n_head;
        let n_split = (SPLIT_BLOCKS_PER_SM * self.sms as usize / (rows * w.n_head)).clamp(1, MAX_SPLIT);
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
            keys: s.alloc_zeros::<u64>(rows).w()?,
            ids: s.alloc_zeros::<u32>(rows).w()?,
            graphs: [[None, None], [None, None]],
        })
    }

    /// Runs a step of one-token segments (each `Logits::Last`) and returns their logits (R,
    /// vocab) in f32 and their greedy ids (R,) in u32 (the first largest logit), in the
    /// segments' order; None when the step has more rows than this path takes or the mode is
    /// Candle (candle's path runs it).
    pub fn run(&mut self, segs: &[Segment<'_>]) -> Result<Option<(Tensor, Tensor)>> {
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
            let (p, sp) = (self.pdl as usize, split as usize);
            if self.buckets[bi].as_ref().expect("made above").graphs[p][sp].is_none() {
                // Once eagerly (loads the kernels; this step's results), then captured.
                self.enqueue(bi, split)?;
                match self.capture(bi, split) {
                    Ok(g) => self.buckets[bi].as_mut().expect("made above").graphs[p][sp] = Some(g),
                    Err(e) => {
                        eprintln!("kvgpt: capturing the CUDA decode step as a graph failed ({e}); steps run the same kernels without a graph");
                        self.no_graph = true;
                    }
                }
            }
            if let Some(g) = &self.buckets[bi].as_ref().expect("made above").graphs[p][sp] {
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
        // SAFETY: as above.
        let mut ids = unsafe { self.stream.alloc::<u32>(r) }.w()?;
        self.stream.memcpy_dtod(&b.ids.slice(0..r), &mut ids).w()?;
        let tensor = |storage, shape: Shape| Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
        let logits = tensor(CudaStorage::wrap_cuda_slice(out, self.dev.clone()), (r, v).into());
        let ids = tensor(CudaStorage::wrap_cuda_slice(ids, self.dev.clone()), r.into());
        Ok(Some((logits, ids)))
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

    /// Launches `f` on the model's stream, after the kernel before it or, with `pdl` (and the
    /// step's `pdl`), as soon as that one's blocks all run (decode.cu's `pdl_wait` orders what
    /// matters).
    fn launch(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, args: Args, pdl: bool) -> Result<()> {
        let mut params: Vec<*mut std::ffi::c_void> = args.0.iter().map(|v| v as *const u64 as *mut std::ffi::c_void).collect();
        // SAFETY: a zeroed attribute is a valid C struct; its id and value are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = pdl && self.pdl;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: self.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        self.stream.context().bind_to_thread().w()?;
        // SAFETY: `params` holds one slot per kernel parameter, of the kernel's types (the
        // callers below follow decode.cu's signatures), alive for the call; the buffers behind
        // the addresses are the bucket's, the weights' and the caches', sized as each kernel
        // reads and writes them (see `enqueue`).
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result().w()?;
        Ok(())
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
        let (keys, greedy) = (dptr(&b.keys, s), dptr(&b.ids, s));
        let vec = (16 / self.elem) as u32;
        // A product over the bucket's rows; `ln` (gamma, beta): its input is the residual stream,
        // layer-normalized as the kernel reads it. x is (rows, k) and W (n, k) with k a whole
        // number of 16-byte vectors (as gamma and beta, k long), y (rows, n); the QKV epilogue
        // writes each row's position, below its capacity; the logits' writes keys (rows).
        let gemv = |epi: usize, xin: u64, wt: u64, bias: u64, y: u64, k: u32, n: u32, ln: [u64; 2], layer: u32| -> Result<()> {
            let split = gemv_split(k / vec, n, 2 * self.sms);
            let (f, resident) = &self.f.gemv[epi][bi];
            let blocks = n.div_ceil(GEMV_WARPS / split).min(*resident);
            let args = Args::default().ptr(xin).ptr(wt).ptr(bias).ptr(y).u32(k).u32(n).ptr(ln[0]).ptr(ln[1]).f32(w.eps);
            let args = args.ptr(ptrs).u32(n_layer).u32(layer).ptr(pos).ptr(caps).u32(hs).u32(split).ptr(keys);
            self.launch(f, (blocks, 1, 1), 32 * GEMV_WARPS, args, true)
        };
        // ids < vocab and positions < n_positions (checked by forward_batch); x is (rows, c). The
        // step's first kernel: after the one before it in the stream, whatever that was.
        let args = Args::default().ptr(ids).ptr(pos).ptr(w.wte).ptr(w.wpe).ptr(x).u32(c);
        self.launch(&self.f.embed, (rows, 1, 1), 256, args, false)?;
        let (qkv_e, resid_e, gelu_e, logits_e) = (0, 1, 2, 3);
        let none = [0u64; 2];
        for (i, lw) in w.layers.iter().enumerate() {
            let layer = i as u32;
            gemv(qkv_e, x, lw.attn_w, lw.attn_b, qkv, c, 3 * c, lw.ln_1, layer)?;
            let n_split = if split { b.n_split } else { 1 };
            // Reads qkv and each row's cache up to its position; writes att (rows, c) and, split,
            // part (sized for (rows, n_head, n_split)) and the (rows, n_head) counters.
            let args = Args::default().ptr(qkv).ptr(att).u32(c).u32(hs).f32(lw.scale).ptr(ptrs).u32(n_layer).u32(layer);
            let args = args.ptr(pos).ptr(caps).ptr(part).ptr(counters).u32(n_split);
            self.launch(&self.f.attend, (rows, nh, n_split), DEC_THREADS, args, true)?;
            gemv(resid_e, att, lw.proj_w, lw.proj_b, x, c, c, none, layer)?;
            gemv(gelu_e, x, lw.fc_w, lw.fc_b, fc, c, inner, lw.ln_2, layer)?;
            gemv(resid_e, fc, lw.mlp_w, lw.mlp_b, x, inner, c, none, layer)?;
        }
        gemv(logits_e, x, w.lm_head, 0, logits, c, v, w.ln_f, 0)?;
        // keys (rows) to ids (rows), keys zeroed.
        let args = Args::default().ptr(keys).ptr(greedy).u32(rows);
        self.launch(&self.f.argmax, (1, 1, 1), 32, args, true)
    }
}
