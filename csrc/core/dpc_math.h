// Per-element math of the SeTok clustering ops (SPEC section 2), shared by the CPU and
// CUDA kernels so that both backends compute every value the same way. Plain C++ on
// scalars: no torch headers, usable from host and device code.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SETOK_HD __host__ __device__ __forceinline__
#else
#define SETOK_HD inline
#endif

namespace setok {
namespace core {

// Up to this feature width, distances come from differences (exact for duplicate points);
// above it from the Gram matrix (one GEMM). Must equal reference.DIRECT_MAX_D.
constexpr int64_t kDirectMaxD = 32;

// dist(i, j)^2 = max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0) / D, evaluated in the same order as
// the reference so both produce the same bits from the same Gram entries.
template <typename T>
SETOK_HD T sqdist_times_d_from_gram(T sq_i, T sq_j, T g_ij) {
  T v = (sq_i + sq_j) - T(2) * g_ij;
  return v > T(0) ? v : T(0);
}

template <typename T>
SETOK_HD T sqdist_from_gram(T sq_i, T sq_j, T g_ij, T D) {
  return sqdist_times_d_from_gram(sq_i, sq_j, g_ij) / D;
}

// For D a power of two, 1/D is exact and v * (1/D) is the same correctly rounded number as
// v / D (both round the same real), so kernels may multiply instead of divide: same bits.
inline bool exact_reciprocal(int64_t D) { return D > 0 && (D & (D - 1)) == 0; }

// j is denser than i iff density_j > density_i, or they are equal and j < i.
template <typename T>
SETOK_HD bool is_denser(T dens_j, int64_t j, T dens_i, int64_t i) {
  return dens_j > dens_i || (dens_j == dens_i && j < i);
}

// density = exp(-mean of the k smallest squared distances)
template <typename T>
SETOK_HD T density_from_sum(T sum, int64_t k_eff) {
  using std::exp;
  return exp(-(sum / T(k_eff)));
}

// Soft kernel alpha = 2^(-d2 / bw^2), from the squared distance so its gradient exists at 0.
template <typename T>
SETOK_HD T alpha_soft(T d2, T inv_bw2) {
  using std::exp2;
  return exp2(-(d2 * inv_bw2));
}

// d alpha_soft / d d2
template <typename T>
SETOK_HD T alpha_soft_grad(T d2, T inv_bw2) {
  using std::exp2;
  return -T(0.69314718055994530942) * inv_bw2 * exp2(-(d2 * inv_bw2));
}

// Forward alpha: hard = 1 if dist <= bandwidth (compared on squares), else the soft kernel.
template <typename T>
SETOK_HD T alpha_value(T d2, bool hard, T bw2, T inv_bw2) {
  return hard ? (d2 <= bw2 ? T(1) : T(0)) : alpha_soft(d2, inv_bw2);
}

// One step of the scope loop for one point: mask_t = scope * alpha, scope *= (1 - alpha).
template <typename T>
SETOK_HD T scope_step(T& scope, T alpha) {
  T m = scope * alpha;
  scope = scope * (T(1) - alpha);
  return m;
}

// Reverse-mode of the scope recursion for one point i (straight-through in hard mode).
//   gm:  grad of masks, rows 0..n (stride `stride`), for this point
//   sd2: squared distance of the point to seed t, rows 0..n-1
//   out: on return, d loss / d d2(i, seed_t) for t < n; used as scratch for the scope
//        values s_t on the way (so no per-point buffer is needed)
template <typename T>
SETOK_HD void scope_backward_point(const T* gm, const T* sd2, T* out, int64_t stride, int64_t n, bool valid,
                                   bool hard, T bw2, T inv_bw2) {
  T s = valid ? T(1) : T(0);
  for (int64_t t = 0; t < n; ++t) {
    out[t * stride] = s;
    const T a = alpha_value(sd2[t * stride], hard, bw2, inv_bw2);
    s = s * (T(1) - a);
  }
  T gs = gm[n * stride];  // the remainder row is the final scope
  for (int64_t t = n - 1; t >= 0; --t) {
    const T st = out[t * stride];
    const T d2 = sd2[t * stride];
    const T a = alpha_value(d2, hard, bw2, inv_bw2);
    const T g = gm[t * stride];
    const T ga = (g - gs) * st;
    gs = g * a + gs * (T(1) - a);
    out[t * stride] = ga * alpha_soft_grad(d2, inv_bw2);
  }
}

}  // namespace core
}  // namespace setok
