// Batched causal self-attention over per-sequence KV caches, for one layer of a step, in two
// launches whatever the number of sequences:
//   kv_write_*: every row's K and V (columns C..3C of the step's qkv) into its sequence's cache
//               at the row's position;
//   attend_*:   one block per (row, head): the row's query against keys 0..=pos of its
//               sequence's cache, with an online softmax over tiles of 32 keys (4 warps take
//               tiles in turn; in a tile a lane scores one key, then each lane sums the
//               weighted V rows for the head dims it holds: lane, lane + 32, ...; the warps'
//               partial sums are merged at the end), written to out (N, C).
// (The decode step of a few sequences has its own attention kernel, in decode.cu.) Caches are
// found through a table of addresses, [sequence][layer][K, V], of buffers shaped (1, n_head,
// capacity, head_dim), HF's layout. Sums are in f32 for every storage type.

#include "common.cuh"

#define WARPS 4
#define MAX_DIMS_PER_LANE 8  // head_dim up to 256

template <typename T>
__device__ void kv_write(const T *qkv, uint32_t n, uint32_t c, uint32_t hs, const uint64_t *ptrs, uint32_t n_layer,
                         uint32_t layer, const uint32_t *seq_of_row, const uint32_t *pos_of_row, const uint32_t *caps) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (uint64_t)n * c) return;
  const uint32_t row = (uint32_t)(i / c), col = (uint32_t)(i % c);
  const uint32_t h = col / hs, d = col % hs;
  const uint32_t s = seq_of_row[row], pos = pos_of_row[row], cap = caps[s];
  T *k = reinterpret_cast<T *>(ptrs[((uint64_t)s * n_layer + layer) * 2]);
  T *v = reinterpret_cast<T *>(ptrs[((uint64_t)s * n_layer + layer) * 2 + 1]);
  const uint64_t dst = ((uint64_t)h * cap + pos) * hs + d;
  const uint64_t src = (uint64_t)row * 3 * c + col;
  k[dst] = qkv[src + c];
  v[dst] = qkv[src + 2 * c];
}

// Dot product of a query (f32, pre-scaled, in shared memory) with one cache row.
template <typename T> __device__ __forceinline__ float row_dot_scalar(const float *q, const T *k, uint32_t hs) {
  float dot = 0.f;
  for (uint32_t d = 0; d < hs; d++) dot += q[d] * to_f(k[d]);
  return dot;
}

// 16-bit rows with 8-element 16-byte loads where the rows allow it (head_dim a multiple of 8:
// every row then starts 16-byte aligned).
template <typename T, typename T2> __device__ __forceinline__ float row_dot_pairs(const float *q, const T *k, uint32_t hs) {
  if (hs % 8 != 0) return row_dot_scalar(q, k, hs);
  float dot = 0.f;
  const uint4 *k4 = reinterpret_cast<const uint4 *>(k);
  for (uint32_t v = 0; v < hs / 8; v++) {
    const uint4 raw = k4[v];
    const T2 *pairs = reinterpret_cast<const T2 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float2 f = pair_to_f2(pairs[e]);
      dot += q[8 * v + 2 * e] * f.x + q[8 * v + 2 * e + 1] * f.y;
    }
  }
  return dot;
}

template <typename T> __device__ __forceinline__ float row_dot(const float *q, const T *k, uint32_t hs) { return row_dot_scalar(q, k, hs); }
template <> __device__ __forceinline__ float row_dot<__half>(const float *q, const __half *k, uint32_t hs) { return row_dot_pairs<__half, __half2>(q, k, hs); }
template <> __device__ __forceinline__ float row_dot<__nv_bfloat16>(const float *q, const __nv_bfloat16 *k, uint32_t hs) {
  return row_dot_pairs<__nv_bfloat16, __nv_bfloat162>(q, k, hs);
}

// One block per (row, head). The warps take tiles of 32 keys in turn (warp w: tiles w, w + WARPS,
// ...); in a tile each lane scores one key against the query, the warp takes the tile's max and
// sum (two reductions a tile, not one a key), then every lane adds the 32 weighted V rows to the
// head dims it holds (lane, lane + 32, ...: coalesced reads). The warps' partial results are
// merged at the end.
template <typename T>
__device__ void attend(const T *qkv, T *out, uint32_t n, uint32_t c, uint32_t hs, float scale, const uint64_t *ptrs,
                       uint32_t n_layer, uint32_t layer, const uint32_t *seq_of_row, const uint32_t *pos_of_row,
                       const uint32_t *caps) {
  __shared__ float q[32 * MAX_DIMS_PER_LANE];
  __shared__ float warp_max[WARPS], warp_sum[WARPS];
  __shared__ float warp_acc[WARPS * 32 * MAX_DIMS_PER_LANE];
  const uint32_t row = blockIdx.x, h = blockIdx.y;
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t s = seq_of_row[row], pos = pos_of_row[row], cap = caps[s];
  const T *K = reinterpret_cast<const T *>(ptrs[((uint64_t)s * n_layer + layer) * 2]) + (uint64_t)h * cap * hs;
  const T *V = reinterpret_cast<const T *>(ptrs[((uint64_t)s * n_layer + layer) * 2 + 1]) + (uint64_t)h * cap * hs;
  const T *qg = qkv + (uint64_t)row * 3 * c + (uint64_t)h * hs;
  for (uint32_t d = threadIdx.x; d < hs; d += blockDim.x) q[d] = to_f(qg[d]) * scale;
  __syncthreads();
  const uint32_t per = (hs + 31) / 32;
  float acc[MAX_DIMS_PER_LANE];
#pragma unroll
  for (uint32_t i = 0; i < MAX_DIMS_PER_LANE; i++) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (uint32_t j0 = 32 * warp; j0 <= pos; j0 += 32 * WARPS) {
    const uint32_t j = j0 + lane;
    const float score = j <= pos ? row_dot(q, K + (uint64_t)j * hs, hs) : -INFINITY;
    float tile_max = score;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
    const float m_new = fmaxf(m, tile_max);  // finite: key j0 <= pos is in the tile
    const float corr = expf(m - m_new);      // 0 for the first tile (m = -inf)
    const float p = j <= pos ? expf(score - m_new) : 0.f;
    float tile_sum = p;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, o);
    l = l * corr + tile_sum;
#pragma unroll
    for (uint32_t i = 0; i < MAX_DIMS_PER_LANE; i++) acc[i] *= corr;
    const uint32_t keys = min(32u, pos - j0 + 1);
    for (uint32_t k = 0; k < keys; k++) {
      const float pk = __shfl_sync(0xffffffffu, p, k);
      const T *vk = V + (uint64_t)(j0 + k) * hs;
#pragma unroll
      for (uint32_t i = 0; i < MAX_DIMS_PER_LANE; i++) {
        const uint32_t d = lane + 32 * i;
        if (i < per && d < hs) acc[i] += pk * to_f(vk[d]);
      }
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
#pragma unroll
  for (uint32_t i = 0; i < MAX_DIMS_PER_LANE; i++) warp_acc[(warp * MAX_DIMS_PER_LANE + i) * 32 + lane] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  // Merge the warps: a warp that saw no key has max -inf and sum 0, and weighs 0. Warp 0 always
  // saw key 0, so the overall max is finite.
  float big = -INFINITY;
  for (uint32_t w = 0; w < WARPS; w++) big = fmaxf(big, warp_max[w]);
  float weight[WARPS], total = 0.f;
  for (uint32_t w = 0; w < WARPS; w++) {
    weight[w] = warp_max[w] == -INFINITY ? 0.f : expf(warp_max[w] - big);
    total += warp_sum[w] * weight[w];
  }
  for (uint32_t i = 0; i < per; i++) {
    const uint32_t d = lane + 32 * i;
    if (d >= hs) continue;
    float o = 0.f;
    for (uint32_t w = 0; w < WARPS; w++) o += warp_acc[(w * MAX_DIMS_PER_LANE + i) * 32 + lane] * weight[w];
    out[(uint64_t)row * c + (uint64_t)h * hs + d] = from_f<T>(o / total);
  }
}

#define KVGPT_ATTENTION(T, NAME)                                                                                       \
  extern "C" __global__ void kv_write_##NAME(const T *qkv, uint32_t n, uint32_t c, uint32_t hs, const uint64_t *ptrs,  \
                                             uint32_t n_layer, uint32_t layer, const uint32_t *seq_of_row,            \
                                             const uint32_t *pos_of_row, const uint32_t *caps) {                      \
    kv_write<T>(qkv, n, c, hs, ptrs, n_layer, layer, seq_of_row, pos_of_row, caps);                                   \
  }                                                                                                                    \
  extern "C" __global__ void attend_##NAME(const T *qkv, T *out, uint32_t n, uint32_t c, uint32_t hs, float scale,     \
                                           const uint64_t *ptrs, uint32_t n_layer, uint32_t layer,                    \
                                           const uint32_t *seq_of_row, const uint32_t *pos_of_row,                    \
                                           const uint32_t *caps) {                                                    \
    attend<T>(qkv, out, n, c, hs, scale, ptrs, n_layer, layer, seq_of_row, pos_of_row, caps);                         \
  }

KVGPT_ATTENTION(float, f32)
KVGPT_ATTENTION(__half, f16)
KVGPT_ATTENTION(__nv_bfloat16, bf16)
