// CUDA kernels of the SeTok clustering ops. The per-element math is dpc_math.h, shared
// with the CPU kernels. Organisation (the distance GEMM itself is cuBLAS, called by the
// torch layer; everything after it is here):
//   sqdist_*         one thread per matrix entry
//   knn_density      one warp per row: bisection on the float bit pattern finds the k-th
//                    smallest distance (any k, no per-thread buffers), then one reduction
//   delta_distance   one warp per row: lanes scan columns, warp reduce (min, index)
//   scope_cluster    one block per image: the loop over seeds is sequential, points are
//                    spread over the block's threads; argmax by block reduction
//   scope_backward   one thread per point (the recursion runs along the clusters)
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "dpc_cuda.h"
#include "dpc_math.h"

namespace setok {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block for the row kernels
constexpr int kScopeThreads = 512;

__device__ __forceinline__ bool is_valid(const bool* valid, int64_t idx) { return valid == nullptr || valid[idx]; }

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U kInf = 0x7f800000u;
  __device__ static U of(float v) { return __float_as_uint(v); }
  __device__ static float from(U u) { return __uint_as_float(u); }
};
template <>
struct Bits<double> {
  using U = unsigned long long;
  static constexpr U kInf = 0x7ff0000000000000ull;
  __device__ static U of(double v) { return static_cast<U>(__double_as_longlong(v)); }
  __device__ static double from(U u) { return __longlong_as_double(static_cast<long long>(u)); }
};

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void sqdist_direct_kernel(const T* __restrict__ x, T* __restrict__ d2, int64_t B, int64_t N, int64_t D) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= B * N * N) return;
  const int64_t b = e / (N * N), i = (e / N) % N, j = e % N;
  const T* xi = x + (b * N + i) * D;
  const T* xj = x + (b * N + j) * D;
  T s = T(0);
  for (int64_t c = 0; c < D; ++c) {
    const T diff = xi[c] - xj[c];
    s += diff * diff;
  }
  d2[e] = s / T(D);
}

template <typename T>
__global__ void gram_diag_kernel(const T* __restrict__ g, T* __restrict__ sq, int64_t B, int64_t N) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= B * N) return;
  const int64_t b = r / N, i = r % N;
  sq[r] = g[(b * N + i) * N + i];
}

template <typename T>
__global__ void sqdist_from_gram_kernel(T* __restrict__ g, const T* __restrict__ sq, int64_t B, int64_t N, int64_t D) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= B * N * N) return;
  const int64_t b = e / (N * N), i = (e / N) % N, j = e % N;
  g[e] = (i == j) ? T(0) : core::sqdist_from_gram(sq[b * N + i], sq[b * N + j], g[e], T(D));
}

template <typename T>
__global__ void knn_density_kernel(const T* __restrict__ d2, const bool* __restrict__ valid, int64_t B, int64_t N,
                                   int64_t k, T* __restrict__ density) {
  using U = typename Bits<T>::U;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (row >= B * N) return;  // whole warp leaves together
  const int64_t b = row / N, i = row % N;
  const bool* vb = valid == nullptr ? nullptr : valid + b * N;
  if (!is_valid(vb, i)) {
    if (lane == 0) density[row] = T(0);
    return;
  }
  const T* r = d2 + row * N;
  int64_t n_valid = 0;
  for (int64_t j = lane; j < N; j += kWarp) n_valid += is_valid(vb, j) ? 1 : 0;
  n_valid = warp_sum(n_valid);
  const int64_t k_eff = k < n_valid ? k : n_valid;
  // smallest bit pattern p with #{v <= p} >= k_eff (non-negative floats order like their bits)
  U lo = 0, hi = Bits<T>::kInf;
  while (lo < hi) {
    const U mid = lo + (hi - lo) / 2;
    int64_t c = 0;
    for (int64_t j = lane; j < N; j += kWarp) c += (is_valid(vb, j) && Bits<T>::of(r[j]) <= mid) ? 1 : 0;
    c = warp_sum(c);
    if (c >= k_eff) hi = mid; else lo = mid + 1;
  }
  const T kth = Bits<T>::from(lo);
  T sum = T(0);
  int64_t less = 0;
  for (int64_t j = lane; j < N; j += kWarp) {
    if (is_valid(vb, j) && r[j] < kth) {
      sum += r[j];
      ++less;
    }
  }
  sum = warp_sum(sum);
  less = warp_sum(less);
  if (lane == 0) density[row] = core::density_from_sum(sum + T(k_eff - less) * kth, k_eff);
}

template <typename T>
__global__ void delta_kernel(const T* __restrict__ d2, const T* __restrict__ density, const bool* __restrict__ valid,
                             int64_t B, int64_t N, T* __restrict__ delta, int64_t* __restrict__ parent) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (row >= B * N) return;
  const int64_t b = row / N, i = row % N;
  const bool* vb = valid == nullptr ? nullptr : valid + b * N;
  if (!is_valid(vb, i)) {
    if (lane == 0) {
      delta[row] = T(0);
      parent[row] = i;
    }
    return;
  }
  const T* r = d2 + row * N;
  const T* den = density + b * N;
  const T di = den[i];
  T best = Bits<T>::from(Bits<T>::kInf);
  int64_t best_j = -1;
  T row_max = T(0);
  for (int64_t j = lane; j < N; j += kWarp) {  // ascending j per lane: strict < keeps the smaller j
    if (!is_valid(vb, j)) continue;
    const T v = r[j];
    row_max = v > row_max ? v : row_max;
    if (v < best && core::is_denser(den[j], j, di, i)) {
      best = v;
      best_j = j;
    }
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oj = __shfl_xor_sync(0xffffffffu, best_j, o);
    const T om = __shfl_xor_sync(0xffffffffu, row_max, o);
    if (oj >= 0 && (best_j < 0 || ob < best || (ob == best && oj < best_j))) {
      best = ob;
      best_j = oj;
    }
    row_max = om > row_max ? om : row_max;
  }
  if (lane == 0) {
    delta[row] = sqrt(best_j >= 0 ? best : row_max);
    parent[row] = best_j >= 0 ? best_j : i;
  }
}

// (value, index) argmax with ties to the smaller index; index -1 = empty.
template <typename T>
__device__ __forceinline__ void argmax_merge(T& v, int64_t& idx, T ov, int64_t oidx) {
  if (oidx >= 0 && (idx < 0 || ov > v || (ov == v && oidx < idx))) {
    v = ov;
    idx = oidx;
  }
}

template <typename T>
__global__ void __launch_bounds__(kScopeThreads) scope_kernel(
    const T* __restrict__ d2, const T* __restrict__ score, const bool* __restrict__ valid, int64_t N, int64_t T_,
    T bw2, T inv_bw2, T min_scope, bool hard, bool has_threshold, T threshold, T* __restrict__ masks,
    int64_t* __restrict__ seeds, int64_t* __restrict__ num_clusters, T* __restrict__ seed_d2, T* __restrict__ scope) {
  __shared__ T red_v[kScopeThreads / kWarp];
  __shared__ int64_t red_i[kScopeThreads / kWarp];
  __shared__ int64_t chosen;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const bool* vb = valid == nullptr ? nullptr : valid + b * N;
  const T* sc = score + b * N;
  T* sp = scope + b * N;
  for (int64_t i = tid; i < N; i += blockDim.x) sp[i] = is_valid(vb, i) ? T(1) : T(0);
  __syncthreads();
  int64_t n = 0;
  for (; n < T_; ++n) {
    T v = T(0);
    int64_t idx = -1;
    for (int64_t i = tid; i < N; i += blockDim.x)
      if (is_valid(vb, i) && sp[i] > min_scope) argmax_merge(v, idx, sc[i] * sp[i], i);
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const T ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
      argmax_merge(v, idx, ov, oi);
    }
    if (lane == 0) {
      red_v[warp] = v;
      red_i[warp] = idx;
    }
    __syncthreads();
    if (tid == 0) {
      T bv = red_v[0];
      int64_t bi = red_i[0];
      for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) argmax_merge(bv, bi, red_v[w], red_i[w]);
      chosen = (bi >= 0 && !(has_threshold && !(bv >= threshold))) ? bi : -1;
    }
    __syncthreads();
    const int64_t m = chosen;
    if (m < 0) break;  // uniform: every thread read the same shared value
    const T* row = d2 + (b * N + m) * N;
    T* mrow = masks + (b * (T_ + 1) + n) * N;
    T* srow = seed_d2 + (b * T_ + n) * N;
    for (int64_t i = tid; i < N; i += blockDim.x) {
      const T d = row[i];
      srow[i] = d;
      mrow[i] = core::scope_step(sp[i], core::alpha_value(d, hard, bw2, inv_bw2));
    }
    if (tid == 0) seeds[b * T_ + n] = m;
    __syncthreads();  // scope and `chosen` are read again in the next round
  }
  T* rem = masks + (b * (T_ + 1) + n) * N;
  for (int64_t i = tid; i < N; i += blockDim.x) rem[i] = sp[i];
  if (tid == 0) num_clusters[b] = n;
}

template <typename T>
__global__ void scope_backward_kernel(const T* __restrict__ grad_masks, const T* __restrict__ seed_d2,
                                      const bool* __restrict__ valid, const int64_t* __restrict__ num_clusters,
                                      int64_t B, int64_t N, int64_t T_, T bw2, T inv_bw2, bool hard,
                                      T* __restrict__ gd2) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= B * N) return;
  const int64_t b = p / N, i = p % N;
  core::scope_backward_point(grad_masks + b * (T_ + 1) * N + i, seed_d2 + b * T_ * N + i, gd2 + b * T_ * N + i, N,
                             num_clusters[b], is_valid(valid, p), hard, bw2, inv_bw2);
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

template <typename T>
void sqdist_direct(const T* x, T* d2, int64_t B, int64_t N, int64_t D, cudaStream_t stream) {
  if (B * N == 0) return;
  sqdist_direct_kernel<T><<<blocks_for(B * N * N, 256), 256, 0, stream>>>(x, d2, B, N, D);
}

template <typename T>
void sqdist_from_gram(T* g, T* sq, int64_t B, int64_t N, int64_t D, cudaStream_t stream) {
  if (B * N == 0) return;
  gram_diag_kernel<T><<<blocks_for(B * N, 256), 256, 0, stream>>>(g, sq, B, N);
  sqdist_from_gram_kernel<T><<<blocks_for(B * N * N, 256), 256, 0, stream>>>(g, sq, B, N, D);
}

template <typename T>
void knn_density(const T* d2, const bool* valid, int64_t B, int64_t N, int64_t k, T* density, cudaStream_t stream) {
  if (B * N == 0) return;
  knn_density_kernel<T><<<blocks_for(B * N, kRowsPerBlock), kRowsPerBlock * kWarp, 0, stream>>>(d2, valid, B, N, k,
                                                                                                density);
}

template <typename T>
void delta_distance(const T* d2, const T* density, const bool* valid, int64_t B, int64_t N, T* delta, int64_t* parent,
                    cudaStream_t stream) {
  if (B * N == 0) return;
  delta_kernel<T><<<blocks_for(B * N, kRowsPerBlock), kRowsPerBlock * kWarp, 0, stream>>>(d2, density, valid, B, N,
                                                                                          delta, parent);
}

template <typename T>
void scope_cluster(const T* d2, const T* score, const bool* valid, int64_t B, int64_t N, int64_t T_, double bandwidth,
                   bool hard, double min_scope, bool has_threshold, double threshold, T* masks, int64_t* seeds,
                   int64_t* num_clusters, T* seed_d2, T* scope, cudaStream_t stream) {
  if (B == 0) return;
  scope_kernel<T><<<static_cast<unsigned>(B), kScopeThreads, 0, stream>>>(
      d2, score, valid, N, T_, T(bandwidth * bandwidth), T(1.0 / (bandwidth * bandwidth)), T(min_scope), hard,
      has_threshold, T(threshold), masks, seeds, num_clusters, seed_d2, scope);
}

template <typename T>
void scope_backward(const T* grad_masks, const T* seed_d2, const bool* valid, const int64_t* num_clusters, int64_t B,
                    int64_t N, int64_t T_, double bandwidth, bool hard, T* gd2, cudaStream_t stream) {
  if (B * N == 0) return;
  scope_backward_kernel<T><<<blocks_for(B * N, 256), 256, 0, stream>>>(
      grad_masks, seed_d2, valid, num_clusters, B, N, T_, T(bandwidth * bandwidth), T(1.0 / (bandwidth * bandwidth)),
      hard, gd2);
}

#define SETOK_INSTANTIATE(T)                                                                                         \
  template void sqdist_direct<T>(const T*, T*, int64_t, int64_t, int64_t, cudaStream_t);                             \
  template void sqdist_from_gram<T>(T*, T*, int64_t, int64_t, int64_t, cudaStream_t);                                \
  template void knn_density<T>(const T*, const bool*, int64_t, int64_t, int64_t, T*, cudaStream_t);                  \
  template void delta_distance<T>(const T*, const T*, const bool*, int64_t, int64_t, T*, int64_t*, cudaStream_t);    \
  template void scope_cluster<T>(const T*, const T*, const bool*, int64_t, int64_t, int64_t, double, bool, double,    \
                                 bool, double, T*, int64_t*, int64_t*, T*, T*, cudaStream_t);                        \
  template void scope_backward<T>(const T*, const T*, const bool*, const int64_t*, int64_t, int64_t, int64_t,        \
                                  double, bool, T*, cudaStream_t);

SETOK_INSTANTIATE(float)
SETOK_INSTANTIATE(double)

}  // namespace cuda
}  // namespace setok
