//! Fused CPU helpers (f32): GPT-2's tanh GELU, which candle runs with scalar libm calls, and the
//! branch-free exp and lane reductions that it and the attention kernels (`cpu::attention`)
//! share; LLVM vectorizes them (AVX2/FMA where the CPU has it). Other devices take candle's ops.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what} must be f32"),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// x (r, c) -> its transpose (c, r), contiguous. On the CPU in f32 by tiles of 32 x 32 over the
/// rayon pool: candle's strided copy (`t().contiguous()`) goes element by element, 22 % of a
/// GPT-2 small q8_0 load's samples (its Conv1D weights are stored (in, out)).
pub fn transpose(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return Ok(x.t()?.contiguous()?);
    }
    let (r, c) = x.dims2()?;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { unreachable!("checked: on the CPU") };
    let src = f32_slice(cpu, layout, "a matrix to transpose")?;
    const TILE: usize = 32;
    let mut out = vec![0f32; r * c];
    // Output rows j0..j0 + TILE (input columns) a task, input rows a tile at a time: each
    // output row gets a run of TILE values, read down a column of the tile (in L1).
    out.par_chunks_mut(TILE * r.max(1)).enumerate().for_each(|(task, block)| {
        let j0 = task * TILE;
        let cols = block.len() / r.max(1);
        for i0 in (0..r).step_by(TILE) {
            let rows = TILE.min(r - i0);
            for j in 0..cols {
                let run = &mut block[j * r + i0..j * r + i0 + rows];
                for (ii, v) in run.iter_mut().enumerate() {
                    *v = src[(i0 + ii) * c + j0 + j];
                }
            }
        }
    });
    drop(storage);
    Ok(Tensor::from_vec(out, (c, r), &candle_core::Device::Cpu)?)
}

/// exp(x) to about 1e-7 relative error (Cephes' expf polynomial), without branches or calls.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4; // x - n ln 2, ln 2 split in two
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // SAFETY: n is an integer in [-126, 127] after the clamp, so the conversion is exact.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    e * f32::from_bits(((n + 127) << 23) as u32)
}

/// GPT-2's gelu_new, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as
/// x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the same function.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.595_769_1 * (x + 0.044715 * x * x * x)))
}

/// Fills a new buffer from `input`, `chunk` elements at a time on the rayon pool, calling
/// `f(index of the chunk's first element, input chunk, output chunk)` compiled for AVX2/FMA
/// when the CPU has it. The output pages are first touched by the threads that fill them.
fn par_map<F>(input: &[f32], chunk: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &[f32], &mut [f32]) + Sync,
{
    let mut out = vec![0f32; input.len()];
    let work = out.par_chunks_mut(chunk).zip(input.par_chunks(chunk)).enumerate();
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<F: Fn(usize, &[f32], &mut [f32])>(f: &F, i: usize, x: &[f32], y: &mut [f32]) {
            f(i, x, y)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            work.for_each(|(c, (y, x))| unsafe { avx2(&f, c * chunk, x, y) });
            return out;
        }
    }
    work.for_each(|(c, (y, x))| f(c * chunk, x, y));
    out
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "kvgpt-gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = par_map(f32_slice(s, l, "gelu input")?, 1 << 14, |_, x, y| {
            y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x));
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// gelu_new (tanh approximation).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&Gelu)?);
    }
    Ok(x.gelu()?)
}

/// Reduces `xs` with `f` in eight independent lanes, a shape LLVM turns into vector code
/// (a single running accumulator would pin the float reduction to one order, so one lane).
#[inline(always)]
pub(crate) fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for c in chunks {
        for k in 0..8 {
            acc[k] = f(acc[k], c[k]);
        }
    }
    acc.iter().fold(tail, |a, &x| f(a, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn transposes_as_candle_does() {
        for (r, c) in [(1, 1), (3, 70), (70, 3), (65, 33), (96, 128)] {
            let x = Tensor::randn(0f32, 1.0, (r, c), &candle_core::Device::Cpu).unwrap();
            let want: Vec<f32> = x.t().unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got = transpose(&x).unwrap();
            assert_eq!(got.dims(), [c, r]);
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "({r}, {c})");
        }
    }

    #[test]
    fn exp_is_accurate() {
        for i in -870..=880 {
            let x = i as f32 / 10.0;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 2e-7, "exp({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn gelu_matches_candle() {
        let x = Tensor::arange(-20000f32, 20000., &Device::Cpu).unwrap().affine(1e-3, 0.).unwrap();
        let diff = (gelu_tanh(&x).unwrap() - x.gelu().unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
