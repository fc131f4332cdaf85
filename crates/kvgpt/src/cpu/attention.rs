//! Causal self-attention on the CPU (f32) for a batch of sequences, each over its own KV cache:
//! per sequence and head, the scores, masked softmax and weighted sum of its new queries
//! against the keys it can see, never materializing the masked half. A few queries (decode
//! steps, short prompt chunks) go row by row; more by blocks of queries through gemm. One rayon
//! task per (sequence, head), each compiled for AVX2/FMA where the CPU has it.

use crate::cpu::ops::{exp, f32_slice, lanes};
use crate::error::{Error, Result};
use crate::model::attention::SeqRows;
use candle_core::{CpuStorage, Device, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

fn cpu_f32<'a>(s: &'a Storage, l: &candle_core::Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => f32_slice(s, l, what),
        _ => candle_core::bail!("{what} must be on the CPU"),
    }
}

/// A cache buffer on the CPU: f32, or f16 (packed weights' caches), widened a head at a time.
#[derive(Clone, Copy)]
enum Kv<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Kv<'a> {
    fn of(s: &'a Storage, l: &candle_core::Layout, what: &str) -> candle_core::Result<Self> {
        match s {
            Storage::Cpu(CpuStorage::F16(v)) => match l.contiguous_offsets() {
                Some((a, b)) => Ok(Kv::F16(&v[a..b])),
                None => candle_core::bail!("{what} must be contiguous"),
            },
            _ => Ok(Kv::F32(cpu_f32(s, l, what)?)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Kv::F32(v) => v.len(),
            Kv::F16(v) => v.len(),
        }
    }

    /// Elements `range` as f32: borrowed, or widened into `scratch` (exactly: f16 -> f32 is).
    fn f32s<'s>(&self, range: std::ops::Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match *self {
            Kv::F32(v) => &v[range],
            Kv::F16(v) => {
                scratch.resize(range.len(), 0.0);
                v[range].convert_to_f32_slice(scratch);
                scratch
            }
        }
    }
}

/// softmax(scale q k^T, causal) v for every sequence of a step. `qkv` is the step's (N, 3C)
/// c_attn output (q in its first C columns); each sequence's queries see its cache's positions
/// `0..=pos + i`. Returns (N, C), the heads side by side, as c_proj takes them.
pub fn attend_batch(qkv: &Tensor, seqs: &[SeqRows<'_>], layer: usize, n_head: usize, scale: f32) -> Result<Tensor> {
    if !(scale > 0.0 && scale.is_finite()) {
        // softmax_row takes the row's maximum before scaling, which needs scale > 0
        return Err(Error::InvalidInput(format!("attention scale must be a positive number, got {scale}")));
    }
    let (n, width) = qkv.dims2()?;
    let c = width / 3;
    let hs = c / n_head;
    let (q_storage, q_layout) = qkv.storage_and_layout();
    let q_all = cpu_f32(&q_storage, q_layout, "qkv")?;
    // Read access to every cache's buffers of this layer for the whole computation.
    let guards: Vec<_> = seqs
        .iter()
        .map(|s| {
            let (k, v) = s.cache.layer_buffers(layer);
            (k.storage_and_layout(), v.storage_and_layout())
        })
        .collect();
    let mut views = Vec::with_capacity(seqs.len());
    for (s, ((ks, kl), (vs, vl))) in seqs.iter().zip(&guards) {
        let (k, v, cap) = (Kv::of(ks, kl, "k cache")?, Kv::of(vs, vl, "v cache")?, s.cache.capacity());
        if s.pos + s.t > cap || (s.row0 + s.t) > n || k.len() < n_head * cap * hs || v.len() < n_head * cap * hs {
            return Err(Error::InvalidInput(format!("attention rows {}..{} at {} do not fit their cache", s.row0, s.row0 + s.t, s.pos)));
        }
        views.push((k, v, cap));
    }
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..n_head).map(move |h| (s, h))).collect();
    let outs: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(si, h)| {
            let (s, (k, v, cap)) = (&seqs[si], views[si]);
            let mut q = vec![0f32; s.t * hs];
            for (j, q) in q.chunks_exact_mut(hs).enumerate() {
                q.copy_from_slice(&q_all[(s.row0 + j) * width + h * hs..][..hs]);
            }
            let keys = s.pos + s.t;
            let mut out = vec![0f32; s.t * hs];
            let head = h * cap * hs..h * cap * hs + keys * hs;
            let (mut ks, mut vs) = (Vec::new(), Vec::new()); // f16 heads widened here
            attend_head(&q, k.f32s(head.clone(), &mut ks), v.f32s(head, &mut vs), hs, scale, &mut out);
            out
        })
        .collect();
    let mut y = vec![0f32; n * c];
    for (&(si, h), out) in tasks.iter().zip(&outs) {
        let s = &seqs[si];
        for (j, o) in out.chunks_exact(hs).enumerate() {
            y[(s.row0 + j) * c + h * hs..][..hs].copy_from_slice(o);
        }
    }
    Ok(Tensor::from_vec(y, (n, c), &Device::Cpu)?)
}

/// Up to this many queries (a decode step, a short prompt) `attend_batch` goes row by row;
/// beyond, by blocks of queries through gemm.
const FEW_QUERIES: usize = 32;

/// Scales (scale > 0), causally masks and normalizes one row of scores in place: `visible`
/// keys are seen, the rest of the row becomes 0.
#[inline(always)]
fn softmax_row(p: &mut [f32], visible: usize, scale: f32) {
    let (seen, hidden) = p.split_at_mut(visible);
    let max = lanes(seen, f32::NEG_INFINITY, |a, b| if a > b { a } else { b });
    seen.iter_mut().for_each(|p| *p = exp((*p - max) * scale));
    let inv = 1.0 / lanes(seen, 0.0, |a, b| a + b);
    seen.iter_mut().for_each(|p| *p *= inv);
    hidden.fill(0.0);
}

/// One head, a few queries (t <= FEW_QUERIES): each query's scores, softmax and
/// weighted sum of v rows in turn. q (t, hs), k and v (l, hs), out (t, hs); the queries are the
/// last t of the l positions.
#[inline(always)]
fn head_by_rows(q: &[f32], k: &[f32], v: &[f32], hs: usize, scale: f32, out: &mut [f32]) {
    let (t, l) = (q.len() / hs, k.len() / hs);
    let mut p = vec![0f32; l];
    for ti in 0..t {
        let visible = l - t + ti + 1; // query ti sits at key position l - t + ti
        let p = &mut p[..visible];
        for (p, k) in p.iter_mut().zip(k.chunks_exact(hs)) {
            *p = crate::cpu::matvec::dot_portable(&q[ti * hs..][..hs], k);
        }
        softmax_row(p, visible, scale);
        let y = &mut out[ti * hs..][..hs];
        for (&p, v) in p.iter().zip(v.chunks_exact(hs)) {
            y.iter_mut().zip(v).for_each(|(y, v)| *y += p * v);
        }
    }
}

/// Queries per block in `head_by_blocks`.
const QUERY_BLOCK: usize = 64;

/// One head, many queries (a prompt): blocks of 64 queries, each multiplied with only the
/// keys it can see (gemm, this thread), so the causal upper triangle is never computed: for
/// 512 queries 56 % of the full products' work. Same arguments as `head_by_rows`.
#[inline(always)]
fn head_by_blocks(q: &[f32], k: &[f32], v: &[f32], hs: usize, scale: f32, out: &mut [f32]) {
    let (t, l) = (q.len() / hs, k.len() / hs);
    let mut s = vec![0f32; QUERY_BLOCK * l];
    for q0 in (0..t).step_by(QUERY_BLOCK) {
        let qb = QUERY_BLOCK.min(t - q0);
        let keys = l - t + q0 + qb; // what the block's last query sees
        let s = &mut s[..qb * keys];
        // SAFETY (both calls): every matrix lies inside its slice with the strides given:
        // S (qb, keys) row-major; Q rows q0.. (qb, hs); K's first `keys` rows read as (hs, keys);
        // V's first `keys` rows (keys, hs); out rows q0.. (qb, hs).
        unsafe {
            gemm::gemm(qb, keys, hs, s.as_mut_ptr(), 1, keys as isize, false, q[q0 * hs..].as_ptr(), 1, hs as isize, k.as_ptr(), hs as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        }
        for (i, row) in s.chunks_exact_mut(keys).enumerate() {
            softmax_row(row, l - t + q0 + i + 1, scale);
        }
        unsafe {
            gemm::gemm(qb, hs, keys, out[q0 * hs..].as_mut_ptr(), 1, hs as isize, false, s.as_ptr(), 1, keys as isize, v.as_ptr(), 1, hs as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        }
    }
}

/// One head (`head_by_rows` or `head_by_blocks`), compiled for AVX2/FMA when the CPU has it:
/// the kernels are written as plain loops that LLVM vectorizes, and a closure handed to rayon
/// would otherwise be compiled for the baseline (SSE2: 4 lanes and no FMA).
fn attend_head(q: &[f32], k: &[f32], v: &[f32], hs: usize, scale: f32, out: &mut [f32]) {
    #[inline(always)]
    fn attend(q: &[f32], k: &[f32], v: &[f32], hs: usize, scale: f32, out: &mut [f32]) {
        if q.len() / hs <= FEW_QUERIES {
            head_by_rows(q, k, v, hs, scale, out);
        } else {
            head_by_blocks(q, k, v, hs, scale, out);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(q: &[f32], k: &[f32], v: &[f32], hs: usize, scale: f32, out: &mut [f32]) {
            attend(q, k, v, hs, scale, out)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return unsafe { avx2(q, k, v, hs, scale, out) };
        }
    }
    attend(q, k, v, hs, scale, out)
}

