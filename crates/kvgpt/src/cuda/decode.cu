// The decode step's own kernels (cuda/step.rs runs them over buffers of its own and captures
// the whole step as a CUDA graph): a step of B one-token rows, B <= 8, as
//   embed                    x = wte[id] + wpe[pos]
//   per layer:
//     gemv QKV (LN)          qkv = ln_1(x) W_attn^T + b, K and V also written into each row's cache
//     attend_decode          att
//     gemv RESID             x += att W_proj^T + b
//     gemv GELU (LN)         f = gelu_tanh(ln_2(x) W_fc^T + b)
//     gemv RESID             x += f W_mlp^T + b
//   gemv LOGITS (LN)         logits (f32) = ln_f(x) W_lm^T, and each row's argmax key
//   argmax_ids               the rows' greedy ids
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

// Programmatic dependent launch (compute 9.0 on; step.rs launches with it only then): a kernel
// lets the next one start as soon as all its blocks run, and the next one loads what no kernel
// of the step writes (the weights, the cache's earlier positions) before it waits for this one
// to finish and its writes to be visible. Elsewhere both are no-ops and launches serialize.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}


// One block per row: x = wte[id] + wpe[pos], rounded to T as candle's sum.
template <typename T>
__device__ void embed(const uint32_t *ids, const uint32_t *pos_of_row, const T *wte, const T *wpe, T *x, uint32_t c) {
  pdl_trigger();
  pdl_wait();
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

// 8 elements from p (16-byte aligned) as floats: one 16-byte load, two for f32. CG: from L2,
// past L1: what an earlier kernel of the step wrote, which with programmatic dependent launch
// this one may have started before (pdl_wait makes it visible in L2).
template <typename T, bool CG = false> __device__ __forceinline__ void load8(const T *p, float *f) {
  const uint4 *p4 = reinterpret_cast<const uint4 *>(p);
  Vec16<T>::load(CG ? __ldcg(p4) : p4[0], f);
  if (Vec16<T>::N == 4) Vec16<T>::load(CG ? __ldcg(p4 + 1) : p4[1], f + 4);
}

#define EPI_QKV 0     // y = v + b (T); columns c..3c (K, V) also into each row's cache
#define EPI_RESID 1   // y += v + b (T): the residual stream
#define EPI_GELU 2    // y = gelu_tanh(v + b) (T)
#define EPI_LOGITS 3  // y = v (f32), no bias

__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// The sum of v over the warp's 32 lanes, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

#define GEMV_WARPS 8
#define GEMV_CH 4  // 16-byte chunks of W a lane holds in registers at once

// A logit and its column as one orderable key: the larger logit, then the smaller column, is
// the larger key (torch.argmax's first index on ties); NaN is 0, below every number.
__device__ __forceinline__ unsigned long long argmax_key(float v, uint32_t col) {
  if (v != v) return 0ull;
  uint32_t u = __float_as_uint(v);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ((unsigned long long)u << 32) | (0xFFFFFFFFu - col);
}

// y (NR, n) from x (NR, k) and W (n, k), nn.Linear's layout. A block of GEMV_WARPS warps takes
// GEMV_WARPS / split columns at a time, each by `split` warps over a k / split share of W's row
// (16 bytes a lane, at most GEMV_CH chunks a lane in flight), summed in shared memory, then the
// next columns gridDim.x blocks on (a grid the GPU holds at once, step.rs: the logits' 50,257
// columns take a dozen a warp). A warp's loads of W run one share ahead of its sums: the first
// (and the bias, and the layer norm's gamma and beta into L2) before it waits for the kernel
// before it (pdl_wait), the next column's while it finishes this one. Lane r of a column's first warp
// finishes row r. k % (16 / sizeof T) == 0 and rows 16-byte aligned (checked by the caller).
// With LN, x's rows are layer-normalized (ln_g, ln_b, eps) as they are read; x (an earlier
// kernel's output) is read after pdl_wait with plain loads, which L1 serves to the block's
// other warps. The logits' epilogue also takes each row's argmax into keys[row] (argmax_key,
// atomicMax, one a block; zero before the kernel, argmax_ids turns them into ids and zeroes
// them).
template <typename T, int NR, int EPI, bool LN>
__device__ void gemv(const T *x, const T *__restrict__ w, const T *__restrict__ bias, void *y, uint32_t k, uint32_t n,
                     const T *__restrict__ ln_g, const T *__restrict__ ln_b, float eps, const uint64_t *ptrs,
                     uint32_t n_layer, uint32_t layer, const uint32_t *pos_of_row, const uint32_t *caps, uint32_t hs,
                     uint32_t split, unsigned long long *keys) {
  pdl_trigger();
  constexpr int V = Vec16<T>::N;
  constexpr bool BIAS = EPI != EPI_LOGITS;
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t cols = GEMV_WARPS / split, col_in = warp % cols, slice = warp / cols;
  const uint32_t stride = gridDim.x * cols;
  const uint32_t k4 = k / V, per = (k4 + split - 1) / split;
  const uint32_t lo = min(k4, slice * per), hi = min(k4, lo + per);
  const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
  const uint4 *w4 = reinterpret_cast<const uint4 *>(w);
  const uint4 *g4 = reinterpret_cast<const uint4 *>(ln_g), *b4 = reinterpret_cast<const uint4 *>(ln_b);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // W's chunks g + lane + 32 j of column col (zero past the share or the columns)
  uint4 wr[GEMV_CH];
  auto load_w = [&](uint32_t col, uint32_t g) {
#pragma unroll
    for (int j = 0; j < GEMV_CH; j++) {
      const uint32_t i = g + lane + 32 * j;
      wr[j] = col < n && i < hi ? __ldg(w4 + (uint64_t)col * k4 + i) : zero;
    }
  };
  const uint32_t first = blockIdx.x * cols + col_in;
  load_w(first, lo);
  if (LN) {
    // gamma and beta, which every warp reads, on their way into L2
    for (uint32_t i = threadIdx.x; i < k4; i += 32 * GEMV_WARPS) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(g4 + i));
      asm volatile("prefetch.global.L2 [%0];" ::"l"(b4 + i));
    }
  }
  float bias_next = BIAS && lane < NR && first < n ? to_f(bias[first]) : 0.f;
  pdl_wait();
  __shared__ float mean[NR], rstd[NR];
  if (LN) {
    // Warp w takes rows w, w + GEMV_WARPS, ...: the mean, then the variance about it.
    for (uint32_t r = warp; r < NR; r += GEMV_WARPS) {
      // the sum of f over row r's elements, in every lane
      auto row_sum = [&](auto f) {
        float s = 0.f;
#pragma unroll 4
        for (uint32_t i = lane; i < k4; i += 32) {
          float xf[V];
          Vec16<T>::load(x4[(uint64_t)r * k4 + i], xf);
#pragma unroll
          for (int e = 0; e < V; e++) s += f(xf[e]);
        }
        return warp_sum(s);
      };
      const float m = row_sum([](float v) { return v; }) / k;
      const float q = row_sum([m](float v) { return (v - m) * (v - m); });
      if (lane == 0) {
        mean[r] = m;
        rstd[r] = rsqrtf(q / k + eps);
      }
    }
    __syncthreads();
  }
  __shared__ float red[GEMV_WARPS][NR];
  unsigned long long best_key = 0ull;  // lane r: row r's best over this warp's columns
  // Block-uniform: every warp of the block runs each pass (a column past n computes zeros).
  for (uint32_t base = blockIdx.x * cols; base < n; base += stride) {
    const uint32_t o = base + col_in;
    const bool live = o < n;
    const float b_o = bias_next;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = 0.f;
    for (uint32_t g = lo; g < hi; g += 32 * GEMV_CH) {
#pragma unroll
      for (int j = 0; j < GEMV_CH; j++) {
        // past the share, a chunk of W is zero and reads x at the share's start (no branch:
        // the loads of all chunks go out together)
        const uint32_t i = g + lane + 32 * j < hi ? g + lane + 32 * j : lo;
        float wf[V], gf[V], bf[V];
        Vec16<T>::load(wr[j], wf);
        if (LN) {
          Vec16<T>::load(__ldg(g4 + i), gf);
          Vec16<T>::load(__ldg(b4 + i), bf);
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
      // W's next share: the rest of this column's, else the next column's first
      if (g + 32 * GEMV_CH < hi) {
        load_w(o, g + 32 * GEMV_CH);
      } else {
        load_w(o + stride, lo);
      }
    }
    if (BIAS && lane < NR && o + stride < n) bias_next = to_f(bias[o + stride]);
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = warp_sum(acc[r]);
    // The split warps' sums, added in slice order.
    if (split > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < NR; r++) red[warp][r] = acc[r];
      }
      __syncthreads();
      if (slice == 0) {
#pragma unroll
        for (int r = 0; r < NR; r++) {
          acc[r] = red[col_in][r];
          for (uint32_t s = 1; s < split; s++) acc[r] += red[s * cols + col_in][r];
        }
      }
      __syncthreads();  // red is rewritten by the next pass
    }
#pragma unroll
    for (int r = 0; r < NR; r++) {
      if (lane != (uint32_t)r || slice != 0 || !live) continue;
      const uint64_t at = (uint64_t)r * n + o;
      if (EPI == EPI_LOGITS) {
        reinterpret_cast<float *>(y)[at] = acc[r];
        best_key = max(best_key, argmax_key(acc[r], o));
        continue;
      }
      const float v = acc[r] + b_o;
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
  if (EPI == EPI_LOGITS) {
    __shared__ unsigned long long best[GEMV_WARPS][NR];
    if (slice == 0 && lane < NR) best[col_in][lane] = best_key;
    __syncthreads();
    if (threadIdx.x < NR) {
      const uint32_t r = threadIdx.x;
      unsigned long long m = best[0][r];
      for (uint32_t cc = 1; cc < cols; cc++) m = max(m, best[cc][r]);
      // Most blocks lose to a key already there: read before the atomic.
      if (m > *reinterpret_cast<volatile unsigned long long *>(keys + r)) atomicMax(keys + r, m);
    }
  }
}

// The rows' greedy ids from the logits' argmax keys, which it zeroes for the next step (all
// NaN, a key of 0, is id 0, as the host's argmax).
__device__ void argmax_ids(unsigned long long *keys, uint32_t *ids, uint32_t rows) {
  pdl_trigger();
  pdl_wait();
  const uint32_t r = threadIdx.x;
  if (r >= rows) return;
  const unsigned long long key = __ldcg(keys + r);
  ids[r] = key == 0ull ? 0u : 0xFFFFFFFFu - (uint32_t)(key & 0xFFFFFFFFull);
  keys[r] = 0ull;
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
// A key row is read by G = hs / 8 lanes, 16 bytes each (hs / 8 a power of two up to 32),
// DEC_GROUP rows a lane in flight: a tile's scores go to shared memory, then each thread sums
// the weighted V vectors of its keys for its 8 dims, an online softmax across tiles. The first
// keys' rows but the row's own position are loaded before waiting for the QKV product (earlier
// steps wrote them). With n_split > 1 every block writes its partial (max, sum, unnormalized
// sums) and the last block of a (row, head) to finish (an atomic count, reset by that block
// for the next step) merges them: no second launch.
#define DEC_GROUP 4
#define MERGE_GROUP 8  // splits a thread of the merging block loads at once
template <typename T>
__device__ void attend_decode(const T *qkv, T *out, uint32_t c, uint32_t hs, float scale, const uint64_t *ptrs,
                              uint32_t n_layer, uint32_t layer, const uint32_t *pos_of_row, const uint32_t *caps,
                              float *part, uint32_t *counters, uint32_t n_split) {
  pdl_trigger();
  __shared__ float s[DEC_THREADS];
  __shared__ float red[DEC_THREADS * 8];
  __shared__ float tmp[DEC_THREADS / 32];
  __shared__ bool last;
  const uint32_t row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, n_head = gridDim.y;
  const uint32_t tid = threadIdx.x;
  const uint32_t g = hs / 8, per_pass = DEC_THREADS / g;  // lanes a key row, keys a pass
  const uint32_t v = tid % g, kg = tid / g;                 // this thread's 8 dims, key group
  // Written by the host before the step: readable before the wait.
  const uint32_t pos = pos_of_row[row], cap = caps[row];
  const uint32_t len = pos + 1;
  const uint32_t chunk = (len + n_split - 1) / n_split;
  const uint32_t lo = min(len, split * chunk), hi = min(len, lo + chunk);
  const T *K = reinterpret_cast<const T *>(ptrs[((uint64_t)row * n_layer + layer) * 2]) + (uint64_t)h * cap * hs;
  const T *V = reinterpret_cast<const T *>(ptrs[((uint64_t)row * n_layer + layer) * 2 + 1]) + (uint64_t)h * cap * hs;
  // The first group of key rows, those of earlier positions, before the wait.
  float kf[DEC_GROUP][8];
  {
    const uint32_t t1 = min(hi, lo + DEC_THREADS);
#pragma unroll
    for (int u = 0; u < DEC_GROUP; u++) {
      const uint32_t j = lo + u * per_pass + kg;
      if (j < t1 && j < pos) load8(K + (uint64_t)j * hs + 8 * v, kf[u]);
    }
    // and the share's V rows of earlier positions on their way into L2
    for (uint32_t j = lo + kg; j < hi && j < pos; j += per_pass) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(V + (uint64_t)j * hs + 8 * v));
    }
  }
  pdl_wait();
  float q[8], acc[8];
  load8<T, true>(qkv + (uint64_t)row * 3 * c + (uint64_t)h * hs + 8 * v, q);
#pragma unroll
  for (int e = 0; e < 8; e++) {
    q[e] *= scale;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (uint32_t t0 = lo; t0 < hi; t0 += DEC_THREADS) {
    const uint32_t t1 = min(hi, t0 + DEC_THREADS);
    // scores of keys t0..t1, G lanes a key, DEC_GROUP keys a lane at once
    for (uint32_t base = t0; base < t1; base += DEC_GROUP * per_pass) {
#pragma unroll
      for (int u = 0; u < DEC_GROUP; u++) {
        const uint32_t j = base + u * per_pass + kg;
        // the first group's earlier positions are in kf already
        if (j < t1 && (base != lo || j >= pos)) load8<T, true>(K + (uint64_t)j * hs + 8 * v, kf[u]);
      }
#pragma unroll
      for (int u = 0; u < DEC_GROUP; u++) {
        const uint32_t j = base + u * per_pass + kg;
        float dot = 0.f;
        if (j < t1) {
#pragma unroll
          for (int e = 0; e < 8; e++) dot += q[e] * kf[u][e];
        }
        for (uint32_t o = g / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (j < t1 && v == 0) s[j - t0] = dot;
      }
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
    for (uint32_t j0 = t0 + kg; j0 < t1; j0 += DEC_GROUP * per_pass) {
      float vv[DEC_GROUP][8];
#pragma unroll
      for (int u = 0; u < DEC_GROUP; u++) {
        const uint32_t j = j0 + u * per_pass;
        if (j < t1) load8<T, true>(V + (uint64_t)j * hs + 8 * v, vv[u]);
      }
#pragma unroll
      for (int u = 0; u < DEC_GROUP; u++) {
        const uint32_t j = j0 + u * per_pass;
        if (j >= t1) continue;
        const float pj = s[j - t0];
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] += pj * vv[u][e];
      }
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
  // Each dim's merge over the splits, DEC_THREADS / hs threads a dim: thread (d, grp) merges
  // splits grp, grp + ng, ..., MERGE_GROUP of them loaded at once (their max, sum and dim-d
  // sum; an empty share, max -inf, is skipped), then the ng merges of dim d are merged through
  // shared memory.
  const uint32_t hd = min(hs, (uint32_t)DEC_THREADS), ng = DEC_THREADS / hd;
  for (uint32_t d0 = 0; d0 < hs; d0 += DEC_THREADS) {
    const uint32_t d = d0 + tid % hd, grp = tid / hd;
    float mm = -INFINITY, ll = 0.f, oo = 0.f;
    for (uint32_t k0 = grp; k0 < n_split; k0 += MERGE_GROUP * ng) {
      float mk[MERGE_GROUP], lk[MERGE_GROUP], pk[MERGE_GROUP];
#pragma unroll
      for (int u = 0; u < MERGE_GROUP; u++) {
        const uint32_t k = k0 + u * ng;
        mk[u] = k < n_split ? __ldcg(part + 2 * (first + k)) : -INFINITY;
        lk[u] = k < n_split ? __ldcg(part + 2 * (first + k) + 1) : 0.f;
        pk[u] = k < n_split ? __ldcg(part + 2 * n_slots + (first + k) * hs + d) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < MERGE_GROUP; u++) {
        if (mk[u] == -INFINITY) continue;
        const float mn = fmaxf(mm, mk[u]), a = expf(mm - mn), b = expf(mk[u] - mn);
        ll = ll * a + lk[u] * b;
        oo = oo * a + pk[u] * b;
        mm = mn;
      }
    }
    red[tid] = mm;
    red[DEC_THREADS + tid] = ll;
    red[2 * DEC_THREADS + tid] = oo;
    __syncthreads();
    if (tid < hd) {
      float big = -INFINITY;
      for (uint32_t gi = 0; gi < ng; gi++) big = fmaxf(big, red[gi * hd + tid]);
      float total = 0.f, o = 0.f;
      for (uint32_t gi = 0; gi < ng; gi++) {
        const float mg = red[gi * hd + tid];
        if (mg == -INFINITY) continue;  // no split of this group had a key
        const float e = expf(mg - big);
        total += red[DEC_THREADS + gi * hd + tid] * e;
        o += red[2 * DEC_THREADS + gi * hd + tid] * e;
      }
      out[(uint64_t)row * c + (uint64_t)h * hs + d] = from_f<T>(o / total);
    }
    __syncthreads();
  }
  if (tid == 0) counters[(uint64_t)row * n_head + h] = 0;  // for the next step
}

#define KVGPT_GEMV(T, NAME, NR, EPI, EPINAME, LN)                                                                      \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS, 2) gemv_##EPINAME##_##NR##_##NAME(                   \
      const T *x, const T *w, const T *bias, void *y, uint32_t k, uint32_t n, const T *ln_g, const T *ln_b, float eps, \
      const uint64_t *ptrs, uint32_t n_layer, uint32_t layer, const uint32_t *pos_of_row, const uint32_t *caps,         \
      uint32_t hs, uint32_t split, unsigned long long *keys) {                                                           \
    gemv<T, NR, EPI, LN>(x, w, bias, y, k, n, ln_g, ln_b, eps, ptrs, n_layer, layer, pos_of_row, caps, hs, split, keys); \
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

extern "C" __global__ void argmax_ids_u32(unsigned long long *keys, uint32_t *ids, uint32_t rows) {
  argmax_ids(keys, ids, rows);
}

KVGPT_DECODE(float, f32)
KVGPT_DECODE(__half, f16)
KVGPT_DECODE(__nv_bfloat16, bf16)
