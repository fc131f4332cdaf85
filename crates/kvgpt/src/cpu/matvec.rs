//! y = x W^T (+ b) on the CPU in f32. A few rows x (decode steps, a short prompt chunk): candle's
//! gemm computes a one-row product on one thread, and few-row products slowly, which leaves
//! these memory-bound products far from the machine's bandwidth; here W's rows are split over
//! the rayon pool (candle's own), each row read once and dotted with every x row by an AVX2/FMA
//! kernel (four x rows per pass) where the CPU has it. A long prompt chunk: gemm, called
//! directly so that the bias is added inside it (y starts as the bias) rather than in a pass of
//! its own. A step of many sequences follows a `RowPlan`, which keeps each row's result
//! independent of the rest of the step (batch invariance): every kernel sums a (W row, x row)
//! pair in the same order, and a long chunk always gets a gemm of its own.

use crate::cpu::int8;
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
/// and a long chunk's gemm sees that chunk alone (gemm's blocking can depend on the number of
/// rows: for W of 50 x 768, a chunk's rows come out otherwise in one call of 73 rows than in
/// its own call of 40, so chunks are not merged).
///
/// The last `chunk_rows` of the small rows are those of chunks of `int8::MIN_ROWS` rows or more
/// (the rest are decode steps and chunks shorter than that): q8_0 weights on a CPU with
/// AVX512-VNNI send those rows and every long chunk's through one integer product
/// (`cpu::int8`, whose rows are independent of each other), the rest through matvec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    pub small: usize,
    pub chunk_rows: usize,
    pub big: Vec<usize>,
}

impl RowPlan {
    /// m rows of one sequence.
    pub fn single(m: usize) -> Self {
        let mut plan = Self::empty();
        plan.push(m);
        plan
    }

    /// An empty plan, to add segments to in `rank` order.
    pub fn empty() -> Self {
        Self { small: 0, chunk_rows: 0, big: vec![] }
    }

    /// Adds a segment of `t` rows at the end.
    pub fn push(&mut self, t: usize) {
        debug_assert!(self.big.is_empty() || t > MAX_ROWS, "segments in rank order");
        debug_assert!(self.chunk_rows == 0 || t >= int8::MIN_ROWS, "segments in rank order");
        if t > MAX_ROWS {
            self.big.push(t);
        } else {
            self.small += t;
            if t >= int8::MIN_ROWS {
                self.chunk_rows += t;
            }
        }
    }

    /// Where a segment of `t` rows goes in a plan's order: decode steps and chunks under
    /// `int8::MIN_ROWS`, then chunks up to `MAX_ROWS`, then longer ones.
    pub fn rank(t: usize) -> u8 {
        match t {
            t if t < int8::MIN_ROWS => 0,
            t if t <= MAX_ROWS => 1,
            _ => 2,
        }
    }

    /// The rows that go through the few-row kernels whatever the weights (the first small ones).
    pub fn few_rows(&self) -> usize {
        self.small - self.chunk_rows
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
        // f32 rows, borrowed as they are: four rows of W at a time against four x rows at a
        // time (a 4x4 tile), then the x rows left over one by one, W read in order.
        let row = |r: usize| &plain[r * k..(r + 1) * k];
        let quads = task_rows / 4;
        for qd in 0..quads {
            let r = first + 4 * qd;
            let ws = [row(r), row(r + 1), row(r + 2), row(r + 3)];
            for i in (0..groups).step_by(4) {
                let d = (kernels.dot4x4)(ws, [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]]);
                for (a, d) in d.iter().enumerate() {
                    for j in 0..4 {
                        out[(4 * qd + a) * m + i + j] = d[j] + b(r + a);
                    }
                }
            }
            for (a, w) in ws.iter().enumerate() {
                for i in groups..m {
                    out[(4 * qd + a) * m + i] = (kernels.dot1x1)(w, rows[i]) + b(r + a);
                }
            }
        }
        // W's rows past the last four, with every x row.
        for r in 4 * quads..task_rows {
            let wr = row(first + r);
            for i in 0..m {
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
    dot4x4: fn([&[f32]; 4], [&[f32]; 4]) -> [[f32; 4]; 4],
    dot2x4: fn([&[f32]; 2], [&[f32]; 4]) -> [[f32; 4]; 2],
    dot1x1: fn(&[f32], &[f32]) -> f32,
}

/// The dot-product kernels. Each one sums every (W row, x row) pair in the same order (one
/// accumulator of 16 lanes with AVX-512, 8 with AVX2, over chunks of that many floats, its
/// lanes added in order, then the scalar tail), so a row's result is the same whichever kernel
/// its place in the step gives it.
fn kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Kernels {
                dot4x4: |w, xs| unsafe { dot4x4_avx512(w, xs) },
                dot2x4: |w, xs| unsafe { dot2x4_avx512(w, xs) },
                dot1x1: |w, x| unsafe { dot1x1_avx512(w, x) },
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Kernels {
                dot4x4: |w, xs| {
                    let (a, b) = unsafe { (dot2x4_avx2([w[0], w[1]], xs), dot2x4_avx2([w[2], w[3]], xs)) };
                    [a[0], a[1], b[0], b[1]]
                },
                dot2x4: |w, xs| unsafe { dot2x4_avx2(w, xs) },
                dot1x1: |w, x| unsafe { dot1x1_avx2(w, x) },
            };
        }
    }
    Kernels {
        dot4x4: |w, xs| w.map(|w| xs.map(|x| dot_portable(w, x))),
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

/// The pair kernels of one vector width ($lanes floats in a $v register), one body for AVX2
/// and AVX-512: `$finish` ends every pair sum alike (the accumulator's lanes added in order,
/// then the products past the last whole chunk), `$dot2x4` takes two rows of W by four x rows
/// (per chunk, 6 loads feed 8 FMAs), `$dot1x1` one row by one x row: a one-sequence decode step
/// reads W there, row after row (one sequential stream: interleaving rows measured 15-30 %
/// slower), four chunks an iteration into the one accumulator, with the line four rows ahead
/// prefetched, since the core's own prefetch leaves a one-row product short of the bandwidth
/// (about 10 % for the lm_head, bench/NOTES.md item 9).
macro_rules! pair_kernels {
    ($feature:literal, $lanes:literal, $v:ty, $zero:ident, $load:ident, $fma:ident, $store:ident, $finish:ident, $dot2x4:ident, $dot1x1:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn $finish(acc: $v, w: &[f32], x: &[f32], i: usize) -> f32 {
            let mut lanes = [0f32; $lanes];
            std::arch::x86_64::$store(lanes.as_mut_ptr(), acc);
            lanes.iter().sum::<f32>() + (i..w.len()).map(|t| w[t] * x[t]).sum::<f32>()
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $dot2x4(w: [&[f32]; 2], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
            use std::arch::x86_64::*;
            let n = w[0].len();
            assert!(w[1].len() == n && xs.iter().all(|x| x.len() >= n));
            let mut acc = [[$zero(); 4]; 2];
            let mut i = 0;
            while i + $lanes <= n {
                let w0 = $load(w[0].as_ptr().add(i));
                let w1 = $load(w[1].as_ptr().add(i));
                for (j, x) in xs.iter().enumerate() {
                    let xv = $load(x.as_ptr().add(i));
                    acc[0][j] = $fma(w0, xv, acc[0][j]);
                    acc[1][j] = $fma(w1, xv, acc[1][j]);
                }
                i += $lanes;
            }
            let mut out = [[0f32; 4]; 2];
            for r in 0..2 {
                for j in 0..4 {
                    out[r][j] = $finish(acc[r][j], w[r], xs[j], i);
                }
            }
            out
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $dot1x1(w: &[f32], x: &[f32]) -> f32 {
            use std::arch::x86_64::*;
            let n = w.len();
            assert!(x.len() >= n);
            let (pw, px) = (w.as_ptr(), x.as_ptr());
            let mut acc = $zero();
            let mut i = 0;
            while i + 4 * $lanes <= n {
                for j in 0..4 {
                    if ($lanes * j) % 16 == 0 {
                        // One line (16 floats) at a time; rows are n floats apart in W, and
                        // the address is never read past W's end.
                        _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(i + 4 * n + $lanes * j) as *const i8);
                    }
                    acc = $fma($load(pw.add(i + $lanes * j)), $load(px.add(i + $lanes * j)), acc);
                }
                i += 4 * $lanes;
            }
            while i + $lanes <= n {
                acc = $fma($load(pw.add(i)), $load(px.add(i)), acc);
                i += $lanes;
            }
            $finish(acc, w, x, i)
        }
    };
}

pair_kernels!("avx2,fma", 8, std::arch::x86_64::__m256, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_storeu_ps, finish256, dot2x4_avx2, dot1x1_avx2);
pair_kernels!("avx512f", 16, std::arch::x86_64::__m512, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_storeu_ps, finish512, dot2x4_avx512, dot1x1_avx512);

/// Sixteen dot products, four rows of W by four x rows (16 accumulators of AVX-512's 32
/// registers): per 16 floats, 8 loads feed 16 FMAs. About 15 % faster than two 2x4 AVX2 calls
/// for 16 rows on this machine's Zen 4 (bench/NOTES.md item 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4x4_avx512(w: [&[f32]; 4], xs: [&[f32]; 4]) -> [[f32; 4]; 4] {
    use std::arch::x86_64::*;
    let n = w[0].len();
    assert!(w.iter().all(|w| w.len() == n) && xs.iter().all(|x| x.len() >= n));
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i + 16 <= n {
        let wv = [0, 1, 2, 3].map(|r| _mm512_loadu_ps(w[r].as_ptr().add(i)));
        for (j, x) in xs.iter().enumerate() {
            let xv = _mm512_loadu_ps(x.as_ptr().add(i));
            for r in 0..4 {
                acc[r][j] = _mm512_fmadd_ps(wv[r], xv, acc[r][j]);
            }
        }
        i += 16;
    }
    let mut out = [[0f32; 4]; 4];
    for r in 0..4 {
        for j in 0..4 {
            out[r][j] = finish512(acc[r][j], w[r], xs[j], i);
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
    /// 45 small rows (each kernel: 4x4 tiles, 1x1 for x rows past the last four and W rows past
    /// the last four), and in a long chunk next to others.
    #[test]
    fn rows_do_not_depend_on_the_rest_of_the_step() {
        let d = Device::Cpu;
        for (n, k) in [(129, 40), (50, 768), (7, 13)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &d).unwrap();
            let x = Tensor::randn(0f32, 1.0, (45 + 40 + 33, k), &d).unwrap();
            let alone = |rows: &Tensor| matvec_cpu(rows, &w, Some(&b), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let plan = RowPlan { small: 45, chunk_rows: 0, big: vec![40, 33] };
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
