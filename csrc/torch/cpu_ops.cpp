// CPU kernels of the setok ops: argument checks, one Gram GEMM (or direct differences
// for small D), then the core row kernels under at::parallel_for. No Python loops, no
// per-image launches: every pass covers all images x rows at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "core/dpc_cpu.h"
#include "torch/common.h"

namespace setok {
namespace {

using at::Tensor;
using c10::optional;

// Row grain for parallel_for: rows are O(N) work each.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

const bool* valid_ptr(const optional<Tensor>& v, int64_t b, int64_t N) {
  return v.has_value() ? v->data_ptr<bool>() + b * N : nullptr;
}

// (B, N, N) squared distances, computed in place over the Gram matrix.
Tensor sqdist_cpu(const Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  if (D <= core::kDirectMaxD) {
    Tensor d2 = at::empty({B, N, N}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_sqdist_direct", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* dp = d2.data_ptr<scalar_t>();
      at::parallel_for(0, B * N, row_grain(N * D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / N, i = r % N;
          core::sqdist_rows_direct(xp + b * N * D, dp + b * N * N, N, D, i, i + 1);
        }
      });
    });
    return d2;
  }
  Tensor g = at::bmm(x, x.transpose(1, 2));  // the one GEMM of the pipeline
  Tensor sq = g.diagonal(0, 1, 2).contiguous();  // (B, N), read before rows are rewritten
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_sqdist_gram", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* sp = sq.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, i = r % N;
        core::sqdist_rows_from_gram(gp + b * N * N, sp + b * N, N, D, i, i + 1);
      }
    });
  });
  return g;
}

std::vector<int64_t> valid_counts(const optional<Tensor>& valid, int64_t B, int64_t N) {
  std::vector<int64_t> n(B, N);
  if (valid.has_value())
    for (int64_t b = 0; b < B; ++b) n[b] = core::count_valid(valid->data_ptr<bool>() + b * N, N);
  return n;
}

Tensor density_cpu(const Tensor& d2, int64_t k, const optional<Tensor>& valid) {
  const int64_t B = d2.size(0), N = d2.size(1);
  Tensor density = at::empty({B, N}, d2.options());
  const auto nv = valid_counts(valid, B, N);
  AT_DISPATCH_FLOATING_TYPES(d2.scalar_type(), "setok_knn_density", [&] {
    const scalar_t* dp = d2.data_ptr<scalar_t>();
    scalar_t* out = density.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, row_grain(N), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(k > 64 ? N : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, i = r % N;
        core::knn_density_rows(dp + b * N * N, valid_ptr(valid, b, N), N, k, nv[b], out + b * N, i, i + 1,
                               scratch.data());
      }
    });
  });
  return density;
}

std::tuple<Tensor, Tensor> delta_cpu(const Tensor& d2, const Tensor& density, const optional<Tensor>& valid) {
  const int64_t B = d2.size(0), N = d2.size(1);
  Tensor delta = at::empty({B, N}, d2.options());
  Tensor parent = at::empty({B, N}, d2.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(d2.scalar_type(), "setok_delta", [&] {
    const scalar_t* dp = d2.data_ptr<scalar_t>();
    const scalar_t* den = density.data_ptr<scalar_t>();
    scalar_t* dl = delta.data_ptr<scalar_t>();
    int64_t* pa = parent.data_ptr<int64_t>();
    at::parallel_for(0, B * N, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, i = r % N;
        core::delta_rows(dp + b * N * N, den + b * N, valid_ptr(valid, b, N), N, dl + b * N, pa + b * N, i,
                         i + 1);
      }
    });
  });
  return {delta, parent};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scope_cpu(const Tensor& d2, const Tensor& score, double bandwidth,
                                                     int64_t T, bool hard, double min_scope,
                                                     optional<double> threshold, const optional<Tensor>& valid) {
  const int64_t B = d2.size(0), N = d2.size(1);
  Tensor masks = at::empty({B, T + 1, N}, d2.options());
  Tensor seeds = at::empty({B, T}, d2.options().dtype(at::kLong));
  Tensor num = at::empty({B}, d2.options().dtype(at::kLong));
  Tensor seed_d2 = at::empty({B, T, N}, d2.options());
  AT_DISPATCH_FLOATING_TYPES(d2.scalar_type(), "setok_scope", [&] {
    const scalar_t* dp = d2.data_ptr<scalar_t>();
    const scalar_t* sc = score.data_ptr<scalar_t>();
    scalar_t* mp = masks.data_ptr<scalar_t>();
    int64_t* sp = seeds.data_ptr<int64_t>();
    int64_t* np = num.data_ptr<int64_t>();
    scalar_t* sdp = seed_d2.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scope(N);
      for (int64_t b = begin; b < end; ++b) {
        np[b] = core::scope_loop(dp + b * N * N, sc + b * N, valid_ptr(valid, b, N), N, T, bandwidth, hard,
                                 min_scope, threshold.has_value(), threshold.value_or(0.0),
                                 mp + b * (T + 1) * N, sp + b * T, sdp + b * T * N, scope.data());
      }
    });
  });
  return {masks, seeds, num, seed_d2};
}

// ---- ops ----------------------------------------------------------------------------

Tensor knn_density(const Tensor& x, int64_t k, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  auto valid = contiguous_valid(valid_in);
  return density_cpu(sqdist_cpu(x), k, valid);
}

std::tuple<Tensor, Tensor> delta_distance(const Tensor& x, const Tensor& density, const optional<Tensor>& valid_in) {
  check_x(x);
  check_bn("density", density, x);
  check_valid(valid_in, x);
  auto valid = contiguous_valid(valid_in);
  return delta_cpu(sqdist_cpu(x), density.to(x.scalar_type()).contiguous(), valid);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dpc_scores(const Tensor& x, int64_t k, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  auto valid = contiguous_valid(valid_in);
  Tensor d2 = sqdist_cpu(x);
  Tensor density = density_cpu(d2, k, valid);
  auto [delta, parent] = delta_cpu(d2, density, valid);
  return {density, delta, parent, density * delta};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scope_cluster(const Tensor& x, const Tensor& score, double bandwidth,
                                                         int64_t max_clusters, bool hard, double min_scope,
                                                         optional<double> score_threshold,
                                                         const optional<Tensor>& valid_in) {
  check_x(x);
  check_bn("score", score, x);
  check_valid(valid_in, x);
  check_scope_args(bandwidth, max_clusters, min_scope);
  auto valid = contiguous_valid(valid_in);
  return scope_cpu(sqdist_cpu(x), score.to(x.scalar_type()).contiguous(), bandwidth, max_clusters, hard, min_scope,
                   score_threshold, valid);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dpc_cluster(
    const Tensor& x, int64_t k, double bandwidth, int64_t max_clusters, bool hard, double min_scope,
    optional<double> score_threshold, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  check_scope_args(bandwidth, max_clusters, min_scope);
  auto valid = contiguous_valid(valid_in);
  Tensor d2 = sqdist_cpu(x);
  Tensor density = density_cpu(d2, k, valid);
  auto [delta, parent] = delta_cpu(d2, density, valid);
  Tensor score = density * delta;
  auto [masks, seeds, num, seed_d2] = scope_cpu(d2, score, bandwidth, max_clusters, hard, min_scope,
                                                score_threshold, valid);
  return {density, delta, parent, score, masks, seeds, num, seed_d2};
}

Tensor scope_cluster_backward(const Tensor& grad_masks_in, const Tensor& x, const Tensor& seeds,
                              const Tensor& seed_d2, const optional<Tensor>& valid_in, const Tensor& num,
                              double bandwidth, bool hard) {
  check_x(x);
  const int64_t B = x.size(0), N = x.size(1), T = seeds.size(1);
  TORCH_CHECK(grad_masks_in.dim() == 3 && grad_masks_in.size(0) == B && grad_masks_in.size(1) == T + 1 &&
                  grad_masks_in.size(2) == N,
              "setok: grad_masks must have shape (B, T+1, N), got ", shape_str(grad_masks_in));
  auto valid = contiguous_valid(valid_in);
  Tensor grad_masks = grad_masks_in.to(x.scalar_type()).contiguous();
  Tensor sd2 = seed_d2.contiguous();
  Tensor n = num.contiguous();
  Tensor gd2 = at::empty({B, T, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_scope_backward", [&] {
    const scalar_t* gm = grad_masks.data_ptr<scalar_t>();
    const scalar_t* sp = sd2.data_ptr<scalar_t>();
    const int64_t* np = n.data_ptr<int64_t>();
    scalar_t* out = gd2.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, row_grain(T + 1), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, i = r % N;
        core::scope_backward_rows(gm + b * (T + 1) * N, sp + b * T * N, valid_ptr(valid, b, N), N, T, np[b],
                                  bandwidth, hard, out + b * T * N, i, i + 1);
      }
    });
  });
  return scope_backward_from_gd2(gd2, x, seeds);
}

}  // namespace
}  // namespace setok

TORCH_LIBRARY_IMPL(setok, CPU, m) {
  m.impl("knn_density", &setok::knn_density);
  m.impl("delta_distance", &setok::delta_distance);
  m.impl("dpc_scores", &setok::dpc_scores);
  m.impl("scope_cluster", &setok::scope_cluster);
  m.impl("dpc_cluster", &setok::dpc_cluster);
  m.impl("scope_cluster_backward", &setok::scope_cluster_backward);
}
