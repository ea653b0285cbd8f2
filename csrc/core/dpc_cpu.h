// CPU kernels of the SeTok clustering ops on raw pointers (no torch headers).
//
// Each kernel works on one image and a range of rows, so the caller decides the
// threading (the torch layer uses at::parallel_for over images x rows; the C++ tests
// call them serially). Layouts, per image:
//   x: (N, D) row-major     d2: (N, N)      valid: (N) or nullptr (= all valid)
//   masks: (T+1, N)         seeds: (T)      seed_d2: (T, N)
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "dpc_math.h"

namespace setok {
namespace core {

// Columns are scanned in blocks of kBlock: a branch-free (vectorised) test finds the rare
// blocks holding a candidate, which only then are looked at one by one.
constexpr int64_t kBlock = 16;

inline bool is_valid(const bool* valid, int64_t i) { return valid == nullptr || valid[i]; }

inline int64_t count_valid(const bool* valid, int64_t N) {
  if (valid == nullptr) return N;
  int64_t c = 0;
  for (int64_t i = 0; i < N; ++i) c += valid[i] ? 1 : 0;
  return c;
}

// sq_i = |x_i|^2 for the n rows of x (n, D), in kBlock lanes summed in a fixed order (the
// same bits whichever thread or path computes it). The pipelines take the norms from here,
// not from the Gram diagonal, so that a thread holding only some Gram rows needs no other
// thread's rows.
template <typename T>
void squared_norms(const T* x, int64_t n, int64_t D, T* sq) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * D;
    T lane[kBlock] = {};
    int64_t c0 = 0;
    for (; c0 + kBlock <= D; c0 += kBlock)
#pragma omp simd
      for (int64_t c = 0; c < kBlock; ++c) lane[c] += xi[c0 + c] * xi[c0 + c];
    for (int64_t c = 0; c0 + c < D; ++c) lane[c] += xi[c0 + c] * xi[c0 + c];
    T s = T(0);
    for (int64_t c = 0; c < kBlock; ++c) s += lane[c];
    sq[i] = s;
  }
}

// In place: the Gram rows [r0, r1), columns [c0, c1) (c1 < 0: N), become squared
// distances. sq holds the squared norms (squared_norms). The diagonal becomes exactly 0.
// The formula is symmetric in (i, j) bit for bit ((sq_i + sq_j) commutes), so the
// pipelines compute only the blocks on and below the diagonal and mirror them
// (mirror_upper_rows).
template <typename T>
void sqdist_rows_from_gram(T* g, const T* sq, int64_t N, int64_t D, int64_t r0, int64_t r1, int64_t c0 = 0,
                           int64_t c1 = -1) {
  if (c1 < 0) c1 = N;
  const T d = T(D), inv_d = T(1) / d;
  const bool mul = exact_reciprocal(D);
  for (int64_t i = r0; i < r1; ++i) {
    T* row = g + i * N;
    const T si = sq[i];
    if (mul)
      for (int64_t j = c0; j < c1; ++j) row[j] = sqdist_times_d_from_gram(si, sq[j], row[j]) * inv_d;
    else
      for (int64_t j = c0; j < c1; ++j) row[j] = sqdist_from_gram(si, sq[j], row[j], d);
    if (i >= c0 && i < c1) row[i] = T(0);
  }
}

// Squared distances from differences (small D), rows [r0, r1), columns [c0, c1) (c1 < 0:
// N): exact zeros for duplicate points, and symmetric bit for bit ((a - b)^2 == (b - a)^2).
template <typename T>
void sqdist_rows_direct(const T* x, T* d2, int64_t N, int64_t D, int64_t r0, int64_t r1, int64_t c0 = 0,
                        int64_t c1 = -1) {
  if (c1 < 0) c1 = N;
  const T d = T(D);
  for (int64_t i = r0; i < r1; ++i) {
    const T* xi = x + i * D;
    for (int64_t j = c0; j < c1; ++j) {
      const T* xj = x + j * D;
      T s = T(0);
      for (int64_t c = 0; c < D; ++c) {
        const T diff = xi[c] - xj[c];
        s += diff * diff;
      }
      d2[i * N + j] = s / d;
    }
  }
}

// Rows [r0, r1) of the symmetric (N, N) matrix d2 above the diagonal, from its lower part:
// d2[i, j] = d2[j, i] for j > i. Tiles of kBlock source rows keep the reads (a short
// segment of each source row) in a few cache lines that every row of the range reuses.
template <typename T>
void mirror_upper_rows(T* d2, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t j0 = r0 + 1; j0 < N; j0 += kBlock) {
    const int64_t j1 = std::min(j0 + kBlock, N);
    for (int64_t i = r0; i < std::min(r1, j1 - 1); ++i) {
      T* row = d2 + i * N;
      for (int64_t j = std::max(j0, i + 1); j < j1; ++j) row[j] = d2[j * N + i];
    }
  }
}

// Sorted insertion of v into buf[0..n) (n < capacity); returns the new size.
template <typename T>
inline int64_t sorted_insert(T* buf, int32_t* idx, int64_t n, T v, int32_t j) {
  int64_t p = n;
  while (p > 0 && buf[p - 1] > v) {
    buf[p] = buf[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  buf[p] = v;
  idx[p] = j;
  return n + 1;
}


constexpr int64_t kSmallK = 64;  // up to this k the neighbours are kept in a sorted buffer

// An upper bound on the k-th smallest of row[0..N) (k <= kBlock <= N): the k-th smallest of
// the kBlock lane minima (lane c: the columns j = c mod kBlock), as k distinct columns lie at
// or below it. On rows without structure it is about the (k+1)-th smallest value, so a scan
// for values <= bound looks at a few blocks one by one where a running threshold looks at
// most of them (a running k-th smallest is loose until many columns have been seen).
template <typename T>
T lane_bound(const T* row, int64_t N, int64_t k) {
  T lane[kBlock];
  for (int64_t c = 0; c < kBlock; ++c) lane[c] = std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kBlock <= N; j += kBlock)
#pragma omp simd
    for (int64_t c = 0; c < kBlock; ++c) lane[c] = row[j + c] < lane[c] ? row[j + c] : lane[c];
  for (int64_t c = 0; j + c < N; ++c) lane[c] = row[j + c] < lane[c] ? row[j + c] : lane[c];
  // the k smallest lane minima by insertion (cheaper than std::nth_element at this size)
  T buf[kBlock];
  int64_t n = 0;
  for (int64_t c = 0; c < kBlock; ++c) {
    const T v = lane[c];
    if (n == k && !(v < buf[k - 1])) continue;
    int64_t p = n < k ? n++ : k - 1;
    for (; p > 0 && buf[p - 1] > v; --p) buf[p] = buf[p - 1];
    buf[p] = v;
  }
  return buf[k - 1];
}

// The k smallest of row[0..N) among the values <= bound into buf/idx, ascending, ties in
// index order (the order a full sorted scan gives). Returns how many were found: k unless
// the row holds NaN (callers then fall back to the full scan).
template <typename T>
int64_t smallest_up_to(const T* row, int64_t N, int64_t k, T bound, T* buf, int32_t* idx) {
  int64_t filled = 0, j = 0;
  auto take = [&](int64_t jj) {
    const T v = row[jj];
    if (!(v <= bound)) return;
    if (filled < k)
      filled = sorted_insert(buf, idx, filled, v, static_cast<int32_t>(jj));
    else if (v < buf[k - 1])
      sorted_insert(buf, idx, k - 1, v, static_cast<int32_t>(jj));
  };
  for (; j + kBlock <= N; j += kBlock) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t c = 0; c < kBlock; ++c) any |= row[j + c] <= bound;
    if (any)
      for (int64_t c = 0; c < kBlock; ++c) take(j + c);
  }
  for (; j < N; ++j) take(j);
  return filled;
}

inline int64_t effective_k(int64_t k, int64_t n_valid) { return std::max<int64_t>(1, std::min(k, n_valid)); }

// density_i = exp(-mean of the k_eff smallest d2[i, j] over valid j), k_eff = min(k, #valid).
// The k smallest are summed in ascending order. `scratch` holds N values (large k only).
// With `knn` (rows x k_eff) and `kth` (rows), the neighbours' indices and the k-th smallest
// distance are kept for delta_rows (only when k_eff <= kSmallK).
template <typename T>
void knn_density_rows(const T* d2, const bool* valid, int64_t N, int64_t k, int64_t n_valid, T* density,
                      int64_t r0, int64_t r1, T* scratch, int32_t* knn = nullptr, T* kth = nullptr) {
  const int64_t k_eff = effective_k(k, n_valid);
  constexpr int64_t kSmall = kSmallK;
  T buf[kSmall + 1];
  int32_t ibuf[kSmall + 1];
  for (int64_t i = r0; i < r1; ++i) {
    if (!is_valid(valid, i)) {
      density[i] = T(0);
      continue;
    }
    const T* row = d2 + i * N;
    T sum = T(0);
    const bool by_bound = k_eff <= kBlock && valid == nullptr && N >= kBlock &&
                          smallest_up_to(row, N, k_eff, lane_bound(row, N, k_eff), buf, ibuf) == k_eff;
    if (k_eff <= kSmall && !by_bound) {
      // buf holds the k_eff smallest values seen so far, ascending
      int64_t filled = 0, j = 0;
      for (; j < N && filled < k_eff; ++j)
        if (is_valid(valid, j)) filled = sorted_insert(buf, ibuf, filled, row[j], static_cast<int32_t>(j));
      auto offer = [&](int64_t jj) {
        const T v = row[jj];
        if (v < buf[k_eff - 1]) sorted_insert(buf, ibuf, k_eff - 1, v, static_cast<int32_t>(jj));
      };
      if (valid == nullptr) {
        for (; j + kBlock <= N; j += kBlock) {
          const T thr = buf[k_eff - 1];
          int any = 0;
          for (int64_t c = 0; c < kBlock; ++c) any |= row[j + c] < thr;
          if (any)
            for (int64_t c = 0; c < kBlock; ++c) offer(j + c);
        }
      }
      for (; j < N; ++j)
        if (is_valid(valid, j)) offer(j);
    }
    if (k_eff <= kSmall) {
      for (int64_t t = 0; t < k_eff; ++t) sum += buf[t];
      if (knn != nullptr) {
        std::copy(ibuf, ibuf + k_eff, knn + (i - r0) * k_eff);
        kth[i - r0] = buf[k_eff - 1];
      }
    } else {
      int64_t m = 0;
      for (int64_t j = 0; j < N; ++j)
        if (is_valid(valid, j)) scratch[m++] = row[j];
      std::partial_sort(scratch, scratch + k_eff, scratch + m);
      for (int64_t t = 0; t < k_eff; ++t) sum += scratch[t];
    }
    density[i] = density_from_sum(sum, k_eff);
  }
}

// delta_i = sqrt(min d2[i, j]) over valid denser j (ties: smaller j), parent_i = that j;
// the densest point takes its row maximum and itself. Invalid points: 0 and i.
// Given the k nearest neighbours of each row (knn_density_rows), most rows are settled
// there: every valid point closer than the k-th distance is among them, so a denser
// neighbour strictly closer than that distance is the exact answer; other rows are scanned.
template <typename T>
void delta_rows(const T* d2, const T* density, const bool* valid, int64_t N, T* delta, int64_t* parent,
                int64_t r0, int64_t r1, const int32_t* knn = nullptr, const T* kth = nullptr, int64_t k_eff = 0) {
  using std::sqrt;
  for (int64_t i = r0; i < r1; ++i) {
    if (!is_valid(valid, i)) {
      delta[i] = T(0);
      parent[i] = i;
      continue;
    }
    const T* row = d2 + i * N;
    const T di = density[i];
    if (knn != nullptr) {
      const int32_t* nb = knn + (i - r0) * k_eff;
      T nbest = std::numeric_limits<T>::infinity();
      int64_t nj = -1;
      for (int64_t t = 0; t < k_eff; ++t) {
        const int64_t j = nb[t];
        const T v = row[j];
        if (is_denser(density[j], j, di, i) && (v < nbest || (v == nbest && j < nj))) {
          nbest = v;
          nj = j;
        }
      }
      if (nj >= 0 && nbest < kth[i - r0]) {
        delta[i] = sqrt(nbest);
        parent[i] = nj;
        continue;
      }
    }
    T best = std::numeric_limits<T>::infinity();
    int64_t best_j = -1;
    T row_max = T(0);
    // ascending j with a strict < keeps the smaller index on ties
    auto offer = [&](int64_t j) {
      const T v = row[j];
      if (v < best && is_denser(density[j], j, di, i)) {
        best = v;
        best_j = j;
      }
    };
    int64_t j = 0;
    if (valid == nullptr) {
      T lane_max[kBlock] = {};
      for (; j + kBlock <= N; j += kBlock) {
        int any = 0;
        for (int64_t c = 0; c < kBlock; ++c) {
          const T v = row[j + c];
          lane_max[c] = v > lane_max[c] ? v : lane_max[c];
          any |= v < best;
        }
        if (any)
          for (int64_t c = 0; c < kBlock; ++c) offer(j + c);
      }
      for (int64_t c = 0; c < kBlock; ++c) row_max = lane_max[c] > row_max ? lane_max[c] : row_max;
    }
    for (; j < N; ++j) {
      if (!is_valid(valid, j)) continue;
      row_max = row[j] > row_max ? row[j] : row_max;
      offer(j);
    }
    if (best_j >= 0) {
      delta[i] = sqrt(best);
      parent[i] = best_j;
    } else {
      delta[i] = sqrt(row_max);
      parent[i] = i;
    }
  }
}

// The scope-masking loop for one image (SPEC 2.3). `scope` is N values of scratch.
// masks (T+1, N), seeds (T) and seed_d2 (T, N) are fully written (rows past the last
// cluster zeroed once at the end, not before). Returns num_clusters.
template <typename T>
int64_t scope_loop(const T* d2, const T* score, const bool* valid, int64_t N, int64_t max_clusters,
                   double bandwidth, bool hard, double min_scope, bool has_threshold, double threshold,
                   T* masks, int64_t* seeds, T* seed_d2, T* scope) {
  const T bw2 = T(bandwidth * bandwidth);
  const T inv_bw2 = T(1.0 / (bandwidth * bandwidth));
  const T ms = T(min_scope);
  const T thr = T(threshold);
  for (int64_t i = 0; i < N; ++i) scope[i] = is_valid(valid, i) ? T(1) : T(0);
  int64_t n = 0;
  for (; n < max_clusters; ++n) {
    int64_t m = -1;
    T best = T(0);
    for (int64_t i = 0; i < N; ++i) {
      if (!is_valid(valid, i) || !(scope[i] > ms)) continue;
      const T s = score[i] * scope[i];
      if (m < 0 || s > best) {
        best = s;
        m = i;
      }
    }
    if (m < 0) break;
    if (has_threshold && !(best >= thr)) break;
    const T* row = d2 + m * N;
    T* mrow = masks + n * N;
    T* srow = seed_d2 + n * N;
    for (int64_t i = 0; i < N; ++i) {
      srow[i] = row[i];
      mrow[i] = scope_step(scope[i], alpha_value(row[i], hard, bw2, inv_bw2));
    }
    seeds[n] = m;
  }
  std::copy(scope, scope + N, masks + n * N);
  std::fill(masks + (n + 1) * N, masks + (max_clusters + 1) * N, T(0));
  std::fill(seed_d2 + n * N, seed_d2 + max_clusters * N, T(0));
  std::fill(seeds + n, seeds + max_clusters, int64_t(-1));
  return n;
}

// Backward of the scope loop for points [r0, r1) of one image: gd2 (T, N) receives
// d loss / d d2(i, seed_t) (zero for t >= n).
template <typename T>
void scope_backward_rows(const T* grad_masks, const T* seed_d2, const bool* valid, int64_t N, int64_t max_clusters,
                         int64_t n, double bandwidth, bool hard, T* gd2, int64_t r0, int64_t r1) {
  const T bw2 = T(bandwidth * bandwidth);
  const T inv_bw2 = T(1.0 / (bandwidth * bandwidth));
  for (int64_t i = r0; i < r1; ++i) {
    scope_backward_point(grad_masks + i, seed_d2 + i, gd2 + i, N, n, is_valid(valid, i), hard, bw2, inv_bw2);
    for (int64_t t = n; t < max_clusters; ++t) gd2[t * N + i] = T(0);
  }
}

}  // namespace core
}  // namespace setok
