//! kvgpt's own CUDA kernels (`attention.cu`, `decode.cu`, compiled to PTX by build.rs with nvcc
//! when the `cuda` feature is on) and their candle glue: a step's attention over every
//! sequence's KV cache in two launches per layer, however many sequences ride in the step, and
//! (`step`) the whole decode step of up to 8 sequences in kvgpt's kernels, replayed as a CUDA
//! graph. `StepMeta` holds what the attention needs on the device for the whole pass (each
//! row's sequence and position, each sequence's cache addresses per layer and capacity),
//! uploaded once per forward pass.

use crate::error::{Error, Result};
use crate::model::attention::SeqRows;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CustomOp1, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

pub mod step;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "kvgpt_attention";
/// Warps per attention block (WARPS in attention.cu).
const WARPS: u32 = 4;
/// The largest head dim the attention kernel holds (32 lanes x MAX_DIMS_PER_LANE).
pub const MAX_HEAD_DIM: usize = 256;

/// The compute capability this build's kernels target (CUDA_COMPUTE_CAP at build time).
pub const BUILD_COMPUTE_CAP: &str = env!("KVGPT_CUDA_COMPUTE_CAP");

/// The GPU's compute capability, (major, minor). Most of candle's kernels (and kvgpt's) are
/// PTX, which the driver compiles for whatever GPU it finds; but the fast q8_0 products
/// (llama.cpp's mmvq/mmq, `candle_kernels::ffi`) are machine code for `BUILD_COMPUTE_CAP` alone
/// (see `loader::machine_code_fits`). Elsewhere their launches fail without an error and leave
/// garbage: on an H200 a build for 8.0 gave q8_0 greedy ids that agreed with HF's for 0 steps.
pub fn compute_capability(device: &CudaDevice) -> Result<(i32, i32)> {
    device
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| Error::Device(format!("cannot read the GPU's compute capability: {e}")))
}

/// The step's layout on the device, for every layer of one forward pass.
pub struct StepMeta {
    seq_of_row: CudaSlice<u32>,
    pos_of_row: CudaSlice<u32>,
    caps: CudaSlice<u32>,
    /// [sequence][layer][K, V] buffer addresses.
    ptrs: CudaSlice<u64>,
    rows: u32,
    n_layer: u32,
}

fn cuda<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => Err(Error::internal(format!("{what} is not on the CUDA device"))),
    }
}

/// The device address of a buffer's first element (its layout's start offset included): a KV
/// cache's, or a weight's for the decode step.
pub fn address(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let s = cuda(&storage, "a KV cache or weight")?;
    let stream = s.device().cuda_stream();
    let stream = &stream;
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(x) => (x.device_ptr(stream).0, 4),
        CudaStorageSlice::F16(x) => (x.device_ptr(stream).0, 2),
        CudaStorageSlice::BF16(x) => (x.device_ptr(stream).0, 2),
        _ => return Err(Error::internal(format!("a KV cache or weight of dtype {:?} for kvgpt's kernels", t.dtype()))),
    };
    Ok(base + (layout.start_offset() * size) as u64)
}

impl StepMeta {
    pub fn new(rows: &[SeqRows<'_>], n_layer: usize, dev: &CudaDevice) -> Result<Self> {
        let mut seq_of_row = Vec::new();
        let mut pos_of_row = Vec::new();
        let mut caps = Vec::with_capacity(rows.len());
        let mut ptrs = Vec::with_capacity(rows.len() * n_layer * 2);
        for (s, r) in rows.iter().enumerate() {
            if seq_of_row.len() != r.row0 {
                return Err(Error::internal("a step's sequences must cover its rows in order"));
            }
            seq_of_row.extend(std::iter::repeat_n(s as u32, r.t));
            pos_of_row.extend((r.pos..r.pos + r.t).map(|p| p as u32));
            caps.push(r.cache.capacity() as u32);
            let addresses = r.cache.addresses();
            if addresses.len() != 2 * n_layer {
                return Err(Error::internal("a KV cache of another device or depth"));
            }
            ptrs.extend_from_slice(addresses);
        }
        Ok(Self {
            rows: seq_of_row.len() as u32,
            seq_of_row: dev.clone_htod(&seq_of_row)?,
            pos_of_row: dev.clone_htod(&pos_of_row)?,
            caps: dev.clone_htod(&caps)?,
            ptrs: dev.clone_htod(&ptrs)?,
            n_layer: n_layer as u32,
        })
    }
}

/// Writes the layer's K/V of every row into its sequence's cache, then attends: qkv (N, 3C)
/// -> (N, C). One op for candle (so the output is a tensor of its own), two launches.
pub fn attend(qkv: &Tensor, meta: &StepMeta, layer: usize, n_head: usize, scale: f32) -> Result<Tensor> {
    let (n, width) = qkv.dims2()?;
    let c = width / 3;
    let hs = c / n_head;
    if n as u32 != meta.rows || hs > MAX_HEAD_DIM || layer as u32 >= meta.n_layer {
        return Err(Error::internal(format!("CUDA attention: {n} rows, head dim {hs}, layer {layer} do not fit the step")));
    }
    Ok(qkv.contiguous()?.apply_op1_no_bwd(&Attend { meta, layer: layer as u32, n_head: n_head as u32, hs: hs as u32, scale })?)
}

struct Attend<'a> {
    meta: &'a StepMeta,
    layer: u32,
    n_head: u32,
    hs: u32,
    scale: f32,
}

impl Attend<'_> {
    fn launch<T: DeviceRepr>(&self, qkv: &CudaSlice<T>, l: &Layout, dev: &CudaDevice, name: &str) -> candle_core::Result<CudaSlice<T>> {
        let (n, width) = l.shape().dims2()?;
        let Some((o1, o2)) = l.contiguous_offsets() else { candle_core::bail!("qkv must be contiguous") };
        let qkv = qkv.slice(o1..o2);
        let (n32, c) = (n as u32, (width / 3) as u32);
        let m = self.meta;
        let write = dev.get_or_load_custom_func(&format!("kv_write_{name}"), MODULE, PTX)?;
        let mut b = write.builder();
        b.arg(&qkv);
        candle_core::builder_arg!(b, n32, c, self.hs);
        b.arg(&m.ptrs);
        candle_core::builder_arg!(b, m.n_layer, self.layer);
        b.arg(&m.seq_of_row);
        b.arg(&m.pos_of_row);
        b.arg(&m.caps);
        let elems = n as u64 * c as u64;
        let cfg = LaunchConfig { grid_dim: (elems.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel writes each row's K/V inside its sequence's cache buffer (position
        // < capacity, checked when the step was planned) and reads qkv's n x 3c elements.
        unsafe { b.launch(cfg) }.w()?;
        // SAFETY: every element of out is written by the attention kernel.
        let out = unsafe { dev.alloc::<T>(n * c as usize)? };
        let attend = dev.get_or_load_custom_func(&format!("attend_{name}"), MODULE, PTX)?;
        let mut b = attend.builder();
        b.arg(&qkv);
        b.arg(&out);
        candle_core::builder_arg!(b, n32, c, self.hs, self.scale);
        b.arg(&m.ptrs);
        candle_core::builder_arg!(b, m.n_layer, self.layer);
        b.arg(&m.seq_of_row);
        b.arg(&m.pos_of_row);
        b.arg(&m.caps);
        let cfg = LaunchConfig { grid_dim: (n32, self.n_head, 1), block_dim: (32 * WARPS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: reads qkv and the caches' first pos + 1 positions of each row's sequence; writes out.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for Attend<'_> {
    fn name(&self) -> &'static str {
        "kvgpt-cuda-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kvgpt-cuda-attention runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let slice = match &s.slice {
            CudaStorageSlice::F32(x) => CudaStorageSlice::F32(self.launch::<f32>(x, l, dev, "f32")?),
            CudaStorageSlice::F16(x) => CudaStorageSlice::F16(self.launch::<f16>(x, l, dev, "f16")?),
            CudaStorageSlice::BF16(x) => CudaStorageSlice::BF16(self.launch::<bf16>(x, l, dev, "bf16")?),
            _ => candle_core::bail!("kvgpt-cuda-attention: unsupported dtype {:?}", s.dtype()),
        };
        let (n, width) = l.shape().dims2()?;
        Ok((CudaStorage { slice, device: dev.clone() }, Shape::from((n, width / 3))))
    }
}
