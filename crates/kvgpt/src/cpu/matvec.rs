//! y = x W^T (+ b) on the CPU in f32. A few rows x (decode steps, a short prompt chunk): candle's
//! gemm computes a one-row product on one thread, and few-row products slowly, which leaves
//! these memory-bound products far from the machine's bandwidth; here W's rows are split over
//! the rayon pool (candle's own), each row read once and dotted with every x row by an AVX2/FMA
//! kernel (four x rows per pass) where the CPU has it. A long prompt chunk: gemm, called
//! directly so that the bias is added inside it (y starts as the bias) rather than in a pass of
//! its own. A step of many sequences follows a `RowPlan`, which keeps each row's result
//! independent of the rest of the step (batch invariance): every kernel sums a (W row, x row)
//! pair in the same order, and a long chunk always gets a gemm of its own.

use crate::cpu::ops::f32_slice;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows of W per rayon task: small enough to balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 64;

/// Up to this many rows go through `matvec`; more through candle's gemm, which is faster once
/// the product is compute-bound (measured in bench/NOTES.md).
pub const MAX_ROWS: usize = 32;

/// How the rows of a step's product are split: the first `small` rows (decode tokens, chunks of
/// at most `MAX_ROWS`) through matvec together, then each of `big` (the row counts of long
/// chunks, in order) through gemm on its own. A row's result then depends on its own sequence
/// only: matvec's kernels sum every (W row, x row) pair in one order whatever the other rows,
/// and a long chunk's gemm sees that chunk alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    pub small: usize,
    pub big: Vec<usize>,
}

impl RowPlan {
    /// m rows of one sequence.
    pub fn single(m: usize) -> Self {
        if m <= MAX_ROWS {
            Self { small: m, big: vec![] }
        } else {
            Self { small: 0, big: vec![m] }
        }
    }

    /// Rows in all.
    pub fn rows(&self) -> usize {
        self.small + self.big.iter().sum::<usize>()
    }

    /// y (m, n) for x (m, k) by the plan: `small` computes the small rows' block (small, n),
    /// `big` one long chunk's rows into its block of y.
    pub(crate) fn apply(
        &self,
        x: &[f32],
        k: usize,
        n: usize,
        small: impl FnOnce(&[f32]) -> candle_core::Result<Vec<f32>>,
        big: impl Fn(&[f32], &mut [f32]),
    ) -> candle_core::Result<Vec<f32>> {
        if self.rows() * k != x.len() {
            candle_core::bail!("linear: x has {} elements, the row plan {} rows of {k}", x.len(), self.rows());
        }
        let head = if self.small > 0 { small(&x[..self.small * k])? } else { vec![] };
        if self.big.is_empty() {
            return Ok(head);
        }
        let mut y = head;
        y.resize(self.rows() * n, 0.0);
        let mut row = self.small;
        for &m in &self.big {
            big(&x[row * k..(row + m) * k], &mut y[row * n..(row + m) * n]);
            row += m;
        }
        Ok(y)
    }
}

/// W's rows as f32, however W is stored: f32 rows are borrowed as they are, quantized rows are
/// expanded into `scratch` (k floats, in L1) just before their dot products.
pub(crate) trait Rows: Sync {
    /// (n, k): W is (out, in), nn.Linear's layout.
    fn shape(&self) -> (usize, usize);
    fn row<'a>(&'a self, r: usize, scratch: &'a mut [f32]) -> &'a [f32];
    /// All of W, row-major, when it is stored as f32 (its rows need no scratch).
    fn plain(&self) -> Option<&[f32]> {
        None
    }
}

struct Dense<'a> {
    w: &'a [f32],
    n: usize,
    k: usize,
}

impl Rows for Dense<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn row<'a>(&'a self, r: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self.w[r * self.k..(r + 1) * self.k]
    }
    fn plain(&self) -> Option<&[f32]> {
        Some(self.w)
    }
}

/// y = x W^T (+ b) for x of m rows (m * k elements): y is (m, n), row-major.
pub(crate) fn matvec_rows<R: Rows>(x: &[f32], w: &R, bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
    let (n, k) = w.shape();
    let m = rows_of(x, n, k, bias)?;
    let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
    let kernels = kernels();
    let b = |r: usize| bias.map_or(0.0, |b| b[r]);
    // Computed as y^T (n, m): each task owns whole rows of W and so a contiguous block of y^T.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let task_rows = out.len() / m;
        let groups = m / 4 * 4; // x rows that go four at a time; the rest one at a time
        let Some(plain) = w.plain() else {
            // Packed rows are expanded into two rows of scratch once, then meet every x row.
            let mut scratch = vec![0f32; 2 * k];
            let (s0, s1) = scratch.split_at_mut(k);
            let mut pairs = out.chunks_exact_mut(2 * m);
            for (p, out) in pairs.by_ref().enumerate() {
                let (r0, r1) = (first + 2 * p, first + 2 * p + 1);
                let (w0, w1) = (w.row(r0, s0), w.row(r1, s1));
                let (o0, o1) = out.split_at_mut(m);
                for i in (0..groups).step_by(4) {
                    let d = (kernels.dot2x4)([w0, w1], [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]]);
                    for j in 0..4 {
                        o0[i + j] = d[0][j] + b(r0);
                        o1[i + j] = d[1][j] + b(r1);
                    }
                }
                for i in groups..m {
                    o0[i] = (kernels.dot1x1)(w0, rows[i]) + b(r0);
                    o1[i] = (kernels.dot1x1)(w1, rows[i]) + b(r1);
                }
            }
            let rest = pairs.into_remainder();
            if !rest.is_empty() {
                let last = first + task_rows - 1;
                let w_last = w.row(last, s0);
                for (i, o) in rest.iter_mut().enumerate() {
                    *o = (kernels.dot1x1)(w_last, rows[i]) + b(last);
                }
            }
            return;
        };
        // f32 rows, borrowed as they are: four x rows (in L1) at a time against the task's W
        // rows (in L2 after the first group), pairs of W rows per call.
        let row = |r: usize| &plain[r * k..(r + 1) * k];
        let pairs = task_rows / 2;
        for i in (0..groups).step_by(4) {
            let xs = [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]];
            for p in 0..pairs {
                let (r0, r1) = (first + 2 * p, first + 2 * p + 1);
                let d = (kernels.dot2x4)([row(r0), row(r1)], xs);
                for j in 0..4 {
                    out[2 * p * m + i + j] = d[0][j] + b(r0);
                    out[(2 * p + 1) * m + i + j] = d[1][j] + b(r1);
                }
            }
        }
        // One row at a time through W: the leftover x rows, and every x row for W's odd row.
        for r in 0..task_rows {
            let from = if r < 2 * pairs { groups } else { 0 };
            let wr = row(first + r);
            for i in from..m {
                out[r * m + i] = (kernels.dot1x1)(wr, rows[i]) + b(first + r);
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

fn matvec(x: &[f32], x_l: &Layout, w: &[f32], w_l: &Layout, bias: Option<&[f32]>, plan: Option<&RowPlan>) -> candle_core::Result<(CpuStorage, Shape)> {
    let (n, k) = w_l.shape().dims2()?;
    let m = rows_of(x, n, k, bias)?;
    let single;
    let plan = match plan {
        Some(p) => p,
        None => {
            single = RowPlan::single(m);
            &single
        }
    };
    let y = plan.apply(
        x,
        k,
        n,
        |x| matvec_rows(x, &Dense { w, n, k }, bias),
        |x, y| {
            if let Some(b) = bias {
                y.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(b));
            }
            gemm_xwt(x, w, k, y, n, bias.is_some());
        },
    )?;
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

struct MatVec<'a>(Option<&'a RowPlan>);
struct MatVecBias<'a>(Option<&'a RowPlan>);

impl CustomOp2 for MatVec<'_> {
    fn name(&self) -> &'static str {
        "kvgpt-matvec"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        matvec(f32_slice(s1, l1, "x")?, l1, f32_slice(s2, l2, "W")?, l2, None, self.0)
    }
}

impl CustomOp3 for MatVecBias<'_> {
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
        matvec(f32_slice(s1, l1, "x")?, l1, f32_slice(s2, l2, "W")?, l2, Some(f32_slice(s3, l3, "bias")?), self.0)
    }
}

/// x W^T (+ b) for x (..., in), W (out, in), on the CPU in f32: a few rows through the matvec
/// kernel, more through gemm with the bias added in its output; with a plan, its rows grouped
/// as it says (x then (rows, in)).
pub fn matvec_cpu(x: &Tensor, w: &Tensor, b: Option<&Tensor>, plan: Option<&RowPlan>) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3_no_bwd(w, b, &MatVecBias(plan)),
        None => x.apply_op2_no_bwd(w, &MatVec(plan)),
    }
}

struct Kernels {
    dot2x4: fn([&[f32]; 2], [&[f32]; 4]) -> [[f32; 4]; 2],
    dot1x1: fn(&[f32], &[f32]) -> f32,
}

/// The dot-product kernels. Each one sums every (W row, x row) pair in the same order (one
/// 8-lane accumulator over 8-float chunks, its lanes added in order, then the scalar tail), so a
/// row's result is the same whichever kernel its place in the step gives it.
fn kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return Kernels {
            dot2x4: |w, xs| unsafe { dot2x4_avx2(w, xs) },
            dot1x1: |w, x| unsafe { dot1x1_avx2(w, x) },
        };
    }
    Kernels {
        dot2x4: |w, xs| w.map(|w| xs.map(|x| dot_portable(w, x))),
        dot1x1: dot_portable,
    }
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

/// The end of every AVX2 pair sum: the accumulator's lanes in order, plus the products past the
/// last whole chunk (from `i` on).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish(acc: std::arch::x86_64::__m256, w: &[f32], x: &[f32], i: usize) -> f32 {
    let mut lanes = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum::<f32>() + (i..w.len()).map(|t| w[t] * x[t]).sum::<f32>()
}

/// Eight dot products, two rows of W by four x rows: per 8 floats, 6 loads feed 8 FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot2x4_avx2(w: [&[f32]; 2], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = w[0].len();
    assert!(w[1].len() == n && xs.iter().all(|x| x.len() >= n));
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
            out[r][j] = finish(acc[r][j], w[r], xs[j], i);
        }
    }
    out
}

/// One row of W by one x row: a one-sequence decode step reads W here, row after row (one
/// sequential stream: interleaving rows measured 15-30 % slower), four chunks per iteration
/// into the one accumulator, and the line four rows ahead prefetched, since the core's own
/// prefetch leaves a one-row product short of the bandwidth (about 10 % for the lm_head,
/// bench/NOTES.md item 9).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot1x1_avx2(w: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    assert!(x.len() >= n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        // Rows are n floats apart in W; the address is never read past W's end.
        _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(i + 4 * n) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(i + 4 * n + 16) as *const i8);
        for j in 0..4 {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(i + 8 * j)), _mm256_loadu_ps(px.add(i + 8 * j)), acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc);
        i += 8;
    }
    finish(acc, w, x, i)
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
            let got = matvec_cpu(&x, &w, Some(&b), None).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "m={m} n={n} k={k} diff {diff}");
            let no_bias = matvec_cpu(&x, &w, None, None).unwrap();
            let expected = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let diff = (no_bias - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "m={m} n={n} k={k} no-bias diff {diff}");
        }
        assert_eq!(dot_portable(&[1.0; 19], &[2.0; 19]), 38.0);
    }

    /// Batch invariance: a row's result is bit for bit the same alone, at any place among up to
    /// 45 small rows (each kernel: 2x4 and 1x1, W's odd row), and in a long chunk next to others.
    #[test]
    fn rows_do_not_depend_on_the_rest_of_the_step() {
        let d = Device::Cpu;
        for (n, k) in [(129, 40), (50, 768), (7, 13)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &d).unwrap();
            let x = Tensor::randn(0f32, 1.0, (45 + 40 + 33, k), &d).unwrap();
            let alone = |rows: &Tensor| matvec_cpu(rows, &w, Some(&b), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let plan = RowPlan { small: 45, big: vec![40, 33] };
            let all = matvec_cpu(&x, &w, Some(&b), Some(&plan)).unwrap();
            for i in [0, 3, 4, 7, 44] {
                let got = all.get(i).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, alone(&x.narrow(0, i, 1).unwrap()), "n={n} k={k} row {i}");
            }
            for (start, len) in [(45, 40), (85, 33)] {
                let got = all.narrow(0, start, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, alone(&x.narrow(0, start, len).unwrap()), "n={n} k={k} chunk at {start}");
            }
        }
    }
}
