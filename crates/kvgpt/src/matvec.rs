//! y = W x (+ b) for a single row x: the products of a decode step. candle's gemm computes a
//! one-row product on one thread, which leaves a memory-bound step at one core's bandwidth;
//! this splits W's rows over the rayon pool (candle's own) with an AVX2/FMA dot product where
//! the CPU has it, so the step streams the weights with every core.

use crate::cpu_ops::f32_slice;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows of W per rayon task: small enough to balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 64;

fn matvec(x: &[f32], x_l: &Layout, w: &[f32], w_l: &Layout, bias: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
    let (n, k) = w_l.shape().dims2()?; // W is (out, in), nn.Linear's layout
    if x.len() != k {
        candle_core::bail!("matvec: x has {} elements, W has {k} columns", x.len());
    }
    if bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!("matvec: bias does not have {n} elements");
    }
    let dot = dot_kernel();
    let mut y = vec![0f32; n];
    y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        for (i, y) in out.iter_mut().enumerate() {
            let r = first + i;
            *y = dot(x, &w[r * k..(r + 1) * k]) + bias.map_or(0.0, |b| b[r]);
        }
    });
    let mut dims = x_l.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    Ok((CpuStorage::F32(y), Shape::from(dims)))
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

/// W x (+ b) for x holding one row (any leading dims of size 1), W (out, in), on the CPU in f32.
pub fn matvec_cpu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3_no_bwd(w, b, &MatVecBias),
        None => x.apply_op2_no_bwd(w, &MatVec),
    }
}

type Dot = fn(&[f32], &[f32]) -> f32;

fn dot_kernel() -> Dot {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return |a, b| unsafe { dot_avx2(a, b) };
    }
    dot_portable
}

/// Eight independent partial sums, which LLVM vectorizes on any target.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_matmul() {
        let d = Device::Cpu;
        for (n, k) in [(1, 1), (7, 13), (100, 768), (129, 40)] {
            let x = Tensor::randn(0f32, 1.0, (1, 1, k), &d).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &d).unwrap();
            let expected = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
            let got = matvec_cpu(&x, &w, Some(&b)).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "n={n} k={k} diff {diff}");
            let no_bias = matvec_cpu(&x, &w, None).unwrap();
            let expected = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let diff = (no_bias - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "n={n} k={k} no-bias diff {diff}");
        }
        assert_eq!(dot_portable(&[1.0; 19], &[2.0; 19]), 38.0);
    }
}
