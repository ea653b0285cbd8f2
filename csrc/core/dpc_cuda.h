// CUDA launchers of the SeTok clustering kernels on raw device pointers (no torch
// headers). All launch on `stream`, never synchronize, and expect contiguous layouts:
//   x (B, N, D), d2 (B, N, N), valid (B, N) or nullptr, density/delta/score (B, N),
//   masks (B, T+1, N) zeroed, seeds (B, T) filled with -1, seed_d2 (B, T, N) zeroed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace setok {
namespace cuda {

// Direct differences (small D): d2[b, i, j] = |x_i - x_j|^2 / D.
template <typename T>
void sqdist_direct(const T* x, T* d2, int64_t B, int64_t N, int64_t D, cudaStream_t stream);

// In place over a Gram matrix g = x x^T (B, N, N): squared distances; `sq` is scratch (B, N).
template <typename T>
void sqdist_from_gram(T* g, T* sq, int64_t B, int64_t N, int64_t D, cudaStream_t stream);

template <typename T>
void knn_density(const T* d2, const bool* valid, int64_t B, int64_t N, int64_t k, T* density, cudaStream_t stream);

template <typename T>
void delta_distance(const T* d2, const T* density, const bool* valid, int64_t B, int64_t N, T* delta,
                    int64_t* parent, cudaStream_t stream);

// `scope` is scratch (B, N).
template <typename T>
void scope_cluster(const T* d2, const T* score, const bool* valid, int64_t B, int64_t N, int64_t T_,
                   double bandwidth, bool hard, double min_scope, bool has_threshold, double threshold, T* masks,
                   int64_t* seeds, int64_t* num_clusters, T* seed_d2, T* scope, cudaStream_t stream);

// gd2 (B, T, N) zeroed: d loss / d d2(i, seed_t).
template <typename T>
void scope_backward(const T* grad_masks, const T* seed_d2, const bool* valid, const int64_t* num_clusters, int64_t B,
                    int64_t N, int64_t T_, double bandwidth, bool hard, T* gd2, cudaStream_t stream);

}  // namespace cuda
}  // namespace setok
