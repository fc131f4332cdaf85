// The decode step's own kernels (cuda/step.rs runs them over buffers of its own and captures
// the whole step as a CUDA graph): a step of B one-token rows, B <= 8, as
//   embed                    x = wte[id] + wpe[pos]
//   per layer:
//     gemv QKV (LN)          qkv = ln_1(x) W_attn^T + b, K and V also written into each row's cache
//     attend (attention.cu)  att
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
// Row metadata, as attention.cu reads it: ids, positions, sequence of each row (here row r is
// sequence r), capacities, and the KV cache address table [row][layer][K, V].

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
