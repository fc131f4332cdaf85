//! Prompts through q8_0 weights in integer arithmetic (AVX512-VNNI): y = x W^T for x of many
//! rows, with x quantized as ggml quantizes activations for its q8_0 x q8_0 products (blocks of
//! 32 values with one f32 scale, d = max|x| / 127, rounded to nearest) and every block of 32
//! products summed exactly in int32 by `vpdpbusd`, then scaled by both blocks' scales into an
//! f32 sum. Widening W to f32 for gemm (the other path) is compute-bound at f32's 16
//! multiply-adds a cycle per core; `vpdpbusd` does 64.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: x's values go in as q + 128 (u8), and each
//! block's sum starts at -128 * sum(W's block), which takes the offset out again, exactly.
//! W is repacked a panel of 32 output rows at a time (into the layout below, in L2) and the
//! panel meets every row of x; rows of x go four at a time, the last ones one at a time, and
//! every row's sum runs over the blocks in the same order, so a row's result does not depend on
//! the other rows (the batch invariance `matvec::RowPlan` asks for).

use rayon::prelude::*;

/// Chunks of fewer rows stay on the f32 path: the integer path repacks all of W each product,
/// which a few rows do not repay (GPT-2 small, time to the first token in q8_0, integer vs f32
/// products: 19-20 vs 10-14 ms at 2 tokens, 22-24 vs 17 at 8, 25 vs 33-35 at 16, 30-36 vs
/// 62-67 at 32). Decode steps (one row) always do.
pub const MIN_ROWS: usize = 16;

use crate::cpu::packed::BLOCK;
/// Output rows (W rows) a panel: two registers of 16 int32 lanes.
const PANEL: usize = 32;
/// Rows of x a kernel call (4 and 6 ran at the same speed, 2 at 0.8x and 8 at 0.95x, on one
/// Zen 4 core: about 40 multiply-adds a cycle).
const MR: usize = 4;
/// One block of a panel: 8 quads (4 consecutive k) x 32 rows of W, byte-interleaved as
/// `vpdpbusd` reads them (a register = 16 rows x 4 bytes), then 32 int32 corrections
/// (-128 * the block's sum) and 32 f32 scales.
const QUADS: usize = BLOCK / 4;
const PANEL_Q: usize = QUADS * PANEL * 4; // 1024
const PANEL_BLOCK: usize = PANEL_Q + PANEL * 4 + PANEL * 4; // 1280

/// Whether this CPU has the instructions the integer path needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether many-row q8_0 products take this path: where the CPU has it, unless the environment
/// says `KVGPT_Q8_PROMPTS=f32` (widen W to f32 for gemm instead, as before; read at each
/// product, so a process can compare the two).
pub fn chosen() -> bool {
    available() && std::env::var_os("KVGPT_Q8_PROMPTS").is_none_or(|v| v != "f32")
}

/// x (m, k) quantized in blocks of 32: `q` holds q + 128, `d` the blocks' scales (m, k / 32).
pub struct QuantizedRows {
    pub q: Vec<u8>,
    pub d: Vec<f32>,
    pub k: usize,
}

/// Quantizes x (m, k) by blocks of 32 (k a multiple of 32), rows over the rayon pool.
pub fn quantize_rows(x: &[f32], k: usize) -> QuantizedRows {
    assert!(k % BLOCK == 0 && x.len() % k == 0, "x must be (m, k) with k a multiple of {BLOCK}");
    let mut q = vec![0u8; x.len()];
    let mut d = vec![0f32; x.len() / BLOCK];
    const CHUNK: usize = 64; // blocks a task
    q.par_chunks_mut(CHUNK * BLOCK).zip(d.par_chunks_mut(CHUNK)).zip(x.par_chunks(CHUNK * BLOCK)).for_each(|((q, d), x)| {
        #[cfg(target_arch = "x86_64")]
        if available() {
            return unsafe { quantize_avx512(x, q, d) };
        }
        quantize_portable(x, q, d)
    });
    QuantizedRows { q, d, k }
}

/// One block: scale max|x| / 127, values rounded to nearest (ties to even, as `vcvtps2dq`).
fn quantize_portable(x: &[f32], q: &mut [u8], d: &mut [f32]) {
    for ((x, q), d) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = ((v * inv).round_ties_even() as i32 + 128) as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(x: &[f32], q: &mut [u8], d: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(x.len() == nb * BLOCK && q.len() == nb * BLOCK);
    let offset = _mm_set1_epi8(-128);
    for b in 0..nb {
        let px = x.as_ptr().add(b * BLOCK);
        let (x0, x1) = (_mm512_loadu_ps(px), _mm512_loadu_ps(px.add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        *d.get_unchecked_mut(b) = amax / 127.0;
        let inv = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let pq = q.as_mut_ptr().add(b * BLOCK) as *mut __m128i;
        // |x * inv| <= 127, so the int32 -> int8 narrowing never saturates; xor 0x80 adds 128.
        let narrow = |v: __m512| _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))), offset);
        _mm_storeu_si128(pq, narrow(x0));
        _mm_storeu_si128(pq.add(1), narrow(x1));
    }
}

/// y = x W^T (+ bias) for W's q8_0 rows (`q` (n, k) int8, `d` (n, k / 32) scales), into y's
/// rows `y_stride` apart (y is only written).
pub fn matmul(x: &QuantizedRows, q: &[i8], d: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let k = x.k;
    let (m, nb) = (x.q.len() / k, k / BLOCK);
    assert!(q.len() == n * k && d.len() == n * nb && n <= y_stride && (m == 0 || (m - 1) * y_stride + n <= y.len()));
    assert!(bias.is_none_or(|b| b.len() == n), "one bias a row of W");
    assert!(available(), "the integer path needs AVX512-VNNI");
    // Each panel writes its own 32 columns of y: shared as a pointer, since the columns of one
    // row interleave between tasks.
    let out = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(PANEL)).into_par_iter().for_each_init(
        || vec![0u8; nb * PANEL_BLOCK + 64],
        |buf, p| {
            let panel = aligned(buf);
            let first = p * PANEL;
            let cols = PANEL.min(n - first);
            let mut b = [0f32; PANEL];
            if let Some(bias) = bias {
                b[..cols].copy_from_slice(&bias[first..first + cols]);
            }
            let out = &out;
            // SAFETY: the panel holds nb blocks of 32 rows of W; rows r..r + R of x exist; row
            // r + i of y has columns first..first + cols, which no other task writes.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                {
                    pack_panel(&q[first * k..(first + cols) * k], &d[first * nb..(first + cols) * nb], cols, k, panel);
                    let mut tile = [0f32; MR * PANEL];
                    let mut r = 0;
                    while r < m {
                        let (dst, stride) = if cols == PANEL { (out.0.add(r * y_stride + first), y_stride) } else { (tile.as_mut_ptr(), PANEL) };
                        let rows = if r + MR <= m {
                            kernel::<MR>(panel.as_ptr(), nb, &x.q[r * k..], &x.d[r * nb..], k, &b, dst, stride);
                            MR
                        } else {
                            kernel::<1>(panel.as_ptr(), nb, &x.q[r * k..], &x.d[r * nb..], k, &b, dst, stride);
                            1
                        };
                        if cols < PANEL {
                            for i in 0..rows {
                                std::ptr::copy_nonoverlapping(tile.as_ptr().add(i * PANEL), out.0.add((r + i) * y_stride + first), cols);
                            }
                        }
                        r += rows;
                    }
                }
            }
        },
    );
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The 64-byte-aligned part of `buf` (which has 64 spare bytes).
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(64);
    let len = buf.len() - 64;
    &mut buf[skip..skip + len]
}

/// `rows` (<= 32) rows of W (row-major, k a row) into one panel; missing rows are zeros with
/// scale 0. A register of a quad is 16 rows' 4 bytes, gathered as one int32 per row; the
/// block's sums come from `vpdpbusd` with 1s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pack_panel(q: &[i8], d: &[f32], rows: usize, k: usize, panel: &mut [u8]) {
    use std::arch::x86_64::*;
    let nb = k / BLOCK;
    assert!(rows <= PANEL && q.len() == rows * k && d.len() == rows * nb && panel.len() >= nb * PANEL_BLOCK);
    assert!(k * (PANEL - 1) + BLOCK <= i32::MAX as usize);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let ones = _mm512_set1_epi8(1);
    // Rows past `rows` are masked off: the gather leaves them 0, their scale is 0.
    let masks = [0, 16].map(|g| if rows >= g + 16 { 0xffffu16 } else if rows > g { (1u16 << (rows - g)) - 1 } else { 0 });
    let index = [0, 16].map(|g| _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(g)), _mm512_set1_epi32(k as i32)));
    for b in 0..nb {
        let blk = panel.as_mut_ptr().add(b * PANEL_BLOCK);
        for g in 0..2 {
            let mut sum = _mm512_setzero_si512();
            for j in 0..QUADS {
                let base = q.as_ptr().add(b * BLOCK + 4 * j) as *const i32;
                let w = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), masks[g], index[g], base as *const _);
                _mm512_store_si512(blk.add(j * PANEL * 4 + g * 64) as *mut _, w);
                sum = _mm512_dpbusd_epi32(sum, ones, w);
            }
            // -128 * sum
            _mm512_store_si512(blk.add(PANEL_Q + g * 64) as *mut _, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(sum)));
            let scales = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), masks[g], _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(16 * g as i32)), _mm512_set1_epi32(nb as i32)), d.as_ptr().add(b) as *const _);
            _mm512_store_ps(blk.add(PANEL_Q + PANEL * 4 + g * 64) as *mut f32, scales);
        }
    }
}

/// R rows of x (quantized, row stride k) times one panel, plus `bias`, into R rows of 32 at
/// `dst` (`stride` apart). Per block: 8 `vpdpbusd` a row and register, from int32 lanes that
/// start at the correction; then f32 (sum * x's scale) * W's scales added to the row's f32
/// sums, which start at 0 (the bias is added last, so a row's sum is the same with or without
/// one).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const R: usize>(panel: *const u8, nb: usize, xq: &[u8], xd: &[f32], k: usize, bias: &[f32; PANEL], dst: *mut f32, stride: usize) {
    use std::arch::x86_64::*;
    assert!(R <= MR && xq.len() >= (R - 1) * k + nb * BLOCK && xd.len() >= (R - 1) * (k / BLOCK) + nb);
    let nbk = k / BLOCK;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for b in 0..nb {
        let blk = panel.add(b * PANEL_BLOCK);
        let corr = [_mm512_load_si512(blk.add(PANEL_Q) as *const _), _mm512_load_si512(blk.add(PANEL_Q + 64) as *const _)];
        let mut sums = [corr; R];
        for j in 0..QUADS {
            let w0 = _mm512_load_si512(blk.add(j * PANEL * 4) as *const _);
            let w1 = _mm512_load_si512(blk.add(j * PANEL * 4 + 64) as *const _);
            for r in 0..R {
                let a = _mm512_set1_epi32((xq.as_ptr().add(r * k + b * BLOCK + 4 * j) as *const i32).read_unaligned());
                sums[r][0] = _mm512_dpbusd_epi32(sums[r][0], a, w0);
                sums[r][1] = _mm512_dpbusd_epi32(sums[r][1], a, w1);
            }
        }
        let dw = [_mm512_load_ps(blk.add(PANEL_Q + PANEL * 4) as *const f32), _mm512_load_ps(blk.add(PANEL_Q + PANEL * 4 + 64) as *const f32)];
        for r in 0..R {
            let da = _mm512_set1_ps(*xd.get_unchecked(r * nbk + b));
            for h in 0..2 {
                acc[r][h] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums[r][h]), da), dw[h], acc[r][h]);
            }
        }
    }
    let bias = [_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(16))];
    for r in 0..R {
        _mm512_storeu_ps(dst.add(r * stride), _mm512_add_ps(acc[r][0], bias[0]));
        _mm512_storeu_ps(dst.add(r * stride + 16), _mm512_add_ps(acc[r][1], bias[1]));
    }
}

/// The same sums as `matmul`, one at a time in plain integer and f32 arithmetic: the reference.
pub fn matmul_reference(x: &QuantizedRows, q: &[i8], d: &[f32], n: usize) -> Vec<f32> {
    let k = x.k;
    let (m, nb) = (x.q.len() / k, k / BLOCK);
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for c in 0..n {
            let mut acc = 0f32;
            for b in 0..nb {
                let s: i32 = (0..BLOCK).map(|t| (x.q[i * k + b * BLOCK + t] as i32 - 128) * q[c * k + b * BLOCK + t] as i32).sum();
                acc = (s as f32 * x.d[i * nb + b]).mul_add(d[c * nb + b], acc);
            }
            y[i * n + c] = acc;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    /// W in q8_0, as the model packs it.
    fn q8(w: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let (mut q, mut d) = (vec![0i8; w.len()], vec![0f32; w.len() / BLOCK]);
        crate::cpu::packed::q8_quantize(&mut q, &mut d, w);
        (q, d)
    }

    /// A row's sums are the same whether it goes through the four-row kernel or the one-row one
    /// (bit for bit): what batch invariance needs.
    #[test]
    fn rows_do_not_depend_on_their_neighbours() {
        if !available() {
            return;
        }
        let (m, n, k) = (9, 40, 256);
        let (q, d) = q8(&uniform(n * k, 4));
        let x = uniform(m * k, 5);
        let mut all = vec![0f32; m * n];
        matmul(&quantize_rows(&x, k), &q, &d, n, None, &mut all, n);
        for i in 0..m {
            let mut one = vec![0f32; n];
            matmul(&quantize_rows(&x[i * k..(i + 1) * k], k), &q, &d, n, None, &mut one, n);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    /// Quantized x: a block's largest value at +-127, zeros for an all-zero block, the AVX-512
    /// quantizer equal to the portable one.
    #[test]
    fn quantizes_blocks_of_x() {
        let mut x = uniform(4 * 64, 1);
        x[3] = 5.0;
        x[64..96].fill(0.0);
        let qx = quantize_rows(&x, 64);
        assert_eq!(qx.q[3], 255);
        assert!((qx.d[0] - 5.0 / 127.0).abs() < 1e-7);
        assert!(qx.q[64..96].iter().all(|&v| v == 128) && qx.d[2] == 0.0);
        let (mut q, mut d) = (vec![0u8; x.len()], vec![0f32; x.len() / BLOCK]);
        quantize_portable(&x, &mut q, &mut d);
        assert_eq!((&q, &d), (&qx.q, &qx.d));
        for (i, &v) in x.iter().enumerate() {
            let back = (qx.q[i] as i32 - 128) as f32 * qx.d[i / BLOCK];
            assert!((back - v).abs() <= qx.d[i / BLOCK] * 0.5 + 1e-7);
        }
    }

    /// The kernel against the reference sums (the same integers, the same f32 order: equal to
    /// rounding), for row counts that leave 0-3 rows for the one-row kernel, n with a partial
    /// last panel, with y starting as a bias or not; and against the f32 product of the
    /// dequantized x and W within the quantization's bound.
    #[test]
    fn matches_reference_sums() {
        if !available() {
            eprintln!("no AVX512-VNNI here: the integer path is not used, nothing to test");
            return;
        }
        for (m, n, k) in [(1, 32, 32), (5, 70, 64), (35, 96, 768), (66, 33, 3072)] {
            let w = uniform(n * k, 2);
            let x = uniform(m * k, 3);
            let (q, d) = q8(&w);
            let qx = quantize_rows(&x, k);
            let want = matmul_reference(&qx, &q, &d, n);
            let bias = uniform(n, 4);
            for with_bias in [false, true] {
                let stride = n + 3;
                let mut y = vec![f32::NAN; m * stride];
                matmul(&qx, &q, &d, n, with_bias.then_some(&bias[..]), &mut y, stride);
                for i in 0..m {
                    for c in 0..n {
                        let got = y[i * stride + c] - if with_bias { bias[c] } else { 0.0 };
                        let want = want[i * n + c];
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "m={m} n={n} k={k} ({i},{c}): {got} vs {want}");
                        // against f32 products: each term off by at most half a step of x's block
                        let f32_sum: f32 = (0..k).map(|t| x[i * k + t] * q[c * k + t] as f32 * d[c * (k / BLOCK) + t / BLOCK]).sum();
                        let bound: f32 = (0..k).map(|t| 0.5 * qx.d[i * (k / BLOCK) + t / BLOCK] * (q[c * k + t] as f32 * d[c * (k / BLOCK) + t / BLOCK]).abs()).sum();
                        assert!((got - f32_sum).abs() <= bound * 1.01 + 1e-4, "({i},{c}): {got} vs f32 {f32_sum}, bound {bound}");
                    }
                    if stride > n {
                        assert!(y[i * stride + n..(i + 1) * stride].iter().all(|v| v.is_nan()), "wrote past n");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    /// `cargo test --release -- --ignored int8_timing --nocapture`: GOPS of quantize, pack and
    /// the whole product for GPT-2 small's four block products at 512 rows.
    #[test]
    #[ignore]
    fn int8_timing() {
        if !available() {
            return;
        }
        for (m, n, k) in [(512, 2304, 768), (512, 768, 768), (512, 3072, 768), (512, 768, 3072)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
            let q: Vec<i8> = (0..n * k).map(|i| ((i * 31 % 255) as i32 - 127) as i8).collect();
            let d = vec![0.01f32; n * k / BLOCK];
            let mut y = vec![0f32; m * n];
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(quantize_rows(&x, k));
            }
            let tq = t.elapsed().as_secs_f64() / reps as f64;
            let qx = quantize_rows(&x, k);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                matmul(&qx, &q, &d, n, None, &mut y, n);
            }
            let tm = t.elapsed().as_secs_f64() / reps as f64;
            let t = std::time::Instant::now();
            let mut buf = vec![0u8; (k / BLOCK) * PANEL_BLOCK + 64];
            for _ in 0..reps {
                for p in 0..n / PANEL {
                    unsafe { pack_panel(&q[p * PANEL * k..(p + 1) * PANEL * k], &d[p * PANEL * k / BLOCK..(p + 1) * PANEL * k / BLOCK], PANEL, k, aligned(&mut buf)) };
                }
            }
            let tp = t.elapsed().as_secs_f64() / reps as f64;
            let ops = 2.0 * (m * n * k) as f64;
            eprintln!("m={m} n={n} k={k}: quantize {:.2} ms, pack (1 thread) {:.2} ms, matmul {:.2} ms = {:.0} GOPS", tq * 1e3, tp * 1e3, tm * 1e3, ops / tm / 1e9);
        }
    }
}
