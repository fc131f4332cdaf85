//! q8_0 weights on the CPU with f32 activations. Each row of W (out, in) is cut into blocks of
//! 32 weights stored as int8 with one scale, as ggml's q8_0 quantizes them (d = max|w| / 127,
//! q = round(w / d)); the scale is kept as an f32 (ggml stores an f16), 1.125 bytes a weight.
//! Unlike candle's CPU q8_0 matmul, the activations are not quantized: a product reads the
//! int8 rows, expands each into f32 in L1 just before its dot products (`matvec::Rows`), and
//! so carries the weights' rounding only. Few-row products (a decode step) run on the matvec
//! kernel; many-row products (a long prompt) expand W a slab at a time and use gemm.

use crate::cpu_ops::f32_slice;
use crate::matvec::{self, Rows};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Weights per block, as in ggml's q8_0.
pub const BLOCK: usize = 32;

/// Rows of W per rayon task in a one-row product.
const ROWS_PER_TASK: usize = 64;

/// Rows of W expanded to f32 at a time for a many-row product: 1024 x 3072 floats is 12 MB.
const SLAB_ROWS: usize = 1024;

pub struct Q8Matrix {
    n: usize,
    k: usize,
    q: Vec<i8>,  // (n, k)
    d: Vec<f32>, // (n, k / BLOCK)
    expand: fn(&[i8], &[f32], &mut [f32]),
    dot: fn(&[i8], &[f32], &[f32]) -> f32,
    dot4: fn([&[i8]; 4], [&[f32]; 4], &[f32]) -> [f32; 4],
}

impl Q8Matrix {
    /// Quantizes W (n, k), row-major; k must be a multiple of `BLOCK`.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert!(k % BLOCK == 0 && w.len() == n * k, "q8_0: W must be (n, k) with k a multiple of {BLOCK}");
        let mut q = vec![0i8; n * k];
        let mut d = vec![0f32; n * k / BLOCK];
        q.par_chunks_mut(BLOCK * 256).zip(d.par_chunks_mut(256)).zip(w.par_chunks(BLOCK * 256)).for_each(|((q, d), w)| {
            for ((q, d), w) in q.chunks_exact_mut(BLOCK).zip(d.iter_mut()).zip(w.chunks_exact(BLOCK)) {
                let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                *d = amax / 127.0;
                let inv = if *d != 0.0 { 1.0 / *d } else { 0.0 };
                for (q, &x) in q.iter_mut().zip(w) {
                    *q = (x * inv).round() as i8;
                }
            }
        });
        let (expand, dot, dot4) = kernels();
        Self { n, k, q, d, expand, dot, dot4 }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes the weights take (and a decode step reads): int8 values plus f32 scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.d.len()
    }

    /// W as f32 (n, k): what the quantized weights stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k).enumerate().for_each(|(r, out)| {
            self.row(r, out);
        });
        w
    }

    /// y = x W^T (+ b) for x of m rows (m * k elements); y is (m, n).
    pub fn matmul(&self, x: &[f32], bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() % k != 0 {
            candle_core::bail!("q8_0 matmul: x has {} elements, not rows of W's {k} columns", x.len());
        }
        if bias.is_some_and(|b| b.len() != n) {
            candle_core::bail!("q8_0 matmul: bias does not have {n} elements");
        }
        let m = x.len() / k;
        if m == 1 {
            // One row (a decode step): each W row is dotted with x straight from its int8 form.
            let nb = k / BLOCK;
            let mut y = vec![0f32; n];
            let q = |r: usize| &self.q[r * k..(r + 1) * k];
            let d = |r: usize| &self.d[r * nb..(r + 1) * nb];
            let b = |r: usize| bias.map_or(0.0, |b| b[r]);
            y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                let len = out.len();
                let mut quads = out.chunks_exact_mut(4);
                for (i, y) in quads.by_ref().enumerate() {
                    let r = first + 4 * i;
                    let v = (self.dot4)([q(r), q(r + 1), q(r + 2), q(r + 3)], [d(r), d(r + 1), d(r + 2), d(r + 3)], x);
                    for j in 0..4 {
                        y[j] = v[j] + b(r + j);
                    }
                }
                let rest = quads.into_remainder();
                let first = first + len - rest.len();
                for (i, y) in rest.iter_mut().enumerate() {
                    *y = (self.dot)(q(first + i), d(first + i), x) + b(first + i);
                }
            });
            return Ok(y);
        }
        if m <= matvec::MAX_ROWS {
            return matvec::matvec_rows(x, self, bias);
        }
        // Compute-bound: expand a slab of W's rows to f32 and let gemm multiply it, adding to
        // the slab's columns of y (which start as the bias).
        let mut y = matvec::start_with_bias(m, n, bias);
        let mut slab = vec![0f32; SLAB_ROWS.min(n) * k];
        for first in (0..n).step_by(SLAB_ROWS) {
            let rows = SLAB_ROWS.min(n - first);
            let slab = &mut slab[..rows * k];
            slab.par_chunks_mut(k).enumerate().for_each(|(i, out)| {
                self.row(first + i, out);
            });
            matvec::gemm_xwt(x, slab, k, &mut y[first..], n, bias.is_some());
        }
        Ok(y)
    }
}

impl Rows for Q8Matrix {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn row<'a>(&'a self, r: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        let (k, nb) = (self.k, self.k / BLOCK);
        let out = &mut scratch[..k];
        (self.expand)(&self.q[r * k..(r + 1) * k], &self.d[r * nb..(r + 1) * nb], out);
        out
    }
}

/// int8 blocks times their scales, into f32.
#[inline(always)]
fn expand_portable(q: &[i8], d: &[f32], out: &mut [f32]) {
    for ((q, &d), out) in q.chunks_exact(BLOCK).zip(d).zip(out.chunks_exact_mut(BLOCK)) {
        for (o, &q) in out.iter_mut().zip(q) {
            *o = q as f32 * d;
        }
    }
}

/// One W row (int8 blocks and their scales) dotted with x in f32.
fn dot_portable(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
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

type Dot4 = fn([&[i8]; 4], [&[f32]; 4], &[f32]) -> [f32; 4];

/// The expand, dot and four-row dot kernels for this CPU.
#[allow(clippy::type_complexity)]
fn kernels() -> (fn(&[i8], &[f32], &mut [f32]), fn(&[i8], &[f32], &[f32]) -> f32, Dot4) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let (dot, dot4): (fn(&[i8], &[f32], &[f32]) -> f32, Dot4) = if std::is_x86_feature_detected!("avx512f") {
            (|q, d, x| unsafe { dot_avx512(q, d, x) }, |q, d, x| unsafe { dot4_avx512(q, d, x) })
        } else {
            let dot: fn(&[i8], &[f32], &[f32]) -> f32 = |q, d, x| unsafe { dot_avx2(q, d, x) };
            (dot, |q, d, x| unsafe { [dot_avx2(q[0], d[0], x), dot_avx2(q[1], d[1], x), dot_avx2(q[2], d[2], x), dot_avx2(q[3], d[3], x)] })
        };
        #[target_feature(enable = "avx2")]
        unsafe fn expand_avx2(q: &[i8], d: &[f32], out: &mut [f32]) {
            expand_portable(q, d, out) // the same loop, vectorized for AVX2 by LLVM
        }
        return (|q, d, out| unsafe { expand_avx2(q, d, out) }, dot, dot4);
    }
    (expand_portable, dot_portable, |q, d, x| [0, 1, 2, 3].map(|i| dot_portable(q[i], d[i], x)))
}

/// `dot_avx2` with 16-wide registers: two products a block instead of four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(q.len() >= nb * BLOCK && x.len() >= nb * BLOCK);
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let block = |b: usize| -> __m512 {
        let w = |j: usize| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pq.add(b * BLOCK + 16 * j) as *const __m128i)));
        let xv = |j: usize| _mm512_loadu_ps(px.add(b * BLOCK + 16 * j));
        _mm512_fmadd_ps(w(1), xv(1), _mm512_mul_ps(w(0), xv(0)))
    };
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut b = 0;
    while b + 2 <= nb {
        acc[0] = _mm512_fmadd_ps(block(b), _mm512_set1_ps(*d.get_unchecked(b)), acc[0]);
        acc[1] = _mm512_fmadd_ps(block(b + 1), _mm512_set1_ps(*d.get_unchecked(b + 1)), acc[1]);
        b += 2;
    }
    if b < nb {
        acc[0] = _mm512_fmadd_ps(block(b), _mm512_set1_ps(*d.get_unchecked(b)), acc[0]);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// Four W rows dotted with one x: x is loaded once for the four, and the four accumulators
/// are independent chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(q: [&[i8]; 4], d: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let nb = d[0].len();
    for r in 0..4 {
        assert!(d[r].len() == nb && q[r].len() >= nb * BLOCK);
    }
    assert!(x.len() >= nb * BLOCK);
    let px = x.as_ptr();
    let pq = q.map(|q| q.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    for b in 0..nb {
        if b % 2 == 0 {
            // The next four rows (the next call's), one 64-byte line at a time: the widening
            // and converting leave too few loads in flight for the core's own prefetch
            // (1.4x faster on one core, 9.0 -> 6.3 ms for the lm_head, bench/NOTES.md).
            for r in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(pq[r].wrapping_add(4 * nb * BLOCK + b * BLOCK) as *const i8);
            }
        }
        let x0 = _mm512_loadu_ps(px.add(b * BLOCK));
        let x1 = _mm512_loadu_ps(px.add(b * BLOCK + 16));
        for r in 0..4 {
            let w = |j: usize| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pq[r].add(b * BLOCK + 16 * j) as *const __m128i)));
            let p = _mm512_fmadd_ps(w(1), x1, _mm512_mul_ps(w(0), x0));
            acc[r] = _mm512_fmadd_ps(p, _mm512_set1_ps(*d[r].get_unchecked(b)), acc[r]);
        }
    }
    acc.map(|a| _mm512_reduce_add_ps(a))
}

/// Per block: four 8-wide products of the widened int8 values with x, summed in a tree (no
/// chain between blocks but the final multiply-add by the scale, split over two accumulators),
/// so the loop runs at the memory's pace rather than the FMA latency's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(q: &[i8], d: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(q.len() >= nb * BLOCK && x.len() >= nb * BLOCK);
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let block = |b: usize| -> __m256 {
        if b % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(pq.wrapping_add(4 * nb * BLOCK + b * BLOCK)); // see dot4_avx512
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
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1]));
    lanes.iter().sum()
}

/// x W^T (+ b) as a candle op: x (..., k) f32 on the CPU, contiguous.
struct Q8Op<'a> {
    w: &'a Q8Matrix,
    b: Option<&'a [f32]>,
}

impl CustomOp1 for Q8Op<'_> {
    fn name(&self) -> &'static str {
        "kvgpt-q8_0-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.w.matmul(f32_slice(s, l, "x")?, self.b)?;
        Ok((CpuStorage::F32(y), matvec::out_shape(l, self.w.n)))
    }
}

/// A linear layer with q8_0 weights on the CPU.
pub struct Q8Linear {
    w: Q8Matrix,
    b: Option<Vec<f32>>,
}

impl Q8Linear {
    /// `w` (out, in) and `b` (out) in f32 on the CPU.
    pub fn new(w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let data: Vec<f32> = w.contiguous()?.flatten_all()?.to_vec1()?;
        let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Self { w: Q8Matrix::quantize(&data, n, k), b })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Q8Op { w: &self.w, b: self.b.as_deref() })
    }

    pub fn bytes(&self) -> usize {
        self.w.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    /// ggml's q8_0 on one block: scale max|w| / 127, values rounded half away from zero.
    #[test]
    fn quantizes_as_ggml_q8_0() {
        let mut w = vec![0f32; 64];
        w[0] = -2.54;
        w[1] = 1.27; // exactly half the range: 63.5 rounds away from zero to 64
        w[2] = 0.005; // under half a step: 0
        let m = Q8Matrix::quantize(&w, 1, 64);
        assert!((m.d[0] - 0.02).abs() < 1e-7 && m.d[1] == 0.0);
        assert_eq!(&m.q[..3], &[-127, 64, 0]);
        assert_eq!(m.bytes(), 64 + 8);
        let back = m.dequantize();
        assert!((back[0] + 2.54).abs() < 1e-6 && back[63] == 0.0);
    }

    /// Against the dequantized weights in plain f32 arithmetic, for few rows (matvec) and many
    /// (slabs + gemm, with a slab boundary inside W), with and without bias.
    #[test]
    fn matmul_matches_dequantized_weights() {
        for (m, n, k) in [(1, 3, 32), (1, 129, 768), (4, 70, 64), (31, 65, 96), (33, 1030, 64), (70, 2100, 128)] {
            let w = randn(n * k, 1);
            let x = randn(m * k, 2);
            let b = randn(n, 3);
            let q = Q8Matrix::quantize(&w, n, k);
            let wd = q.dequantize();
            // The rounding is at most half a step of each block's scale.
            for (blk, (w, wd)) in w.chunks(BLOCK).zip(wd.chunks(BLOCK)).enumerate() {
                for (a, b) in w.iter().zip(wd) {
                    assert!((a - b).abs() <= q.d[blk] * 0.5 + 1e-7);
                }
            }
            for bias in [Some(b.as_slice()), None] {
                let y = q.matmul(&x, bias).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|t| x[i * k + t] * wd[j * k + t]).sum::<f32>() + bias.map_or(0.0, |b| b[j]);
                        let got = y[i * n + j];
                        assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "m={m} n={n} k={k} ({i},{j}): {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn linear_op_keeps_leading_dims() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 48, &d).unwrap();
        let lin = Q8Linear::new(&w, Some(&b)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &d).unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 48]);
        let want = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
        let rel = ((&y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
            / want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(rel < 2e-2, "q8_0 relative error {rel}");
        assert!(lin.forward(&Tensor::zeros((2, 63), candle_core::DType::F32, &d).unwrap()).is_err());
    }
}
