//! y = x W^T (+ b) on the CPU in f32. A few rows x (a decode step, a short prompt): candle's gemm
//! computes a one-row product on one thread, and few-row products slowly, which leaves these
//! memory-bound products far from the machine's bandwidth; here W's rows are split over the
//! rayon pool (candle's own), each row read once and dotted with every x row by an AVX2/FMA
//! kernel (four x rows per pass) where the CPU has it. More rows (a prompt): gemm, called
//! directly so that the bias is added inside it (y starts as the bias) rather than in a pass of
//! its own.

use crate::cpu_ops::f32_slice;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows of W per rayon task: small enough to balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 64;

/// Up to this many rows go through `matvec`; more through candle's gemm, which is faster once
/// the product is compute-bound (measured in bench/NOTES.md).
pub const MAX_ROWS: usize = 32;

/// W's rows as f32, however W is stored: f32 rows are borrowed as they are, quantized rows are
/// expanded into `scratch` (k floats, in L1) just before their dot products.
pub(crate) trait Rows: Sync {
    /// (n, k): W is (out, in), nn.Linear's layout.
    fn shape(&self) -> (usize, usize);
    /// Whether `row` writes into its scratch (f32 rows are borrowed and need none).
    const EXPANDS: bool;
    fn row<'a>(&'a self, r: usize, scratch: &'a mut [f32]) -> &'a [f32];
}

struct Dense<'a> {
    w: &'a [f32],
    n: usize,
    k: usize,
}

impl Rows for Dense<'_> {
    const EXPANDS: bool = false;
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn row<'a>(&'a self, r: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self.w[r * self.k..(r + 1) * self.k]
    }
}

/// y = x W^T (+ b) for x of m rows (m * k elements): y is (m, n), row-major.
pub(crate) fn matvec_rows<R: Rows>(x: &[f32], w: &R, bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
    let (n, k) = w.shape();
    let m = rows_of(x, n, k, bias)?;
    let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
    let kernels = kernels();
    // Computed as y^T (n, m): each task owns whole rows of W and so a contiguous block of y^T.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let last = first + out.len() / m - 1; // the odd row out, when the block has one
        // Room for two expanded rows; none for f32 rows, which this hot path borrows as they are.
        let half = if R::EXPANDS { k } else { 0 };
        let mut scratch = vec![0f32; 2 * half];
        let (s0, s1) = scratch.split_at_mut(half);
        let b = |r: usize| bias.map_or(0.0, |b| b[r]);
        let mut pairs = out.chunks_exact_mut(2 * m);
        for (p, out) in pairs.by_ref().enumerate() {
            let (r0, r1) = (first + 2 * p, first + 2 * p + 1);
            let (w0, w1) = (w.row(r0, s0), w.row(r1, s1));
            let (o0, o1) = out.split_at_mut(m);
            let mut i = 0;
            while i + 4 <= m {
                let d = (kernels.dot2x4)([w0, w1], [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]]);
                for j in 0..4 {
                    o0[i + j] = d[0][j] + b(r0);
                    o1[i + j] = d[1][j] + b(r1);
                }
                i += 4;
            }
            for i in i..m {
                o0[i] = (kernels.dot)(w0, rows[i]) + b(r0);
                o1[i] = (kernels.dot)(w1, rows[i]) + b(r1);
            }
        }
        let rest = pairs.into_remainder();
        if !rest.is_empty() {
            let w_last = w.row(last, s0);
            for (i, o) in rest.iter_mut().enumerate() {
                *o = (kernels.dot)(w_last, rows[i]) + b(last);
            }
        }
    });
    if m == 1 {
        return Ok(yt);
    }
    let mut y = vec![0f32; m * n];
    y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row.iter_mut().enumerate().for_each(|(r, v)| *v = yt[r * m + i]);
    });
    Ok(y)
}

fn matvec(x: &[f32], x_l: &Layout, w: &[f32], w_l: &Layout, bias: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
    let (n, k) = w_l.shape().dims2()?;
    let m = rows_of(x, n, k, bias)?;
    let y = if m <= MAX_ROWS {
        matvec_rows(x, &Dense { w, n, k }, bias)?
    } else {
        let mut y = start_with_bias(m, n, bias);
        gemm_xwt(x, w, k, &mut y, n, bias.is_some());
        y
    };
    Ok((CpuStorage::F32(y), out_shape(x_l, n)))
}

/// How many rows of W's k columns x holds, checking that x is whole rows and the bias n long.
pub(crate) fn rows_of(x: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> candle_core::Result<usize> {
    if k == 0 || x.len() % k != 0 {
        candle_core::bail!("linear: x has {} elements, not rows of W's {k} columns", x.len());
    }
    if bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!("linear: bias does not have {n} elements");
    }
    Ok(x.len() / k)
}

/// (m, n) rows each equal to the bias, or zeros.
pub(crate) fn start_with_bias(m: usize, n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    match bias {
        Some(b) => {
            let mut y = vec![0f32; m * n];
            y.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
            y
        }
        None => vec![0f32; m * n],
    }
}

/// y (m, n_w) = x (m, k) W^T (+ y when `accumulate`), W (n_w, k) row-major, y's rows `y_stride`
/// apart: gemm on the rayon pool. Adding to a y that starts as the bias fuses the bias add.
pub(crate) fn gemm_xwt(x: &[f32], w: &[f32], k: usize, y: &mut [f32], y_stride: usize, accumulate: bool) {
    let (m, n_w) = (x.len() / k, w.len() / k);
    assert!(m * k == x.len() && n_w * k == w.len() && n_w <= y_stride && (m == 0 || (m - 1) * y_stride + n_w <= y.len()));
    // SAFETY: x is (m, k) and W (n_w, k) row-major inside their slices, read as x and W^T; y's
    // m rows of n_w lie inside y (checked above).
    unsafe {
        gemm::gemm(
            m,
            n_w,
            k,
            y.as_mut_ptr(),
            1,
            y_stride as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// x's shape with the last dimension replaced by n.
pub(crate) fn out_shape(x_l: &Layout, n: usize) -> Shape {
    let mut dims = x_l.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    Shape::from(dims)
}

struct MatVec;
struct MatVecBias;

impl CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "kvgpt-matvec"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        matvec(f32_slice(s1, l1, "x")?, l1, f32_slice(s2, l2, "W")?, l2, None)
    }
}

impl CustomOp3 for MatVecBias {
    fn name(&self) -> &'static str {
        "kvgpt-matvec-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        matvec(f32_slice(s1, l1, "x")?, l1, f32_slice(s2, l2, "W")?, l2, Some(f32_slice(s3, l3, "bias")?))
    }
}

/// x W^T (+ b) for x (..., in), W (out, in), on the CPU in f32: a few rows through the matvec
/// kernel, more through gemm with the bias added in its output.
pub fn matvec_cpu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3_no_bwd(w, b, &MatVecBias),
        None => x.apply_op2_no_bwd(w, &MatVec),
    }
}

struct Kernels {
    dot: fn(&[f32], &[f32]) -> f32,
    dot2x4: fn([&[f32]; 2], [&[f32]; 4]) -> [[f32; 4]; 2],
}

fn kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return Kernels { dot: |a, b| unsafe { dot_avx2(a, b) }, dot2x4: |w, xs| unsafe { dot2x4_avx2(w, xs) } };
    }
    Kernels { dot: dot_portable, dot2x4: |w, xs| w.map(|w| xs.map(|x| dot_portable(w, x))) }
}

/// Eight independent partial sums, which LLVM vectorizes on any target.
#[inline(always)]
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        // Four rows ahead (a one-row product reads W's rows in order): about 10 % faster than
        // the core's own prefetch alone for the lm_head (bench/NOTES.md item 9).
        _mm_prefetch::<_MM_HINT_T0>(pa.wrapping_add(i + 4 * n) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(pa.wrapping_add(i + 4 * n + 16) as *const i8);
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(i + 8 * j));
            let y = _mm256_loadu_ps(pb.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    while i < n {
        total += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    total
}

/// Eight dot products, two rows of W by four x rows: per 8 floats, 6 loads feed 8 FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot2x4_avx2(w: [&[f32]; 2], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = w[0].len();
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut i = 0;
    while i + 8 <= n {
        let w0 = _mm256_loadu_ps(w[0].as_ptr().add(i));
        let w1 = _mm256_loadu_ps(w[1].as_ptr().add(i));
        for (j, x) in xs.iter().enumerate() {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            acc[0][j] = _mm256_fmadd_ps(w0, xv, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(w1, xv, acc[1][j]);
        }
        i += 8;
    }
    let mut out = [[0f32; 4]; 2];
    for r in 0..2 {
        for j in 0..4 {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]);
            out[r][j] = lanes.iter().sum::<f32>() + (i..n).map(|t| w[r][t] * xs[j][t]).sum::<f32>();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_matmul() {
        let d = Device::Cpu;
        for (m, n, k) in [(1, 1, 1), (1, 7, 13), (1, 100, 768), (1, 129, 40), (5, 70, 33), (8, 3, 768), (31, 65, 64), (33, 70, 33), (100, 129, 64)] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &d).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &d).unwrap();
            let expected = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
            let got = matvec_cpu(&x, &w, Some(&b)).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "m={m} n={n} k={k} diff {diff}");
            let no_bias = matvec_cpu(&x, &w, None).unwrap();
            let expected = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let diff = (no_bias - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "m={m} n={n} k={k} no-bias diff {diff}");
        }
        assert_eq!(dot_portable(&[1.0; 19], &[2.0; 19]), 38.0);
    }
}
