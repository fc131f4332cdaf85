//! Fused CPU kernels for the two elementwise hot spots of a forward pass, which candle runs with
//! scalar libm calls: GPT-2's tanh GELU and the scaled, causally masked softmax of attention.
//! Both use a branch-free exp that LLVM vectorizes (AVX2/FMA where the CPU has it) and split
//! the work over the rayon pool. Other devices and dtypes take candle's ops.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
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

/// exp(x) to about 1e-7 relative error (Cephes' expf polynomial), without branches or calls.
#[inline(always)]
fn exp(x: f32) -> f32 {
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
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
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

struct CausalSoftmax {
    scale: f32,
    /// Absolute position of the first query row; query i sees keys 0..=pos + i.
    pos: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "kvgpt-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let (t, keys) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if self.pos + t != keys {
            candle_core::bail!("causal softmax: {t} queries at position {} need {} keys, got {keys}", self.pos, self.pos + t);
        }
        let (scale, pos) = (self.scale, self.pos);
        // Row r is query r % t; it sees keys 0..=pos + r % t, and the rest of the row is 0.
        let row = move |r: usize, x: &[f32], y: &mut [f32]| {
            let visible = pos + (r % t) + 1;
            let (x, y) = (&x[..visible], &mut y[..visible]);
            let max = lanes(x, f32::NEG_INFINITY, |a, b| if a > b { a } else { b }) * scale;
            y.iter_mut().zip(x).for_each(|(y, &x)| *y = exp(x * scale - max));
            let inv = 1.0 / lanes(y, 0.0, |a, b| a + b);
            y.iter_mut().for_each(|y| *y *= inv);
        };
        let rows_per_task = (1 << 14) / keys.max(1) + 1;
        let out = par_map(f32_slice(s, l, "attention scores")?, keys * rows_per_task, |first, x, y| {
            for (j, (x, y)) in x.chunks(keys).zip(y.chunks_mut(keys)).enumerate() {
                row(first / keys + j, x, y);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// softmax(scale * att + causal mask) over the last dim of att (B, nh, T, pos + T). Off the CPU
/// the mask is `mask` (`causal_mask(T, pos)` in att's dtype on its device, made once per forward
/// pass rather than once per layer), built here when None.
pub fn causal_softmax(att: &Tensor, scale: f64, pos: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    if is_cpu_f32(att) {
        return Ok(att.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { scale: scale as f32, pos })?);
    }
    let t = att.dim(2)?;
    let att = (att * scale)?;
    let att = match (t > 1, mask) {
        (false, _) => att,
        (true, Some(mask)) => att.broadcast_add(mask)?,
        (true, None) => att.broadcast_add(&causal_mask(t, pos, att.device())?.to_dtype(att.dtype())?)?,
    };
    Ok(candle_nn::ops::softmax_last_dim(&att)?)
}

/// (T, pos + T) additive mask: query i (absolute position pos + i) sees keys 0..=pos + i.
pub fn causal_mask(t: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let l = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..l).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, l), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        let d = Device::Cpu;
        for (t, pos) in [(1, 0), (1, 9), (5, 0), (4, 3)] {
            let att = Tensor::randn(0f32, 3., (2, 3, t, pos + t), &d).unwrap();
            let got = causal_softmax(&att, 0.125, pos, None).unwrap();
            let mut want = (&att * 0.125).unwrap();
            if t > 1 {
                want = want.broadcast_add(&causal_mask(t, pos, &d).unwrap()).unwrap();
            }
            let want = candle_nn::ops::softmax_last_dim(&want).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "t={t} pos={pos}: {diff}");
        }
    }
}
