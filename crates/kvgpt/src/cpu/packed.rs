//! Reduced-precision weights on the CPU with f32 activations: q8_0 (blocks of 32 int8 with one
//! scale, quantized as ggml's q8_0 does: d = max|w| / 127, q = round(w / d); the scale kept as
//! an f32, so 1.125 bytes a weight), f16 and bf16 (2 bytes a weight). The activations and every
//! sum stay f32, so a product carries the weights' rounding only (candle's CPU q8_0 matmul
//! quantizes the activations too, and its f16/bf16 kernels are slower than f32).
//! A one-row product (a decode step alone) reads W's rows one after another; a few rows (a
//! batched step, a short chunk) read four rows of W at a time, widened once for up to four rows
//! of x, and prefetch the next four (AVX-512 or AVX2 kernels, chosen at run time); both sum a
//! (W row, x row) pair by the same operations. Many rows of q8_0 go through 8-bit integer
//! products where the CPU has AVX512-VNNI (`cpu::int8`), other many-row products expand W a
//! slab at a time for gemm.

use crate::cpu::ops::f32_slice;
use crate::cpu::int8;
use crate::cpu::matvec::{self, Rows};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m128i, __m256, __m256i, __m512};

/// Weights per q8_0 block, as in ggml.
pub const BLOCK: usize = 32;

/// Rows of W per rayon task in a one-row product.
const ROWS_PER_TASK: usize = 64;

/// Floats of W expanded at a time for a many-row product (16 MB): each of GPT-2 small's block
/// layers in one slab, so one gemm call, and the lm_head in ten.
const SLAB_FLOATS: usize = 1 << 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Q8_0,
    F16,
    Bf16,
}

enum Data {
    Q8 { q: Vec<i8>, d: Vec<f32> }, // q (n, k), d (n, k / BLOCK)
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// W (n, k) = (out, in), nn.Linear's layout, in a reduced precision.
pub struct PackedMatrix {
    n: usize,
    k: usize,
    data: Data,
}

impl PackedMatrix {
    /// Packs W (n, k), row-major f32; q8_0 needs k to be a multiple of `BLOCK`.
    pub fn pack(w: &[f32], n: usize, k: usize, packing: Packing) -> Self {
        assert_eq!(w.len(), n * k, "W must be (n, k)");
        let data = match packing {
            Packing::Q8_0 => {
                assert!(k % BLOCK == 0, "q8_0: k must be a multiple of {BLOCK}");
                let mut q = vec![0i8; n * k];
                let mut d = vec![0f32; n * k / BLOCK];
                let chunk = BLOCK * 256;
                q.par_chunks_mut(chunk).zip(d.par_chunks_mut(256)).zip(w.par_chunks(chunk)).for_each(|((q, d), w)| {
                    #[cfg(target_arch = "x86_64")]
                    if std::is_x86_feature_detected!("avx2") {
                        #[target_feature(enable = "avx2")]
                        unsafe fn avx2(q: &mut [i8], d: &mut [f32], w: &[f32]) {
                            q8_quantize(q, d, w) // the same loop, vectorized for AVX2 by LLVM
                        }
                        return unsafe { avx2(q, d, w) };
                    }
                    q8_quantize(q, d, w)
                });
                Data::Q8 { q, d }
            }
            Packing::F16 => {
                let mut h = vec![f16::ZERO; n * k];
                h.par_chunks_mut(1 << 16).zip(w.par_chunks(1 << 16)).for_each(|(h, w)| h.convert_from_f32_slice(w));
                Data::F16(h)
            }
            Packing::Bf16 => {
                let mut h = vec![bf16::ZERO; n * k];
                h.par_chunks_mut(1 << 16).zip(w.par_chunks(1 << 16)).for_each(|(h, w)| h.convert_from_f32_slice(w));
                Data::Bf16(h)
            }
        };
        Self { n, k, data }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn packing(&self) -> Packing {
        match self.data {
            Data::Q8 { .. } => Packing::Q8_0,
            Data::F16(_) => Packing::F16,
            Data::Bf16(_) => Packing::Bf16,
        }
    }

    /// Bytes the weights take, which a decode step reads.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Q8 { q, d } => q.len() + 4 * d.len(),
            Data::F16(h) => 2 * h.len(),
            Data::Bf16(h) => 2 * h.len(),
        }
    }

    /// W as f32 (n, k): what the packed weights stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1)).enumerate().for_each(|(r, out)| {
            self.row(r, out);
        });
        w
    }

    /// y = x W^T (+ b) for x of m rows (m * k elements); y is (m, n).
    pub fn matmul(&self, x: &[f32], bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        self.matmul_in_slabs(x, bias, SLAB_FLOATS)
    }

    /// `matmul`, expanding W `slab_floats` at a time (at least a row) when x has many rows.
    fn matmul_in_slabs(&self, x: &[f32], bias: Option<&[f32]>, slab_floats: usize) -> candle_core::Result<Vec<f32>> {
        let m = matvec::rows_of(x, self.n, self.k, bias)?;
        self.planned(x, bias, &matvec::RowPlan::single(m), slab_floats)
    }

    /// y = x W^T (+ b) with x's rows grouped by `plan` (see `matvec::RowPlan`).
    pub fn matmul_by(&self, x: &[f32], bias: Option<&[f32]>, plan: &matvec::RowPlan) -> candle_core::Result<Vec<f32>> {
        self.planned(x, bias, plan, SLAB_FLOATS)
    }

    /// `matmul_by`, expanding W `slab_floats` at a time (at least a row) for gemm.
    fn planned(&self, x: &[f32], bias: Option<&[f32]>, plan: &matvec::RowPlan, slab_floats: usize) -> candle_core::Result<Vec<f32>> {
        let m = matvec::rows_of(x, self.n, self.k, bias)?;
        if self.int8_rows() {
            // Decode steps and short chunks through the few-row kernels, the other chunks' rows
            // in one integer product (each of its rows independent of the others).
            let (one, n, k) = (plan.few_rows(), self.n, self.k);
            if plan.rows() != m {
                candle_core::bail!("linear: x has {m} rows, the row plan {}", plan.rows());
            }
            let mut y = if one > 0 { self.few_rows(&x[..one * k], bias)? } else { vec![] };
            y.resize(m * n, 0.0);
            if m > one {
                self.many_rows(&x[one * k..], bias, &mut y[one * n..], slab_floats);
            }
            return Ok(y);
        }
        plan.apply(x, self.k, self.n, |x| self.few_rows(x, bias), |x, y| self.many_rows(x, bias, y, slab_floats))
    }

    /// Whether products of two rows or more take the integer path (q8_0 on AVX512-VNNI).
    fn int8_rows(&self) -> bool {
        matches!(self.data, Data::Q8 { .. }) && int8::chosen()
    }

    /// A few rows x (m * k): W's rows four at a time straight from their packed form, widened
    /// once for up to four rows of x. Every (W row, x row) pair is summed by the same operations
    /// in the same order whatever m and the pair's place (`dot4::<R>` for any R, the last n % 4
    /// rows of W one pair at a time), so a row's result does not depend on the other rows of a
    /// step (batch invariance, see `matvec::RowPlan`).
    fn few_rows(&self, x: &[f32], bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        let m = matvec::rows_of(x, n, k, bias)?;
        let b = |r: usize| bias.map_or(0.0, |b| b[r]);
        if m == 1 {
            // One row of x: W's rows one after another, a single load stream a task, which
            // reads memory about twice as fast as four rows side by side (bench/NOTES.md, item
            // 23); `dot1` sums each row as `dot4` sums a pair.
            let mut y = vec![0f32; n];
            y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
                for (j, o) in out.iter_mut().enumerate() {
                    let r = task * ROWS_PER_TASK + j;
                    *o = self.dot1(r, x) + b(r);
                }
            });
            return Ok(y);
        }
        let rows: Vec<&[f32]> = x.chunks_exact(k.max(1)).collect();
        // Computed as y^T (n, m): each task owns whole rows of W and so a contiguous block.
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            let task_rows = out.len() / m;
            let quads = task_rows / 4;
            for qd in 0..quads {
                let r = first + 4 * qd;
                let out = &mut out[4 * qd * m..(4 * qd + 4) * m];
                let mut put = |i: usize, got: &[[f32; 4]]| {
                    for (xi, v) in got.iter().enumerate() {
                        for j in 0..4 {
                            out[j * m + i + xi] = v[j] + b(r + j);
                        }
                    }
                    got.len()
                };
                let mut i = 0;
                while i < m {
                    i += match m - i {
                        1 => put(i, &self.dot4::<1>(r, [rows[i]])),
                        2 => put(i, &self.dot4::<2>(r, [rows[i], rows[i + 1]])),
                        3 => put(i, &self.dot4::<3>(r, [rows[i], rows[i + 1], rows[i + 2]])),
                        _ => put(i, &self.dot4::<4>(r, [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]])),
                    };
                }
            }
            for j in 4 * quads..task_rows {
                for (i, x) in rows.iter().enumerate() {
                    out[j * m + i] = self.dot1(first + j, x) + b(first + j);
                }
            }
        });
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks_exact(m).enumerate() {
            for (i, v) in col.iter().enumerate() {
                y[i * n + j] = *v;
            }
        }
        Ok(y)
    }

    /// Many rows, compute-bound, into y (m, n), whatever it held: q8_0 in integer arithmetic
    /// where the CPU has AVX512-VNNI (`int8`), else a slab of W's rows expanded to f32 at a
    /// time for gemm, which adds to the slab's columns of y (set to the bias first).
    fn many_rows(&self, x: &[f32], bias: Option<&[f32]>, y: &mut [f32], slab_floats: usize) {
        let (n, k) = (self.n, self.k);
        if let Data::Q8 { q, d } = &self.data {
            if int8::chosen() {
                return int8::matmul(&int8::quantize_rows(x, k), q, d, n, bias, y, n);
            }
        }
        let accumulate = bias.is_some();
        if let Some(b) = bias {
            y.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
        }
        let slab_rows = (slab_floats / k).clamp(1, n);
        let mut slab = vec![0f32; slab_rows * k];
        for first in (0..n).step_by(slab_rows) {
            let rows = slab_rows.min(n - first);
            let slab = &mut slab[..rows * k];
            slab.par_chunks_mut(k).enumerate().for_each(|(i, out)| {
                self.row(first + i, out);
            });
            matvec::gemm_xwt(x, slab, k, &mut y[first..], n, accumulate);
        }
    }

    /// Row r of W dotted with x, by the operations `dot4` gives each pair.
    fn dot1(&self, r: usize, x: &[f32]) -> f32 {
        let k = self.k;
        let row = r * k..(r + 1) * k;
        match &self.data {
            Data::Q8 { q, d } => {
                let nb = k / BLOCK;
                let (q, d) = (&q[row], &d[r * nb..(r + 1) * nb]);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        return unsafe { q8_dot1_avx512(q, d, x) };
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        return unsafe { q8_dot_avx2(q, d, x) };
                    }
                }
                q8_dot_portable(q, d, x)
            }
            Data::F16(h) => {
                let w = &h[row];
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        return unsafe { f16_dot1_avx512(w, x) };
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
                        return unsafe { f16_dot1_avx2(w, x) };
                    }
                }
                half_dot1_portable(w, x, |h| h.to_f32())
            }
            Data::Bf16(h) => {
                let w = &h[row];
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        return unsafe { bf16_dot1_avx512(w, x) };
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        return unsafe { bf16_dot1_avx2(w, x) };
                    }
                }
                half_dot1_portable(w, x, |h| h.to_f32())
            }
        }
    }

    /// Rows r..r + 4 of W dotted with each of R rows of x: `[x row][W row]`.
    fn dot4<const R: usize>(&self, r: usize, x: [&[f32]; R]) -> [[f32; 4]; R] {
        let k = self.k;
        let rows = |i: usize| (r + i) * k..(r + i + 1) * k;
        let each = |f: &dyn Fn(usize, &[f32]) -> f32| x.map(|x| [0, 1, 2, 3].map(|i| f(i, x)));
        match &self.data {
            Data::Q8 { q, d } => {
                let nb = k / BLOCK;
                let qs = [0, 1, 2, 3].map(|i| &q[rows(i)]);
                let ds = [0, 1, 2, 3].map(|i| &d[(r + i) * nb..(r + i + 1) * nb]);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        return unsafe { q8_dot4_avx512(qs, ds, x) };
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        return each(&|i, x| unsafe { q8_dot_avx2(qs[i], ds[i], x) });
                    }
                }
                each(&|i, x| q8_dot_portable(qs[i], ds[i], x))
            }
            Data::F16(h) => {
                let ws = [0, 1, 2, 3].map(|i| &h[rows(i)]);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        return unsafe { f16_dot4_avx512(ws, x) };
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
                        return unsafe { f16_dot4_avx2(ws, x) };
                    }
                }
                x.map(|x| half_dot4_portable(ws, x, |h| h.to_f32()))
            }
            Data::Bf16(h) => {
                let ws = [0, 1, 2, 3].map(|i| &h[rows(i)]);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        return unsafe { bf16_dot4_avx512(ws, x) };
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        return unsafe { bf16_dot4_avx2(ws, x) };
                    }
                }
                x.map(|x| half_dot4_portable(ws, x, |h| h.to_f32()))
            }
        }
    }
}

impl Rows for PackedMatrix {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn row<'a>(&'a self, r: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        let k = self.k;
        let out = &mut scratch[..k];
        match &self.data {
            Data::Q8 { q, d } => {
                let nb = k / BLOCK;
                q8_expand(&q[r * k..(r + 1) * k], &d[r * nb..(r + 1) * nb], out);
            }
            Data::F16(h) => h[r * k..(r + 1) * k].convert_to_f32_slice(out),
            Data::Bf16(h) => h[r * k..(r + 1) * k].convert_to_f32_slice(out),
        }
        out
    }
}

/// Blocks of 32 of w into q8_0 as ggml quantizes: d = max|w| / 127, q = round(w / d), halves
/// away from zero (roundf, written as trunc and an exact remainder so that it vectorizes:
/// `f32::round` is a libm call a value, 10 % of a q8_0 load's samples).
#[inline(always)]
pub(crate) fn q8_quantize(q: &mut [i8], d: &mut [f32], w: &[f32]) {
    for ((q, d), w) in q.chunks_exact_mut(BLOCK).zip(d.iter_mut()).zip(w.chunks_exact(BLOCK)) {
        let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        *d = amax / 127.0;
        let inv = if *d != 0.0 { 1.0 / *d } else { 0.0 };
        for (q, &x) in q.iter_mut().zip(w) {
            *q = round_half_away(x * inv) as i8;
        }
    }
}

/// `x.round()` (halves away from zero) for finite x: x - trunc(x) is exact.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// int8 blocks times their scales, into f32.
#[inline(always)]
fn q8_expand_portable(q: &[i8], d: &[f32], out: &mut [f32]) {
    for ((q, &d), out) in q.chunks_exact(BLOCK).zip(d).zip(out.chunks_exact_mut(BLOCK)) {
        for (o, &q) in out.iter_mut().zip(q) {
            *o = q as f32 * d;
        }
    }
}

fn q8_expand(q: &[i8], d: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(q: &[i8], d: &[f32], out: &mut [f32]) {
            q8_expand_portable(q, d, out) // the same loop, vectorized for AVX2 by LLVM
        }
        return unsafe { avx2(q, d, out) };
    }
    q8_expand_portable(q, d, out)
}

/// One q8_0 row dotted with x in f32.
fn q8_dot_portable(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((q, &d), x) in q.chunks_exact(BLOCK).zip(d).zip(x.chunks_exact(BLOCK)) {
        let mut lanes = [0f32; 8];
        for (q, x) in q.chunks_exact(8).zip(x.chunks_exact(8)) {
            for i in 0..8 {
                lanes[i] += q[i] as f32 * x[i];
            }
        }
        acc += d * lanes.iter().sum::<f32>();
    }
    acc
}

// The four-row kernels below read four rows of W and, one 64-byte line per row at a time, ask
// for the next four rows (the next call's) with a software prefetch: widening the packed values
// leaves too few loads in flight for the core's own prefetch (q8_0 lm_head on one thread:
// 8.7 -> 4.5 ms; bench/NOTES.md item 9). Past W's end the prefetch address is never read.

/// Four q8_0 rows, each with R rows of x: per block two 16-wide products of the widened int8
/// values (widened once for the R rows of x) with x, scaled into independent accumulators, one
/// a (x row, W row) pair, so a pair's sum is the same for any R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn q8_dot4_avx512<const R: usize>(q: [&[i8]; 4], d: [&[f32]; 4], x: [&[f32]; R]) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    let nb = d[0].len();
    for r in 0..4 {
        assert!(d[r].len() == nb && q[r].len() >= nb * BLOCK);
    }
    for x in x {
        assert!(x.len() >= nb * BLOCK);
    }
    let px = x.map(|x| x.as_ptr());
    let pq = q.map(|q| q.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for b in 0..nb {
        if b % 2 == 0 {
            for p in pq {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * nb * BLOCK + b * BLOCK));
            }
        }
        let w = |r: usize, j: usize| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pq[r].add(b * BLOCK + 16 * j) as *const __m128i)));
        let ws = [0, 1, 2, 3].map(|r| [w(r, 0), w(r, 1)]);
        for xi in 0..R {
            let x0 = _mm512_loadu_ps(px[xi].add(b * BLOCK));
            let x1 = _mm512_loadu_ps(px[xi].add(b * BLOCK + 16));
            for r in 0..4 {
                let p = _mm512_fmadd_ps(ws[r][1], x1, _mm512_mul_ps(ws[r][0], x0));
                acc[xi][r] = _mm512_fmadd_ps(p, _mm512_set1_ps(*d[r].get_unchecked(b)), acc[xi][r]);
            }
        }
    }
    acc.map(|a| a.map(|a| _mm512_reduce_add_ps(a)))
}

/// One q8_0 row with x, by the operations `q8_dot4_avx512` gives each pair, reading the row
/// alone (no prefetch: one stream is what the hardware prefetcher follows best).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn q8_dot1_avx512(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(q.len() >= nb * BLOCK && x.len() >= nb * BLOCK);
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let mut acc = _mm512_setzero_ps();
    for b in 0..nb {
        let x0 = _mm512_loadu_ps(px.add(b * BLOCK));
        let x1 = _mm512_loadu_ps(px.add(b * BLOCK + 16));
        let w = |j: usize| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pq.add(b * BLOCK + 16 * j) as *const __m128i)));
        let p = _mm512_fmadd_ps(w(1), x1, _mm512_mul_ps(w(0), x0));
        acc = _mm512_fmadd_ps(p, _mm512_set1_ps(*d.get_unchecked(b)), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// One q8_0 row, 8-wide: four products a block summed in a tree, so no chain links the blocks
/// but the final multiply-add by the scale, split over two accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_dot_avx2(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(q.len() >= nb * BLOCK && x.len() >= nb * BLOCK);
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let block = |b: usize| -> __m256 {
        if b % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(pq.wrapping_add(4 * nb * BLOCK + b * BLOCK));
        }
        let w = |j: usize| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(pq.add(b * BLOCK + 8 * j) as *const __m128i)));
        let xv = |j: usize| _mm256_loadu_ps(px.add(b * BLOCK + 8 * j));
        let p01 = _mm256_fmadd_ps(w(1), xv(1), _mm256_mul_ps(w(0), xv(0)));
        let p23 = _mm256_fmadd_ps(w(3), xv(3), _mm256_mul_ps(w(2), xv(2)));
        _mm256_add_ps(p01, p23)
    };
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut b = 0;
    while b + 2 <= nb {
        acc[0] = _mm256_fmadd_ps(block(b), _mm256_set1_ps(*d.get_unchecked(b)), acc[0]);
        acc[1] = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(*d.get_unchecked(b + 1)), acc[1]);
        b += 2;
    }
    if b < nb {
        acc[0] = _mm256_fmadd_ps(block(b), _mm256_set1_ps(*d.get_unchecked(b)), acc[0]);
    }
    hsum256(_mm256_add_ps(acc[0], acc[1]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v);
    lanes.iter().sum()
}

/// Four 16-bit rows (f16 or bf16) dotted with x, one widened value at a time.
fn half_dot4_portable<T>(w: [&[T]; 4], x: &[f32], widen: impl Fn(&T) -> f32) -> [f32; 4] {
    w.map(|w| half_dot1_portable(w, x, &widen))
}

/// Four 16-bit rows (f16 or bf16, widened by `widen`) dotted with each of R rows of x,
/// `$lanes` values a step in `$acc`-wide registers (each W value widened once for the R rows,
/// one accumulator a pair, so a pair's sum is the same for any R); `tail` widens one value for
/// the last k % `$lanes`. One body for the AVX-512 (16 lanes) and AVX2 (8 lanes) kernels;
/// inlined into their target-feature wrappers.
macro_rules! half_dot4 {
    ($name:ident, $lanes:literal, $acc:ty, $packed:ty, $zero:ident, $loadx:ident, $loadw:ident, $fma:ident, $sum:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn $name<T, const R: usize>(w: [&[T]; 4], x: [&[f32]; R], widen: impl Fn($packed) -> $acc, tail: impl Fn(&T) -> f32) -> [[f32; 4]; R] {
            use std::arch::x86_64::*;
            let k = w[0].len();
            for r in 0..4 {
                assert!(w[r].len() == k);
            }
            for x in x {
                assert!(x.len() == k);
            }
            let pw = w.map(|w| w.as_ptr());
            let mut acc = [[$zero(); 4]; R];
            let mut i = 0;
            while i + $lanes <= k {
                if i % 32 == 0 {
                    for p in pw {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * k + i) as *const i8);
                    }
                }
                let ws = pw.map(|p| widen($loadw(p.add(i) as *const $packed)));
                for xi in 0..R {
                    let xv = $loadx(x[xi].as_ptr().add(i));
                    for r in 0..4 {
                        acc[xi][r] = $fma(ws[r], xv, acc[xi][r]);
                    }
                }
                i += $lanes;
            }
            let mut out = acc.map(|a| a.map($sum));
            for (xi, o) in out.iter_mut().enumerate() {
                for (r, o) in o.iter_mut().enumerate() {
                    *o += (i..k).map(|j| tail(&w[r][j]) * x[xi][j]).sum::<f32>();
                }
            }
            out
        }
    };
}

half_dot4!(half_dot4_avx512, 16, __m512, __m256i, _mm512_setzero_ps, _mm512_loadu_ps, _mm256_loadu_si256, _mm512_fmadd_ps, |a| _mm512_reduce_add_ps(a));
half_dot4!(half_dot4_avx2, 8, __m256, __m128i, _mm256_setzero_ps, _mm256_loadu_ps, _mm_loadu_si128, _mm256_fmadd_ps, |a| hsum256(a));

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_dot4_avx512<const R: usize>(w: [&[f16]; 4], x: [&[f32]; R]) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    half_dot4_avx512(w, x, |v| _mm512_cvtph_ps(v), |h| h.to_f32())
}

/// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_dot4_avx512<const R: usize>(w: [&[bf16]; 4], x: [&[f32]; R]) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    half_dot4_avx512(w, x, |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v))), |h| h.to_f32())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dot4_avx2<const R: usize>(w: [&[f16]; 4], x: [&[f32]; R]) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    half_dot4_avx2(w, x, |v| _mm256_cvtph_ps(v), |h| h.to_f32())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_dot4_avx2<const R: usize>(w: [&[bf16]; 4], x: [&[f32]; R]) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    half_dot4_avx2(w, x, |v| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v))), |h| h.to_f32())
}

/// One 16-bit row dotted with x, by the operations `half_dot4_portable` gives each pair.
fn half_dot1_portable<T>(w: &[T], x: &[f32], widen: impl Fn(&T) -> f32) -> f32 {
    w.iter().zip(x).map(|(w, x)| widen(w) * x).sum()
}

/// One 16-bit row dotted with x, by the operations `half_dot4!` gives each pair, reading the
/// row alone (no prefetch).
macro_rules! half_dot1 {
    ($name:ident, $lanes:literal, $acc:ty, $packed:ty, $zero:ident, $loadx:ident, $loadw:ident, $fma:ident, $sum:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn $name<T>(w: &[T], x: &[f32], widen: impl Fn($packed) -> $acc, tail: impl Fn(&T) -> f32) -> f32 {
            use std::arch::x86_64::*;
            let k = x.len();
            assert!(w.len() == k);
            let pw = w.as_ptr();
            let mut acc = $zero();
            let mut i = 0;
            while i + $lanes <= k {
                acc = $fma(widen($loadw(pw.add(i) as *const $packed)), $loadx(x.as_ptr().add(i)), acc);
                i += $lanes;
            }
            let sum: f32 = $sum(acc);
            sum + (i..k).map(|j| tail(&w[j]) * x[j]).sum::<f32>()
        }
    };
}

half_dot1!(half_dot1_avx512, 16, __m512, __m256i, _mm512_setzero_ps, _mm512_loadu_ps, _mm256_loadu_si256, _mm512_fmadd_ps, |a| _mm512_reduce_add_ps(a));
half_dot1!(half_dot1_avx2, 8, __m256, __m128i, _mm256_setzero_ps, _mm256_loadu_ps, _mm_loadu_si128, _mm256_fmadd_ps, |a| hsum256(a));

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_dot1_avx512(w: &[f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    half_dot1_avx512(w, x, |v| _mm512_cvtph_ps(v), |h| h.to_f32())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_dot1_avx512(w: &[bf16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    half_dot1_avx512(w, x, |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v))), |h| h.to_f32())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dot1_avx2(w: &[f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    half_dot1_avx2(w, x, |v| _mm256_cvtph_ps(v), |h| h.to_f32())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_dot1_avx2(w: &[bf16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    half_dot1_avx2(w, x, |v| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v))), |h| h.to_f32())
}

/// x W^T (+ b) as a candle op: x (..., k) f32 on the CPU, contiguous; rows grouped by `plan`
/// when there is one.
struct PackedOp<'a> {
    w: &'a PackedMatrix,
    b: Option<&'a [f32]>,
    plan: Option<&'a matvec::RowPlan>,
}

impl CustomOp1 for PackedOp<'_> {
    fn name(&self) -> &'static str {
        "kvgpt-packed-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "x")?;
        let y = match self.plan {
            Some(plan) => self.w.matmul_by(x, self.b, plan)?,
            None => self.w.matmul(x, self.b)?,
        };
        Ok((CpuStorage::F32(y), matvec::out_shape(l, self.w.n)))
    }
}

/// A linear layer with packed weights on the CPU; its bias stays f32.
pub struct PackedLinear {
    w: PackedMatrix,
    b: Option<Vec<f32>>,
}

impl PackedLinear {
    /// `w` (out, in) and `b` (out) in f32 on the CPU.
    pub fn new(w: &Tensor, b: Option<&Tensor>, packing: Packing) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        // Packed straight from the tensor's own storage: a copy first would hold the whole f32
        // matrix twice while loading (GPT-2 small's lm_head: 154 MB more at the load's peak).
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let w = match &*storage {
            candle_core::Storage::Cpu(s) => PackedMatrix::pack(crate::cpu::ops::f32_slice(s, layout, "a packed weight")?, n, k, packing),
            _ => candle_core::bail!("packed weights are made from CPU tensors"),
        };
        let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Self { w, b })
    }

    /// x (..., k); with a plan, x's rows are grouped as it says.
    pub fn forward(&self, x: &Tensor, plan: Option<&matvec::RowPlan>) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&PackedOp { w: &self.w, b: self.b.as_deref(), plan })
    }

    /// Bytes of weights and bias.
    pub fn bytes(&self) -> usize {
        self.w.bytes() + 4 * self.b.as_ref().map_or(0, Vec::len)
    }

    /// Rows `ids` of W widened to f32, (ids.len(), k): a lookup table's rows.
    pub fn rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (n, k) = self.w.shape();
        let mut out = vec![0f32; ids.len() * k];
        for (&id, out) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            if id as usize >= n {
                candle_core::bail!("row {id} of a {n}-row table");
            }
            self.w.row(id as usize, out); // packed rows are written into `out`
        }
        Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    const ALL: [Packing; 3] = [Packing::Q8_0, Packing::F16, Packing::Bf16];

    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    /// The vectorizable rounding equals `f32::round` (halves away from zero) around every half
    /// and integer in q8_0's range, and far outside it.
    #[test]
    fn round_half_away_is_round() {
        let mut xs = vec![0.0f32, -0.0, 0.49999997, -0.49999997, 0.5000001, 1e-30, 8388607.5, 8388608.0, 1e30, -1e30];
        for i in -300..=300 {
            let h = i as f32 * 0.5;
            xs.extend([h, h.next_up(), h.next_down()]);
        }
        for x in xs {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
    }

    /// ggml's q8_0 on one block: scale max|w| / 127, values rounded half away from zero.
    #[test]
    fn quantizes_as_ggml_q8_0() {
        let mut w = vec![0f32; 64];
        w[0] = -2.54;
        w[1] = 1.27; // exactly half the range: 63.5 rounds away from zero to 64
        w[2] = 0.005; // under half a step: 0
        let m = PackedMatrix::pack(&w, 1, 64, Packing::Q8_0);
        let Data::Q8 { q, d } = &m.data else { panic!("not q8_0") };
        assert!((d[0] - 0.02).abs() < 1e-7 && d[1] == 0.0);
        assert_eq!(&q[..3], &[-127, 64, 0]);
        assert_eq!(m.bytes(), 64 + 8);
        let back = m.dequantize();
        assert!((back[0] + 2.54).abs() < 1e-6 && back[63] == 0.0);
        assert_eq!(PackedMatrix::pack(&w, 2, 32, Packing::F16).bytes(), 128);
    }

    /// Against the dequantized weights in plain f32 arithmetic, for one row (the four-row
    /// kernels, n not a multiple of 4), a few rows (matvec) and many (slabs + gemm, one slab or
    /// slabs of 300 rows; q8_0 by the integer path where there is one), with and without bias;
    /// and each packing's rounding bound.
    #[test]
    fn matmul_matches_dequantized_weights() {
        for packing in ALL {
            for (m, n, k) in [(1, 3, 32), (1, 129, 768), (1, 70, 3072), (4, 70, 64), (31, 65, 96), (33, 1030, 64), (70, 2100, 128)] {
                let w = uniform(n * k, 1);
                let x = uniform(m * k, 2);
                let b = uniform(n, 3);
                let p = PackedMatrix::pack(&w, n, k, packing);
                assert_eq!(p.packing(), packing);
                let wd = p.dequantize();
                for (i, (a, b)) in w.iter().zip(&wd).enumerate() {
                    let bound = match &p.data {
                        Data::Q8 { d, .. } => d[i / BLOCK] * 0.5 + 1e-7, // half a step of its block
                        Data::F16(_) => a.abs() * 4.9e-4 + 6e-8,         // 2^-11 relative
                        Data::Bf16(_) => a.abs() * 3.9e-3,               // 2^-8 relative
                    };
                    assert!((a - b).abs() <= bound, "{packing:?} {a} -> {b}");
                }
                // Many rows of q8_0 go through the integer path where the CPU has it: its sums
                // (x quantized too) are what they must equal.
                let int8_sums = match &p.data {
                    Data::Q8 { q, d } if m >= int8::MIN_ROWS && int8::available() => Some(int8::matmul_reference(&int8::quantize_rows(&x, k), q, d, n)),
                    _ => None,
                };
                for (bias, slab) in [(Some(b.as_slice()), SLAB_FLOATS), (None, SLAB_FLOATS), (Some(b.as_slice()), 300 * k)] {
                    let y = p.matmul_in_slabs(&x, bias, slab).unwrap(); // 300 rows: slab ends inside W
                    for i in 0..m {
                        for j in 0..n {
                            let sum = match &int8_sums {
                                Some(s) => s[i * n + j],
                                None => (0..k).map(|t| x[i * k + t] * wd[j * k + t]).sum::<f32>(),
                            };
                            let want = sum + bias.map_or(0.0, |b| b[j]);
                            let got = y[i * n + j];
                            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{packing:?} m={m} n={n} k={k} ({i},{j}): {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 kernels, which this machine's AVX-512 would otherwise shadow, against the
    /// portable sums.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_portable() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")) {
            return;
        }
        let (n, k) = (4, 1608); // not a multiple of 16, so the scalar tail runs too
        let w = uniform(n * k, 4);
        let x = uniform(k, 5);
        let close = |a: [f32; 4], b: [f32; 4]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-3 * (1.0 + b.abs()));
        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let bh: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let rows = |i: usize| i * k..(i + 1) * k;
        let want = |f: &dyn Fn(usize) -> f32| [0, 1, 2, 3].map(f);
        let got = unsafe { f16_dot4_avx2([0, 1, 2, 3].map(|i| &h[rows(i)]), [&x[..]]) }[0];
        assert!(close(got, want(&|i| h[rows(i)].iter().zip(&x).map(|(w, x)| w.to_f32() * x).sum())));
        let got = unsafe { bf16_dot4_avx2([0, 1, 2, 3].map(|i| &bh[rows(i)]), [&x[..]]) }[0];
        assert!(close(got, want(&|i| bh[rows(i)].iter().zip(&x).map(|(w, x)| w.to_f32() * x).sum())));
        // The one-row kernels sum a row as the four-row ones sum each pair, bit for bit.
        let four = unsafe { f16_dot4_avx2([0, 1, 2, 3].map(|i| &h[rows(i)]), [&x[..]]) }[0];
        assert_eq!(four, [0, 1, 2, 3].map(|i| unsafe { f16_dot1_avx2(&h[rows(i)], &x) }));
        let four = unsafe { bf16_dot4_avx2([0, 1, 2, 3].map(|i| &bh[rows(i)]), [&x[..]]) }[0];
        assert_eq!(four, [0, 1, 2, 3].map(|i| unsafe { bf16_dot1_avx2(&bh[rows(i)], &x) }));
        let k = 24 * BLOCK;
        let p = PackedMatrix::pack(&w[..n * k], n, k, Packing::Q8_0);
        let Data::Q8 { q, d } = &p.data else { unreachable!() };
        let nb = k / BLOCK;
        let got = [0, 1, 2, 3].map(|i| unsafe { q8_dot_avx2(&q[i * k..(i + 1) * k], &d[i * nb..(i + 1) * nb], &x[..k]) });
        assert!(close(got, [0, 1, 2, 3].map(|i| q8_dot_portable(&q[i * k..(i + 1) * k], &d[i * nb..(i + 1) * nb], &x[..k]))));
    }

    /// Batch invariance with a row plan: each row comes out as it does alone (a one-row
    /// segment) or in its own chunk alone, bit for bit, among one-row segments, short chunks and
    /// long ones, for every packing (q8_0's chunks in one integer product where the CPU has it).
    #[test]
    fn planned_rows_do_not_depend_on_the_rest_of_the_step() {
        let (n, k) = (70, 96);
        let w = uniform(n * k, 6);
        let b = uniform(n, 7);
        let mut plan = matvec::RowPlan::empty();
        let segments = [1, 1, 1, 5, 2, 17, 16, 40, 33];
        for t in segments {
            plan.push(t);
        }
        assert_eq!((plan.small, plan.chunk_rows, plan.few_rows(), &plan.big[..]), (43, 33, 10, &[40, 33][..]));
        let x = uniform(plan.rows() * k, 8);
        for packing in ALL {
            let p = PackedMatrix::pack(&w, n, k, packing);
            let all = p.matmul_by(&x, Some(&b), &plan).unwrap();
            let mut row = 0;
            for t in segments {
                let alone = p.matmul_by(&x[row * k..(row + t) * k], Some(&b), &matvec::RowPlan::single(t)).unwrap();
                assert_eq!(alone, all[row * n..(row + t) * n], "{packing:?}: segment of {t} at row {row}");
                row += t;
            }
        }
    }

    /// A packed matrix as a lookup table: its rows widened to f32, as `dequantize` gives them;
    /// an id past the table is an error.
    #[test]
    fn rows_are_the_dequantized_rows() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 64), &d).unwrap();
        for packing in ALL {
            let lin = PackedLinear::new(&w, None, packing).unwrap();
            let all = lin.w.dequantize();
            let got: Vec<f32> = lin.rows(&[3, 39, 3, 0]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = [3, 39, 3, 0].iter().flat_map(|&r| all[r * 64..(r + 1) * 64].to_vec()).collect();
            assert_eq!(got, want, "{packing:?}");
            assert!(lin.rows(&[40]).is_err());
        }
    }

    #[test]
    fn linear_op_keeps_leading_dims() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 48, &d).unwrap();
        let want = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&Tensor::ones((2, 3, 64), candle_core::DType::F32, &d).unwrap()).unwrap();
        for (packing, max_rel) in [(Packing::Q8_0, 2e-2), (Packing::F16, 1e-3), (Packing::Bf16, 1e-2)] {
            let lin = PackedLinear::new(&w, Some(&b), packing).unwrap();
            assert_eq!(lin.bytes(), lin.w.bytes() + 48 * 4);
            let y = lin.forward(&Tensor::ones((2, 3, 64), candle_core::DType::F32, &d).unwrap(), None).unwrap();
            assert_eq!(y.dims(), &[2, 3, 48]);
            let rel = ((&y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
                / want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(rel < max_rel, "{packing:?}: relative error {rel}");
            assert!(lin.forward(&Tensor::zeros((2, 63), candle_core::DType::F32, &d).unwrap(), None).is_err());
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    /// `cargo test --release -- --ignored packed_decode_timing --nocapture`: GB/s of one-row
    /// products over GPT-2 small's matrices.
    #[test]
    #[ignore]
    fn packed_decode_timing() {
        for packing in [Packing::Q8_0, Packing::F16, Packing::Bf16] {
            for (n, k) in [(2304, 768), (3072, 768), (768, 3072), (50257, 768)] {
                let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
                let p = PackedMatrix::pack(&w, n, k, packing);
                drop(w);
                let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 / 7.0).collect();
                let reps = 30;
                // Repeated: the block matrices (1.8-4.7 MB) then come from L3, the lm_head
                // (38-77 MB) from memory.
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(p.matmul(&x, None).unwrap());
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                eprintln!("{packing:?} n={n} k={k}: {:.3} ms, {:.1} GB/s", s * 1e3, p.bytes() as f64 / s / 1e9);
            }
        }
    }
}

