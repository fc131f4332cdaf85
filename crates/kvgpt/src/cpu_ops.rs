//! Fused CPU kernels (f32): GPT-2's tanh GELU, which candle runs with scalar libm calls, and
//! causal self-attention over the KV cache (scores, masked softmax and weighted sum per head,
//! never materializing the masked half). Both use a branch-free exp that LLVM vectorizes
//! (AVX2/FMA where the CPU has it) and split the work over the rayon pool. Other devices and
//! dtypes take candle's ops.

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

/// softmax(scale * att + causal mask) over the last dim of att (B, nh, T, pos + T), in candle's
/// ops (on the CPU in f32 the model takes `attention` instead). The mask is `mask`
/// (`causal_mask(T, pos)` in att's dtype on its device, made once per forward pass rather than
/// once per layer), built here when None.
pub fn causal_softmax(att: &Tensor, scale: f64, pos: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let t = att.dim(2)?;
    let att = (att * scale)?;
    let att = match (t > 1, mask) {
        (false, _) => att,
        (true, Some(mask)) => att.broadcast_add(mask)?,
        (true, None) => att.broadcast_add(&causal_mask(t, pos, att.device())?.to_dtype(att.dtype())?)?,
    };
    Ok(candle_nn::ops::softmax_last_dim(&att)?)
}

/// Up to this many queries (a decode step, a short prompt) `attention` goes row by row;
/// beyond, by blocks of queries through gemm.
const FEW_QUERIES: usize = 32;

struct Attention {
    scale: f32,
}

/// A (B, nh, L, hs) tensor whose last two dims are dense (a cache view narrowed along L, or a
/// contiguous tensor): its data, the strides of B and nh, and its offset. (candle may give a
/// dim of size 1 any stride.)
fn heads<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<(&'a [f32], [usize; 2], usize)> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what} must be f32") };
    let st = l.stride();
    let dims = l.dims();
    if dims.len() != 4 || (dims[3] > 1 && st[3] != 1) || (dims[2] > 1 && st[2] != dims[3]) {
        candle_core::bail!("{what} must be (B, nh, L, hs) with dense rows, got dims {dims:?} strides {st:?}");
    }
    Ok((data.as_slice(), [st[0], st[1]], l.start_offset()))
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "kvgpt-attention"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, nh, t, hs) = ql.shape().dims4()?;
        let l = kl.dims()[2];
        if kl.dims() != [b, nh, l, hs] || vl.dims() != kl.dims() || t > l {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit", ql.dims(), kl.dims(), vl.dims());
        }
        let q = f32_slice(qs, ql, "q")?;
        let (k, k_st, k_off) = heads(ks, kl, "k")?;
        let (v, v_st, v_off) = heads(vs, vl, "v")?;
        let scale = self.scale;
        // One task per (batch, head); the output is (B, T, nh, hs), i.e. (B, T, C) as c_proj takes it.
        let mut y = vec![0f32; b * t * nh * hs];
        let mut out: Vec<(usize, Vec<f32>)> = (0..b * nh).map(|i| (i, vec![0f32; t * hs])).collect();
        let head = |(i, out): &mut (usize, Vec<f32>)| {
            let (bi, h) = (*i / nh, *i % nh);
            let q = &q[(bi * nh + h) * t * hs..][..t * hs];
            let k = &k[k_off + bi * k_st[0] + h * k_st[1]..][..l * hs];
            let v = &v[v_off + bi * v_st[0] + h * v_st[1]..][..l * hs];
            attend_head(q, k, v, hs, scale, out);
        };
        out.par_iter_mut().for_each(head);
        for (i, o) in &out {
            let (bi, h) = (i / nh, i % nh);
            for ti in 0..t {
                y[((bi * t + ti) * nh + h) * hs..][..hs].copy_from_slice(&o[ti * hs..][..hs]);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, t, nh * hs))))
    }
}

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
            *p = crate::matvec::dot_portable(&q[ti * hs..][..hs], k);
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

/// softmax(scale q k^T, causal) v for q (B, nh, T, hs) and k, v (B, nh, L, hs), L >= T, the
/// queries being the last T positions of the L keys; k and v may be views of the KV cache.
/// Returns (B, T, nh * hs). CPU f32 only: one task per head; a few queries go row by row, more
/// by blocks of queries through gemm, each block against only the keys it can see.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if !(scale > 0.0 && scale.is_finite()) {
        // softmax_row takes the row's maximum before scaling, which needs scale > 0
        return Err(crate::error::Error::InvalidInput(format!("attention scale must be a positive number, got {scale}")));
    }
    Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &Attention { scale: scale as f32 })?)
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

    /// Against matmul + causal softmax + matmul, with k and v as views of a larger buffer (a
    /// KV cache narrowed to its filled part) and as plain tensors.
    #[test]
    fn attention_matches_matmul_softmax() {
        let d = Device::Cpu;
        let cases = [(1, 3, 1, 0, 4), (1, 12, 1, 37, 64), (2, 2, 5, 3, 10), (1, 4, 7, 0, 7), (1, 2, 33, 0, 40), (2, 3, 150, 20, 200), (1, 2, 64, 64, 128)];
        for (b, nh, t, filled, cap) in cases {
            let l = filled + t;
            let q = Tensor::randn(0f32, 1., (b, nh, t, 64), &d).unwrap();
            let kbuf = Tensor::randn(0f32, 1., (b, nh, cap, 64), &d).unwrap();
            let vbuf = Tensor::randn(0f32, 1., (b, nh, cap, 64), &d).unwrap();
            let (k, v) = (kbuf.narrow(2, 0, l).unwrap(), vbuf.narrow(2, 0, l).unwrap());
            let att = causal_softmax(&q.matmul(&k.t().unwrap()).unwrap(), 0.125, filled, None).unwrap();
            let want = att.matmul(&v.contiguous().unwrap()).unwrap().transpose(1, 2).unwrap().reshape((b, t, nh * 64)).unwrap();
            for (k, v) in [(k.clone(), v.clone()), (k.contiguous().unwrap(), v.contiguous().unwrap())] {
                let got = attention(&q, &k, &v, 0.125).unwrap();
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-5, "b={b} nh={nh} t={t} filled={filled}: {diff}");
            }
        }
        let q = Tensor::zeros((1, 2, 3, 8), DType::F32, &d).unwrap();
        let short = Tensor::zeros((1, 2, 2, 8), DType::F32, &d).unwrap();
        assert!(attention(&q, &short, &short, 1.0).is_err(), "fewer keys than queries");
        assert!(attention(&q, &q, &q, 0.0).is_err() && attention(&q, &q, &q, f64::NAN).is_err(), "scale must be positive");
    }
}
