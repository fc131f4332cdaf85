// The decode step's own kernels (cuda/step.rs runs them over buffers of its own and captures
// the whole step as a CUDA graph): a step of B one-token rows, B <= 8, as
//   embed                    x = wte[id] + wpe[pos]
//   per layer:
//     gemv QKV (LN)          qkv = ln_1(x) W_attn^T + b, K and V also written into each row's cache
//     attend_decode          att
//     gemv RESID             x += att W_proj^T + b
//     gemv GELU (LN)         f = gelu_tanh(ln_2(x) W_fc^T + b)
//     gemv RESID             x += f W_mlp^T + b
//   gemv LOGITS (LN)         logits (f32) = ln_f(x) W_lm^T
// 5 kernels a layer. A product marked LN normalizes its input rows itself: each block takes
// every row's mean and variance (two passes, as candle's layer norm) before its products, and
// normalizes x as it reads it, rounding to T as the layer norm's output would be stored; the
// rows are a few KB, read from L2 by every block, so a launch a layer norm (and its ~5 us in a
// graph) is saved. Sums in f32; the residual stream and the products' outputs are stored in
// T, each product rounding once (its bias, activation and residual are applied to the f32
// sum) where candle's path rounds after the product and again after each elementwise op.
//
// Row metadata: ids, positions, capacities (row r is sequence r of the step), and the KV cache
// address table [row][layer][K, V], laid out as attention.cu's.

#include "common.cuh"

// One block per row: x = wte[id] + wpe[pos], rounded to T as candle's sum.
template <typename T>
__device__ void embed(const uint32_t *ids, const uint32_t *pos_of_row, const T *wte, const T *wpe, T *x, uint32_t c) {
  const uint32_t row = blockIdx.x;
  const T *e = wte + (uint64_t)ids[row] * c;
  const T *p = wpe + (uint64_t)pos_of_row[row] * c;
  for (uint32_t j = threadIdx.x; j < c; j += blockDim.x) x[(uint64_t)row * c + j] = from_f<T>(to_f(e[j]) + to_f(p[j]));
}

// 16 bytes of T as floats: 4 f32 or 8 f16/bf16.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
  static constexpr int N = 4;
  static __device__ __forceinline__ void load(const uint4 raw, float *f) {
    f[0] = __uint_as_float(raw.x);
    f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z);
    f[3] = __uint_as_float(raw.w);
  }
};
template <typename T, typename T2> struct Vec16Pairs {
  static constexpr int N = 8;
  static __device__ __forceinline__ void load(const uint4 raw, float *f) {
    const T2 *pairs = reinterpret_cast<const T2 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float2 p = pair_to_f2(pairs[e]);
      f[2 * e] = p.x;
      f[2 * e + 1] = p.y;
    }
  }
};
template <> struct Vec16<__half> : Vec16Pairs<__half, __half2> {};
template <> struct Vec16<__nv_bfloat16> : Vec16Pairs<__nv_bfloat16, __nv_bfloat162> {};

// 8 elements from p (16-byte aligned) as floats: one 16-byte load, two for f32.
template <typename T> __device__ __forceinline__ void load8(const T *p, float *f) {
  const uint4 *p4 = reinterpret_cast<const uint4 *>(p);
  Vec16<T>::load(p4[0], f);
  if (Vec16<T>::N == 4) Vec16<T>::load(p4[1], f + 4);
}

#define EPI_QKV 0     // y = v + b (T); columns c..3c (K, V) also into each row's cache
#define EPI_RESID 1   // y += v + b (T): the residual stream
#define EPI_GELU 2    // y = gelu_tanh(v + b) (T)
#define EPI_LOGITS 3  // y = v (f32), no bias

__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

#define GEMV_WARPS 4

// y (NR, n) from x (NR, k) and W (n, k), nn.Linear's layout: one warp per output column, which
// reads W's row once, 16 bytes a lane at a time, against all NR rows of x (k % (16 / sizeof T)
// == 0 and 16-byte aligned rows, checked by the caller). Each lane r < NR finishes row r. With
// LN, x's rows are layer-normalized (ln_g, ln_b, eps) as they are read.
template <typename T, int NR, int EPI, bool LN>
__device__ void gemv(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ bias, void *y, uint32_t k,
                     uint32_t n, const T *__restrict__ ln_g, const T *__restrict__ ln_b, float eps, const uint64_t *ptrs,
                     uint32_t n_layer, uint32_t layer, const uint32_t *pos_of_row, const uint32_t *caps, uint32_t hs) {
  constexpr int V = Vec16<T>::N;
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
  const uint32_t k4 = k / V;
  __shared__ float mean[NR], rstd[NR];
  if (LN) {
    // Warp w takes rows w, w + GEMV_WARPS, ...: the mean, then the variance about it.
    for (uint32_t r = warp; r < NR; r += GEMV_WARPS) {
      float s = 0.f;
      for (uint32_t i = lane; i < k4; i += 32) {
        float xf[V];
        Vec16<T>::load(x4[(uint64_t)r * k4 + i], xf);
#pragma unroll
        for (int e = 0; e < V; e++) s += xf[e];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      const float m = s / k;
      float q = 0.f;
      for (uint32_t i = lane; i < k4; i += 32) {
        float xf[V];
        Vec16<T>::load(x4[(uint64_t)r * k4 + i], xf);
#pragma unroll
        for (int e = 0; e < V; e++) q += (xf[e] - m) * (xf[e] - m);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0) {
        mean[r] = m;
        rstd[r] = rsqrtf(q / k + eps);
      }
    }
    __syncthreads();
  }
  const uint32_t o = blockIdx.x * GEMV_WARPS + warp;
  if (o >= n) return;  // the whole warp
  float acc[NR];
#pragma unroll
  for (int r = 0; r < NR; r++) acc[r] = 0.f;
  const uint4 *w4 = reinterpret_cast<const uint4 *>(w + (uint64_t)o * k);
#pragma unroll 4
  for (uint32_t i = lane; i < k4; i += 32) {
    float wf[V], gf[V], bf[V];
    Vec16<T>::load(__ldg(w4 + i), wf);
    if (LN) {
      Vec16<T>::load(reinterpret_cast<const uint4 *>(ln_g)[i], gf);
      Vec16<T>::load(reinterpret_cast<const uint4 *>(ln_b)[i], bf);
    }
#pragma unroll
    for (int r = 0; r < NR; r++) {
      float xf[V];
      Vec16<T>::load(x4[(uint64_t)r * k4 + i], xf);
      if (LN) {
#pragma unroll
        for (int e = 0; e < V; e++) xf[e] = to_f(from_f<T>((xf[e] - mean[r]) * rstd[r] * gf[e] + bf[e]));
      }
#pragma unroll
      for (int e = 0; e < V; e++) acc[r] += wf[e] * xf[e];
    }
  }
#pragma unroll
  for (int r = 0; r < NR; r++) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], s);
  }
#pragma unroll
  for (int r = 0; r < NR; r++) {
    if (lane != (uint32_t)r) continue;
    const uint64_t at = (uint64_t)r * n + o;
    if (EPI == EPI_LOGITS) {
      reinterpret_cast<float *>(y)[at] = acc[r];
      continue;
    }
    const float v = acc[r] + to_f(bias[o]);
    T *yt = reinterpret_cast<T *>(y);
    if (EPI == EPI_RESID) {
      yt[at] = from_f<T>(to_f(yt[at]) + v);
    } else if (EPI == EPI_GELU) {
      yt[at] = from_f<T>(gelu_tanh(v));
    } else {
      const T t = from_f<T>(v);
      yt[at] = t;
      const uint32_t c = n / 3;
      if (o >= c) {
        const uint32_t col = (o - c) % c, which = (o - c) / c;  // 0: K, 1: V
        T *cache = reinterpret_cast<T *>(ptrs[((uint64_t)r * n_layer + layer) * 2 + which]);
        cache[((uint64_t)(col / hs) * caps[r] + pos_of_row[r]) * hs + col % hs] = t;
      }
    }
  }
}

#define DEC_THREADS 128  // threads of an attention block, and keys of a tile

// The sum (or max) of v over the block's DEC_THREADS threads, in every thread.
template <bool MAX> __device__ __forceinline__ float block_reduce(float v, float *shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, u) : v + u;
  }
  __syncthreads();  // shared may still be read from the last call
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float r = shared[0];
  for (int w = 1; w < DEC_THREADS / 32; w++) r = MAX ? fmaxf(r, shared[w]) : r + shared[w];
  return r;
}

// Attention of one query row per sequence over its cache (the K/V of the row's own position
// written by the QKV product), for the decode step: one block per (row, head, split), the
// split's share of keys 0..=pos (ceil((pos + 1) / n_split) keys; a share past pos is empty).
// A key row is read by G = hs / 8 lanes, 16 bytes each (hs / 8 a power of two up to 32): a
// tile's scores go to shared memory, then each thread sums the weighted V vectors of its keys
// for its 8 dims, an online softmax across tiles. With n_split > 1 every block writes its
// partial (max, sum, unnormalized sums) and the last block of a (row, head) to finish (an atomic
// count, reset by that block for the next step) merges them: no second launch.
template <typename T>
__device__ void attend_decode(const T *qkv, T *out, uint32_t c, uint32_t hs, float scale, const uint64_t *ptrs,
                              uint32_t n_layer, uint32_t layer, const uint32_t *pos_of_row, const uint32_t *caps,
                              float *part, uint32_t *counters, uint32_t n_split) {
  __shared__ float s[DEC_THREADS];
  __shared__ float red[DEC_THREADS * 8];
  __shared__ float tmp[DEC_THREADS / 32];
  __shared__ bool last;
  const uint32_t row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, n_head = gridDim.y;
  const uint32_t tid = threadIdx.x;
  const uint32_t g = hs / 8, per_pass = DEC_THREADS / g;  // lanes a key row, keys a pass
  const uint32_t v = tid % g, kg = tid / g;                 // this thread's 8 dims, key group
  const uint32_t pos = pos_of_row[row], cap = caps[row];
  const uint32_t len = pos + 1;
  const uint32_t chunk = (len + n_split - 1) / n_split;
  const uint32_t lo = min(len, split * chunk), hi = min(len, lo + chunk);
  const T *K = reinterpret_cast<const T *>(ptrs[((uint64_t)row * n_layer + layer) * 2]) + (uint64_t)h * cap * hs;
  const T *V = reinterpret_cast<const T *>(ptrs[((uint64_t)row * n_layer + layer) * 2 + 1]) + (uint64_t)h * cap * hs;
  float q[8], acc[8];
  load8(qkv + (uint64_t)row * 3 * c + (uint64_t)h * hs + 8 * v, q);
#pragma unroll
  for (int e = 0; e < 8; e++) {
    q[e] *= scale;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (uint32_t t0 = lo; t0 < hi; t0 += DEC_THREADS) {
    const uint32_t t1 = min(hi, t0 + DEC_THREADS);
    // scores of keys t0..t1, G lanes a key
    for (uint32_t base = t0; base < t1; base += per_pass) {
      const uint32_t j = base + kg;
      float dot = 0.f;
      if (j < t1) {
        float k[8];
        load8(K + (uint64_t)j * hs + 8 * v, k);
#pragma unroll
        for (int e = 0; e < 8; e++) dot += q[e] * k[e];
      }
      for (uint32_t o = g / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (j < t1 && v == 0) s[j - t0] = dot;
    }
    __syncthreads();
    const float mine = tid < t1 - t0 ? s[tid] : -INFINITY;
    const float m_new = fmaxf(m, block_reduce<true>(mine, tmp));  // finite: the tile has a key
    const float p = tid < t1 - t0 ? expf(mine - m_new) : 0.f;
    const float corr = expf(m - m_new);  // 0 for the first tile
    l = l * corr + block_reduce<false>(p, tmp);
    m = m_new;
    if (tid < t1 - t0) s[tid] = p;
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] *= corr;
    for (uint32_t j = t0 + kg; j < t1; j += per_pass) {
      float vv[8];
      load8(V + (uint64_t)j * hs + 8 * v, vv);
      const float pj = s[j - t0];
#pragma unroll
      for (int e = 0; e < 8; e++) acc[e] += pj * vv[e];
    }
    __syncthreads();  // s is rewritten by the next tile
  }
  // the key groups' sums: dims d = 8 v + e of group kg at red[kg * hs + d]
#pragma unroll
  for (int e = 0; e < 8; e++) red[kg * hs + 8 * v + e] = acc[e];
  __syncthreads();
  const uint64_t slot = ((uint64_t)row * n_head + h) * n_split + split;
  const uint64_t n_slots = (uint64_t)gridDim.x * n_head * n_split;
  for (uint32_t d = tid; d < hs; d += DEC_THREADS) {
    float o = 0.f;
    for (uint32_t k = 0; k < per_pass; k++) o += red[k * hs + d];
    if (n_split == 1) {
      out[(uint64_t)row * c + (uint64_t)h * hs + d] = from_f<T>(o / l);
    } else {
      part[2 * n_slots + slot * hs + d] = o;  // 0 for an empty share
    }
  }
  if (n_split == 1) return;
  if (tid == 0) {
    part[2 * slot] = m;  // -inf for an empty share: weighs 0
    part[2 * slot + 1] = l;
  }
  __threadfence();  // this block's partial is visible before it is counted
  __syncthreads();
  if (tid == 0) last = atomicAdd(&counters[(uint64_t)row * n_head + h], 1u) == n_split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const uint64_t first = ((uint64_t)row * n_head + h) * n_split;
  float big = -INFINITY;
  for (uint32_t k = 0; k < n_split; k++) big = fmaxf(big, __ldcg(part + 2 * (first + k)));
  float total = 0.f;
  for (uint32_t k = 0; k < n_split; k++) {
    const float mk = __ldcg(part + 2 * (first + k));
    if (mk != -INFINITY) total += __ldcg(part + 2 * (first + k) + 1) * expf(mk - big);
  }
  for (uint32_t d = tid; d < hs; d += DEC_THREADS) {
    float o = 0.f;
    for (uint32_t k = 0; k < n_split; k++) {
      const float mk = __ldcg(part + 2 * (first + k));
      if (mk != -INFINITY) o += __ldcg(part + 2 * n_slots + (first + k) * hs + d) * expf(mk - big);
    }
    out[(uint64_t)row * c + (uint64_t)h * hs + d] = from_f<T>(o / total);
  }
  if (tid == 0) counters[(uint64_t)row * n_head + h] = 0;  // for the next step
}

#define KVGPT_GEMV(T, NAME, NR, EPI, EPINAME, LN)                                                                      \
  extern "C" __global__ void gemv_##EPINAME##_##NR##_##NAME(                                                           \
      const T *x, const T *w, const T *bias, void *y, uint32_t k, uint32_t n, const T *ln_g, const T *ln_b, float eps, \
      const uint64_t *ptrs, uint32_t n_layer, uint32_t layer, const uint32_t *pos_of_row, const uint32_t *caps,         \
      uint32_t hs) {                                                                                                     \
    gemv<T, NR, EPI, LN>(x, w, bias, y, k, n, ln_g, ln_b, eps, ptrs, n_layer, layer, pos_of_row, caps, hs);             \
  }

#define KVGPT_GEMV_EPIS(T, NAME, NR)                \
  KVGPT_GEMV(T, NAME, NR, EPI_QKV, qkv, true)       \
  KVGPT_GEMV(T, NAME, NR, EPI_RESID, resid, false)  \
  KVGPT_GEMV(T, NAME, NR, EPI_GELU, gelu, true)     \
  KVGPT_GEMV(T, NAME, NR, EPI_LOGITS, logits, true)

#define KVGPT_DECODE(T, NAME)                                                                                          \
  extern "C" __global__ void attend_decode_##NAME(const T *qkv, T *out, uint32_t c, uint32_t hs, float scale,           \
                                                  const uint64_t *ptrs, uint32_t n_layer, uint32_t layer,               \
                                                  const uint32_t *pos_of_row, const uint32_t *caps, float *part,        \
                                                  uint32_t *counters, uint32_t n_split) {                               \
    attend_decode<T>(qkv, out, c, hs, scale, ptrs, n_layer, layer, pos_of_row, caps, part, counters, n_split);         \
  }                                                                                                                     \
  extern "C" __global__ void embed_##NAME(const uint32_t *ids, const uint32_t *pos_of_row, const T *wte, const T *wpe,  \
                                          T *x, uint32_t c) {                                                          \
    embed<T>(ids, pos_of_row, wte, wpe, x, c);                                                                          \
  }                                                                                                                     \
  KVGPT_GEMV_EPIS(T, NAME, 1)                                                                                           \
  KVGPT_GEMV_EPIS(T, NAME, 2)                                                                                           \
  KVGPT_GEMV_EPIS(T, NAME, 4)                                                                                           \
  KVGPT_GEMV_EPIS(T, NAME, 8)

KVGPT_DECODE(float, f32)
KVGPT_DECODE(__half, f16)
KVGPT_DECODE(__nv_bfloat16, bf16)
